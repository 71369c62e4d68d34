"""Stage selection and consensus: pure tensor functions, no training inside.

The papers (Bala et al. 2024, 2025) monitor the model at a few "stage" epochs of each refinement
iteration. At every stage a sample is *selected* when its cross-entropy loss is below a
threshold (1.0). A sample selected at every stage of an iteration gets a pseudo-label; every
other sample keeps its label. The papers leave open what the loss is taken against, where the
pseudo-label comes from and more; each of those is an argument here (see ``RefineConfig``).

Shapes: N samples, C classes, S stages.
"""

from __future__ import annotations

import math
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
        max_loss: ``(N,)`` the largest stage loss so far: a fixed threshold ``t`` would have
            selected the sample at every stage iff ``max_loss < t`` (the ``auto`` threshold
            chooses ``t`` after the stages; ``None`` when no losses were recorded).
    """

    all_selected: torch.Tensor
    n_selected: torch.Tensor
    first_pred: torch.Tensor
    agree: torch.Tensor
    last_pred: torch.Tensor
    prob_sum: torch.Tensor
    stages: int = 0
    max_loss: torch.Tensor | None = None

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

    def record(self, selected: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """Add one stage: its selection mask ``(N,)``, logits ``(N, C)`` and (optionally) the
        stage losses ``(N,)`` the mask came from."""
        if losses is not None:
            losses = losses.float()
            self.max_loss = losses.clone() if self.max_loss is None else torch.maximum(self.max_loss, losses)
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
                ("all_selected", "n_selected", "first_pred", "agree", "last_pred", "prob_sum", "stages", "max_loss")}

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


#: Candidate stage-loss thresholds of ``threshold_mode=auto`` (against the prediction, max p above
#: 0.37, 0.50, 0.61, 0.74, 0.82, 0.90 and 0.95): the papers' 1.0 down to almost nothing.
AUTO_THRESHOLDS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)


@dataclass
class GuardChoice:
    """What :func:`guarded_threshold` chose, and the evidence (all on the noisy validation split).

    Attributes:
        threshold: the chosen stage-loss threshold; ``None`` = relabel nothing this iteration.
        gain: the chosen relabelling's mean change, over the validation images, of the kNN vote
            mass on their noisy label (against no relabelling); 0 when nothing is chosen.
        z: the paired t statistic of the best candidate's change (``mean / (sd / sqrt(M))``).
        per_threshold: ``{threshold: (mean change, z)}`` for every candidate.
        best: the candidate with the largest mean change (whether or not it passed the test).
    """

    threshold: float | None
    gain: float
    z: float
    per_threshold: dict[float, tuple[float, float]]
    best: float | None = None


def _paired_z(delta: torch.Tensor) -> tuple[float, float]:
    """Mean of paired differences and its t statistic (``inf`` when they are all equal and positive)."""
    mean = float(delta.mean())
    if delta.numel() < 2:
        return mean, 0.0
    sd = float(delta.std())
    if sd == 0.0:
        return mean, math.inf if mean > 0 else 0.0
    return mean, mean / (sd / math.sqrt(delta.numel()))


def guarded_threshold(max_loss: torch.Tensor, eligible: torch.Tensor, pseudo: torch.Tensor,
                      base: torch.Tensor, nbr_idx: torch.Tensor, nbr_w: torch.Tensor,
                      val_labels: torch.Tensor, num_classes: int, *,
                      thresholds: tuple[float, ...] = AUTO_THRESHOLDS, z_min: float = 1.0) -> GuardChoice:
    """Choose an iteration's stage-loss threshold from the noisy validation split alone.

    Each candidate threshold ``t`` gives a relabelling of the training set: samples that are
    ``eligible`` (the consensus' other conditions, e.g. the same prediction at every stage) with
    ``max_loss < t`` take ``pseudo``, the others keep ``base`` (the labels they would have without
    relabelling). A relabelling is scored by a kNN probe: each validation image's training-set
    neighbours (``nbr_idx``, ``nbr_w``: :func:`labelrefine.knn.knn_neighbours` in a feature space)
    vote with their labels under that relabelling, and the probe reads the vote mass on the
    image's *noisy* validation label. The change of that mass against no relabelling, paired over
    the validation images, is the evidence: the chosen threshold has the largest mean change
    (ties: the smaller threshold, fewer changes) and is kept only if the mean is positive and its
    paired t statistic reaches ``z_min``. Otherwise nothing is relabelled: a model whose
    pseudo-labels do not make the neighbourhoods of held-out images more consistent with their
    labels has not earned the right to change any.

    Why held-out noisy labels can judge: a relabelling that fixes training labels moves vote mass
    to the right classes, which most validation labels are (the noise rate is below one half);
    one that damages labels moves it away. A vote *mass* rather than the vote's argmax: a majority
    of neighbours is robust to a few relabelled ones, so the argmax seldom changes and the test
    would have almost no power.
    """
    from .knn import neighbour_votes

    def mass(labels: torch.Tensor) -> torch.Tensor:
        votes = neighbour_votes(nbr_idx, nbr_w, labels, num_classes)
        return votes.gather(1, val_labels.to(votes.device)[:, None]).squeeze(1)

    mass0 = mass(base)
    per: dict[float, tuple[float, float]] = {}
    best: float | None = None
    for t in sorted(thresholds):
        cand = torch.where(eligible & (max_loss < t), pseudo, base)
        per[t] = _paired_z(mass(cand) - mass0)
        if best is None or per[t][0] > per[best][0]:
            best = t
    if best is None:
        return GuardChoice(None, 0.0, 0.0, per)
    gain, z = per[best]
    if gain <= 0 or z < z_min:
        return GuardChoice(None, 0.0, z, per, best=best)
    return GuardChoice(best, gain, z, per, best=best)
