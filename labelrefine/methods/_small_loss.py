"""What the small-loss baselines share: Co-teaching, JoCoR and MentorNet-PD.

All three train on the noisy labels for the whole run and, batch by batch, drop the samples
with the largest loss (the "small-loss trick": networks fit clean samples before noisy ones).
This module holds, once:

* :func:`forget_rate` - the fraction dropped per batch, ``r(t) = τ·min(t/T_k, 1)`` (Han et al.
  2018), and :func:`resolve_tau` - the final rate τ from the config or the noise rate;
* :func:`small_loss_index` / :func:`peer_selection` - which rows of a batch are kept;
* :class:`SelectionCounter` - per-sample counts of how often a sample was kept, on the device;
* :class:`SmallLossMethod` - the pass, schedule, outputs and checkpoints; a subclass supplies the
  networks, their learners and :meth:`SmallLossMethod.batch_step`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed as ddp
from ..data.noise import check_noise_type
from ..engine import Context, EpochSpec, Learner, Pass, Step
from ..errors import UserError
from .base import LabelReport, Method
from .schedule import supervised_budget

__all__ = [
    "SelectionCounter",
    "SmallLossMethod",
    "forget_rate",
    "num_remember",
    "peer_selection",
    "resolve_tau",
    "small_loss_index",
]


# ---------------------------------------------------------------------------------------------
# The forget-rate schedule


def forget_rate(epochs_done: float, tau: float, num_gradual: int) -> float:
    """Fraction of each batch to drop after ``epochs_done`` epochs: ``τ·min(t / T_k, 1)``.

    Co-teaching's schedule (Han et al., NeurIPS 2018, Alg. 1; JoCoR uses the same): the rate
    rises linearly from 0 to τ over the first ``T_k = num_gradual`` epochs, then stays at τ.
    The first epoch (``epochs_done = 0``) drops nothing, as in the reference code.
    """
    if num_gradual <= 0:
        return float(tau)
    return float(tau) * min(max(epochs_done, 0.0) / num_gradual, 1.0)


def resolve_tau(cfg, noise_rate: float, configured: float, *, key: str, halve_pairflip: bool = False) -> float:
    """The final forget rate τ: ``configured`` when it is >= 0, else the requested noise rate.

    ``halve_pairflip``: JoCoR (Wei et al., CVPR 2020) uses τ/2 for pair-flip ("asymmetric")
    noise when τ comes from the noise rate; an explicit ``configured`` value is used as given.
    ``cfg.data.noise`` is a canonical name: pass the Context's ``ctx.cfg`` (it resolved any alias).

    Raises:
        UserError: ``configured`` is neither -1 nor in [0, 1), or it is -1 and the noise type
            has no requested rate (``none``, ``column:NAME``), so τ must be given explicitly.
    """
    if configured >= 0:
        if configured >= 1.0:
            raise UserError(f"config key {key!r}: {configured} is outside [0, 1) (or -1 = the noise rate)")
        return float(configured)
    if configured != -1.0:
        raise UserError(f"config key {key!r}: {configured} must be -1 (= the noise rate) or in [0, 1)")
    noise = cfg.data.noise
    if not check_noise_type(noise):
        raise UserError(f"config key {key!r}: -1 takes the forget rate from data.noise_rate, which "
                        f"data.noise={noise!r} does not use; set {key} to the expected noise rate")
    tau = float(noise_rate)
    if halve_pairflip and noise == "pairflip":  # canonical: the Context resolved the alias asymmetric
        tau /= 2.0
    return tau


# ---------------------------------------------------------------------------------------------
# Per-batch selection


def num_remember(batch_size: int, rate: float) -> int:
    """Rows kept of a batch of ``batch_size`` when dropping ``rate``: ``int((1 - r)·B)``, at least 1."""
    return min(batch_size, max(1, int((1.0 - rate) * batch_size)))


def small_loss_index(losses: torch.Tensor, rate: float) -> torch.Tensor:
    """Positions of the :func:`num_remember` smallest entries of ``losses`` ``(B,)``, smallest first.

    Ties keep the earlier position (stable sort), so the selection is deterministic.
    """
    order = torch.argsort(losses.detach(), stable=True)
    return order[: num_remember(losses.shape[0], rate)]


def peer_selection(loss1: torch.Tensor, loss2: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-teaching's cross update: which rows each network is trained on.

    Each network ranks the batch by its own per-sample loss and keeps its small-loss rows; those
    rows update the *peer* (Han et al., NeurIPS 2018, Alg. 1, steps 4-6).

    Args:
        loss1, loss2: ``(B,)`` per-sample losses of network 1 and network 2.
        rate: the forget rate r(t).

    Returns:
        ``(rows_for_net1, rows_for_net2)``: batch positions that update network 1 (network 2's
        small-loss rows) and network 2 (network 1's small-loss rows).
    """
    return small_loss_index(loss2, rate), small_loss_index(loss1, rate)


# ---------------------------------------------------------------------------------------------
# Selection-frequency bookkeeping


class SelectionCounter:
    """Per-sample counts, on the device, of how often each sample was seen and kept.

    ``seen[i]`` counts the selections sample ``i`` took part in (two per batch for a two-network
    method that lets each network choose), ``kept[i]`` those that kept it. The ``epoch_*``
    counterparts cover the current epoch only (for the oracle's precision of the selection).
    """

    def __init__(self, n: int, device: torch.device):
        z = lambda: torch.zeros(n, dtype=torch.int64, device=device)  # noqa: E731
        self.seen, self.kept, self.epoch_seen, self.epoch_kept = z(), z(), z(), z()

    def start_epoch(self) -> None:
        self.epoch_seen.zero_()
        self.epoch_kept.zero_()

    def add(self, index: torch.Tensor, kept_rows: torch.Tensor) -> None:
        """One selection over the batch ``index`` ``(B,)`` that kept the rows ``kept_rows``."""
        ones = torch.ones_like(index)
        self.seen.index_add_(0, index, ones)
        self.epoch_seen.index_add_(0, index, ones)
        picked = index[kept_rows]
        ones = torch.ones_like(picked)
        self.kept.index_add_(0, picked, ones)
        self.epoch_kept.index_add_(0, picked, ones)

    # Data parallel: each rank counts the samples it trains on; the views below sum over ranks
    # (collectives: every rank calls them at the same point).
    def _global(self, *names: str) -> list[torch.Tensor]:
        return [ddp.all_reduce_sum(getattr(self, k).clone()) for k in names]

    def frequency(self) -> torch.Tensor:
        """``(N,)`` float in [0, 1]: ``1 - dropped / seen``, i.e. kept / seen; 1 for a sample never seen."""
        seen, kept = self._global("seen", "kept")
        dropped = (seen - kept).double()
        return (1.0 - dropped / seen.clamp_min(1).double()).float()

    def epoch_selected(self) -> torch.Tensor | None:
        """``(N,)`` bool: kept by at least half of this epoch's selections it was in (None if none ran)."""
        seen, kept = self._global("epoch_seen", "epoch_kept")
        if not bool(seen.any()):
            return None
        return (seen > 0) & (2 * kept >= seen)

    def state_dict(self) -> dict:
        """The global counts (data parallel: summed over ranks)."""
        return dict(zip(("seen", "kept", "epoch_seen", "epoch_kept"),
                        self._global("seen", "kept", "epoch_seen", "epoch_kept"), strict=True))

    def load_state_dict(self, state: dict) -> None:
        for key in ("seen", "kept", "epoch_seen", "epoch_kept"):
            # Data parallel: rank 0 carries the global counts, the others start from zero.
            getattr(self, key).copy_(state[key] if ddp.is_main() else torch.zeros_like(state[key]))


# ---------------------------------------------------------------------------------------------
# The shared method skeleton


class SmallLossMethod(Method):
    """A single-stage small-loss baseline: ``epochs`` training epochs on the noisy labels.

    A subclass builds ``self.trainers`` (one :class:`~labelrefine.engine.optim.Learner` per
    optimizer) and ``self.nets`` (the networks that predict, network 1 first) in its ``__init__``,
    and implements :meth:`batch_step`. This class gives the epoch's one pass (every learner's
    networks on the same augmented batch, one loss per learner; the Trainer steps them), the
    schedule, predictions from network 1, the label report, the oracle view and checkpoints.
    """

    phases = ("train",)  # the schedule below; coteaching, jocor and mentornet inherit it
    trainers: list[Learner]
    nets: list[nn.Module]

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.epochs = supervised_budget(self.cfg)
        self.all = torch.arange(ctx.n, device=ctx.device)
        self.counter = SelectionCounter(ctx.n, ctx.device)
        self.epochs_done = 0

    # -- to implement ----------------------------------------------------------------------
    def start_epoch(self, spec: EpochSpec) -> dict[str, float]:
        """Per-epoch set-up (e.g. the forget rate); returns logs for the epoch's record."""
        return {}

    def batch_step(self, logits: list[torch.Tensor], y: torch.Tensor,
                   index: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor | float]]:
        """Losses of one batch, one scalar per learner (in ``self.trainers`` order).

        Args:
            logits: float32 ``(B, K)`` of each training network (the learners' ``nets`` in order:
                network 1 first), from the same augmented batch.
            y: ``(B,)`` noisy labels; index: ``(B,)`` sample indices.

        Returns:
            ``(losses, logs)``; ``logs`` must hold ``loss`` (what the epoch reports) and may hold
            more scalars, averaged over the epoch's samples. Record selections in ``self.counter``.
        """
        raise NotImplementedError

    def end_epoch(self, spec: EpochSpec) -> dict[str, float]:
        """Logs computed after the epoch's last step."""
        return {}

    # -- the epoch ---------------------------------------------------------------------------
    def schedule(self) -> list[EpochSpec]:
        return [EpochSpec("train", 0, e) for e in range(1, self.epochs + 1)]

    def on_epoch_start(self, spec: EpochSpec) -> dict[str, float]:
        logs = self.start_epoch(spec)
        self.counter.start_epoch()
        return logs

    def passes(self, spec: EpochSpec) -> list[Pass]:
        n, bs = self.ctx.n, self.cfg.optim.batch_size
        # Full batches only, as supervised_pass: a batch of a few samples gives noisy BatchNorm statistics.
        batches = self.ctx.batches(self.all, bs, drop_last=n > bs)
        return [Pass(batches, self.trainers, self._step, desc=self.name)]

    def _step(self, index: torch.Tensor) -> Step:
        x = self.ctx.augment(index)
        with self.ctx.autocast():
            outs = [net(x) for t in self.trainers for net in t.nets]
        losses, logs = self.batch_step([o.float() for o in outs], self.given[index], index)
        return Step(losses, logs, len(index))

    def on_epoch_end(self, spec: EpochSpec, parts: list[dict[str, float]]) -> dict[str, float]:
        self.epochs_done = spec.epoch
        return {**parts[0], **self.end_epoch(spec)}

    # -- outputs -----------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """Network 1 only: the papers report network 1, so it alone predicts (and is saved)."""
        return {"model": self.nets[0]}

    def predict_logits(self, images: torch.Tensor | None = None, *, tta: str = "none") -> torch.Tensor:
        return self.ctx.logits_all(self.nets[0], images, tta=tta)

    def oracle_view(self) -> dict[str, torch.Tensor]:
        """The given labels, and the samples this epoch's small-loss selection kept (if any)."""
        view = {"labels": self.given}
        selected = self.counter.epoch_selected()
        if selected is not None:
            view["stage_selected"] = selected
        return view

    def label_report(self) -> LabelReport:
        """Refined label = network 1's argmax; quality = the small-loss selection frequency.

        ``label_quality`` is the fraction of the selections a sample took part in that kept it
        (:meth:`SelectionCounter.frequency`); ``n_stages_selected`` is how often it was kept.
        """
        pred = self.predict_logits().argmax(1)
        return LabelReport(pred, self.counter.frequency(), pred != self.given, self.counter.kept.clone())

    # -- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"trainers": [t.state_dict() for t in self.trainers], "counter": self.counter.state_dict(),
                "epochs_done": self.epochs_done, **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        for trainer, s in zip(self.trainers, state["trainers"], strict=True):
            trainer.load_state_dict(s)
        self.counter.load_state_dict(state["counter"])
        self.epochs_done = state["epochs_done"]
        self.load_extra_state(state)


def check_range(ok: bool, key: str, msg: str) -> None:
    """A config range check for a method's own section (``config.validate`` covers the rest)."""
    if not ok:
        raise UserError(f"config key {key!r}: {msg}")
