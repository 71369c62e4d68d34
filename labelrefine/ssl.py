"""SimCLR pretraining (Chen et al., ICML 2020), epoch by epoch, with an on-disk encoder cache.

The papers pretrain the backbone with SimCLR for 30 epochs before any supervised training. It
uses no labels, so the encoder is cached on disk, keyed by the image content, the backbone, the
SSL config and the seed: one pretraining serves every noise setting and every method on a data
set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as ddp
from .engine import Context, backbone_kwargs, lr_factor, optimizer_step, to_device
from .errors import UserError
from .losses import nt_xent
from .models import encoder_state, is_classifier_key
from .progress import progress
from .store import LegacyFile, StoreError
from .store import load as store_load
from .store import save as store_save

log = logging.getLogger("labelrefine")

CACHE_VERSION = 2  # 2: the strong augmentation's crop is ResizedCropFlip (was kornia's)
#: The cache file's format (labelrefine.store): checksummed, unpickled with weights_only.
ENCODER_FORMAT = "labelrefine-ssl-encoder-v1"


class ProjectionHead(nn.Module):
    """SimCLR's MLP head ``feat_dim -> hidden -> out`` (lightly's CIFAR setting: 512 -> 512 -> 128)."""

    def __init__(self, feat_dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feat_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def images_fingerprint(images: torch.Tensor) -> str:
    """sha256 of a uint8 image tensor's shape and bytes."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images.cpu().numpy()).data)
    return h.hexdigest()


def encoder_cache_key(ctx: Context) -> str:
    cfg = ctx.cfg
    ssl = {k: v for k, v in dataclasses.asdict(cfg.ssl).items() if k != "cache"}
    blob = json.dumps({
        "version": CACHE_VERSION,
        "images": images_fingerprint(ctx.ssl_all),
        "backbone": cfg.model.backbone,
        "backbone_kwargs": backbone_kwargs(cfg),
        "ssl": ssl,
        "flip": cfg.flip,
        "seed": cfg.seed,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def encoder_cache_path(ctx: Context) -> Path | None:
    if not ctx.cfg.ssl.cache or not ctx.cache_dir:
        return None
    return Path(ctx.cache_dir) / "ssl" / f"{ctx.cfg.model.backbone}-{encoder_cache_key(ctx)}.pt"


def load_cached_encoder(ctx: Context, model: nn.Module) -> bool:
    """Load a cached SimCLR encoder into ``model``; False when there is none (or it is unusable)."""
    path = encoder_cache_path(ctx)
    if path is None or not path.is_file():
        return False
    try:
        state = store_load(path, kind=ENCODER_FORMAT, name="SSL cache")
    except LegacyFile:  # written before checksums: not trusted, pretrained again (once)
        log.info("SSL cache %s has no checksum header (an older labelrefine's file, or not ours); "
                 "pretraining again", path)
        return False
    except StoreError as e:  # a damaged cache file must not stop a run: pretrain again
        log.warning("ignoring unreadable SSL cache: %s; pretraining again", e)
        return False
    # Check names, shapes and dtypes before copying anything: a partial copy would change the
    # model that is then pretrained again.
    encoder = state.get("encoder") if isinstance(state, dict) else None
    target = encoder_state(model.state_dict())
    if not isinstance(encoder, dict) or set(encoder) != set(target) or any(
            not isinstance(encoder[k], torch.Tensor) or encoder[k].shape != v.shape or encoder[k].dtype != v.dtype
            for k, v in target.items()):
        log.warning("ignoring SSL cache %s: it does not fit the model", path)
        return False
    model.load_state_dict(encoder, strict=False)
    log.info("SimCLR encoder loaded from cache %s", path)
    return True


def save_cached_encoder(ctx: Context, model: nn.Module, info: dict) -> None:
    path = encoder_cache_path(ctx)
    if path is None or not ddp.is_main():
        return
    encoder = {k: v.detach().cpu() for k, v in encoder_state(model.state_dict()).items()}
    try:
        store_save(path, {"encoder": encoder, "info": info}, kind=ENCODER_FORMAT)
    except (OSError, UserError) as e:  # a cache that cannot be written (full disk) must not stop the run
        log.warning("could not write the SSL cache (%s); continuing without it", e)
        return
    log.info("SimCLR encoder cached at %s", path)


class SimCLR:
    """SimCLR on the context's ``ssl_images``: two strong views per image, NT-Xent, SGD + cosine.

    The classifier ``fc`` of ``model`` is not trained here; ``model.features`` is.
    """

    def __init__(self, ctx: Context, model: nn.Module):
        self.ctx = ctx
        s = ctx.cfg.ssl
        self.model = model
        self.head = ProjectionHead(model.feat_dim, s.proj_hidden, s.proj_dim).to(ctx.device)
        params = [p for n, p in model.named_parameters() if not is_classifier_key(n)]
        params += list(self.head.parameters())
        self.batch_size = min(s.batch_size, ctx.ssl_n)  # global batch (data parallel: split over ranks)
        self.base_lr = s.lr * self.batch_size / 256
        self.optimizer = torch.optim.SGD(params, lr=self.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
        self.scaler = ctx.grad_scaler()
        self.progress = 0.0
        self.images = to_device(ctx.ssl_images, ctx.device)

    def train_epoch(self) -> dict[str, float]:
        ctx, s = self.ctx, self.ctx.cfg.ssl
        self.model.train()
        self.head.train()
        n = self.images.shape[0]  # this rank's images (all of them without data parallelism)
        total, count, lr = 0.0, 0, self.base_lr
        batches = ctx.batches(torch.arange(n, device=ctx.device), self.batch_size, drop_last=True,
                              rank_counts=ddp.counts(ctx.ssl_n))
        steps = max(1, len(batches))
        for idx in progress(batches, total=steps, desc="simclr", unit="batch", inner=True):
            lr = self.base_lr * lr_factor(self.progress, s.epochs, "cosine")
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            x = self.images[idx]
            views = torch.cat([ctx.aug_strong(x), ctx.aug_strong(x)]).contiguous(memory_format=ctx.memory_format)
            loss = self.step(views, len(idx))
            total += float(loss) * len(idx)
            count += len(idx)
            self.progress += 1.0 / steps
        self.progress = float(math.floor(self.progress + 0.5))
        return {"loss": total / max(count, 1), "lr": lr, "samples": count}

    def step(self, views: torch.Tensor, n: int) -> torch.Tensor:
        """One optimisation step on ``2n`` float views, rows ``[view 1 of n images; view 2]``.

        Returns the detached loss. ``labelrefine bench speed`` feeds the same step from
        pre-made views (the model-only limit) and from a torchvision DataLoader (the peer pipeline).
        """
        ctx = self.ctx
        with ctx.autocast():
            z = self.head(self.model.features(views))
        z = z.float()
        loss = nt_xent(z[:n], z[n:], temperature=ctx.cfg.ssl.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        optimizer_step(self.optimizer, self.scaler, loss)
        return loss.detach()

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": self.progress, "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = state["progress"]
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
