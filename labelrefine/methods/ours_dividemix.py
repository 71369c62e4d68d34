"""The papers' "Our Method (with DivideMix)": the ``ours`` pipeline, then DivideMix.

Built by composition: an :class:`~labelrefine.methods.ours.Ours` runs its SimCLR pretraining,
CE warmup and refinement iterations (its softmax-weighted fine-tune is replaced by DivideMix),
then a :class:`~labelrefine.methods.dividemix.DivideMix` runs its own warmup (``dm_warmup``) and
MixMatch epochs (``dm_train``), as many as the ``dividemix`` method would.

The papers do not say how the two are combined. The default reading (``dividemix.init=auto``,
``dividemix.labels=auto``): both DivideMix nets start from the SimCLR encoder - the weights right
after pretraining, before any supervised step; each net keeps its own random classifier - and
train on the refined labels. The alternatives:

* ``dividemix.init=refined``: both nets start from the ours model after refinement (classifier
  included; the two nets then start identical and diverge only through their batches);
* ``dividemix.init=random``: DivideMix from scratch on the refined labels;
* ``dividemix.labels=noisy``: DivideMix on the given labels (the refinement then only matters
  through ``init=refined``; SimCLR init alone is cheaper as ``method=dividemix dividemix.init=ssl``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..engine import Context, EpochSpec
from . import register
from .base import LabelReport, Method
from .dividemix import DivideMix, dividemix_specs, encoder_weights
from .ours import Ours

log = logging.getLogger("labelrefine")


@register
class OursDivideMix(Method):
    name = "ours_dividemix"
    summary = "SimCLR + warmup + stage-consensus refinement, then DivideMix (SimCLR init) on the refined labels."
    paper = "Bala et al. 2024 (arXiv), 'Our Method (with DivideMix)'; Li et al., ICLR 2020"
    phases = ("ssl", "warmup", "refine", "dm_warmup", "dm_train")
    PHASES = ("dm_warmup", "dm_train")

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        d = self.cfg.dividemix
        self.init = "ssl" if d.init == "auto" else d.init
        self.label_source = "refined" if d.labels == "auto" else d.labels
        if self.init == "ssl" and self.cfg.ssl.epochs == 0:
            log.warning("dividemix.init=ssl but ssl.epochs=0: the DivideMix nets start from random weights")
            self.init = "random"
        if self.label_source == "noisy" and self.init != "refined":
            log.warning("ours_dividemix with dividemix.labels=noisy and init=%s does not use the refinement; "
                        "method=dividemix dividemix.init=ssl gives the same without its cost", self.init)
        self.ours = Ours(ctx)
        self.encoder: dict[str, torch.Tensor] | None = None  # SimCLR weights, kept until DivideMix starts
        self.dm: DivideMix | None = None

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self) -> list[EpochSpec]:
        pre = [s for s in self.ours.schedule() if s.phase != "finetune"]
        return pre + dividemix_specs(self.cfg, self.PHASES)

    def on_supervised_start(self) -> None:
        """Called after SimCLR, before the first supervised step: snapshot the encoder."""
        self.ours.on_supervised_start()
        if self.init == "ssl" and self.encoder is None and self.dm is None:
            self.encoder = encoder_weights(self.ours.sup.model)

    def handler(self, spec: EpochSpec):
        """The DivideMix stage for its phases (built at its first epoch), else the ``ours`` part."""
        if spec.phase in self.PHASES:
            if self.dm is None:
                self.dm = self._new_dividemix(fresh=True)
            return self.dm.handler(spec)
        return self.ours.handler(spec)

    def _new_dividemix(self, *, fresh: bool) -> DivideMix:
        """The DivideMix stage; ``fresh=False`` when its state is about to be loaded anyway."""
        init_state = None
        if fresh and self.init == "ssl":
            init_state = self.encoder
        elif fresh and self.init == "refined":
            init_state = {k: v.detach().clone() for k, v in self.ours.sup.model.state_dict().items()}
        labels = self.ours.labels if self.label_source == "refined" else self.given
        dm = DivideMix(self.ctx, init_state=init_state, labels=labels, phases=self.PHASES, ssl=False)
        self.encoder = None  # no longer needed
        return dm

    # -- outputs -------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return self.dm.networks() if self.dm is not None else self.ours.networks()

    def training_labels(self) -> torch.Tensor:
        return self.dm.training_labels() if self.dm is not None else self.ours.training_labels()

    def oracle_view(self) -> dict[str, torch.Tensor]:
        return self.dm.oracle_view() if self.dm is not None else self.ours.oracle_view()

    def label_report(self) -> LabelReport:
        """DivideMix's report, with the quality of a given label that the refinement replaced set to
        0 (DivideMix's GMM then judged the refined label, not the given one); refined label = the
        DivideMix prediction; ``n_stages_selected`` from the refinement."""
        if self.dm is None:
            return self.ours.label_report()
        out = self.dm.label_report()
        out.label_quality = out.label_quality * (self.dm.labels == self.given).float()
        out.is_label_issue = out.label_quality < self.cfg.dividemix.p_threshold
        out.n_stages_selected = self.ours.n_stages.clone()
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ours": self.ours.state_dict(), "encoder": self.encoder,
                "dm": None if self.dm is None else self.dm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ours.load_state_dict(state["ours"])
        self.encoder = state["encoder"]
        if state["dm"] is not None:
            self.dm = self._new_dividemix(fresh=False)
            self.dm.load_state_dict(state["dm"])
