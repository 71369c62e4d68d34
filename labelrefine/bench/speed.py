"""``labelrefine bench speed``: where the training time goes, measured side by side in one process.

The profile is the CPU suite's (``cpu-cifar10-quick``: ResNet-18 with the CIFAR stem at width 8,
batch 128, SimCLR batch 256, 2 threads) on its 3,000-image subset of the shared CIFAR-10, with
IDN-20% labels, on the CPU. ``--set`` overrides any run-config key (``device=cuda``,
``model.width=64``, ``optim.batch_size=256``, ``data.spec=...``) and the bench's own options
(``speed.epochs``, ``speed.sizes``, ``speed.workers``; see :class:`SpeedOptions`).

What is measured (each timed region ends with a device sync, so CUDA times are the work's):

1. **Supervised limit**: fwd + bwd + optimizer step of the model on float batches that are
   already normalised, resident and in the configured memory format: no augmentation, no data
   movement; the same model, batch, optimizer and number of steps as an epoch of (2).
2. **Supervised step**: the Trainer's supervised pass (weak crop + flip augmentation of the
   in-memory uint8 store, on the device), whole epochs after one untimed warm-up epoch.
3. **SimCLR step**: the Trainer's SimCLR pass (two batched strong views per image; each image
   counted once), beside its model-only limit (:meth:`SimCLR.step` on pre-made views).
4. **Peer pipeline**: the same :meth:`SimCLR.step` fed the conventional way: torchvision
   transforms (the same recipe) on PIL images in a ``torch.utils.data.DataLoader`` with
   ``speed.workers`` worker processes, two views per image.
5. **Method cost**: seconds per epoch of every registered method's main phase, against CE
   (SimCLR skipped, warm-ups cut to one untimed epoch; :func:`method_plan` says what is timed).
6. **Refinement overhead**: ``ours``' stage evaluation + consensus as a fraction of its
   refinement iteration (:attr:`Ours.refine_overhead_seconds`).
7. **Scaling**: a CE epoch at ``speed.sizes`` training images, with a least-squares line and R².
8. **Memory**: peak resident memory against the size of the uint8 data.

Then the issue's targets with PASS/FAIL. Wall-time numbers are what they are: nothing here
asserts on them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..artifacts import cpu_name
from ..config import RunConfig, _from_dict, apply_overrides, config_from_dict, config_to_dict, dump_yaml
from ..engine import Context, EpochSpec, Learner, Trainer, resolve_device
from ..engine.checkpoint import seed_everything
from ..errors import UserError
from ..io import write_csv, write_text

log = logging.getLogger("labelrefine")

PROFILE_SUITE = "cpu-cifar10-quick"
# On top of the suite's config: its first setting (IDN-20%), the whole 3,000-image subset as the
# training set (no validation split: nothing is evaluated), the CPU, one seed.
BASE_OVERRIDES = ["method=ce", "data.noise=idn", "data.noise_rate=0.2", "data.val_fraction=0", "device=cpu",
                  "seed=0"]
GIB = 1024 ** 3
CSV_HEADER = ["section", "name", "value", "unit", "target", "result", "note"]


@dataclass
class SpeedOptions:
    """The bench's own knobs, set with ``--set speed.KEY=VALUE``."""

    epochs: int = 3  # timed epochs (or passes) of each measurement, after one untimed warm-up epoch
    sizes: list[int] = field(default_factory=lambda: [5000, 10000, 20000, 40000])  # CE scaling: training-set sizes
    workers: int = 2  # DataLoader worker processes of the peer pipeline (0 = load in the main process)


@dataclass
class Row:
    """One line of ``speed.csv``."""

    section: str
    name: str
    value: float
    unit: str
    note: str = ""
    target: str = ""
    result: str = ""

    def csv(self) -> list[Any]:
        value = "" if self.value is None else f"{self.value:.6g}"
        return [self.section, self.name, value, self.unit, self.target, self.result, self.note]


@dataclass
class SpeedResult:
    rows: list[Row]
    markdown: str


# ---------------------------------------------------------------------------------------------
# Configuration


def speed_config(user_overrides: list[str]) -> tuple[RunConfig, SpeedOptions]:
    """The profile's run config with ``--set`` applied, and the ``speed.*`` options."""
    from .suites import load_suite

    cfg_items, speed_items = [], []
    for item in user_overrides:
        (speed_items if item.split("=", 1)[0].strip().startswith("speed.") else cfg_items).append(item)
    data = copy.deepcopy(load_suite(PROFILE_SUITE).config)
    apply_overrides(data, [*BASE_OVERRIDES, *cfg_items])
    cfg = config_from_dict(data)
    opts = _from_dict(SpeedOptions, apply_overrides({}, speed_items).get("speed", {}), "speed.")
    if opts.epochs < 1:
        raise UserError(f"config key 'speed.epochs': {opts.epochs} must be >= 1")
    if opts.workers < 0:
        raise UserError(f"config key 'speed.workers': {opts.workers} must be >= 0")
    if len(opts.sizes) < 2 or min(opts.sizes) < 1 or opts.sizes != sorted(set(opts.sizes)):
        raise UserError(f"config key 'speed.sizes': {opts.sizes} must be at least two increasing positive sizes")
    return cfg, opts


def with_overrides(cfg: RunConfig, items: list[str]) -> RunConfig:
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(items)))


@dataclass(frozen=True)
class MethodPlan:
    """How a method's epoch cost is measured: config overrides and the phase that is timed.

    Every plan also sets ``ssl.epochs=0``: SimCLR initialisation changes the weights, not the
    cost of an epoch. Epochs of the schedule before the timed ones run untimed (warm-up).
    """

    overrides: tuple[str, ...]
    phase: str | None  # None: the schedule's most frequent supervised phase
    what: str
    iteration: int = 0  # > 0: time every epoch of this refinement iteration instead of `epochs` epochs


def method_plan(name: str, epochs: int) -> MethodPlan:
    """The measurement plan of a registered method (``epochs`` = timed epochs).

    The timed phase is the last one the method declares (``Method.phases``), ``ours``' its
    ``refine``; a method without an entry below is timed on its schedule's most frequent
    supervised phase.
    """
    from ..methods import get_method

    phases = get_method(name).phases
    main = phases[-1] if phases else ""
    total = f"epochs={1 + epochs}"
    plain = f"epoch 1 untimed, then {epochs} timed"
    plans = {
        "ce": MethodPlan((total,), main, f"`{main}`: {plain}"),
        "ce_ssl": MethodPlan((total,), main, f"`{main}` (SimCLR skipped): {plain}"),
        "coteaching": MethodPlan((total,), main, f"`{main}` (both nets): {plain}"),
        "jocor": MethodPlan((total,), main, f"`{main}` (both nets): {plain}"),
        "mentornet": MethodPlan((total,), main, f"`{main}`: epoch 1 (CE burn-in) untimed, then {epochs} "
                                "MentorNet-PD epochs"),
        "dividemix": MethodPlan(("dividemix.warmup_epochs=1", "dividemix.init=random", total), main,
                                f"`{main}` (co-divide GMM + MixMatch, both nets): 1 CE warmup epoch untimed, then "
                                f"{epochs} timed"),
        "ours_dividemix": MethodPlan(("refine.warmup_epochs=0", "refine.iterations=0", "dividemix.warmup_epochs=1",
                                      "dividemix.init=random", total), main,
                                     f"`{main}` (refinement skipped): 1 `{phases[-2] if len(phases) > 1 else ''}` "
                                     f"epoch untimed, then {epochs} timed"),
    }
    if name == "ours":  # the refinement iterations, not the (short) fine-tune that ends the schedule
        plans[name] = MethodPlan(("refine.warmup_epochs=1", "refine.iterations=2"), "refine",
                                 "`refine`: 1 CE warmup epoch untimed, then every epoch of iteration 1 (its stage "
                                 "evaluations and the consensus included)", iteration=1)
    plan = plans.get(name, MethodPlan((total,), None, f"main phase: {plain}"))
    if plan.phase is not None and plan.phase not in phases:
        raise RuntimeError(f"bench speed: the plan of {name} times phase {plan.phase!r}, which {name} does not "
                           f"declare ({', '.join(phases) or 'no phases'})")
    return plan


# ---------------------------------------------------------------------------------------------
# Timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())`` with the device synchronised on both ends."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def interleaved(passes: dict[str, Callable[[], int]], rounds: int,
                device: torch.device) -> tuple[dict[str, float], dict[str, int]]:
    """Run every pass once per round, in turn (so a drift of the machine's speed hits them all
    alike); return the seconds and the image counts (each pass returns its count) per pass."""
    seconds, counts = dict.fromkeys(passes, 0.0), dict.fromkeys(passes, 0)
    for _ in range(rounds):
        for key, fn in passes.items():
            dt, count = timed(fn, device)
            seconds[key] += dt
            counts[key] += count
    return seconds, counts


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b·x``: ``(a, b, R²)``; R² is 1 for a perfect fit of constant ``y``."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(xs) < 2 or np.ptp(xs) == 0:
        raise ValueError("linear_fit needs at least two distinct x values")
    b, a = np.polyfit(xs, ys, 1)
    pred = a + b * xs
    ss_res = float(((ys - pred) ** 2).sum())
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-24 else float("nan"))
    return float(a), float(b), r2


def peak_rss_bytes(who: str = "self") -> int:
    """Peak resident set size of this process (``self``) or of its largest waited-for child."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN)
    return int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def stage_schedules(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """``(label, stages, epochs)`` of the first refinement iteration in this profile and of the
    papers' iterations (stages 2,3,4 of 4 epochs; then 2,5,7 of 7)."""
    from ..methods.schedule import iteration_length, stages_of

    return [("profile", len(stages_of(cfg, 1)), iteration_length(cfg, 1)),
            ("papers_iteration1", 3, 4), ("papers_later", 3, 7)]


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children (DataLoader workers)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


PROFILE_STEPS = 4  # steps of the SimCLR model-only limit under the torch profiler
# Profiled aten ops by what they are (first match; substrings of the op name).
OP_CATEGORIES = [
    ("convolution", ("conv",)),
    ("batch norm", ("batch_norm",)),
    ("matmul", ("mm", "linear", "matmul", "bmm")),
    ("optimizer update", ("_foreach", "sgd")),
    ("activations, pooling, elementwise", ("relu", "threshold", "pool", "add", "mul", "div", "sub", "exp", "log",
                                           "sum", "mean", "max", "norm", "copy", "fill", "zero", "where", "neg",
                                           "sqrt", "pow", "clamp", "cat", "softmax")),
]


def profile_ops(fn: Callable[[], Any], device: torch.device) -> list[tuple[str, float]]:
    """Run ``fn`` under the torch profiler: the share of self time of each :data:`OP_CATEGORIES`
    category (and "other"), largest first. On CUDA the device time is profiled too, but the
    shares are of the host-side self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue  # user ranges and profiler bookkeeping: their ops are counted by name
        op = ev.key[len("aten::"):].lower()
        cat = next((c for c, keys in OP_CATEGORIES if any(k in op for k in keys)), "other")
        totals[cat] = totals.get(cat, 0.0) + ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return sorted(((c, v / whole) for c, v in totals.items()), key=lambda kv: -kv[1])


def _context(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             device: torch.device, noise_rate: float = 0.0) -> Context:
    # No cache directory: the bench never reads or writes a SimCLR encoder cache.
    return Context(cfg, images, labels, num_classes, device=device, ssl_images=images, cache_dir=None,
                   noise_rate=noise_rate)


def _cycle(items: list, steps: int) -> list:
    return [items[i % len(items)] for i in range(steps)]


# ---------------------------------------------------------------------------------------------
# (1) + (2): the supervised step against its limit

MAX_RESIDENT_BATCHES = 16  # distinct pre-made batches of a limit pass (cycled for the epoch's step count)


def measure_supervised(cfg: RunConfig, ctx: Context, epochs: int) -> dict[str, float]:
    """Img/s of the model-only limit and of the Trainer's supervised pass, interleaved pass by pass."""
    from ..methods.base import supervised_pass

    seed_everything(cfg.seed)
    bs, n, device = cfg.optim.batch_size, ctx.n, ctx.device
    rows = torch.arange(n, device=device)
    sup = Learner(ctx, 1 + epochs)
    trainer = Trainer(ctx, None)
    model = ctx.new_model()
    model.train()
    limit = Learner(ctx, 1 + epochs, model=model)  # the same optimizer, stepped without the loop around it
    index = ctx.batches(rows, bs, drop_last=n > bs)  # the epoch's batches, as supervised_pass makes them
    resident = [(ctx.aug_none(ctx.x[i]).contiguous(memory_format=ctx.memory_format), ctx.y[i])
                for i in index[:MAX_RESIDENT_BATCHES]]
    steps = _cycle(resident, len(index))

    def limit_pass() -> int:
        for x, y in steps:
            with ctx.autocast():
                logits = model(x)
            limit.step(F.cross_entropy(logits.float(), y))
        return sum(len(y) for _, y in steps)

    def epoch() -> int:
        return int(trainer.run_pass(supervised_pass(ctx, sup, rows, ctx.y))["samples"])

    limit_pass(), epoch()  # warm-up
    t, k = interleaved({"limit": limit_pass, "step": epoch}, epochs, device)
    # The stage evaluation of `ours` (refine.stage_loss=eval) is this pass: Context.logits_all,
    # eval mode, no augmentation, over the whole training set.
    ctx.logits_all(model)
    t_eval = sum(timed(lambda: ctx.logits_all(model), device)[0] for _ in range(epochs))
    profile = profile_ops(lambda: ctx.logits_all(model), device)
    return {"limit_img_s": k["limit"] / t["limit"], "step_img_s": k["step"] / t["step"],
            "eval_img_s": n * epochs / t_eval, "eval_profile": profile,
            "images_per_epoch": k["step"] / epochs, "steps_per_epoch": len(index)}


# ---------------------------------------------------------------------------------------------
# (3) + (4): SimCLR, its limit, and the peer pipeline


def peer_transform(image_size: tuple[int, int], channels: int, mean, std, *, crop_scale_min: float, flip: bool,
                   blur: bool = True):
    """Our strong augmentation's recipe (:class:`~labelrefine.data.augment.StrongAugment`) as the
    usual torchvision transforms on a PIL image: RandomResizedCrop, flip, ColorJitter(0.4, 0.4,
    0.4, 0.1, p=0.8), RandomGrayscale(0.2), GaussianBlur(p=0.5), ToTensor, Normalize."""
    from torchvision import transforms as T

    from ..data.augment import blur_kernel_size

    ops: list = [T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if channels == 3:
        ops += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    else:
        ops.append(T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8))
    if blur:
        k = blur_kernel_size(image_size)
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    ops += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


class PILTwoViews(torch.utils.data.Dataset):
    """The conventional SSL data set: uint8 ``HWC`` arrays (as torchvision's CIFAR10 holds them),
    decoded to a PIL image per item, two independently transformed views."""

    def __init__(self, images: np.ndarray, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img)


def collate_views(batch) -> torch.Tensor:
    """``[(v1, v2), ...]`` -> one ``(2B, C, H, W)`` tensor ``[view 1s; view 2s]`` (pinned by the loader on CUDA)."""
    return torch.cat([torch.stack([a for a, _ in batch]), torch.stack([b for _, b in batch])])


def measure_simclr(cfg: RunConfig, ctx: Context, epochs: int, workers: int) -> dict[str, float]:
    """Img/s (each image once) of the SimCLR pass, its model-only limit and the peer pipeline."""
    from ..methods.simclr import SimCLR

    seed_everything(cfg.seed)
    sim = SimCLR(ctx, ctx.new_model())
    index = ctx.batches(torch.arange(sim.images.shape[0], device=ctx.device), sim.batch_size, drop_last=True)
    result = _simclr_step_and_limit(ctx, sim, index, epochs)
    result.update(_peer_pipeline(cfg, ctx, sim, index, epochs, workers))
    return result


def _simclr_step_and_limit(ctx: Context, sim, index: list[torch.Tensor], epochs: int) -> dict[str, Any]:
    """(3): the SimCLR pass (:meth:`SimCLR.pass_` in the Trainer) interleaved with its model-only
    limit (:meth:`SimCLR.loss` and a step on pre-made views), the limit's op profile, then the
    augmentation of (3) alone."""
    trainer = Trainer(ctx, None)
    device, b = ctx.device, sim.batch_size
    resident = []
    for i in index[:MAX_RESIDENT_BATCHES]:
        x = sim.images[i]
        resident.append(torch.cat([ctx.aug_strong(x), ctx.aug_strong(x)]).contiguous(memory_format=ctx.memory_format))
    steps = _cycle(resident, len(index))

    def limit_pass() -> int:
        for views in steps:
            sim.learner.step(sim.loss(views, len(views) // 2))
        return sum(len(v) // 2 for v in steps)

    def epoch() -> int:
        return int(trainer.run_pass(sim.pass_())["samples"])

    limit_pass(), epoch()
    t, k = interleaved({"limit": limit_pass, "step": epoch}, epochs, device)
    profile = profile_ops(lambda: [sim.learner.step(sim.loss(v, len(v) // 2)) for v in resident[:PROFILE_STEPS]],
                          device)
    resident, steps = [], []  # free the pre-made views

    def aug_pass() -> int:  # the augmentation of (3) alone: two strong views of every batch, no model
        for i in index:
            x = sim.images[i]
            torch.cat([ctx.aug_strong(x), ctx.aug_strong(x)]).contiguous(memory_format=ctx.memory_format)
        return len(index) * b

    t_aug, k_aug = (d["aug"] for d in interleaved({"aug": aug_pass}, epochs, device))
    return {"limit_img_s": k["limit"] / t["limit"], "step_img_s": k["step"] / t["step"], "aug_img_s": k_aug / t_aug,
            "profile": profile, "batch": b, "steps_per_epoch": len(index), "images_per_epoch": k["step"] / epochs}


def _peer_pipeline(cfg: RunConfig, ctx: Context, sim, index: list[torch.Tensor], epochs: int,
                   workers: int) -> dict[str, float]:
    """(4): the same SimCLR object (model, head, optimizer) fed by a DataLoader of torchvision
    transforms on PIL images, interleaved with that loader alone; the workers' CPU time."""
    from torch.utils.data import DataLoader

    device, b = ctx.device, sim.batch_size
    arr = ctx.ssl_images.cpu().permute(0, 2, 3, 1).numpy()
    arr = np.ascontiguousarray(arr[..., 0] if ctx.channels == 1 else arr)
    tf = peer_transform(ctx.image_size, ctx.channels, ctx.mean, ctx.std, crop_scale_min=cfg.ssl.crop_scale_min,
                        flip=cfg.flip)
    loader = DataLoader(PILTwoViews(arr, tf), batch_size=b, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda", collate_fn=collate_views)

    wait = {"seconds": 0.0}

    def peer_epoch() -> int:
        count, total = 0, 0.0
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            views = next(batches, None)  # the main process waits here for the workers
            wait["seconds"] += time.perf_counter() - t0
            if views is None:
                return count
            views = views.to(device, non_blocking=True).contiguous(memory_format=ctx.memory_format)
            loss = sim.loss(views, len(views) // 2)
            sim.learner.step(loss)
            total += float(loss.detach())  # the per-step loss read of the Trainer's pass
            count += len(views) // 2

    def loader_pass() -> int:  # the loader of (4) alone, no model step
        count = 0
        for views in loader:
            views.to(device, non_blocking=True)
            count += len(views) // 2
        return count

    children_cpu0 = children_cpu_seconds()
    peer_epoch()  # warm-up: starts the (persistent) workers
    produced = len(index) * b
    wait["seconds"] = 0.0
    tp, kp = interleaved({"peer": peer_epoch, "load": loader_pass}, epochs, device)
    t_peer, k_peer, t_load, k_load = tp["peer"], kp["peer"], tp["load"], kp["load"]
    produced += k_peer + k_load
    loader = None  # shuts the persistent workers down: their CPU time then counts in RUSAGE_CHILDREN
    gc.collect()
    worker_cpu = children_cpu_seconds() - children_cpu0
    return {"peer_img_s": k_peer / t_peer, "loader_img_s": k_load / t_load,
            "peer_wait_fraction": wait["seconds"] / t_peer,
            "peer_worker_cpu_ms": 1000 * worker_cpu / produced if worker_cpu > 0 else float("nan")}


# ---------------------------------------------------------------------------------------------
# (5) + (6): method cost and refinement overhead


@dataclass
class MethodTiming:
    name: str
    plan: MethodPlan
    seconds: list[float]  # per timed epoch
    samples: list[int | None]
    overhead: float = 0.0  # ours: stage evaluation + consensus seconds within the timed epochs
    eval_seconds: float = 0.0  # ours: the part of `overhead` spent in evaluation passes
    extra: dict[str, list[float]] = field(default_factory=dict)  # ours: iteration 2 seconds / samples

    @property
    def per_epoch(self) -> float:
        return sum(self.seconds) / len(self.seconds) if self.seconds else float("nan")


def _pick(specs: list[EpochSpec], plan: MethodPlan, epochs: int) -> list[int]:
    """Schedule positions of the timed epochs."""
    phase = plan.phase
    if phase is None:
        counts = Counter(s.phase for s in specs if s.supervised)
        phase = counts.most_common(1)[0][0] if counts else ""
    if plan.iteration:
        return [i for i, s in enumerate(specs) if s.phase == phase and s.iteration == plan.iteration]
    pos = [i for i, s in enumerate(specs) if s.phase == phase]
    if pos and pos[0] == 0:
        pos = pos[1:]  # nothing runs before the phase: its first epoch is the untimed warm-up
    return pos[:epochs]


def time_method(name: str, cfg: RunConfig, train, num_classes: int, device: torch.device, epochs: int,
                extra_overrides: tuple[str, ...] = ()) -> MethodTiming:
    from ..methods import get_method

    plan = method_plan(name, epochs)
    mcfg = with_overrides(cfg, ["ssl.epochs=0", f"method={name}", *plan.overrides, *extra_overrides])
    seed_everything(mcfg.seed)
    ctx = _context(mcfg, train.images, train.labels, num_classes, device, noise_rate=mcfg.data.noise_rate)
    method = get_method(name)(ctx)
    trainer = Trainer(ctx, method)
    specs = method.schedule()
    chosen = _pick(specs, plan, epochs)
    if not chosen:
        raise RuntimeError(f"bench speed: no epoch of {name}'s schedule matches its timing plan ({plan.what})")
    extra_pos = [i for i, s in enumerate(specs) if plan.iteration and s.phase == specs[chosen[0]].phase
                 and s.iteration == plan.iteration + 1]
    last = max([*chosen, *extra_pos])
    result = MethodTiming(name, plan, [], [])
    started = False
    for i, spec in enumerate(specs[: last + 1]):
        if spec.supervised and not started:
            method.on_supervised_start()
            started = True
        before = getattr(method, "refine_overhead_seconds", 0.0)
        before_eval = getattr(method, "refine_eval_seconds", 0.0)
        dt, logs = timed(lambda spec=spec: trainer.run_epoch(spec), device)
        samples = logs.get("samples")
        if i in chosen:
            result.seconds.append(dt)
            result.samples.append(None if samples is None else int(samples))
            result.overhead += getattr(method, "refine_overhead_seconds", 0.0) - before
            result.eval_seconds += getattr(method, "refine_eval_seconds", 0.0) - before_eval
        elif i in extra_pos:
            result.extra.setdefault("seconds", []).append(dt)
            result.extra.setdefault("samples", []).append(float(samples or 0))
        log.debug("bench speed: %s %s it %d ep %d: %.2fs", name, spec.phase, spec.iteration, spec.epoch, dt)
    return result


# ---------------------------------------------------------------------------------------------
# (7): scaling


def measure_scaling(cfg: RunConfig, full, sizes: list[int], device: torch.device) -> list[tuple[int, float, int]]:
    """``(N, seconds, images trained)`` of one CE epoch on a stratified N-image subset, per size."""
    from ..data.splits import stratified_sample
    from ..methods import get_method

    mcfg = with_overrides(cfg, ["ssl.epochs=0", "method=ce", "epochs=1", "data.noise=none"])
    out = []
    for n in sizes:
        idx = torch.from_numpy(stratified_sample(full.labels, n, np.random.default_rng(0), full.num_classes))
        images, labels = full.images[idx], full.labels[idx]
        seed_everything(mcfg.seed)
        ctx = _context(mcfg, images, labels, full.num_classes, device)
        method = get_method("ce")(ctx)
        spec = method.schedule()[0]
        trainer = Trainer(ctx, method)
        dt, logs = timed(lambda trainer=trainer, spec=spec: trainer.run_epoch(spec), device)
        out.append((n, dt, int(logs["samples"])))
        log.info("bench speed: scaling N=%d: %.1fs", n, dt)
        del ctx, method, images, labels
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------------
# The whole bench


def run_speed(out: str | Path, user_overrides: list[str] | None = None, *, methods: list[str] | None = None,
              command: str = "labelrefine bench speed") -> SpeedResult:
    """Run every measurement, write ``OUT/speed.md`` and ``OUT/speed.csv``; return rows and markdown."""
    t_start = time.perf_counter()
    cfg, opts = speed_config(list(user_overrides or []))
    chosen = _chosen_methods(methods)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    data, prep, data_bytes = _load_profile_data(cfg, opts, device)
    full, train, num_classes = data.train, prep.train, len(prep.classes)

    marks = [("data loaded", peak_rss_bytes())]
    ctx = _context(cfg, train.images, train.labels, num_classes, device)
    log.info("bench speed: (1)+(2) supervised step and its limit")
    sup = measure_supervised(cfg, ctx, opts.epochs)
    marks.append(("(1)+(2) supervised", peak_rss_bytes()))
    log.info("bench speed: (3)+(4) SimCLR step, its limit, the peer pipeline")
    ssl = measure_simclr(cfg, ctx, opts.epochs, opts.workers)
    marks.append(("(3)+(4) SimCLR and the peer pipeline", peak_rss_bytes()))
    del ctx
    gc.collect()

    timings, stage_train, ce_repeat = _time_methods(chosen, cfg, train, num_classes, device, opts.epochs)
    marks.append(("(5)+(6) every method", peak_rss_bytes()))
    log.info("bench speed: (7) scaling over %s images", opts.sizes)
    scaling = measure_scaling(cfg, full, opts.sizes, device)
    marks.append(("(7) scaling", peak_rss_bytes()))
    rss = peak_rss_bytes("self")
    rss_children = peak_rss_bytes("children")
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    wall = time.perf_counter() - t_start

    rows = _rows(cfg, opts, sup, ssl, timings, stage_train, scaling, rss, rss_children, cuda_peak,
                 data_bytes, full, wall, marks)
    rows.append(Row("run", "ce_repeat", ce_repeat, "x", "CE timed again after every other method, "
                    "against its first timing (1 = no drift); `ce` is the mean of both"))
    md = render_markdown(rows, cfg, opts, device, prep.name, len(train), command)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "speed.csv", CSV_HEADER, [r.csv() for r in rows])
    write_text(out / "speed.md", md)
    speed_yaml = yaml.safe_dump({"speed": dataclasses.asdict(opts)}, sort_keys=False)
    write_text(out / "config.yaml", dump_yaml(cfg) + speed_yaml)
    log.info("bench speed: done in %.1f min; %s", wall / 60, out / "speed.md")
    return SpeedResult(rows, md)


def _chosen_methods(methods: list[str] | None) -> list[str]:
    """The registered methods to time (all by default), in registry order; CE always (the ratios' denominator)."""
    from ..methods import list_methods

    registered = [m.name for m in list_methods()]
    if not methods:
        return registered
    unknown = [m for m in methods if m not in registered]
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r}; registered: {', '.join(registered)}")
    return [m for m in registered if m in methods or m == "ce"]


def _load_profile_data(cfg: RunConfig, opts: SpeedOptions, device: torch.device):
    """``(data, prepared data, bytes of every uint8 split)``, checked against ``speed.sizes`` and
    the batch size."""
    from ..data.sources import load_data
    from ..data.splits import prepare_data
    from ..pipeline import default_cache_dir

    cache_dir = default_cache_dir(cfg)
    data = load_data(cfg.data.spec, cache_dir=cache_dir)
    full = data.train
    if max(opts.sizes) > len(full):
        raise UserError(f"config key 'speed.sizes': {max(opts.sizes)} images asked for, but data "
                        f"{cfg.data.spec!r} has {len(full)} training images")
    data_bytes = sum(s.images.numel() for s in (data.train, data.val, data.test) if s is not None)
    prep = prepare_data(cfg, cache_dir, data)
    train = prep.train
    if len(train) < 2 * cfg.optim.batch_size:
        raise UserError(f"bench speed: {len(train)} training images is fewer than two batches of "
                        f"{cfg.optim.batch_size}; use a larger data.train_subset or a smaller optim.batch_size")
    log.info("bench speed: %s, %d training images, %s width %d, batch %d, %s, %d threads",
             prep.name, len(train), cfg.model.backbone, cfg.model.width, cfg.optim.batch_size, device,
             torch.get_num_threads())
    return data, prep, data_bytes


def _time_methods(chosen: list[str], cfg: RunConfig, train, num_classes: int, device: torch.device,
                  epochs: int) -> tuple[dict[str, MethodTiming], MethodTiming | None, float]:
    """(5) + (6): every chosen method's timing, ``ours`` again with ``refine.stage_loss=train``,
    and CE's second timing over its first (``ce_repeat``; ``ce`` then holds both)."""
    timings: dict[str, MethodTiming] = {}
    for name in chosen:
        log.info("bench speed: (5) method cost: %s", name)
        timings[name] = time_method(name, cfg, train, num_classes, device, epochs)
    stage_train = None
    if "ours" in timings:
        log.info("bench speed: (5) ours with refine.stage_loss=train")
        stage_train = time_method("ours", cfg, train, num_classes, device, epochs,
                                  ("refine.stage_loss=train", "refine.iterations=1"))
    # CE is the denominator of every ratio: time it again after the others and use both, so that a
    # drift of the machine's speed during the bench shows (ce_repeat) and averages out.
    first_ce = timings["ce"].per_epoch
    again = time_method("ce", cfg, train, num_classes, device, epochs)
    timings["ce"].seconds += again.seconds
    timings["ce"].samples += again.samples
    return timings, stage_train, _ratio(again.per_epoch, first_ce)


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def _rows(cfg, opts, sup, ssl, timings, stage_train, scaling, rss, rss_children, cuda_peak, data_bytes,
          full, wall, marks=()) -> list[Row]:
    """Every row of ``speed.csv`` but ``ce_repeat``, in the file's order."""
    ce = timings["ce"].per_epoch
    rows = _throughput_rows(cfg, opts, sup, ssl)
    rows += _method_cost_rows(timings, stage_train, ce)
    overhead_rows, overhead, overhead_train = _overhead_rows(timings, stage_train)
    rows += overhead_rows
    rows += _eval_cost_rows(cfg, sup)
    scaling_rows, r2 = _scaling_rows(scaling)
    rows += scaling_rows
    store_max = max(opts.sizes) * int(np.prod(full.images.shape[1:]))
    rows += _memory_rows(rss, rss_children, data_bytes, store_max, max(opts.sizes), marks, cuda_peak)
    ours = timings["ours"].per_epoch if "ours" in timings else float("nan")
    ours_train = stage_train.per_epoch if stage_train is not None else float("nan")
    rows += _target_rows(sup, ssl, ce, ours, ours_train, overhead, overhead_train, r2, rss, data_bytes)
    rows.append(Row("run", "wall_seconds", wall, "s", "the whole bench speed run"))
    return rows


def _throughput_rows(cfg: RunConfig, opts: SpeedOptions, sup: dict, ssl: dict) -> list[Row]:
    """(1)-(4) and the pieces of (4), then the two op profiles."""
    bs = cfg.optim.batch_size
    rows = [
        Row("throughput", "limit_supervised", sup["limit_img_s"], "img/s",
            f"(1) model fwd+bwd+SGD step on resident normalised float batches of {bs}, "
            f"{sup['steps_per_epoch']} steps a pass, {opts.epochs} passes"),
        Row("throughput", "supervised_step", sup["step_img_s"], "img/s",
            f"(2) the Trainer's supervised pass, weak crop+flip from the uint8 store, "
            f"{sup['images_per_epoch']:.0f} img an epoch, {opts.epochs} epochs after 1 warm-up"),
        Row("throughput", "eval_pass", sup["eval_img_s"], "img/s",
            f"Context.logits_all: eval-mode forward over the training set, batches of {cfg.optim.eval_batch_size} "
            "(the stage evaluation of `ours`)"),
        Row("throughput", "limit_simclr", ssl["limit_img_s"], "img/s",
            f"(3) limit: SimCLR.step on pre-made views, batch {ssl['batch']} ({2 * ssl['batch']} views), "
            f"images counted once"),
        Row("throughput", "simclr_step", ssl["step_img_s"], "img/s",
            f"(3) the Trainer's SimCLR pass, two batched strong views from the uint8 store, images counted once, "
            f"{ssl['images_per_epoch']:.0f} img an epoch"),
        Row("throughput", "peer_simclr", ssl["peer_img_s"], "img/s",
            f"(4) the same SimCLR.step fed by torchvision transforms on PIL images, DataLoader with "
            f"{opts.workers} workers"),
        Row("throughput", "aug_strong_only", ssl["aug_img_s"], "img/s",
            "the augmentation of (3) alone: two batched strong views per image from the uint8 store, no model"),
        Row("throughput", "peer_loader_only", ssl["loader_img_s"], "img/s",
            f"the DataLoader of (4) alone ({opts.workers} workers, two torchvision views per image), no model"),
        Row("peer", "main_process_waiting", ssl["peer_wait_fraction"], "fraction",
            "share of (4)'s wall time the main process waits for the next batch from the workers"),
        Row("peer", "worker_cpu_ms_per_image", ssl["peer_worker_cpu_ms"], "ms",
            "CPU time of the DataLoader workers per image (two torchvision views); the batched two views of (3) take "
            f"{1000 / ssl['aug_img_s']:.3f} ms of wall time per image on the main process"),
    ]
    rows += [Row("profile", cat, share, "fraction", f"torch profiler, {PROFILE_STEPS} steps of the SimCLR "
                 "model-only limit: share of aten self time") for cat, share in ssl["profile"]]
    rows += [Row("profile_eval", cat, share, "fraction", "torch profiler, one stage evaluation pass "
                 "(Context.logits_all): share of aten self time") for cat, share in sup["eval_profile"]]
    return rows


def _method_cost_rows(timings: dict[str, MethodTiming], stage_train: MethodTiming | None, ce: float) -> list[Row]:
    """(5): seconds per epoch of every method (and ours' extras), then each against CE."""
    rows = []
    for name, t in timings.items():
        known = [s for s in t.samples if s is not None]
        img = f"{sum(known) / len(known):.0f} img/epoch; " if known else ""
        rows.append(Row("method_cost", name, t.per_epoch, "s/epoch", f"{img}{t.plan.what}"))
    if "ours" in timings and timings["ours"].extra.get("seconds"):
        ex = timings["ours"].extra
        rows.append(Row("method_cost", "ours_iteration2", sum(ex["seconds"]) / len(ex["seconds"]), "s/epoch",
                        f"{sum(ex['samples']) / len(ex['samples']):.0f} rows/epoch: iteration 2, with strongly "
                        f"augmented copies of iteration 1's pseudo-labelled samples (informational)"))
    if stage_train is not None:
        rows.append(Row("method_cost", "ours_stage_loss_train", stage_train.per_epoch, "s/epoch",
                        "iteration 1 with refine.stage_loss=train: stages reuse the epoch's training logits, "
                        "no extra evaluation pass (informational)"))
    for name, t in timings.items():
        rows.append(Row("method_ratio", name, _ratio(t.per_epoch, ce), "x CE"))
    for key in ("ours_iteration2", "ours_stage_loss_train"):
        match = [r for r in rows if r.section == "method_cost" and r.name == key]
        if match:
            rows.append(Row("method_ratio", key, _ratio(match[0].value, ce), "x CE"))
    return rows


def _overhead_rows(timings: dict[str, MethodTiming],
                   stage_train: MethodTiming | None) -> tuple[list[Row], float, float]:
    """(6): ``ours``' stage evaluation + consensus within its iteration; the rows and the two
    fractions (``refine.stage_loss=eval`` and ``=train``; NaN without ``ours``)."""
    rows = []
    overhead = float("nan")
    if "ours" in timings:
        t = timings["ours"]
        overhead = _ratio(t.overhead, sum(t.seconds))
        rows += [Row("refine_overhead", "iteration_seconds", sum(t.seconds), "s",
                     f"ours refinement iteration 1 ({len(t.seconds)} epochs)"),
                 Row("refine_overhead", "stage_eval_consensus_seconds", t.overhead, "s",
                     "stage losses (an evaluation pass over the training set per stage) + selection + consensus"),
                 Row("refine_overhead", "evaluation_pass_seconds", t.eval_seconds, "s",
                     "of which the evaluation passes (Context.logits_all)"),
                 Row("refine_overhead", "fraction", overhead, "fraction"),
                 Row("refine_overhead", "fraction_evaluation_passes", _ratio(t.eval_seconds, sum(t.seconds)),
                     "fraction", "the evaluation passes alone"),
                 Row("refine_overhead", "fraction_selection_consensus",
                     _ratio(t.overhead - t.eval_seconds, sum(t.seconds)), "fraction",
                     "everything else: stage losses, selection, consensus, label update")]

    overhead_train = float("nan")
    if stage_train is not None:
        overhead_train = _ratio(stage_train.overhead, sum(stage_train.seconds))
        rows += [Row("refine_overhead", "fraction_stage_loss_train", overhead_train, "fraction",
                     "the same with refine.stage_loss=train (losses of the epoch's own training pass)")]
    return rows, overhead, overhead_train


def _eval_cost_rows(cfg: RunConfig, sup: dict) -> list[Row]:
    """What a full-set evaluation pass per stage costs at the measured rates: an iteration of e
    epochs with s stages takes about e/T + s/E per image (T = supervised limit (1), E = eval pass)."""
    rows = []
    for label, stages, epochs in stage_schedules(cfg):
        extra = stages * sup["limit_img_s"] / sup["eval_img_s"]
        rows += [Row("eval_cost", f"ours_vs_ce_{label}", 1 + extra / epochs, "x CE",
                     f"{stages} full evaluation passes in a {epochs}-epoch iteration: 1 + s·T/(e·E)"),
                 Row("eval_cost", f"refine_overhead_{label}", extra / (epochs + extra), "fraction",
                     f"{stages} full evaluation passes in a {epochs}-epoch iteration: s·T/E / (e + s·T/E)")]
    return rows


def _scaling_rows(scaling: list[tuple[int, float, int]]) -> tuple[list[Row], float]:
    """(7): a CE epoch per size and the least-squares line; the rows and its R²."""
    ns, ts = [n for n, _, _ in scaling], [t for _, t, _ in scaling]
    a, b, r2 = linear_fit(ns, ts)
    rows = [Row("scaling", f"ce_epoch_{n}", t, "s", f"{k} images trained ({k / t:.0f} img/s)") for n, t, k in scaling]
    rows += [Row("scaling", "fit_intercept", a, "s"), Row("scaling", "fit_slope_per_1000", 1000 * b, "s"),
             Row("scaling", "fit_r2", r2, "R^2", "least squares t = a + b*N over the sizes")]
    return rows, r2


def _memory_rows(rss: int, rss_children: int, data_bytes: int, store_max: int, max_size: int, marks,
                 cuda_peak: int | None) -> list[Row]:
    """(8): peak resident memory, the data's size, the high-water marks, CUDA's peak."""
    rows = [Row("memory", "peak_rss", rss / GIB, "GiB", "ru_maxrss of this process (whole run: torch, data, "
                "models, the peer pipeline's main side)"),
            Row("memory", "peak_rss_children", rss_children / GIB, "GiB",
                "ru_maxrss of the largest child (a DataLoader worker; counts pages shared with the parent)"),
            Row("memory", "data_uint8", data_bytes / GIB, "GiB", "every split of the data set as loaded (uint8)"),
            Row("memory", "largest_train_store", store_max / GIB, "GiB",
                f"the {max_size}-image uint8 store of the scaling run")]
    rows += [Row("memory", f"peak_rss_after_{i}", value / GIB, "GiB", f"high-water mark after: {what}")
             for i, (what, value) in enumerate(marks)]
    if cuda_peak is not None:
        rows.append(Row("memory", "cuda_max_allocated", cuda_peak / GIB, "GiB", "torch.cuda.max_memory_allocated"))
    return rows


def _target(name: str, value: float, op: str, bound: float, shown: str, what: str) -> Row:
    """A target row: PASS or FAIL against ``op bound`` (n/a for NaN)."""
    if not math.isfinite(value):
        result = "n/a"
    else:
        result = "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
    return Row("target", name, value, "", note=what, target=f"{op} {shown}", result=result)


def _target_rows(sup: dict, ssl: dict, ce: float, ours: float, ours_train: float, overhead: float,
                 overhead_train: float, r2: float, rss: int, data_bytes: int) -> list[Row]:
    """The issue's targets, PASS/FAIL (and one bound shown for information)."""
    limit_rss = data_bytes + 2 * GIB
    return [
        _target("supervised_vs_limit", _ratio(sup["step_img_s"], sup["limit_img_s"]), ">=", 0.90, "0.90",
                "(2) supervised step / (1) limit"),
        _target("simclr_vs_limit", _ratio(ssl["step_img_s"], ssl["limit_img_s"]), ">=", 0.85, "0.85",
                "(3) SimCLR step / its model-only limit"),
        _target("simclr_vs_peer", _ratio(ssl["step_img_s"], ssl["peer_img_s"]), ">=", 3.0, "3",
                "(3) SimCLR step / (4) peer pipeline"),
        Row("target", "simclr_vs_peer_bound", _ratio(ssl["limit_img_s"], ssl["peer_img_s"]), "",
            note="(3)'s model-only limit / (4): the most any data pipeline could reach against (4)",
            target="(bound)", result="info"),
        _target("ours_vs_ce", _ratio(ours, ce), "<=", 1.3, "1.3", "ours refine epoch / CE epoch"),
        _target("refine_overhead", overhead, "<=", 0.10, "0.10", "(6) stage evaluation + consensus / iteration"),
        _target("ours_vs_ce_stage_loss_train", _ratio(ours_train, ce), "<=", 1.3, "1.3",
                "ours refine epoch / CE epoch, refine.stage_loss=train"),
        _target("refine_overhead_stage_loss_train", overhead_train, "<=", 0.10, "0.10",
                "(6) with refine.stage_loss=train"),
        _target("scaling_r2", r2, ">=", 0.99, "0.99", "(7) R^2 of the linear fit of CE epoch time on N"),
        _target("peak_rss_gib", rss / GIB, "<=", limit_rss / GIB, f"{limit_rss / GIB:.2f} GiB",
                "(8) peak RSS, against uint8 data + 2 GiB"),
    ]


# ---------------------------------------------------------------------------------------------
# Markdown


def machine_description(device: torch.device) -> str:
    text = f"{cpu_name()}, {os.cpu_count()} logical CPUs ({platform.system()} {platform.machine()})"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def _fmt(v: float, unit: str) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if unit == "img/s":
        return f"{v:,.0f}"
    if unit == "fraction":
        return f"{100 * v:.1f}%"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.2f}"


def render_markdown(rows: list[Row], cfg: RunConfig, opts: SpeedOptions, device: torch.device, data_name: str,
                    n_train: int, command: str) -> str:
    by = {(r.section, r.name): r for r in rows}
    lines = _md_header(by, cfg, opts, device, data_name, n_train, command)
    lines += _md_throughput(rows, by)
    lines += _md_method_cost(rows, by, cfg, n_train)
    lines += _md_scaling_memory_targets(rows, by)
    lines.append("")
    return "\n".join(lines)


def _val(by: dict[tuple[str, str], Row], section: str, name: str) -> str:
    """A row's value as the markdown shows it (— when the row is missing)."""
    r = by.get((section, name))
    return "—" if r is None else _fmt(r.value, r.unit)


def _md_header(by: dict[tuple[str, str], Row], cfg: RunConfig, opts: SpeedOptions, device: torch.device,
               data_name: str, n_train: int, command: str) -> list[str]:
    """Title, machine, date, command, code version and the profile, then the throughput table's head."""
    from ..pipeline import code_version

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    width = "" if cfg.model.backbone in ("tiny", "tiny_gn") else f" width {cfg.model.width}"
    return [
        "# Training speed: `labelrefine bench speed`", "",
        f"- Machine: {machine_description(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device `{device}`",
        f"- Date: {date}; command: `{command}`; code {code_version()}; the resolved config is `config.yaml` beside "
        f"this file",
        f"- Profile: `{cfg.model.backbone}`{width}, batch {cfg.optim.batch_size} (SimCLR batch "
        f"{min(cfg.ssl.batch_size, n_train)}), amp `{cfg.amp}`, channels_last `{cfg.channels_last}`, compile "
        f"`{cfg.compile}`; data {data_name} (`{cfg.data.spec}`), {n_train} training images, noise "
        f"{cfg.data.noise} {cfg.data.noise_rate}",
        f"- Each throughput is measured over {opts.epochs} epoch(s) (or limit passes of the same step count) after "
        f"one untimed warm-up; limits and steps are interleaved; the device is synchronised around each timed "
        f"region. CE, the denominator of the ratios, is timed before and after the other methods (second ÷ first "
        f"= {_val(by, 'run', 'ce_repeat')}) and averaged. Wall time of this run: {_val(by, 'run', 'wall_seconds')} s.",
        "",
        "## Throughput", "",
        "| # | measurement | img/s | what |", "|---|---|---:|---|",
    ]


def _md_throughput(rows: list[Row], by: dict[tuple[str, str], Row]) -> list[str]:
    """The throughput rows, then where the SimCLR step's time goes."""
    lines = []
    for num, name in (("1", "limit_supervised"), ("2", "supervised_step"), ("3", "simclr_step"),
                      ("3", "limit_simclr"), ("4", "peer_simclr"), ("", "aug_strong_only"),
                      ("", "peer_loader_only"), ("", "eval_pass")):
        r = by[("throughput", name)]
        lines.append(f"| {num} | `{name}` | {_fmt(r.value, r.unit)} | {r.note} |")
    prof = [r for r in rows if r.section == "profile"]
    lines += ["", "## Where the SimCLR step's time goes", "",
              f"The torch profiler over {PROFILE_STEPS} steps of (3)'s model-only limit, aten self time by kind of "
              "op:", "", "| op | share |", "|---|---:|"]
    lines += [f"| {r.name} | {100 * r.value:.1f}% |" for r in prof]
    lines += ["", f"The augmentation of (3) costs "
              f"{1000 / by[('throughput', 'aug_strong_only')].value:.3f} ms of wall time per image (two views, "
              f"batched on the main process); the peer's torchvision transforms cost "
              f"{_val(by, 'peer', 'worker_cpu_ms_per_image')} ms of worker CPU per image, on the same cores as the "
              f"model. In (4) the main process waits for the workers {_val(by, 'peer', 'main_process_waiting')} of "
              f"the time. (3) cannot beat its own model-only limit, so against this (4) no data pipeline can exceed "
              f"(3)-limit ÷ (4) = **{by[('target', 'simclr_vs_peer_bound')].value:.2f}**.", ""]
    return lines


def _md_method_cost(rows: list[Row], by: dict[tuple[str, str], Row], cfg: RunConfig, n_train: int) -> list[str]:
    """(5) method cost and (6) the refinement overhead, with what the evaluation passes cost."""
    val = functools.partial(_val, by)
    lines = [f"## Method cost (5): seconds per epoch of the main phase, {n_train} images", "",
             "| method | s/epoch | × CE | timed |", "|---|---:|---:|---|"]
    for r in rows:
        if r.section == "method_cost":
            lines.append(f"| `{r.name}` | {_fmt(r.value, r.unit)} | {val('method_ratio', r.name)} | {r.note} |")
    lines += ["", "## Refinement overhead (6)", "",
              f"`ours` iteration 1: {val('refine_overhead', 'iteration_seconds')} s, of which stage evaluation + "
              f"consensus {val('refine_overhead', 'stage_eval_consensus_seconds')} s = "
              f"**{val('refine_overhead', 'fraction')}**: the evaluation passes "
              f"{val('refine_overhead', 'fraction_evaluation_passes')}, everything else (stage losses, selection, "
              f"consensus, label update) {val('refine_overhead', 'fraction_selection_consensus')}. With "
              f"`refine.stage_loss=train` (stage losses read off the epoch's own training pass, no evaluation pass): "
              f"**{val('refine_overhead', 'fraction_stage_loss_train')}**.", "",
              "The papers compute each stage's losses over the whole training set: an evaluation pass, a forward "
              "pass over N images. At the measured rates (T = (1), E = `eval_pass`) an iteration of e epochs with "
              "s stages costs about e/T + s/E per image, so the passes alone are this share of the iteration, "
              "however little the rest of the refinement costs:", "",
              "| schedule | s stages / e epochs | ours ÷ CE from the passes alone | their share of the iteration |",
              "|---|---|---:|---:|"]
    for label, stages, epochs in stage_schedules(cfg):
        lines.append(f"| {label.replace('_', ' ')} | {stages} / {epochs} | {val('eval_cost', f'ours_vs_ce_{label}')} | "
                     f"{val('eval_cost', f'refine_overhead_{label}')} |")
    lines += ["", "What the evaluation pass spends its time on (torch profiler, aten self time):", "",
              "| op | share |", "|---|---:|"]
    lines += [f"| {r.name} | {100 * r.value:.1f}% |" for r in rows if r.section == "profile_eval"]
    return lines


def _md_scaling_memory_targets(rows: list[Row], by: dict[tuple[str, str], Row]) -> list[str]:
    """(7) scaling, (8) memory and the targets table."""
    lines = ["", "## Scaling (7): one CE epoch", "", "| N | s | img/s |", "|---:|---:|---:|"]
    for r in rows:
        if r.section == "scaling" and r.name.startswith("ce_epoch_"):
            n = int(r.name.rsplit("_", 1)[1])
            lines.append(f"| {n:,} | {_fmt(r.value, r.unit)} | {r.note.split('(')[1].split(' ')[0]} |")
    lines += ["", f"Least squares: t = {_val(by, 'scaling', 'fit_intercept')} s + "
              f"{_val(by, 'scaling', 'fit_slope_per_1000')} s per 1,000 images; R² = "
              f"{by[('scaling', 'fit_r2')].value:.4f}.", "",
              "## Memory (8)", "", "| item | GiB | note |", "|---|---:|---|"]
    for r in rows:
        if r.section == "memory":
            lines.append(f"| `{r.name}` | {r.value:.3f} | {r.note} |")
    lines += ["", "`ru_maxrss` is the high-water mark of resident pages over the whole process life (shared "
              "libraries included: torch alone is several hundred MiB); the data is held once as uint8.", "",
              "## Targets (issue 6)", "", "| target | measured | required | result |", "|---|---:|---:|---|"]
    for r in rows:
        if r.section == "target" and r.result != "info":
            pct = r.name.startswith("refine_overhead")
            shown = "—" if not math.isfinite(r.value) else (f"{100 * r.value:.1f}%" if pct else f"{r.value:.3f}")
            req = r.target.replace("0.10", "10%") if pct else r.target
            lines.append(f"| {r.note} | {shown} | {req} | **{r.result}** |")
    return lines
