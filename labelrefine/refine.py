"""Stage selection and consensus: pure tensor functions, no training inside.

The papers (Bala et al. 2024, 2025) monitor the model at a few "stage" epochs of each refinement
iteration. At every stage a sample is *selected* when its cross-entropy loss is below a
threshold (1.0). A sample selected at every stage of an iteration gets a pseudo-label; every
other sample keeps its label. The papers leave open what the loss is taken against, where the
pseudo-label comes from and more; each of those is an argument here (see ``RefineConfig``).

Shapes: N samples, C classes, S stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def stage_losses(logits: torch.Tensor, labels: torch.Tensor, *, target: str = "label") -> torch.Tensor:
    """Per-sample CE at a stage, ``(N,)``.

    Args:
        logits: ``(N, C)`` model outputs on un-augmented images.
        labels: ``(N,)`` current training labels.
        target: ``"label"`` - CE against the current label (loss < 1 means p(label) > e^-1, so
            the step mostly *selects* samples the model agrees with); ``"prediction"`` - CE
            against the model's own argmax, ``-log max_k p_k`` (the step *corrects* labels).
    """
    if target == "label":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if target == "prediction":
        return -torch.log_softmax(logits.float(), dim=1).max(dim=1).values
    raise ValueError(f"unknown stage-loss target {target!r}")


def select(
    losses: torch.Tensor,
    *,
    threshold: float = 1.0,
    mode: str = "fixed",
    classes: torch.Tensor | None = None,
    num_classes: int | None = None,
    quantile: float = 0.5,
) -> torch.Tensor:
    """Which samples a stage selects, a bool ``(N,)`` mask.

    ``fixed``: ``loss < threshold`` (papers: 1.0). ``class_quantile``: within each class of
    ``classes`` (the current labels) keep the ``quantile`` fraction with the smallest loss, and
    never anything at or above ``threshold`` (an adaptive threshold - the papers' future work -
    that adapts to per-class difficulty and to the noise level).
    """
    below = losses < threshold
    if mode == "fixed":
        return below
    if mode != "class_quantile":
        raise ValueError(f"unknown selection mode {mode!r}")
    if classes is None or num_classes is None:
        raise ValueError("class_quantile selection needs classes and num_classes")
    # Rank of each sample's loss within its class, computed with one sort (no per-class loop):
    # sort by (class, loss), then rank = position - first position of the class.
    order = torch.argsort(losses, stable=True)
    order = order[torch.argsort(classes[order], stable=True)]
    counts = torch.bincount(classes, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=losses.device) - starts[classes[order]]
    keep = rank < torch.ceil(quantile * counts[classes].float()).long()
    return keep & below


@dataclass
class StageHistory:
    """What an iteration remembers of its stages (enough for consensus; O(N·C) memory).

    Attributes:
        all_selected: ``(N,)`` bool, selected at every stage so far.
        n_selected: ``(N,)`` int, the number of stages (this iteration) that selected the sample.
        first_pred: ``(N,)`` predicted class at the first stage.
        agree: ``(N,)`` bool, the prediction has been the same at every stage so far.
        last_pred: ``(N,)`` predicted class at the latest stage.
        prob_sum: ``(N, C)`` sum of softmax outputs over the stages.
        stages: stages recorded so far.
    """

    all_selected: torch.Tensor
    n_selected: torch.Tensor
    first_pred: torch.Tensor
    agree: torch.Tensor
    last_pred: torch.Tensor
    prob_sum: torch.Tensor
    stages: int = 0

    @classmethod
    def empty(cls, n: int, num_classes: int, device: torch.device | str = "cpu") -> StageHistory:
        return cls(
            all_selected=torch.ones(n, dtype=torch.bool, device=device),
            n_selected=torch.zeros(n, dtype=torch.int64, device=device),
            first_pred=torch.zeros(n, dtype=torch.int64, device=device),
            agree=torch.ones(n, dtype=torch.bool, device=device),
            last_pred=torch.zeros(n, dtype=torch.int64, device=device),
            prob_sum=torch.zeros(n, num_classes, dtype=torch.float32, device=device),
        )

    def record(self, selected: torch.Tensor, logits: torch.Tensor) -> None:
        """Add one stage: its selection mask ``(N,)`` and logits ``(N, C)``."""
        probs = torch.softmax(logits.float(), dim=1)
        pred = probs.argmax(dim=1)
        if self.stages == 0:
            self.first_pred = pred
        self.agree &= pred == self.first_pred
        self.all_selected &= selected
        self.n_selected += selected.long()
        self.last_pred = pred
        self.prob_sum += probs
        self.stages += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("all_selected", "n_selected", "first_pred", "agree", "last_pred", "prob_sum", "stages")}

    @classmethod
    def from_state(cls, state: dict) -> StageHistory:
        return cls(**state)


def consensus(
    history: StageHistory, *, require_agreement: bool = True, label_source: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples that get a pseudo-label, and the pseudo-labels.

    Returns:
        mask: ``(N,)`` bool - selected at every stage (and, with ``require_agreement``, predicted
            the same class at every stage).
        pseudo: ``(N,)`` int64 - argmax at the last stage (``label_source="last"``) or of the
            stage-averaged softmax (``"mean"``); meaningful where ``mask`` is True.
    """
    if history.stages == 0:
        n = history.all_selected.shape[0]
        return torch.zeros(n, dtype=torch.bool, device=history.all_selected.device), history.last_pred
    mask = history.all_selected.clone()
    if require_agreement:
        mask &= history.agree
    if label_source == "last":
        pseudo = history.last_pred
    elif label_source == "mean":
        pseudo = history.prob_sum.argmax(dim=1)
    else:
        raise ValueError(f"unknown pseudo-label source {label_source!r}")
    return mask, pseudo


def update_labels(
    current: torch.Tensor,
    given: torch.Tensor,
    mask: torch.Tensor,
    pseudo: torch.Tensor,
    *,
    keep_previous: bool = True,
) -> torch.Tensor:
    """New training labels after an iteration.

    Samples in ``mask`` take ``pseudo``. The others keep ``current`` (``keep_previous``: an
    earlier pseudo-label survives) or go back to ``given`` (the papers' "retain their original
    labels", read literally).
    """
    base = current if keep_previous else given
    return torch.where(mask, pseudo, base)
