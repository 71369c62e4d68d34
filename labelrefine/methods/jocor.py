"""JoCoR: two networks trained jointly on a co-regularised loss, keeping the small-loss samples.

Wei, Feng, Chen, An, "Combating Noisy Labels by Agreement: A Joint Training Method with
Co-Regularization", CVPR 2020.

Per batch both networks see the same augmented images. The per-sample joint loss
``ℓ = (1-λ)(CE₁ + CE₂) + λ(KL(p₁‖p₂) + KL(p₂‖p₁))`` (:func:`labelrefine.losses.jocor_loss`,
``λ = jocor.lam``) ranks the batch; the ``int((1 - r(t))·B)`` rows with the smallest ``ℓ`` are
kept and ONE optimiser over both networks' parameters takes a step on their mean. ``r(t)`` is
Co-teaching's schedule with ``τ = jocor.forget_rate``; -1 takes the requested noise rate,
halved for pair-flip noise as in the reference code.

Optimiser: the reference's Adam at lr 1e-3 without weight decay (``jocor.optimizer=adam``,
``jocor.lr``) with the project's lr schedule; ``jocor.optimizer=optim`` uses the shared ``optim``
section (its optimizer, lr and weight decay) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..config import FORGET_RATE, Range, above, at_least, unit
from ..engine import Context, EpochSpec, Learner
from ..losses import jocor_loss
from . import register
from ._small_loss import SmallLossMethod, check_range, forget_rate, resolve_tau, small_loss_index


@dataclass
class JocorConfig:
    """The ``jocor`` config section."""

    RANGES: ClassVar[dict[str, Range]] = {  # field -> allowed range (see labelrefine.config.Range)
        "lam": unit(),
        "lr": above(0.0),
        "forget_rate": FORGET_RATE,
        "num_gradual": at_least(0),
    }
    lam: float = 0.9  # co-regularisation weight lambda (Wei et al.: 0.9 CIFAR-10, 0.85 CIFAR-100)
    # JoCoR's own optimizer: the reference's Adam at lr 1e-3. With SGD at the shared optim.lr the
    # KL term (lambda 0.9) drives both nets to the same uniform output (digits: 16% test acc).
    optimizer: Literal["adam", "optim"] = "adam"  # adam = the reference (no weight decay); optim = the optim section
    lr: float = 0.001
    forget_rate: float = -1.0  # -1 = the noise rate (tau; tau/2 for pair-flip noise)
    num_gradual: int = 10


@register
class JoCoR(SmallLossMethod):
    name = "jocor"
    summary = "Two networks, one optimiser: small-loss selection on a joint CE + symmetric-KL loss (JoCoR)."
    paper = "Wei et al., CVPR 2020"
    sections = {"jocor": JocorConfig}

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        j = self.cfg.jocor
        check_range(0.0 <= j.lam <= 1.0, "jocor.lam", f"{j.lam} is outside [0, 1]")
        check_range(j.num_gradual >= 0, "jocor.num_gradual", "must be >= 0")
        self.tau = resolve_tau(self.cfg, ctx.noise_rate, j.forget_rate, key="jocor.forget_rate",
                               halve_pairflip=True)
        # One learner over both networks: a single optimiser holds both networks' parameters.
        own = j.optimizer == "adam"
        # The reference's Adam has no weight decay; jocor.optimizer=optim takes optim.weight_decay.
        self.trainers = [Learner(ctx, self.epochs, models=[ctx.new_model(), ctx.new_model()],
                                 optimizer="adam" if own else None, lr=j.lr if own else None,
                                 weight_decay=0.0 if own else None)]
        self.nets = list(self.trainers[0].model)
        self.rate = 0.0

    def start_epoch(self, spec: EpochSpec) -> dict[str, float]:
        self.rate = forget_rate(spec.epoch - 1, self.tau, self.cfg.jocor.num_gradual)
        return {"forget_rate": self.rate}

    def batch_step(self, logits, y, index):
        per = jocor_loss(logits[0], logits[1], y, self.cfg.jocor.lam)
        rows = small_loss_index(per, self.rate)
        self.counter.add(index, rows)
        loss = per[rows].mean()
        agree = (logits[0].argmax(1) == logits[1].argmax(1)).float().mean()
        return [loss], {"loss": loss.detach(), "kept_fraction": len(rows) / len(index), "agreement": agree}
