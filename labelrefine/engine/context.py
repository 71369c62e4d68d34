"""What a method runs on: the device, AMP, the training data on the device, batching, augmentation.

A :class:`Context` is built once per run. It holds:

* the training images as a uint8 ``N×C×H×W`` tensor *on the device*, and the noisy labels;
* batched, per-sample-random augmentation on the device (weak, strong, none);
* a seeded generator for batch order, model construction, autocast, and whole-set scoring.

Nothing here sees clean labels. The loop that uses it is :mod:`labelrefine.engine.trainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as ddp
from ..config import RunConfig
from ..data.augment import channel_stats, make_augment
from ..data.noise import resolve_noise_type
from ..errors import UserError
from ..models import create_backbone
from ..models.airbench import PatchWhitening, whiten_init


@dataclass(frozen=True)
class EpochSpec:
    """One entry of a method's schedule.

    Attributes:
        phase: ``ssl``, ``warmup``, ``refine``, ``finetune``, ``train``, ...
        iteration: refinement iteration (1-based; 0 outside refinement).
        epoch: epoch within the phase or iteration (1-based).
        supervised: evaluate on val/test after this epoch (False for SSL).
    """

    phase: str
    iteration: int
    epoch: int
    supervised: bool = True

    def as_dict(self) -> dict:
        return {"phase": self.phase, "iteration": self.iteration, "epoch": self.epoch}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'device': unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config key 'device': {name!r} requested but CUDA is not available")
    return dev


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, moved once: from host memory to CUDA through pinned (page-locked)
    memory with a non-blocking copy, so the transfer is a DMA that does not stall the host
    (PyTorch keeps the pinned staging block alive until the copy has finished). Anything else
    (CPU to CPU, already on the device, another accelerator) is a plain ``.to(device)``, which
    returns ``t`` itself when nothing needs to move.
    """
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    src = t if t.is_pinned() else t.pin_memory()
    return src.to(device, non_blocking=True)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` the module's forward in place (``nn.Module.compile``).

    In place rather than ``torch.compile(model)``: the module keeps its class, its attributes
    (``features``, ``fc``, ``feat_dim``) and its state-dict keys, so checkpoints, the SimCLR
    encoder cache and ``model.pt`` are the same with and without compilation. Only ``forward``
    (``model(x)``) is compiled; SimCLR's ``model.features`` runs eagerly.
    """
    model.compile()
    return model


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None = full precision)."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None  # CPU autocast is slower than fp32 on most CPUs
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _canonical_noise(cfg: RunConfig) -> RunConfig:
    """``cfg`` itself when ``data.noise`` is a canonical name, else a copy with the canonical name.

    The one place the methods' view of a noise alias is resolved. Not in config validation: that
    runs before the CLI claims the run directory and must not import torch (the noise registry does).
    """
    noise = resolve_noise_type(cfg.data.noise)
    if noise == cfg.data.noise:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, noise=noise))


class Context:
    """Everything a method needs, resident on the device. Built once per run.

    Args:
        cfg: the resolved run config. ``self.cfg`` has the canonical name of its noise type
            (:func:`~labelrefine.data.noise.resolve_noise_type`: ``asymmetric`` becomes ``pairflip``),
            so methods compare canonical names only.
        images: uint8 ``(N, C, H, W)`` training images (the split the method trains on).
        labels: int64 ``(N,)`` *noisy* training labels.
        num_classes: C.
        stats_images: images used for the normalisation statistics (default ``images``).
        device: where the data and models live.
        cache_dir: where the SSL encoder cache lives.
    """

    def __init__(
        self,
        cfg: RunConfig,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        *,
        device: torch.device,
        ssl_images: torch.Tensor | None = None,
        cache_dir: str | None = None,
        noise_rate: float = 0.0,
    ):
        self.cfg = _canonical_noise(cfg)
        self.device = device
        self.num_classes = num_classes
        self.cache_dir = cache_dir
        self.noise_rate = noise_rate  # the *requested* rate, which some baselines take as a hyperparameter
        self.y = to_device(labels, device)
        self.n = labels.shape[0]  # global: every rank holds the labels and label state of all samples
        # Data parallel (torchrun): this rank keeps only the images of the samples it owns.
        self.world, self.rank = ddp.world(), ddp.rank()
        own = ddp.owned(self.n)
        # The uint8 store moves to the device once (CUDA: pinned memory, non-blocking copy).
        self.x = to_device(images[own] if self.world > 1 else images, device).contiguous()
        self.local_pos = None
        if self.world > 1:
            self.local_pos = torch.full((self.n,), -1, dtype=torch.long, device=device)
            self.local_pos[own.to(device)] = torch.arange(len(own), device=device)
        self.ssl_all = images if ssl_images is None else ssl_images  # for the cache key and the statistics
        self.ssl_n = self.ssl_all.shape[0]
        self.ssl_images = self.ssl_all[ddp.owned(self.ssl_n)] if self.world > 1 else self.ssl_all
        self.channels, h, w = self.x.shape[1:]
        self.image_size = (h, w)
        mean, std = channel_stats(self.ssl_all)
        self.mean, self.std = mean, std
        common = {"image_size": (h, w), "channels": self.channels, "mean": mean, "std": std}
        self.aug_none = make_augment("none", **common)
        pad = {} if cfg.crop_pad < 0 else {"pad": cfg.crop_pad}
        self.aug_weak = make_augment(cfg.augment, flip=cfg.flip, **common, **pad) if cfg.augment != "none" \
            else self.aug_none
        self.aug_strong = make_augment("strong", flip=cfg.flip, crop_scale_min=cfg.ssl.crop_scale_min, **common)
        self.amp = amp_dtype(device, cfg.amp)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        # Batch order comes from its own generator so that evaluation never shifts it.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._whitening: dict | None = None
        # The noisy validation split (images on the device, noisy labels), once the Trainer hands
        # it over; a method may read it (refine.threshold_mode=auto does), never clean labels.
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- models ----------------------------------------------------------------------------
    def new_model(self) -> nn.Module:
        model = create_backbone(self.cfg.model.backbone, in_channels=self.channels,
                                num_classes=self.num_classes, **backbone_kwargs(self.cfg))
        model = model.to(self.device, memory_format=self.memory_format)
        if isinstance(getattr(model, "whiten", None), PatchWhitening):
            self._whiten(model.whiten)
        return compile_model(model) if self.cfg.compile else model

    WHITEN_SAMPLE = 5000  # training images the patch-whitening layer is fitted on (airbench: 5,000)

    def _whiten(self, layer: PatchWhitening) -> None:
        """Fit an airbench whitening layer on an evenly spaced sample of the (un-augmented, label-free)
        training images; fitted once per context, the same on every rank."""
        if self._whitening is None:
            n = self.ssl_n
            idx = torch.linspace(0, n - 1, min(n, self.WHITEN_SAMPLE)).round().long()
            fresh = PatchWhitening(layer.in_channels, layer.kernel_size).to(self.device)
            whiten_init(fresh, self.ssl_all[idx].to(self.device), self.mean, self.std)
            self._whitening = fresh.state_dict()
        layer.load_state_dict(self._whitening)

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        if self.amp is torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    # -- data ------------------------------------------------------------------------------
    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator).to(self.device)

    def batches(self, indices: torch.Tensor, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                sample_ids: torch.Tensor | None = None, rank_counts: list[int] | None = None) -> list[torch.Tensor]:
        """Batches over ``indices`` (a 1-D LongTensor on the device), ``batch_size`` each.

        Data parallel: ``batch_size`` is the global batch. Each rank keeps the items whose
        sample (``sample_ids``, default the items themselves) it owns, in batches of
        ``batch_size / world``, and every rank yields the same number of batches (a rank with
        fewer items starts over on a fresh shuffle of its own). ``rank_counts`` says instead
        that ``indices`` are already this rank's and how many each rank has.
        """
        if self.world > 1:
            if rank_counts is None:
                ids = indices if sample_ids is None else sample_ids
                owner = ids % self.world
                rank_counts = torch.bincount(owner, minlength=self.world).tolist()
                indices = indices[owner == self.rank]
            batch_size = max(1, batch_size // self.world)

        def count(n: int) -> int:
            return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)

        order = indices[self.permutation(len(indices))] if shuffle else indices
        n = len(order)
        out = [order[s:s + batch_size] for s in range(0, count(n) * batch_size, batch_size)]
        out = [b for b in out if len(b)]
        if self.world > 1:
            steps = max(count(c) for c in rank_counts)
            if not n:  # a rank that owns none of these items still steps with the others
                return [indices[:0]] * steps
            while len(out) < steps:  # equal step counts keep the gradient all-reduces in lockstep
                extra = indices[self.permutation(n)] if shuffle else indices
                out += [extra[s:s + batch_size] for s in range(0, n, batch_size)][: steps - len(out)]
        return out

    def local(self, index: torch.Tensor) -> torch.Tensor:
        """Positions in this rank's image store of the (owned) global sample indices ``index``."""
        return index if self.local_pos is None else self.local_pos[index]

    def augment(self, index: torch.Tensor, strong: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """Float, normalised, augmented batch for the samples ``index``.

        ``strong`` (bool, same length) marks rows that get the SimCLR augmentation instead of
        the weak one - the papers' "augmented copies" of pseudo-labelled samples.
        """
        x = self.x[self.local(index)] if images is None else images[index]
        if strong is None or not bool(strong.any()):
            out = self.aug_weak(x)
        elif bool(strong.all()):
            out = self.aug_strong(x)
        else:
            out = self.aug_weak(x)
            out[strong] = self.aug_strong(x[strong])
        return out.contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def logits_all(self, model: nn.Module, images: torch.Tensor | None = None, *, tta: str = "none") -> torch.Tensor:
        """Float32 logits ``(N, C)`` of every image (eval mode, no augmentation by default).

        ``images=None`` means the training set: data parallel, every rank scores its own part
        and the result is gathered in global order (a collective: all ranks must call it).
        ``tta`` averages the logits of several views: ``flip`` (the image and its mirror) or
        ``crops`` (airbench's: half the identity pair, a quarter each of the pairs translated by
        one pixel up-left and down-right, reflect-padded); the Trainer uses it for test accuracy only.
        """
        if images is None and self.world > 1:
            ddp.average_buffers(model)
            return ddp.gather_rows(self.logits_all(model, self.x, tta=tta), self.n)
        return self._forward_all(model, images, lambda b: _tta_logits(model, b, tta), self.num_classes)

    @torch.no_grad()
    def features_all(self, model: nn.Module, images: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 penultimate features ``(N, model.feat_dim)`` of every image, as :meth:`logits_all`
        scores them (eval mode, no augmentation; ``images=None``: the training set, gathered)."""
        if images is None and self.world > 1:
            ddp.average_buffers(model)
            return ddp.gather_rows(self.features_all(model, self.x), self.n)
        return self._forward_all(model, images, lambda b: model.features(b).float(), model.feat_dim)

    def _forward_all(self, model: nn.Module, images: torch.Tensor | None, fn, width: int) -> torch.Tensor:
        """``fn`` of every normalised, un-augmented batch of ``images`` (default: this rank's training
        images) with ``model`` in eval mode, concatenated: ``(N, width)``."""
        x = self.x if images is None else images
        was_training = model.training
        model.eval()
        out = []
        bs = self.cfg.optim.eval_batch_size
        for start in range(0, x.shape[0], bs):
            batch = self.aug_none(x[start:start + bs].to(self.device)).contiguous(memory_format=self.memory_format)
            with self.autocast():
                out.append(fn(batch))
        model.train(was_training)
        if not out:
            return torch.zeros(0, width, device=self.device)
        return torch.cat(out)


def _tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Float logits of the normalised batch ``x``, averaged over the ``tta`` views."""
    def pair(v: torch.Tensor) -> torch.Tensor:  # a view and its mirror
        return 0.5 * (model(v).float() + model(v.flip(-1)).float())

    if tta == "none":
        return model(x).float()
    if tta == "flip":
        return pair(x)
    if tta != "crops":
        raise ValueError(f"unknown tta {tta!r}")
    h, w = x.shape[-2:]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left = padded[..., :h, :w].contiguous(memory_format=fmt)
    down_right = padded[..., 2:, 2:].contiguous(memory_format=fmt)
    return 0.5 * pair(x) + 0.25 * pair(up_left) + 0.25 * pair(down_right)


def backbone_kwargs(cfg: RunConfig) -> dict:
    """Constructor options of the configured backbone (``tiny`` keeps its own width)."""
    if cfg.model.backbone in ("tiny", "tiny_gn"):
        return {}
    out = {"width": cfg.model.width}
    if cfg.model.expand:  # (validate() allows it for airbench only)
        out["expand"] = cfg.model.expand
    return out
