"""Image classifiers, registered by name and built with :func:`create_backbone`.

Every model is a :class:`Classifier`: ``features(x)`` maps a float batch ``(B, C, H, W)`` to
``(B, feat_dim)`` after a global pool (average; ``airbench``: max), so any input of at least
8×8 pixels works (8×8 digits, 28×28 X-rays, 32×32 CIFAR, 64+ px histopathology), and ``forward(x)`` is
``fc(features(x))``. SimCLR pretraining uses ``features`` and ``feat_dim`` to attach its
projection head; :meth:`Classifier.reset_classifier` swaps the linear head.

Registered backbones (see :func:`list_backbones`):

* ``preact_resnet18`` - PreAct ResNet-18 (He et al., ECCV 2016) with the CIFAR stem, as in
  the DivideMix reference (Li et al., ICLR 2020). About 11.2 M parameters. The paper profile.
* ``resnet18_cifar`` / ``resnet34_cifar`` - BasicBlock ResNet-18/34 (He et al., CVPR 2016)
  with the CIFAR stem and a ``width`` knob (channels ``w, 2w, 4w, 8w``). Width 16 gives about
  0.7 M parameters and trains at about 500 img/s on 2 CPU cores: the CPU profile.
* ``airbench`` - the airbench94-style VGG net (Jordan 2024, arXiv 2404.00498) in
  :mod:`labelrefine.models.airbench`: a frozen 2×2 patch-whitening conv (fit it with
  ``whiten_init``) and three conv groups ``w, 4w, 4w``; ``width=64`` ≈ 1.97 M parameters. Its
  features are a global *max* pool.
* ``tiny`` - two conv blocks, for tests.

The "CIFAR stem" is a 3×3 stride-1 convolution with no max-pool: the ImageNet stem (7×7
stride 2 + max-pool) would throw away 15/16 of a 32×32 image before the first block.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = [
    "BACKBONES",
    "Classifier",
    "create_backbone",
    "encoder_state",
    "is_classifier_key",
    "list_backbones",
    "register_backbone",
]

_T = TypeVar("_T")


class Classifier(nn.Module):
    """Base class: a feature extractor followed by one linear layer.

    Subclasses set ``self.feat_dim`` and implement :meth:`features`; this class owns ``fc``.

    Attributes:
        feat_dim: length of the feature vector returned by :meth:`features`.
        fc: ``nn.Linear(feat_dim, num_classes)``.
    """

    feat_dim: int
    fc: nn.Linear

    def _init_head(self, feat_dim: int, num_classes: int) -> None:
        self.feat_dim = feat_dim
        self.fc = nn.Linear(feat_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float -> ``(B, feat_dim)`` float, after a global (average or max) pool."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float -> logits ``(B, num_classes)``."""
        return self.fc(self.features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` with a freshly initialised ``Linear(feat_dim, num_classes)``.

        The new layer is created on the device and dtype of the old one.
        """
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}")
        old = self.fc
        self.fc = nn.Linear(self.feat_dim, num_classes, device=old.weight.device, dtype=old.weight.dtype)


def is_classifier_key(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to the classifier ``fc`` of a :class:`Classifier`."""
    return name.startswith("fc.")


def encoder_state(state: Mapping[str, _T]) -> dict[str, _T]:
    """The encoder part of a :class:`Classifier`'s ``state_dict()``: every entry but the
    classifier ``fc`` (what SimCLR trains and the SSL cache holds), in the same order; the
    values are not copied."""
    return {k: v for k, v in state.items() if not is_classifier_key(k)}


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, BN weight 1 / bias 0.

    The same scheme as torchvision's ResNet; the linear head keeps PyTorch's default.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed (or, in PreAct, preceded) by a BatchNorm that
    # supplies the shift, so a conv bias would be a redundant parameter.
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class StridedPointwise(nn.Conv2d):
    """A 1×1 convolution with stride ``s`` (no padding, no bias), computed as subsampling every
    ``s``-th row and column followed by a stride-1 1×1 convolution: the same function, the same
    parameter (``weight``, so the same state-dict keys as ``nn.Conv2d(..., stride=s)``).

    Why: torch 2.14's CPU kernel for the weight gradient of a *strided* 1×1 convolution crashes the
    process (segmentation fault or heap corruption) on channels_last input with an odd batch size
    and 2 threads (found with 8→16 channels, width-8 ResNet-18; tests/test_models.py keeps the
    reproduction). The stride-1 kernel is not affected, and the subsampling is free.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, kernel_size=1, stride=1, bias=False)
        self.step = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step > 1:
            x = x[:, :, :: self.step, :: self.step]
        return super().forward(x)


def _pool(x: torch.Tensor) -> torch.Tensor:
    # Global average pool: makes the classifier independent of the input size.
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------------------------
# ResNet (post-activation BasicBlock)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1×1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                StridedPointwise(cin, cout, stride), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetCifar(Classifier):
    """BasicBlock ResNet with the CIFAR stem (He et al., CVPR 2016, section 4.2 style stem).

    Args:
        layers: blocks per stage, ``[2, 2, 2, 2]`` for ResNet-18, ``[3, 4, 6, 3]`` for ResNet-34.
        in_channels: image channels (1 or 3).
        num_classes: outputs of ``fc``.
        width: channels of the first stage; the stages have ``width * (1, 2, 4, 8)``.
    """

    def __init__(self, layers: list[int], *, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = width
        for i, (n, cout) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self._init_head(widths[-1], num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.stages(self.stem(x)))


# --------------------------------------------------------------------------------------------
# PreAct ResNet (He et al., "Identity mappings in deep residual networks", ECCV 2016)


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus an identity (or 1×1 conv on the pre-activation) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = StridedPointwise(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input (as in the paper's design);
        # the identity shortcut passes x through untouched, keeping the clean identity path.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNetCifar(Classifier):
    """PreAct ResNet with the CIFAR stem, the DivideMix reference architecture.

    A final BN-ReLU follows the last stage (pre-activation blocks end without one).

    Args:
        layers: blocks per stage, ``[2, 2, 2, 2]`` for PreAct ResNet-18.
        in_channels: image channels (1 or 3).
        num_classes: outputs of ``fc``.
        width: channels of the first stage (64 in the reference).
    """

    def __init__(self, layers: list[int], *, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = _conv3x3(in_channels, width)
        stages: list[nn.Module] = []
        cin = width
        for i, (n, cout) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [PreActBlock(cin, cout, stride)] + [PreActBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[-1])
        self._init_head(widths[-1], num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return _pool(F.relu(self.bn(out), inplace=True))


# --------------------------------------------------------------------------------------------
# Tiny convnet for tests


class TinyConvNet(Classifier):
    """Two 3×3 conv-BN-ReLU blocks (``width``, ``2 * width`` channels; the second stride 2).

    With the default width 16 it has about 6 k parameters: a test epoch over a few hundred
    8×8 images takes milliseconds.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 16, group_norm: bool = False):
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.GroupNorm(4, c) if group_norm else nn.BatchNorm2d(c)

        self.body = nn.Sequential(
            _conv3x3(in_channels, width),
            norm(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, 2 * width, stride=2),
            norm(2 * width),
            nn.ReLU(inplace=True),
        )
        self._init_head(2 * width, num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.body(x))


# --------------------------------------------------------------------------------------------
# Registry

BACKBONES: dict[str, Callable[..., Classifier]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., Classifier]], Callable[..., Classifier]]:
    """Decorator: register a constructor ``(*, in_channels, num_classes, **kwargs) -> Classifier``."""

    def deco(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return deco


@register_backbone("preact_resnet18")
def preact_resnet18(*, in_channels: int, num_classes: int, width: int = 64) -> Classifier:
    """PreAct ResNet-18, CIFAR stem, widths 64-128-256-512 (≈11.2 M params); DivideMix's net."""
    return PreActResNetCifar([2, 2, 2, 2], in_channels=in_channels, num_classes=num_classes, width=width)


@register_backbone("resnet18_cifar")
def resnet18_cifar(*, in_channels: int, num_classes: int, width: int = 64) -> Classifier:
    """ResNet-18 [2,2,2,2], CIFAR stem; ``width=16`` ≈ 0.7 M params (the CPU profile)."""
    return ResNetCifar([2, 2, 2, 2], in_channels=in_channels, num_classes=num_classes, width=width)


@register_backbone("resnet34_cifar")
def resnet34_cifar(*, in_channels: int, num_classes: int, width: int = 64) -> Classifier:
    """ResNet-34 [3,4,6,3], CIFAR stem; ``width=64`` ≈ 21 M params."""
    return ResNetCifar([3, 4, 6, 3], in_channels=in_channels, num_classes=num_classes, width=width)


@register_backbone("tiny")
def tiny(*, in_channels: int, num_classes: int, width: int = 16) -> Classifier:
    """Two conv blocks and a global pool: for tests and smoke runs only."""
    return TinyConvNet(in_channels=in_channels, num_classes=num_classes, width=width)


@register_backbone("tiny_gn")
def tiny_gn(*, in_channels: int, num_classes: int, width: int = 16) -> Classifier:
    """``tiny`` with GroupNorm: no batch statistics, so data-parallel training can equal one process exactly."""
    return TinyConvNet(in_channels=in_channels, num_classes=num_classes, width=width, group_norm=True)


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`, sorted."""
    return sorted(BACKBONES)


def create_backbone(name: str, *, in_channels: int, num_classes: int, **kwargs: object) -> Classifier:
    """Build the registered backbone ``name``.

    Args:
        name: one of :func:`list_backbones`.
        in_channels: image channels, usually 1 (grayscale) or 3 (RGB).
        num_classes: number of outputs of the linear head.
        **kwargs: backbone options, e.g. ``width`` for the ResNets.

    Raises:
        UserError: unknown name, unknown option, or a non-positive size.
    """
    if name not in BACKBONES:
        raise UserError(f"backbone: unknown name {name!r}; known: {', '.join(list_backbones())}")
    for field, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{field} must be a positive integer, got {value!r}")
    ctor = BACKBONES[name]
    accepted = {
        p.name for p in inspect.signature(ctor).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    } - {"in_channels", "num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        known = ", ".join(sorted(accepted)) or "none"
        raise UserError(f"backbone {name!r}: unknown option {unknown[0]!r}; accepted: {known}")
    width = kwargs.get("width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise UserError(f"backbone width must be a positive integer, got {width!r}")
    return ctor(in_channels=in_channels, num_classes=num_classes, **kwargs)
