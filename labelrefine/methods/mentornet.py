"""MentorNet-PD: one network, per-sample weights from a moving loss percentile.

Jiang, Zhou, Leung, Li, Fei-Fei, "MentorNet: Learning Data-Driven Curriculum for Very Deep
Neural Networks on Corrupted Labels", ICML 2018; the pre-defined curriculum ("MentorNet PD").

For every batch the ``mentornet.percentile``-th percentile of its per-sample CE updates an
exponential moving average ``λ ← m·λ + (1 - m)·percentile`` (``m = mentornet.momentum``; the
first batch initialises ``λ``). After a burn-in of the first ``mentornet.burn_in`` fraction of
the epochs (plain CE, every ``v = 1``), each sample gets ``v = 1[ℓ ≤ λ]`` and the step minimises
``Σ v·ℓ / B`` (the reference code's ``reduce_mean`` of the weighted losses). As in the reference,
``λ`` is updated on every batch, burn-in included, before the batch's weights are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import distributed as ddp
from ..config import Range, unit
from ..engine import Context, EpochSpec, Learner
from ..losses import per_sample_ce
from . import register
from ._small_loss import SmallLossMethod, check_range


def update_moving_percentile(moving: torch.Tensor | None, losses: torch.Tensor, *, percentile: float,
                             momentum: float) -> torch.Tensor:
    """The new moving percentile ``m·moving + (1 - m)·q``, q = the ``percentile``-th percentile of ``losses``.

    Args:
        moving: the current value (0-d tensor), or None before the first batch (then ``q``).
        losses: ``(B,)`` per-sample losses (detached here).
        percentile: in [0, 100] (MentorNet-PD: 75); linear interpolation between order statistics.
        momentum: ``m`` in [0, 1).
    """
    # Data parallel: the percentile of the whole global batch, not of this rank's part.
    q = torch.quantile(ddp.all_gather_cat(losses.detach().float()), percentile / 100.0)
    return q if moving is None else momentum * moving + (1.0 - momentum) * q


def pd_weights(losses: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """MentorNet-PD's weights ``v = 1[ℓ ≤ λ]`` as floats ``(B,)``."""
    return (losses.detach() <= threshold).to(losses.dtype)


@dataclass
class MentornetConfig:
    """The ``mentornet`` config section."""

    RANGES: ClassVar[dict[str, Range]] = {  # field -> allowed range (see labelrefine.config.Range)
        "percentile": Range(0.0, 100.0),
        "burn_in": unit(),
        "momentum": unit(hi_open=True),
    }
    percentile: float = 75.0  # MentorNet-PD: keep samples whose loss <= this moving percentile
    burn_in: float = 0.18  # fraction of epochs trained with plain CE first
    momentum: float = 0.9  # moving-average factor of the percentile


@register
class MentorNetPD(SmallLossMethod):
    name = "mentornet"
    summary = "MentorNet-PD: after a CE burn-in, train only on samples whose loss is below a moving percentile."
    paper = "Jiang et al., ICML 2018"
    sections = {"mentornet": MentornetConfig}

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        m = self.cfg.mentornet
        check_range(0.0 <= m.burn_in <= 1.0, "mentornet.burn_in", f"{m.burn_in} is outside [0, 1]")
        check_range(0.0 <= m.momentum < 1.0, "mentornet.momentum", f"{m.momentum} is outside [0, 1)")
        self.burn_in_epochs = math.floor(m.burn_in * self.epochs + 0.5)
        self.trainers = [Learner(ctx, self.epochs)]
        self.nets = [self.trainers[0].model]
        self.moving: torch.Tensor | None = None  # the moving percentile λ of the per-sample CE
        self.burning_in = True

    def start_epoch(self, spec: EpochSpec) -> dict[str, float]:
        self.burning_in = spec.epoch <= self.burn_in_epochs
        return {"burn_in": int(self.burning_in)}

    def batch_step(self, logits, y, index):
        m = self.cfg.mentornet
        per = per_sample_ce(logits[0], y)
        self.moving = update_moving_percentile(self.moving, per, percentile=m.percentile, momentum=m.momentum)
        if self.burning_in:
            loss = per.mean()
            kept = 1.0
        else:
            v = pd_weights(per, self.moving)
            loss = (v * per).sum() / len(per)
            self.counter.add(index, v.nonzero().flatten())
            kept = v.mean()
        return [loss], {"loss": loss.detach(), "kept_fraction": kept}

    def end_epoch(self, spec: EpochSpec) -> dict[str, float]:
        return {} if self.moving is None else {"percentile": float(self.moving)}

    def extra_state(self) -> dict:
        return {"moving": self.moving}

    def load_extra_state(self, state: dict) -> None:
        self.moving = state["moving"]
