"""Label-error detectors: per-sample scores of how likely a *given* label is right, and an
estimate of how many given labels are wrong.

Every score is "quality": high = the given label looks right, low = suspected error, so one
ascending sort ranks suspected errors first (``labels.csv``). The scores a run can have:

``self_confidence``
    The final model's softmax probability of the given label (cleanlab's self-confidence,
    Northcutt et al. 2021): what ``labels.csv`` ranked by before issue 16.
``normalized_margin``
    The final model's p(given) minus its largest other class probability, mapped to [0, 1]
    (Kuan and Mueller 2022's normalized margin).
``stage_confidence``
    p(given) averaged over the refinement's stage evaluation passes (un-augmented images; the
    passes the method runs anyway): the trajectory, not one snapshot.
``aum``
    The area under the margin (Pleiss et al., NeurIPS 2020): the logit of the given label minus
    the largest other logit, averaged over every supervised training step that saw the sample
    (the training pass's own logits: no extra pass), squashed to (0, 1) by a logistic.
``knn_ssl``
    The weighted vote mass on the given label among the sample's ``k`` nearest other training
    images in the SimCLR encoder's feature space (cosine): SimiFeat's idea (Zhu et al., ICML
    2022), with features no model trained on the noisy labels has shaped.
``knn_model``
    The same vote in the final model's penultimate feature space.

:func:`estimate_issue_count` estimates the number of wrong labels from a matrix of predicted
class probabilities with the confident joint of Northcutt et al. (JAIR 2021, sections 3.1-3.2):
per-class thresholds, counts of confidently mislabelled samples, calibrated to the class sizes.
:func:`flag_lowest` flags that many samples, lowest quality first.

The defaults (:class:`DetectConfig`): rank by ``aum``; flag the lowest-quality samples, as many as
the confident joint estimates from the mean of the final model's probabilities and the SimCLR kNN
votes. Chosen once from the detection suites by the rule of docs/detection.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from . import distributed as ddp
from .config import Range, at_least
from .errors import UserError, short_repr
from .knn import knn_votes

log = logging.getLogger("labelrefine")

#: Every detector a run may report, in the order of ``labels.csv``'s score columns.
DETECTORS = ("self_confidence", "normalized_margin", "stage_confidence", "aum", "knn_ssl", "knn_model")


def given_probability(logits: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the given label, ``(N,)`` float32."""
    return torch.softmax(logits.float(), dim=1).gather(1, given[:, None].long()).squeeze(1)


def logit_margin(logits: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """The given label's logit minus the largest other logit (AUM's margin), ``(N,)``."""
    logits = logits.float()
    g = given[:, None].long()
    other = logits.scatter(1, g, float("-inf")).amax(1)
    return logits.gather(1, g).squeeze(1) - other


def normalized_margin(probs: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``(p(given) - max other p + 1) / 2`` in [0, 1] (Kuan and Mueller's normalized margin)."""
    g = given[:, None].long()
    other = probs.scatter(1, g, float("-inf")).amax(1)
    return (probs.gather(1, g).squeeze(1) - other + 1) / 2


class Dynamics:
    """Running per-sample sums over training: p(given) and the logit margin, with a count.

    ``update(indices, logits)`` adds rows (duplicates allowed: each row counts); data parallel,
    each rank adds its own rows and :meth:`means` sums the ranks' totals (``reduce=True``).
    """

    def __init__(self, given: torch.Tensor, *, reduce: bool = False):
        self.given = given
        self.reduce = reduce
        n = len(given)
        self.p_sum = torch.zeros(n, dtype=torch.float64, device=given.device)
        self.margin_sum = torch.zeros(n, dtype=torch.float64, device=given.device)
        self.count = torch.zeros(n, dtype=torch.float64, device=given.device)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        g = self.given[indices]
        self.p_sum.index_add_(0, indices, given_probability(logits, g).double())
        self.margin_sum.index_add_(0, indices, logit_margin(logits, g).double())
        self.count.index_add_(0, indices, torch.ones(len(indices), dtype=torch.float64, device=indices.device))

    def means(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean p(given) and mean margin per sample (float32), or ``None`` before any update. A
        sample never seen (impossible in a full epoch) gets p = 0.5 and margin 0: no evidence."""
        sums = torch.stack([self.p_sum, self.margin_sum, self.count])
        if self.reduce and ddp.enabled():
            sums = ddp.all_reduce_sum(sums)
        p, m, c = sums
        if not bool((c > 0).any()):
            return None
        seen = c > 0
        p = torch.where(seen, p / c.clamp_min(1), torch.full_like(p, 0.5))
        m = torch.where(seen, m / c.clamp_min(1), torch.zeros_like(m))
        return p.float(), m.float()

    def state_dict(self) -> dict:
        return {"p_sum": self.p_sum, "margin_sum": self.margin_sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.p_sum, self.margin_sum, self.count = (state[k].to(self.given.device) for k in
                                                   ("p_sum", "margin_sum", "count"))


def aum_quality(margin: torch.Tensor) -> torch.Tensor:
    """AUM as a quality in (0, 1): the logistic of the mean margin (monotone: the ranking is AUM's)."""
    return torch.sigmoid(margin.float())


#: Neighbours of the kNN label-agreement detectors (``detect.knn_k``'s default).
KNN_K = 10


@torch.no_grad()
def knn_label_votes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                    k: int = KNN_K, temperature: float = 0.1) -> torch.Tensor:
    """Each sample's weighted vote mass ``(N, C)`` over its ``k`` nearest *other* samples'
    labels (cosine; :func:`labelrefine.knn.knn_votes`, in chunks, no N x N matrix)."""
    return knn_votes(features, labels, features, num_classes, k=k, temperature=temperature, exclude_self=True)


@torch.no_grad()
def knn_agreement_sweep(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: list[int], *,
                        temperature: float = 0.1) -> dict[int, torch.Tensor]:
    """:func:`knn_agreement` of :func:`knn_label_votes` for every ``k`` in ``ks``, from one
    neighbour search (the ``k`` nearest are a prefix of the ``max(ks)`` nearest)."""
    from .knn import knn_neighbours, neighbour_votes

    if not ks:
        return {}
    idx, w = knn_neighbours(features, features, k=max(ks), temperature=temperature, exclude_self=True)
    return {k: knn_agreement(neighbour_votes(idx[:, :k], w[:, :k], labels, num_classes), labels) for k in ks}


def knn_agreement(votes: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """The vote mass on the given label, ``(N,)``."""
    return votes.gather(1, given[:, None].long()).squeeze(1)


def confident_joint(probs: torch.Tensor, given: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The calibrated confident joint ``Q`` (``(C, C)``, float64): ``Q[i, j]`` estimates how many
    samples labelled ``i`` belong to class ``j``; each row sums to the count of label ``i``.

    Northcutt et al. 2021: class ``j``'s threshold ``t_j`` is the mean p_j over the samples
    labelled ``j``; a sample counts for the class ``j`` of largest p_j among those with
    p_j >= t_j (none: it is not counted); rows are then rescaled to the label counts.
    """
    probs = probs.double()
    given = given.long().to(probs.device)
    c = num_classes
    n_label = torch.bincount(given, minlength=c).double()
    sums = torch.zeros(c, c, dtype=torch.float64, device=probs.device).index_add_(0, given, probs)
    t = sums.diagonal() / n_label.clamp_min(1)
    t = torch.where(n_label > 0, t, torch.full_like(t, math.inf))  # an absent class is never confident
    above = probs >= t[None, :]
    counted = above.any(1)
    pick = torch.where(above, probs, torch.full_like(probs, -1.0)).argmax(1)
    joint = torch.bincount(given[counted] * c + pick[counted], minlength=c * c).double().reshape(c, c)
    rows = joint.sum(1, keepdim=True)
    # A label with no confident sample: assume it is right (all of its mass on the diagonal).
    eye = torch.eye(c, dtype=torch.float64, device=probs.device)
    joint = torch.where(rows > 0, joint / rows.clamp_min(1), eye)
    return joint * n_label[:, None]


def estimate_issue_count(probs: torch.Tensor, given: torch.Tensor, num_classes: int) -> int:
    """Estimated number of wrong given labels: the off-diagonal mass of :func:`confident_joint`."""
    q = confident_joint(probs, given, num_classes)
    return int(round(float(q.sum() - q.diagonal().sum())))


def flag_lowest(quality: torch.Tensor, count: int) -> torch.Tensor:
    """Bool ``(N,)``: the ``count`` samples of lowest quality (ties: the earlier sample first)."""
    n = len(quality)
    count = max(0, min(int(count), n))
    flags = torch.zeros(n, dtype=torch.bool, device=quality.device)
    flags[torch.argsort(quality, stable=True)[:count]] = True
    return flags


def combined_quality(scores: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """The mean of the named quality scores (each in [0, 1]); names a run lacks are skipped."""
    have = [scores[n].float() for n in names if n in scores]
    if not have:
        raise KeyError(f"none of the detectors {', '.join(names)} is available")
    return torch.stack(have).mean(0)


def final_scores(logits: torch.Tensor, features: torch.Tensor | None, given: torch.Tensor, num_classes: int,
                 *, k: int = KNN_K, sweep: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The final model's detectors: ``self_confidence``, ``normalized_margin`` and, with its
    penultimate ``features``, ``knn_model`` (and ``knn_model_k<K>`` for each K of ``sweep``)."""
    probs = torch.softmax(logits.float(), dim=1)
    out = {"self_confidence": probs.gather(1, given[:, None].long()).squeeze(1),
           "normalized_margin": normalized_margin(probs, given)}
    if features is not None:
        feats = F.normalize(features.float(), dim=1)
        agree = knn_agreement_sweep(feats, given, num_classes, sorted({k, *(sweep or [])}))
        out["knn_model"] = agree[k]
        out.update({f"knn_model_k{kk}": v for kk, v in agree.items() if kk in (sweep or [])})
    return out


#: The ``detect`` options that only choose among what a finished run recorded (which score column
#: ranks, which estimate sets the flagged count): changing them changes no training and no score,
#: so the benchmarks reuse runs made with other values and derive the ranking and the flags again
#: (:func:`select_quality`, :func:`select_flags`). ``knn_k`` and ``knn_k_sweep`` are not among
#: them: they change the scores a run computes.
POST_HOC_KEYS = ("detect.score", "detect.combine", "detect.flag", "detect.estimate_from")


def select_quality(d: DetectConfig, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """``label_quality``: the ``detect.score`` detector of ``scores`` (or the mean of
    ``detect.combine``); a run that lacks it (no SimCLR phase, no stages) ranks by
    ``self_confidence``, with a warning."""
    if d.score == "combined":
        return combined_quality(scores, tuple(d.combine))
    if d.score in scores:
        return scores[d.score]
    log.warning("detect.score=%s is not available in this run (no SimCLR phase or no stages); "
                "ranking by self_confidence", d.score)
    return scores["self_confidence"]


def select_flags(d: DetectConfig, quality: torch.Tensor, estimates: dict[str, int],
                 changed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``is_label_issue`` and the estimated number of wrong labels: ``detect.flag=refined`` flags
    the ``changed`` samples (refined label != given), ``estimated`` the ``detect.estimate_from``
    estimate's count of lowest quality (the model's estimate where a run lacks that source)."""
    estimated = int(estimates.get(d.estimate_from, estimates["model"]))
    return (changed.clone() if d.flag == "refined" else flag_lowest(quality, estimated)), estimated


@dataclass
class DetectConfig:
    """The ``detect`` config section: which detector ranks ``labels.csv`` and what is flagged."""

    RANGES: ClassVar[dict[str, Range]] = {"knn_k": at_least(1), "knn_k_sweep": at_least(1)}
    # The defaults of score, flag and estimate_from were chosen once by the rule of
    # docs/detection.md from the detection suites' records (scripts/choose_detection_defaults.py).
    # label_quality (the ranking): one of DETECTORS, or "combined" (the mean of detect.combine).
    score: Literal["self_confidence", "normalized_margin", "stage_confidence", "aum", "knn_ssl", "knn_model",
                   "combined"] = "aum"
    combine: list[str] = field(default_factory=lambda: ["self_confidence", "knn_ssl"])
    # is_label_issue: the samples whose refined label differs from the given one, or the
    # estimated number of wrong labels (confident joint) of lowest quality.
    flag: Literal["refined", "estimated"] = "estimated"
    # The class probabilities the confident joint reads: the final model's, the SimCLR kNN
    # votes (out of sample: a sample never votes for itself), or their mean.
    estimate_from: Literal["model", "knn_ssl", "mean"] = "mean"
    knn_k: int = KNN_K  # neighbours of the kNN detectors
    # Benchmarks: also report the kNN agreements at these k (columns knn_ssl_k<K>, knn_model_k<K>).
    knn_k_sweep: list[int] = field(default_factory=list)

    def check(self) -> None:
        bad = [n for n in self.combine if n not in DETECTORS]
        if not self.combine or bad:
            raise UserError(f"config key 'detect.combine': {short_repr(self.combine)} must be a non-empty list of "
                            f"detectors ({', '.join(DETECTORS)})")
