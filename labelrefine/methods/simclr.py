"""SimCLR pretraining (Chen et al., ICML 2020) as a method's ``ssl`` phase, with an on-disk encoder cache.

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
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed as ddp
from ..engine import Context, EpochSpec, Learner, Pass, Step, backbone_kwargs, to_device
from ..engine.checkpoint import seed_everything
from ..errors import UserError
from ..losses import nt_xent
from ..models import encoder_state, is_classifier_key
from ..store import LegacyFile, StoreError
from ..store import load as store_load
from ..store import save as store_save

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
    ssl = {k: v for k, v in dataclasses.asdict(cfg.ssl).items() if k not in ("cache", "seed")}
    # ssl.seed = -1 pretrains inside the run's own random stream ("seed": the run's seed, the key
    # of every encoder cached before the option existed); a pinned ssl.seed reseeds the
    # pretraining on its own (another computation, so another key: "ssl_seed").
    seed = {"seed": cfg.seed} if cfg.ssl.seed < 0 else {"ssl_seed": cfg.ssl.seed}
    blob = json.dumps({
        "version": CACHE_VERSION,
        "images": images_fingerprint(ctx.ssl_all),
        "backbone": cfg.model.backbone,
        "backbone_kwargs": backbone_kwargs(cfg),
        "ssl": ssl,
        "flip": cfg.flip,
        **seed,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def encoder_cache_path(ctx: Context) -> Path | None:
    if not ctx.cfg.ssl.cache or not ctx.cache_dir:
        return None
    return Path(ctx.cache_dir) / "ssl" / f"{ctx.cfg.model.backbone}-{encoder_cache_key(ctx)}.pt"


def load_cached_encoder(ctx: Context, model: nn.Module) -> dict | None:
    """Load a cached SimCLR encoder into ``model`` and return the cache entry's info (epochs,
    final loss, pretraining seconds); ``None`` when there is none (or it is unusable)."""
    path = encoder_cache_path(ctx)
    if path is None or not path.is_file():
        return None
    try:
        state = store_load(path, kind=ENCODER_FORMAT, name="SSL cache")
    except LegacyFile:  # written before checksums: not trusted, pretrained again (once)
        log.info("SSL cache %s has no checksum header (an older labelrefine's file, or not ours); "
                 "pretraining again", path)
        return None
    except StoreError as e:  # a damaged cache file must not stop a run: pretrain again
        log.warning("ignoring unreadable SSL cache: %s; pretraining again", e)
        return None
    # Check names, shapes and dtypes before copying anything: a partial copy would change the
    # model that is then pretrained again.
    encoder = state.get("encoder") if isinstance(state, dict) else None
    target = encoder_state(model.state_dict())
    if not isinstance(encoder, dict) or set(encoder) != set(target) or any(
            not isinstance(encoder[k], torch.Tensor) or encoder[k].shape != v.shape or encoder[k].dtype != v.dtype
            for k, v in target.items()):
        log.warning("ignoring SSL cache %s: it does not fit the model", path)
        return None
    model.load_state_dict(encoder, strict=False)
    log.info("SimCLR encoder loaded from cache %s", path)
    info = state.get("info")
    return dict(info) if isinstance(info, dict) else {}


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


class SimCLRNet(nn.Module):
    """The encoder (``model.features``) and the projection head as one module: what SimCLR's training
    forward calls, and what the data-parallel wrapper holds (the classifier ``fc`` is not part of it)."""

    def __init__(self, model: nn.Module, head: ProjectionHead):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(x))


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
        base_lr = s.lr * self.batch_size / 256
        optimizer = torch.optim.SGD(params, lr=base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
        # fc takes no part in SimCLR: frozen while the data-parallel wrapper records what it averages.
        fc = [p for n, p in model.named_parameters() if is_classifier_key(n)]
        for p in fc:
            p.requires_grad_(False)
        self.learner = Learner(ctx, s.epochs, model=model, torch_optimizer=optimizer, base_lr=base_lr,
                               schedule="cosine", warmup=0.0, wrap=[SimCLRNet(model, self.head)])
        for p in fc:
            p.requires_grad_(True)
        self.images = to_device(ctx.ssl_images, ctx.device)

    def pass_(self) -> Pass:
        """One epoch over this rank's SSL images, full batches only."""
        ctx = self.ctx
        n = self.images.shape[0]  # this rank's images (all of them without data parallelism)
        batches = ctx.batches(torch.arange(n, device=ctx.device), self.batch_size, drop_last=True,
                              rank_counts=ddp.counts(ctx.ssl_n))
        return Pass(batches, [self.learner], self.step, desc="simclr", extra_train=[self.head])

    def step(self, idx: torch.Tensor) -> Step:
        x = self.images[idx]
        views = torch.cat([self.ctx.aug_strong(x), self.ctx.aug_strong(x)])
        loss = self.loss(views.contiguous(memory_format=self.ctx.memory_format), len(idx))
        return Step([loss], {"loss": loss.detach()}, len(idx))

    def loss(self, views: torch.Tensor, n: int) -> torch.Tensor:
        """NT-Xent of ``2n`` float views, rows ``[view 1 of n images; view 2]``.

        ``labelrefine bench speed`` feeds it pre-made views (the model-only limit) and views from a
        torchvision DataLoader (the peer pipeline).
        """
        ctx = self.ctx
        with ctx.autocast():
            z = self.learner.nets[0](views)
        z = z.float()
        return nt_xent(z[:n], z[n:], temperature=ctx.cfg.ssl.temperature)

    def state_dict(self) -> dict:
        lr = self.learner
        return {"head": self.head.state_dict(), "optimizer": lr.optimizer.state_dict(),
                "progress": lr.progress, "scaler": None if lr.scaler is None else lr.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        lr = self.learner
        self.head.load_state_dict(state["head"])
        lr.optimizer.load_state_dict(state["optimizer"])
        lr.progress = state["progress"]
        if lr.scaler is not None and state.get("scaler") is not None:
            lr.scaler.load_state_dict(state["scaler"])


class SSLInit:
    """SimCLR pretraining as the first phase of a method (ours, ce_ssl, ours_dividemix, dividemix).

    :meth:`specs` gives the SSL epochs still to run: none when the encoder cache already holds
    this pretraining (then the model is loaded from it at construction). It is the Trainer's
    handler of the ``ssl`` phase (:meth:`labelrefine.methods.base.Method.handler`).
    """

    def __init__(self, ctx: Context, model: nn.Module):
        self.ctx = ctx
        self.model = model
        self.epochs = ctx.cfg.ssl.epochs
        info = load_cached_encoder(ctx, model) if self.epochs > 0 else None
        self.cached = info is not None
        self.pretrain = self.epochs > 0 and not self.cached
        # Wall seconds of the pretraining: this run's, or the cached encoder's when it recorded them
        # (None: unknown, an older cache entry). A benchmark adds them to the run's cost.
        self.seconds: float | None = (info or {}).get("seconds") if self.cached else 0.0
        self._t0: float | None = None
        # A pinned ssl.seed builds the trainer at the first SSL epoch, after reseeding (on_epoch_start).
        self.pinned = ctx.cfg.ssl.seed >= 0
        self.trainer: SimCLR | None = SimCLR(ctx, model) if self.pretrain and not self.pinned else None

    def specs(self) -> list[EpochSpec]:
        if not self.pretrain:
            return []
        return [EpochSpec("ssl", 0, e, supervised=False) for e in range(1, self.epochs + 1)]

    def on_epoch_start(self, spec: EpochSpec) -> dict[str, float]:
        self._t0 = time.perf_counter()
        if self.pinned and spec.epoch == 1:
            self._start_pinned()
        return {}

    def _start_pinned(self) -> None:
        """``ssl.seed`` >= 0: the pretraining depends on that seed alone, not on the run's. Every
        generator is reseeded and the encoder gets fresh initial weights drawn from it (the
        classifier keeps the run's), so runs of any seed pretrain the same encoder and one
        cache entry is right for all of them. Supervised training is reseeded from the run's
        seed afterwards (the Trainer), as it is after a cached encoder."""
        seed = self.ctx.cfg.ssl.seed
        seed_everything(seed)
        self.ctx.generator.manual_seed(seed)
        fresh = self.ctx.new_model()
        self.model.load_state_dict(encoder_state(fresh.state_dict()), strict=False)
        self.trainer = SimCLR(self.ctx, self.model)

    def passes(self, spec: EpochSpec) -> list[Pass]:
        assert self.trainer is not None
        return [self.trainer.pass_()]

    def on_epoch_end(self, spec: EpochSpec, parts: list[dict[str, float]]) -> dict[str, float]:
        logs = parts[0]
        if self._t0 is not None and self.seconds is not None:
            self.seconds += time.perf_counter() - self._t0
        if spec.epoch == self.epochs:
            save_cached_encoder(self.ctx, self.model, {"epochs": self.epochs, "final_loss": logs["loss"],
                                                       "seconds": self.seconds})
            self.trainer = None  # free the projection head, its optimizer and the SSL image copy
            self.pretrain = False
        return logs

    def state_dict(self) -> dict:
        return {"trainer": None if self.trainer is None else self.trainer.state_dict(), "cached": self.cached,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = state.get("seconds", self.seconds)
        if state["trainer"] is None:
            self.trainer = None  # before the first SSL epoch (pinned seed) or after the last one
        else:
            if self.trainer is None:
                self.trainer = SimCLR(self.ctx, self.model)
            self.trainer.load_state_dict(state["trainer"])
