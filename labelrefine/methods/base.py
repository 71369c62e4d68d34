"""The interface every method implements, and pieces several methods share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..detect import Dynamics
from ..engine import Context, EpochSpec, Learner, Pass, Step, merge_parts
from ..losses import softmax_weighted_ce
from .simclr import SSLInit


@dataclass
class LabelReport:
    """Per-training-sample outputs of a method (``labels.csv``), all ``(N,)`` on one device.

    Attributes:
        refined_label: int64, the label the method believes is right.
        label_quality: float in [0, 1]; low = likely wrong (the ranking of suspected errors).
        is_label_issue: bool, the flagged set.
        n_stages_selected: int64, how often the sample was selected as clean (0 for methods without stages).
        predicted_label: int64, the final model's argmax (``None``: the method does not say).
        scores: every detector's quality score the run has (:mod:`labelrefine.detect`), ``(N,)`` each.
        estimated_issues: the detector's estimate of the number of wrong given labels, if it makes one.
        estimates: that estimate from each source of class probabilities the run has (``model``,
            ``knn_ssl``, ``mean``; :class:`labelrefine.detect.DetectConfig`'s ``estimate_from``).
    """

    refined_label: torch.Tensor
    label_quality: torch.Tensor
    is_label_issue: torch.Tensor
    n_stages_selected: torch.Tensor
    predicted_label: torch.Tensor | None = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    estimated_issues: int | None = None
    estimates: dict[str, int] = field(default_factory=dict)

    def suggested(self, given: torch.Tensor) -> torch.Tensor:
        """The label to suggest for each sample: the refined label where it differs from the given
        one, else the final model's prediction (a sample flagged by its score whose refined label
        stayed the given one gets the model's class, not its own label back)."""
        if self.predicted_label is None:
            return self.refined_label
        given = given.to(self.refined_label.device)
        return torch.where(self.refined_label != given, self.refined_label, self.predicted_label)

    def cpu(self) -> LabelReport:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.cpu()
            if isinstance(v, dict):
                return {k: t.cpu() if isinstance(t, torch.Tensor) else t for k, t in v.items()}
            return v

        return LabelReport(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every per-sample tensor the report holds; scores as ``score_<detector>``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if isinstance(getattr(self, f.name), torch.Tensor)}
        return {**out, **{f"score_{k}": v for k, v in self.scores.items()}}


class Method:
    """A training method: a schedule of epochs, and per phase the passes and steps that train it.

    The :class:`~labelrefine.engine.trainer.Trainer` calls :meth:`schedule` once, then for each
    entry asks :meth:`handler` which object runs that phase (this method; its SimCLR phase
    :attr:`ssl`; a part of a composite method) and calls that object's ``on_epoch_start``,
    ``passes`` and ``on_epoch_end``; each :class:`~labelrefine.engine.trainer.Pass` names its
    training step. After every supervised epoch it evaluates the model through
    :meth:`predict_logits`. A method never sees clean labels, and never calls ``backward``.

    Subclasses set ``name``, ``summary`` (one line), ``paper`` (a citation), ``phases``: every
    phase name their :meth:`schedule` can use, in schedule order (the bench's per-phase time
    columns, the report's phase colours and ``bench speed`` read them), and ``sections``: the
    config sections they own.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ()
    # The config sections this method owns: section name -> dataclass (defined in the method's
    # file; ``cfg.<name>`` at run time). A dataclass may carry ``RANGES`` (field -> Range) and a
    # ``check()`` for what ranges cannot express; :mod:`labelrefine.config` reads both.
    sections: ClassVar[dict[str, type]] = {}
    ssl: SSLInit | None = None  # SimCLR pretraining as this method's ``ssl`` phase, if it has one

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.given = ctx.y.clone()  # the noisy labels as given; never modified

    # -- the schedule ------------------------------------------------------------------------
    def schedule(self) -> list[EpochSpec]:
        raise NotImplementedError

    def handler(self, spec: EpochSpec):
        """The object that runs ``spec``'s phase: the SimCLR phase for ``ssl``, else the method itself."""
        return self.ssl if spec.phase == "ssl" and self.ssl is not None else self

    def on_epoch_start(self, spec: EpochSpec) -> dict[str, float]:
        """Per-epoch set-up before the passes; returns logs for the epoch's record."""
        return {}

    def passes(self, spec: EpochSpec) -> Iterable[Pass]:
        """The epoch's passes (a list, or a generator that builds each when the previous one has run)."""
        raise NotImplementedError

    def on_epoch_end(self, spec: EpochSpec, parts: list[dict[str, float]]) -> dict[str, float]:
        """The epoch's logs from its passes' (``loss``, ``lr``, ``samples``, ...)."""
        return merge_parts(parts)

    # -- outputs -----------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """The networks that make predictions (saved in ``model.pt``)."""
        raise NotImplementedError

    def predict_logits(self, images: torch.Tensor | None = None, *, tta: str = "none") -> torch.Tensor:
        """Float logits ``(N, C)`` for uint8 images (on any device); ``None``: the training set.
        ``tta``: test-time augmentation views (:meth:`Context.logits_all`); only test accuracy uses it."""
        nets = list(self.networks().values())
        out = self.ctx.logits_all(nets[0], images, tta=tta)
        for net in nets[1:]:
            out = out + self.ctx.logits_all(net, images, tta=tta)
        return out

    def on_supervised_start(self) -> None:
        """Called once, before the first supervised epoch (after any SSL epochs)."""

    def oracle_view(self) -> dict[str, torch.Tensor]:
        """Tensors the evaluation oracle may compare with clean labels after an epoch.

        ``labels`` (the current training labels) always; refinement methods add
        ``stage_selected`` / ``stage_labels`` after a stage and ``pseudo_mask`` after an iteration.
        """
        return {"labels": self.training_labels()}

    def training_labels(self) -> torch.Tensor:
        """The labels the method currently trains on ``(N,)``; the given labels unless it relabels."""
        return self.given

    def label_report(self) -> LabelReport:
        """Per-training-sample outputs for ``labels.csv``.

        The default: the final model's softmax probability of the given label (cleanlab's
        self-confidence) as quality, its argmax as refined label, an issue when they differ.
        """
        probs = torch.softmax(self.predict_logits(), dim=1)
        pred = probs.argmax(1)
        quality = probs.gather(1, self.given[:, None]).squeeze(1)
        return LabelReport(pred, quality, pred != self.given, torch.zeros_like(self.given), predicted_label=pred,
                           scores={"self_confidence": quality})

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def supervised_pass(ctx: Context, learner: Learner, indices: torch.Tensor, targets: torch.Tensor, *,
                    strong: torch.Tensor | None = None, loss: str = "ce", weight: str = "max_prob",
                    record: torch.Tensor | None = None, dynamics: Dynamics | None = None,
                    desc: str = "train") -> Pass:
    """One pass of ``learner``'s network over ``indices`` (duplicates allowed) with per-row ``targets``.

    Args:
        indices: ``(M,)`` sample indices into the context's images.
        targets: ``(M,)`` labels, one per row of ``indices``.
        strong: ``(M,)`` bool, rows that get the strong (SimCLR) augmentation.
        loss: ``ce`` or ``weighted_ce`` (softmax-weighted CE, paper 2).
        weight: the weighted-CE weight, ``max_prob`` or ``target_prob``.
        record: ``(M, C)`` float buffer that receives each row's logits as seen during training
            (data parallel: this rank's rows only; the rest keep what they held).
        dynamics: accumulates the training logits' p(given) and margin of every row that is not a
            strongly augmented copy (the AUM detector, :class:`labelrefine.detect.Dynamics`).
    """
    m = len(indices)
    bs = ctx.cfg.optim.batch_size
    smoothing = ctx.cfg.optim.label_smoothing
    rows = torch.arange(m, device=ctx.device)
    # Drop the final partial batch (BatchNorm statistics of a few samples are noise), except
    # when every row's logits must be recorded.
    batches = ctx.batches(rows, bs, drop_last=m > bs and record is None, sample_ids=indices)

    def step(batch_rows: torch.Tensor) -> Step:
        x = ctx.augment(indices[batch_rows], None if strong is None else strong[batch_rows])
        y = targets[batch_rows]
        with ctx.autocast():
            logits = learner.nets[0](x)
        logits = logits.float()
        if loss == "weighted_ce":
            value = softmax_weighted_ce(logits, y, weight=weight)
        else:
            value = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing).mean()
        if record is not None:
            record[batch_rows] = logits.detach()
        if dynamics is not None:
            rows = batch_rows if strong is None else batch_rows[~strong[batch_rows]]
            logit_rows = logits.detach() if strong is None else logits.detach()[~strong[batch_rows]]
            dynamics.update(indices[rows], logit_rows)
        return Step([value], {"loss": value.detach()}, len(batch_rows))

    return Pass(batches, [learner], step, desc=desc)
