"""Plain cross-entropy on the noisy labels, with and without SimCLR initialisation."""

from __future__ import annotations

import torch

from ..engine import Context, EpochSpec, Learner
from . import register
from .base import LabelReport, Method, supervised_pass
from .schedule import supervised_budget
from .simclr import SSLInit


@register
class CE(Method):
    name = "ce"
    summary = "Plain cross-entropy on the noisy labels (the standard baseline)."
    paper = "-"
    phases = ("train",)
    use_ssl = False

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        model = ctx.new_model()
        self.ssl = SSLInit(ctx, model) if self.use_ssl else None
        self.epochs = supervised_budget(self.cfg)
        self.sup = Learner(ctx, self.epochs, model=model)
        self.all = torch.arange(ctx.n, device=ctx.device)

    def schedule(self) -> list[EpochSpec]:
        pre = self.ssl.specs() if self.ssl is not None else []
        return pre + [EpochSpec("train", 0, e) for e in range(1, self.epochs + 1)]

    def passes(self, spec: EpochSpec):
        return [supervised_pass(self.ctx, self.sup, self.all, self.given)]

    def networks(self):
        return {"model": self.sup.model}

    def label_report(self) -> LabelReport:
        """Quality = 1 - the normalised rank of the final model's loss on the given label."""
        out = super().label_report()
        loss = -torch.log(out.label_quality.clamp_min(1e-12))
        rank = torch.empty_like(loss)
        rank[torch.argsort(loss)] = torch.arange(len(loss), device=loss.device, dtype=loss.dtype)
        out.label_quality = 1.0 - rank / max(len(loss) - 1, 1)
        return out

    def state_dict(self) -> dict:
        return {"sup": self.sup.state_dict(), "ssl": None if self.ssl is None else self.ssl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sup.load_state_dict(state["sup"])
        if self.ssl is not None:
            self.ssl.load_state_dict(state["ssl"])


@register
class CESSL(CE):
    name = "ce_ssl"
    summary = "SimCLR initialisation, then plain cross-entropy: isolates what the SSL alone buys."
    paper = "Chen et al., ICML 2020 (SimCLR) + CE"
    phases = ("ssl", "train")
    use_ssl = True
