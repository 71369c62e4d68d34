"""Co-teaching: two networks, each trained on the small-loss samples its peer picks.

Han, Yao, Yu, Niu, Xu, Hu, Tsang, Sugiyama, "Co-teaching: Robust Training of Deep Neural
Networks with Extremely Noisy Labels", NeurIPS 2018 (Alg. 1).

Per batch both networks see the same augmented images. Each computes its per-sample CE on the
noisy labels and keeps the ``int((1 - r(t))·B)`` rows with the smallest loss; network 1 is then
updated on network 2's rows and network 2 on network 1's, each with its own optimiser. The
forget rate ``r(t) = τ·min(t/T_k, 1)`` rises over ``coteaching.num_gradual`` epochs to
``τ = coteaching.forget_rate`` (-1: the requested noise rate).

Differences from the reference code: the optimiser and lr schedule are the project's
(``optim.*``; the paper's Adam at lr 1e-3 is ``optim.optimizer=adam optim.lr=0.001``), so the
reference's linear lr decay and β1 change from epoch 80 are not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import FORGET_RATE, Range, at_least
from ..engine import Context, EpochSpec, Learner
from ..losses import per_sample_ce
from . import register
from ._small_loss import SmallLossMethod, check_range, forget_rate, peer_selection, resolve_tau


@dataclass
class CoteachingConfig:
    """The ``coteaching`` config section."""

    RANGES: ClassVar[dict[str, Range]] = {  # field -> allowed range (see labelrefine.config.Range)
        "forget_rate": FORGET_RATE,
        "num_gradual": at_least(0),
    }
    forget_rate: float = -1.0  # final fraction dropped per batch; -1 = the noise rate (Han et al.: tau)
    num_gradual: int = 10  # epochs over which the forget rate rises linearly to its final value


@register
class Coteaching(SmallLossMethod):
    name = "coteaching"
    summary = "Two networks; each is trained on the small-loss samples its peer selects (Co-teaching)."
    paper = "Han et al., NeurIPS 2018"
    sections = {"coteaching": CoteachingConfig}

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        c = self.cfg.coteaching
        check_range(c.num_gradual >= 0, "coteaching.num_gradual", "must be >= 0")
        self.tau = resolve_tau(self.cfg, ctx.noise_rate, c.forget_rate, key="coteaching.forget_rate")
        # Two networks from two draws of the global RNG: different random initialisations.
        self.trainers = [Learner(ctx, self.epochs), Learner(ctx, self.epochs)]
        self.nets = [t.model for t in self.trainers]
        self.rate = 0.0

    def start_epoch(self, spec: EpochSpec) -> dict[str, float]:
        self.rate = forget_rate(spec.epoch - 1, self.tau, self.cfg.coteaching.num_gradual)
        return {"forget_rate": self.rate}

    def batch_step(self, logits, y, index):
        loss1, loss2 = per_sample_ce(logits[0], y), per_sample_ce(logits[1], y)
        rows1, rows2 = peer_selection(loss1, loss2, self.rate)
        # rows2 are network 1's own small-loss picks and rows1 network 2's.
        self.counter.add(index, rows2)
        self.counter.add(index, rows1)
        update1, update2 = loss1[rows1].mean(), loss2[rows2].mean()
        agree = (logits[0].argmax(1) == logits[1].argmax(1)).float().mean()
        logs = {"loss": (update1.detach() + update2.detach()) / 2, "loss1": update1.detach(),
                "loss2": update2.detach(), "kept_fraction": len(rows1) / len(index), "agreement": agree}
        return [update1, update2], logs
