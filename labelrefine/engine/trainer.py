"""The training loop: every method's epochs and batches run here, and only here.

A method (:mod:`labelrefine.methods`) is step-level. For each entry of its schedule
(:class:`~labelrefine.engine.context.EpochSpec`) the :class:`Trainer` asks the method's handler
for that phase (:meth:`Method.handler`: the method itself, or its SimCLR phase, or the part of a
composite method that owns the phase) for

1. ``on_epoch_start(spec)``: per-epoch set-up and its logs (a forget rate, DivideMix's co-divide);
2. ``passes(spec)``: one or more :class:`Pass` es, each a list of batches and the
   :class:`~labelrefine.engine.optim.Learner` s they train (DivideMix trains its two nets one after
   the other in one epoch: two passes). Passes may be produced lazily (a generator), so a pass's
   batches can be drawn after the previous pass has trained;
3. for every batch, the pass's training step, which returns a :class:`Step`: one loss per
   learner and the scalars to log (or, for a batch processed in parts, a generator of the parts'
   losses: gradient accumulation, see :class:`Pass`). The Trainer does the rest - the lr of every learner, the
   finite-loss guard, backward and optimizer step (data parallel: DDP's gradient average),
   progress, and the epoch's averages (summed over ranks);
4. ``on_epoch_end(spec, parts)``: the epoch's logs from the passes' (stage selection, consensus).

Around the epochs :meth:`Trainer.fit` owns the seeding at the start of supervised training,
BatchNorm statistics over ranks, evaluation on the noisy validation split (model selection)
and on the test split (reported only), the oracle's metrics, ``metrics.jsonl``, checkpoints
and resume (RNG state included).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed as ddp
from ..errors import TrainingDiverged
from ..evaluation import Oracle, accuracy
from ..progress import progress
from . import checkpoint as ckpt_io
from .context import Context, EpochSpec, to_device
from .optim import Learner

log = logging.getLogger("labelrefine")


@dataclass
class Step:
    """What one training step of a method returns.

    Attributes:
        losses: one scalar per learner of the pass, in the pass's order; the Trainer checks they are
            finite, then backpropagates and steps each learner with its own.
        logs: scalars averaged over the pass, each weighted by ``size``.
        size: the batch's weight in those averages: its sample count, or 1 for a per-step mean.
    """

    losses: Sequence[torch.Tensor]
    logs: dict[str, Any]
    size: int


@dataclass
class Pass:
    """A sweep over ``batches`` within an epoch that trains ``learners``.

    Attributes:
        batches: one item per step, handed to ``step`` (index tensors, or tuples of them).
        learners: stepped in this order at every batch, one loss each; put in train mode first.
        step: the training step ``step(batch) -> Step``. For a batch too large for one
            forward-backward it may instead return a generator (gradient accumulation): it yields
            the losses of each part of the batch (one per learner, adding up to the step's losses),
            which the Trainer backpropagates at once, and returns the step's :class:`Step` (its
            ``losses`` the parts' sums, detached, for the record); the learners step once, after
            the last part.
        desc: the progress bar's label.
        extra_train: other modules to put in train mode (SimCLR's projection head).
    """

    batches: Sequence[Any]
    learners: list[Learner]
    step: Callable[[Any], Step | Generator[Sequence[torch.Tensor], None, Step]]
    desc: str = "train"
    extra_train: list[torch.nn.Module] = field(default_factory=list)


def _check_finite(losses: Sequence[torch.Tensor]) -> None:
    if not all(bool(torch.isfinite(v)) for v in losses):
        raise FloatingPointError("non-finite loss")


def merge_parts(parts: list[dict]) -> dict:
    """The default epoch logs: the passes' logs, later passes overriding earlier keys."""
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


class Trainer:
    """Runs a method's schedule: the epoch loop, the batch loop, evaluation, metrics and checkpoints.

    Args:
        ctx: the run context.
        method: the method instance (built on ``ctx``).
        out: the run directory (``metrics.jsonl`` and ``checkpoint.pt``); ``None`` writes nothing.
        val, test: the noisy validation split and the test split (either may be ``None``).
        oracle: clean-label metrics after every epoch (``None`` when the clean labels are unknown).
        data_fingerprint: stored in checkpoints (class list and split sizes).
    """

    def __init__(self, ctx: Context, method, *, out: Path | None = None, val=None, test=None,
                 oracle: Oracle | None = None, data_fingerprint: dict | None = None):
        self.ctx, self.method, self.cfg = ctx, method, ctx.cfg
        self.out = out
        self.oracle = oracle
        self.fingerprint = data_fingerprint or {}
        self.val = None if val is None else (to_device(val.images, ctx.device), val.labels.to(ctx.device))
        if self.val is not None:
            ctx.val = self.val
        self.test = None if test is None else (to_device(test.images, ctx.device), test.labels.to(ctx.device))
        self.schedule: list[EpochSpec] = []
        self.state: dict = {}
        self._eta: tuple[str, int] | None = None  # (phase, its epochs left): log an ETA early in the next pass

    # -- one pass, one epoch ---------------------------------------------------------------------
    def run_pass(self, p: Pass) -> dict[str, float]:
        """Train ``p``'s learners over its batches; the pass's averaged logs, ``lr`` and count."""
        for learner in p.learners:
            learner.model.train()
        for module in p.extra_train:
            module.train()
        steps = max(1, len(p.batches))
        sums: dict[str, float] = {}
        count, lr = 0, p.learners[0].base_lr
        eta, self._eta = self._eta, None
        probe_at = min(steps, max(3, steps // 10))  # time steps 2..probe_at (step 1 warms up caches)
        t_first = None
        for k, batch in enumerate(progress(p.batches, total=steps, desc=p.desc, unit="batch", inner=True), 1):
            if eta is not None and k == 2:
                t_first = time.perf_counter()
            if eta is not None and t_first is not None and k == probe_at + 1:
                self._log_eta(eta, (time.perf_counter() - t_first) / (probe_at - 1) * steps)
                eta = None
            lr = [learner.set_lr() for learner in p.learners][0]
            out = p.step(batch)
            if isinstance(out, Step):
                _check_finite(out.losses)
                for learner, loss in zip(p.learners, out.losses, strict=True):
                    learner.step(loss)
            else:
                out = self._accumulate(p.learners, out)
            for learner in p.learners:
                learner.progress += 1.0 / steps
            for key, value in out.logs.items():
                sums[key] = sums.get(key, 0.0) + float(value) * out.size
            count += out.size
        for learner in p.learners:
            learner.progress = round(learner.progress)
            learner.end_pass()
        if self.ctx.world > 1:  # the averages of the global epoch, not of this rank's part
            keys = sorted(sums)
            total = ddp.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64))
            sums = {k: float(v) for k, v in zip(keys, total[:-1], strict=True)}
            count = int(total[-1])
        return {**{k: v / max(count, 1) for k, v in sums.items()}, "lr": lr, "samples": count}

    @staticmethod
    def _accumulate(learners: list[Learner], parts: Generator[Sequence[torch.Tensor], None, Step]) -> Step:
        """A step whose batch comes in parts (gradient accumulation): zero the gradients, backpropagate
        each part's losses as it is yielded (so its graph is freed before the next part is built),
        then one optimizer step per learner. Returns the generator's :class:`Step`."""
        for learner in learners:
            learner.zero_grad()
        while True:
            try:
                losses = next(parts)
            except StopIteration as stop:
                out = stop.value
                break
            _check_finite(losses)
            for learner, loss in zip(learners, losses, strict=True):
                learner.backward(loss)
        if not isinstance(out, Step):
            raise TypeError(f"a step generator must return a Step, not {type(out).__name__}")
        for learner in learners:
            learner.apply()
        return out

    @staticmethod
    def _log_eta(eta: tuple[str, int], epoch_seconds: float) -> None:
        phase, epochs = eta
        log.info("%s: about %s an epoch (timed on its first steps); the phase's %d epoch(s): about %s",
                 phase, _duration(epoch_seconds), epochs, _duration(epoch_seconds * epochs))

    def run_epoch(self, spec: EpochSpec) -> dict[str, float]:
        """One schedule entry: the handler's start hook, its passes, its end hook; the epoch's logs."""
        handler = self.method.handler(spec)
        logs = dict(handler.on_epoch_start(spec) or {})
        parts = [self.run_pass(p) for p in handler.passes(spec)]
        logs.update(handler.on_epoch_end(spec, parts))
        return logs

    # -- the schedule ------------------------------------------------------------------------------
    def start(self, checkpoint: dict | None = None) -> None:
        """The schedule and loop state: fresh, or restored from ``checkpoint`` (method, RNG, progress)."""
        if checkpoint is None:
            self.schedule = self.method.schedule()
            self.state = {"done": 0, "best": None, "phase_seconds": {}, "metrics_lines": 0,
                          "supervised_started": False, "last_val": None, "last_test": None, "elapsed": 0.0}
            return
        self.schedule = [EpochSpec(**s) for s in checkpoint["schedule"]]
        ckpt_io.restore(self.ctx, self.method, checkpoint, self.out / "checkpoint.pt")
        self.state = checkpoint["engine"]
        log.info("resuming %s at epoch %d of %d", self.out, self.state["done"] + 1, len(self.schedule))

    def fit(self) -> dict:
        """Run the schedule from where :meth:`start` left it; returns the loop state."""
        state, schedule, n = self.state, self.schedule, len(self.schedule)
        saved_epoch = state["done"] or None  # the epoch the checkpoint on disk ends (None: no checkpoint)
        t_loop, elapsed0 = time.perf_counter(), state["elapsed"]
        evaluated = self._evaluated_epochs()
        first = state["done"]
        for i in progress(range(first, n), desc=self.cfg.method, unit="epoch"):
            spec = schedule[i]
            if spec.supervised and not state["supervised_started"]:
                # Reseed: supervised training must not depend on whether SSL ran or came from the cache.
                ckpt_io.seed_everything(self.cfg.seed + 1)
                self.ctx.generator.manual_seed(self.cfg.seed + 1)
                self.method.on_supervised_start()
                state["supervised_started"] = True
                state["ssl_knn_test_acc"] = self._ssl_knn()
            if i == first or schedule[i - 1].phase != spec.phase:  # a phase starts (or resumes): its ETA
                left = next((j for j in range(i, n) if schedule[j].phase != spec.phase), n) - i
                self._eta = (spec.phase, left)
            t0 = time.perf_counter()
            try:
                logs = self.run_epoch(spec)
            except FloatingPointError:
                raise TrainingDiverged(self._diverged(spec, i, saved_epoch)) from None
            dt = time.perf_counter() - t0
            for net in self.method.networks().values():
                ddp.average_buffers(net)  # BatchNorm statistics: the same model on every rank
            state["phase_seconds"][spec.phase] = state["phase_seconds"].get(spec.phase, 0.0) + dt
            record = {**spec.as_dict(), "global_epoch": i + 1, **logs, "seconds": round(dt, 3)}
            if spec.supervised and i == next(j for j, s in enumerate(schedule) if s.supervised) \
                    and state.get("ssl_knn_test_acc") is not None:
                record["ssl_knn_test_acc"] = state["ssl_knn_test_acc"]  # the first supervised epoch's record
            if i in evaluated:
                self._evaluate(record, spec, i)
            if self.oracle is not None:
                record.update(self.oracle.metrics(self.method.oracle_view()))
            if self.out is not None and ddp.is_main():
                ckpt_io.append_line(self.out / "metrics.jsonl", record)
            state["metrics_lines"] += 1
            state["done"] = i + 1
            state["elapsed"] = elapsed0 + time.perf_counter() - t_loop
            log.info(epoch_line(record, n))
            every = self.cfg.checkpoint_every
            if self.out is not None and every and ((i + 1) % every == 0 or i + 1 == n):
                ckpt_io.save(self.out / "checkpoint.pt", self.cfg, schedule, self.method, self.ctx, state,
                             self.fingerprint)
                saved_epoch = i + 1
        return state

    SSL_KNN_K, SSL_KNN_T = 200, 0.1  # lightly's CIFAR benchmark settings

    def _ssl_knn(self) -> float | None:
        """The SimCLR encoder's diagnostic, before any supervised step: kNN accuracy of the test
        split against the training images with the labels the run was given (noisy unless the
        noise is none), in the encoder's feature space (:mod:`labelrefine.knn`). Test labels are
        used for this evaluation only; nothing is selected by it. None without SSL or a test split."""
        ssl = getattr(self.method, "ssl", None)
        if ssl is None or self.test is None or self.cfg.ssl.epochs == 0:
            return None
        from ..knn import knn_accuracy

        ctx = self.ctx
        bank = ctx.features_all(ssl.model)
        query = ctx.features_all(ssl.model, self.test[0])
        return knn_accuracy(bank, ctx.y, query, self.test[1], ctx.num_classes,
                            k=self.SSL_KNN_K, temperature=self.SSL_KNN_T)

    def _diverged(self, spec: EpochSpec, i: int, saved_epoch: int | None) -> str:
        n = len(self.schedule)
        kept = (f"the last good checkpoint (after epoch {saved_epoch} of {n}) is kept in {self.out}"
                if saved_epoch else "no checkpoint was written before it, so there is nothing to resume")
        return (f"non-finite loss in phase {spec.phase!r}, iteration {spec.iteration}, epoch {spec.epoch} "
                f"(epoch {i + 1} of {n}); {kept}")

    def _evaluated_epochs(self) -> set[int]:
        """Schedule positions evaluated: every ``eval_every``-th supervised epoch and the last one."""
        supervised = [i for i, s in enumerate(self.schedule) if s.supervised]
        every = self.cfg.eval_every
        return {i for k, i in enumerate(supervised) if (k + 1) % every == 0 or k + 1 == len(supervised)}

    def _evaluate(self, record: dict, spec: EpochSpec, i: int) -> None:
        """Validation accuracy (selects the model) and test accuracy (reported only) into ``record``;
        the best epoch's weights, on the host, into the loop state."""
        state, method = self.state, self.method
        if self.val is not None:
            record["val_acc"] = accuracy(method.predict_logits(self.val[0]), self.val[1])
        if self.test is not None:
            record["test_acc"] = accuracy(method.predict_logits(self.test[0], tta=self.cfg.tta), self.test[1])
        state["last_val"], state["last_test"] = record.get("val_acc"), record.get("test_acc")
        best = state["best"]
        score = record.get("val_acc", float("-inf"))
        if best is None or score > best["val_acc"] or self.val is None:
            state["best"] = {"epoch": i + 1, "val_acc": score, "test_acc": record.get("test_acc"),
                             "spec": spec.as_dict(),
                             "networks": {k: {n: t.detach().to("cpu", copy=True) for n, t in v.state_dict().items()}
                                          for k, v in method.networks().items()}}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def epoch_line(r: dict, total: int) -> str:
    """The log line of one epoch's record."""
    parts = [f"[{r['global_epoch']}/{total}] {r['phase']}"]
    if r["iteration"]:
        parts.append(f"it {r['iteration']}")
    parts.append(f"ep {r['epoch']} loss {r.get('loss', float('nan')):.4f}")
    for key, label in (("val_acc", "val"), ("test_acc", "test"), ("oracle_label_acc", "label-acc")):
        if key in r:
            parts.append(f"{label} {r[key]:.4f}")
    for key in ("stage_selected", "pseudo_labelled", "labels_changed"):
        if key in r:
            parts.append(f"{key.replace('_', '-')} {r[key]}")
    parts.append(f"{r['seconds']:.1f}s")
    return " ".join(parts)

