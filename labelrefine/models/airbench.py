"""An airbench-style backbone: a frozen patch-whitening layer and three VGG-like conv groups.

The design follows airbench94 (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv 2404.00498; github.com/KellerJordan/cifar10-airbench), which itself builds on hlb-CIFAR10
(github.com/tysam-code/hlb-CIFAR10). Written here from the description, not copied; see
``docs/research/fast-cifar.md`` for what each piece buys according to those sources.

Layout of :class:`AirbenchNet` (``width=w``, ``expand=e``, ``C`` input channels, ``k=2``)::

    whiten   k×k conv, no padding, C -> 2·C·k² channels. Weight: a buffer (frozen), set by
             whiten_init() to ± the eigenvectors of the training patches' covariance, scaled
             by 1/sqrt(eigenvalue + eps). Bias: trainable (airbench trains it 3 epochs, then
             freezes it: a recipe decision, ``model.whiten.bias.requires_grad_(False)``).
    GELU
    group1   conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU       w channels
    group2   the same                                                       e·w channels
    group3   the same                                                       e·w channels
    global max pool, times ``feature_scale`` (1/9)  ->  features (e·w)  ->  fc

``width=64, expand=4`` is airbench94 (64/256/256 channels, 1.97 M trainable parameters with
10 classes); ``width=64, expand=2`` is airbench93's 64/128/128. On 32×32 input the whitening
conv gives 31×31 maps and the pools 15, 7, 3, as in airbench; a pool is skipped along a side
that is already 1 pixel, so any input of at least 8×8 works (8×8: 7, 3, 1, 1) and the final
pool is global whatever the size.

Other choices, as in airbench: BatchNorm scales are fixed at 1 (only the shift is learned; the
fixed scale is no parameter at all here, so every parameter of the model is trainable), running
statistics with momentum 0.4 (PyTorch's convention; airbench writes it as 0.6), no conv biases
after the whitening layer, and "partial identity" (dirac) initialisation: the first
``min(c_in, c_out)`` output filters of every 3×3 conv start as the identity on the input
channels, the rest keep PyTorch's default initialisation. One departure: BN ``eps`` is
PyTorch's 1e-5 rather than airbench's 1e-12, so that a channel with no variance (tiny images,
1×1 maps) cannot blow up. The linear head is the base class's ``fc`` (with a bias; airbench's
has none), and the ``1/9`` logit scale of airbench is applied to the features instead, which is
the same function and the same gradient dynamics for the head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .backbones import Classifier, register_backbone

__all__ = ["AirbenchNet", "PatchWhitening", "airbench", "patch_covariance", "whiten_init"]


class PatchWhitening(nn.Module):
    """A ``k×k`` stride-1 convolution without padding whose weight is a buffer (never trained).

    ``weight`` has shape ``(2·d, C, k, k)`` with ``d = C·k²``; before :func:`whiten_init` it is
    the whitening of already-white data: the ``d`` unit basis vectors of the patch space and
    their negatives (each output copies one pixel of the patch, with either sign), so the layer
    loses no information whether or not it has been fitted. ``bias`` is a trainable parameter.
    """

    def __init__(self, in_channels: int, kernel_size: int = 2):
        super().__init__()
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        d = in_channels * kernel_size * kernel_size
        self.out_channels = 2 * d
        eye = torch.eye(d).view(d, in_channels, kernel_size, kernel_size)
        self.register_buffer("weight", torch.cat([eye, -eye]))
        self.bias = nn.Parameter(torch.zeros(2 * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size} (frozen weight)"


class BiasOnlyBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the scale fixed at 1 and a learned shift (``bias``) only.

    The fixed scale is not stored at all (``weight`` is ``None``), so optimizers, weight decay
    and EMA never see it.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.4, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(num_features))


def _halve(x: torch.Tensor) -> torch.Tensor:
    """2×2 max pool (floor), skipping a side that is already 1 pixel."""
    h, w = x.shape[-2:]
    kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
    if kh == kw == 1:
        return x
    return F.max_pool2d(x, (kh, kw))


def _dirac_conv3x3(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)  # PyTorch's default init
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


class ConvGroup(nn.Module):
    """conv3x3 -> 2×2 max pool -> BN -> GELU -> conv3x3 -> BN -> GELU (pool before BN: cheaper)."""

    def __init__(self, cin: int, cout: int, *, bn_momentum: float):
        super().__init__()
        self.conv1 = _dirac_conv3x3(cin, cout)
        self.norm1 = BiasOnlyBatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = _dirac_conv3x3(cout, cout)
        self.norm2 = BiasOnlyBatchNorm2d(cout, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(_halve(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(Classifier):
    """The airbench94-style network (see the module docstring for the layout).

    Args:
        in_channels: image channels (1 or 3; any positive number works).
        num_classes: outputs of ``fc``.
        width: channels of the first conv group; the other two have ``expand * width``.
        expand: width multiplier of groups 2 and 3 (4: airbench94, 2: airbench93).
        whiten_kernel: patch size ``k`` of the whitening layer (2 in airbench).
        bn_momentum: BatchNorm running-statistics momentum, PyTorch convention (0.4).
        feature_scale: multiplies the pooled features (airbench's 1/9 logit scale).

    Attributes:
        width: the ``width`` option, as given.
        whiten: the :class:`PatchWhitening` layer; fit it with :func:`whiten_init`.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 64, expand: int = 4,
                 whiten_kernel: int = 2, bn_momentum: float = 0.4, feature_scale: float = 1 / 9):
        super().__init__()
        self.width = width
        self.expand = expand
        self.feature_scale = float(feature_scale)
        self.whiten = PatchWhitening(in_channels, whiten_kernel)
        widths = [width, expand * width, expand * width]
        groups, cin = [], self.whiten.out_channels
        for cout in widths:
            groups.append(ConvGroup(cin, cout, bn_momentum=bn_momentum))
            cin = cout
        self.groups = nn.Sequential(*groups)
        self._init_head(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return torch.amax(x, dim=(2, 3)) * self.feature_scale

    def norm_biases(self) -> Iterator[nn.Parameter]:
        """The BatchNorm shifts: the parameters airbench trains with a 64× larger learning rate."""
        for m in self.modules():
            if isinstance(m, BiasOnlyBatchNorm2d):
                yield m.bias


@register_backbone("airbench")
def airbench(*, in_channels: int, num_classes: int, width: int = 64, expand: int = 4, whiten_kernel: int = 2,
             bn_momentum: float = 0.4, feature_scale: float = 1 / 9) -> Classifier:
    """airbench94-style VGG net: frozen patch whitening + 3 conv groups ``w, e·w, e·w``;
    ``width=64`` ≈ 1.97 M params (airbench94). Fit the whitening with ``whiten_init``."""
    for name, value in (("expand", expand), ("whiten_kernel", whiten_kernel)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"backbone airbench: {name} must be a positive integer, got {value!r}")
    if not 0.0 < float(bn_momentum) <= 1.0:
        raise UserError(f"backbone airbench: bn_momentum must be in (0, 1], got {bn_momentum!r}")
    return AirbenchNet(in_channels=in_channels, num_classes=num_classes, width=width, expand=expand,
                       whiten_kernel=whiten_kernel, bn_momentum=bn_momentum, feature_scale=feature_scale)


# --------------------------------------------------------------------------------------------
# Patch whitening


def _accum_dtype(device: torch.device) -> torch.dtype:
    # float64 where the device has it (the sums run over millions of patches); MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def patch_covariance(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], kernel_size: int, *,
                     chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(d,)`` and covariance ``(d, d)`` of every ``k×k`` patch (stride 1, no padding) of the
    normalised images ``(x / 255 - mean) / std``; ``d = C·k²`` in ``F.unfold``'s order (channel,
    row, column), which is the order of a conv weight's flattened filter.

    ``images`` is a uint8 ``(N, C, H, W)`` tensor on any device; the work runs there in chunks
    of ``chunk`` images (one unfold and one matrix product each, no per-sample loop). The
    returned tensors are float64 on the CPU (float32 on MPS).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise UserError(f"whitening needs a uint8 (N, C, H, W) image tensor, got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n < 1 or h < kernel_size or w < kernel_size:
        raise UserError(f"whitening needs at least one image of at least {kernel_size}×{kernel_size} pixels, "
                        f"got {tuple(images.shape)}")
    if len(mean) != c or len(std) != c:
        raise UserError(f"whitening: mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    device = images.device
    acc = _accum_dtype(device)
    m = torch.tensor([float(v) for v in mean], device=device).view(1, c, 1, 1)
    s = torch.tensor([float(v) for v in std], device=device).view(1, c, 1, 1)
    if bool((s <= 0).any()):
        raise UserError(f"whitening: std must be > 0 in every channel, got {tuple(std)}")
    d = c * kernel_size * kernel_size
    total = torch.zeros(d, dtype=acc, device=device)
    gram = torch.zeros(d, d, dtype=acc, device=device)
    count = 0
    for start in range(0, n, chunk):
        x = images[start:start + chunk].float().div_(255.0).sub_(m).div_(s)
        p = F.unfold(x, kernel_size).transpose(1, 2).reshape(-1, d).to(acc)  # (patches, d)
        total += p.sum(0)
        gram += p.T @ p
        count += p.shape[0]
    mu = total / count
    cov = gram / count - torch.outer(mu, mu)
    return mu.cpu(), ((cov + cov.T) / 2).cpu()


@torch.no_grad()
def whiten_init(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                eps: float = 5e-4, chunk: int = 512) -> torch.Tensor:
    """Set the whitening layer of an airbench model from a sample of training images.

    Computes the covariance ``Σ = V diag(λ) Vᵀ`` of all ``k×k`` patches of the normalised
    images and sets the layer's filters to ``± diag(1/sqrt(λ + eps)) Vᵀ`` (largest eigenvalue
    first) and its bias to ``∓`` the filters applied to the patch mean, so that the positive half
    of the outputs has, on this sample, mean 0 and covariance ``diag(λ / (λ + eps))`` ≈ identity.
    Eigenvector signs are made deterministic (largest-magnitude entry positive), so every rank
    of a data-parallel run computes the same filters from the same images.

    What it needs: ``images``, a uint8 ``(N, C, H, W)`` sample of the *training* images, not
    augmented (airbench uses 5,000 CIFAR images; a few thousand is plenty for a ``12×12``
    covariance), on the device that should do the work, and the same per-channel ``mean`` and
    ``std`` (in [0, 1] units, as from :func:`labelrefine.data.augment.channel_stats`) that
    normalise the model's input. It uses no labels, so it is safe with noisy labels; do not
    give it test images. ``eps`` is in units of the normalised pixel variance.

    Args:
        model: an :class:`AirbenchNet` (or a ``torch.compile`` wrapper of one), or a
            :class:`PatchWhitening` layer.
        images, mean, std: see above.
        eps: regulariser added to every eigenvalue (airbench: 5e-4).
        chunk: images per unfold (bounds the memory: ``chunk·H·W·d`` float64 values).

    Returns:
        The eigenvalues ``λ``, descending, float64 on the CPU (float32 from MPS).
    """
    model = getattr(model, "_orig_mod", model)
    layer = model if isinstance(model, PatchWhitening) else getattr(model, "whiten", None)
    if not isinstance(layer, PatchWhitening):
        raise TypeError(f"whiten_init needs an airbench model or a PatchWhitening layer, got {type(model).__name__}")
    if images.dim() == 4 and images.shape[1] != layer.in_channels:
        raise UserError(f"whitening: the model takes {layer.in_channels} channels, the images have {images.shape[1]}")
    if not eps > 0:
        raise UserError(f"whitening: eps must be > 0, got {eps!r}")
    k, c = layer.kernel_size, layer.in_channels
    mu, cov = patch_covariance(images, mean, std, k, chunk=chunk)
    evals, evecs = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
    evals, evecs = evals.flip(0), evecs.flip(1)
    pivot = evecs.abs().argmax(0)
    evecs = evecs * torch.sign(evecs[pivot, torch.arange(evecs.shape[1])]).unsqueeze(0)
    filters = evecs.T / torch.sqrt(evals.clamp_min(0) + eps).unsqueeze(1)  # (d, d): row i = filter i
    shift = -(filters @ mu)
    weight = torch.cat([filters, -filters]).view(-1, c, k, k)
    layer.weight.copy_(weight.to(layer.weight.dtype))
    layer.bias.copy_(torch.cat([shift, -shift]).to(layer.bias.dtype))
    return evals
