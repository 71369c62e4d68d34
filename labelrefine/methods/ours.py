"""The method of the two papers: SimCLR -> CE warmup -> stage-consensus pseudo-label refinement
(with strongly augmented copies of the pseudo-labelled samples) -> softmax-weighted CE fine-tune.

Bala, Gupta, Behera, Sethi, "Mitigating Instance-dependent Label Noise: Integrating
Self-supervised Pretraining with Pseudo-label Refinement" (2024), and Bala, Gupta, Sethi,
"Softmax-Weighted Pseudo-Label Refinement for Enhancing Robustness to Label Noise" (MIDL 2025).

Schedule (defaults from the papers): ``ssl`` 30 epochs, ``warmup`` 5 epochs, 4 ``refine``
iterations whose stage epochs are (2, 3, 4) in the first and (2, 5, 7) in later ones, then
``finetune``. At each stage every training sample is scored on un-augmented images; at the end
of an iteration the samples selected at every stage get pseudo-labels (``labelrefine.refine``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from .. import distributed as ddp
from ..config import Range, above, at_least, unit
from ..detect import (
    DetectConfig,
    Dynamics,
    aum_quality,
    estimate_issue_count,
    final_scores,
    knn_agreement,
    knn_agreement_sweep,
    knn_label_votes,
    select_flags,
    select_quality,
)
from ..engine import Context, EpochSpec, Learner
from ..errors import UserError, short_repr
from ..knn import knn_neighbours
from ..refine import AUTO_THRESHOLDS, StageHistory, consensus, guarded_threshold, select, stage_losses, update_labels
from . import register
from .base import LabelReport, Method, supervised_pass
from .schedule import iteration_length, refinement_epochs, stages_of
from .simclr import SSLInit

log = logging.getLogger("labelrefine")

#: Neighbours of a validation image in the auto threshold's kNN probe. Small, so that the probe is
#: local: a relabelled training sample changes the vote of the validation images next to it
#: (SimiFeat's k-NN label clusterability uses k = 10, Zhu et al. ICML 2022). Not tuned.
PROBE_K = 10


@dataclass
class RefineConfig:
    """The ``refine`` config section."""

    RANGES: ClassVar[dict[str, Range]] = {  # field -> allowed range (see labelrefine.config.Range)
        "warmup_epochs": at_least(0),
        "iterations": at_least(0),
        "first_stages": at_least(1),
        "later_stages": at_least(1),
        "iteration_epochs": at_least(0),
        "threshold": above(0.0),
        "quantile": unit(lo_open=True),
        "guard_z": at_least(0.0),
    }
    warmup_epochs: int = 5  # CE warmup on the noisy labels (papers: 5)
    iterations: int = 4  # refinement iterations (papers: 4)
    first_stages: list[int] = field(default_factory=lambda: [2, 3, 4])  # stage epochs of iteration 1 (papers)
    later_stages: list[int] = field(default_factory=lambda: [2, 5, 7])  # stage epochs of later iterations (papers)
    iteration_epochs: int = 0  # epochs per iteration; 0 = the iteration's last stage epoch (open question)
    # Per-sample stage CE below this selects the sample (papers: 1.0, against the label). Against the
    # prediction, 0.3 (max p > 0.74) keeps a weak model from relabelling (docs/refine-options.md).
    threshold: float = 0.3
    # fixed: loss < threshold; class_quantile: per-class loss quantile; auto: each iteration picks
    # its threshold from refine.AUTO_THRESHOLDS, or relabels nothing, by a kNN probe of the noisy
    # validation split (labelrefine.refine.guarded_threshold; docs/refine-options.md).
    threshold_mode: Literal["fixed", "class_quantile", "auto"] = "fixed"
    guard_z: float = 1.0  # auto: the paired sign test's z a relabelling needs on the noisy val split
    quantile: float = 0.5  # class_quantile: fraction of each (current) class selected at a stage
    # Stage CE against the model's argmax (corrects labels) or the current label (only selects);
    # the default is measured in docs/refine-options.md.
    loss_target: Literal["prediction", "label"] = "prediction"
    require_agreement: bool = True  # also require the same predicted class at every stage
    label_source: Literal["last", "mean"] = "mean"  # pseudo-label: argmax at the last stage or of the stage mean
    keep_previous: bool = True  # unselected samples keep their previous pseudo-label (False: revert to given)
    stage_loss: Literal["eval", "train"] = "eval"  # eval: a clean no-augmentation pass; train: losses of the epoch
    reinit: Literal["none", "ssl", "random"] = "none"  # re-initialise the model at each iteration's start
    augment_copies: bool = True  # add pseudo-labelled samples again as strongly augmented copies (papers)
    # Which samples get a copy: every sample whose training label is a pseudo-label (from any
    # iteration), only those of the latest iteration's consensus (the behaviour before 0.1.1), or
    # only those whose training label differs from the given one (changed: no copies, so no
    # change to the epoch, when the refinement confirms labels without correcting any).
    copies: Literal["pseudo_labelled", "latest", "changed"] = "pseudo_labelled"
    # lr schedule: one cosine over warmup + all iterations, or a restart (a fresh cosine, same
    # optimizer and weights) for the warmup and for each iteration (open question).
    lr_schedule: Literal["continuous", "restart"] = "continuous"
    loss: Literal["ce", "weighted_ce"] = "ce"  # training loss inside the iterations

    def check(self) -> None:
        """What ranges cannot express: strictly increasing stage lists within the iteration."""
        for key, stages in (("first_stages", self.first_stages), ("later_stages", self.later_stages)):
            if not stages:
                raise UserError(f"config key 'refine.{key}': must be a non-empty list of epochs >= 1")
            if stages != sorted(set(stages)):
                raise UserError(f"config key 'refine.{key}': {short_repr(stages)} must be strictly increasing")
            if self.iteration_epochs and max(stages) > self.iteration_epochs:
                raise UserError(f"config key 'refine.{key}': stage {max(stages)} lies beyond "
                                f"refine.iteration_epochs={self.iteration_epochs}")


@dataclass
class FinetuneConfig:
    """The ``finetune`` config section."""

    RANGES: ClassVar[dict[str, Range]] = {  # field -> allowed range (see labelrefine.config.Range)
        "epochs": at_least(0),
        "lr_scale": above(0.0),
    }
    epochs: int = 5  # final fine-tune epochs on the refined labels (paper 2; length not given)
    loss: Literal["weighted_ce", "ce"] = "weighted_ce"  # paper 2: softmax-weighted CE
    weight: Literal["max_prob", "target_prob"] = "max_prob"  # the detached per-sample weight of weighted CE
    lr_scale: float = 0.1  # fine-tune lr as a fraction of optim.lr


@register
class Ours(Method):
    name = "ours"
    summary = "SimCLR + CE warmup + stage-consensus pseudo-label refinement + softmax-weighted CE fine-tune."
    paper = "Bala et al. 2024 (arXiv) and MIDL 2025"
    sections = {"refine": RefineConfig, "finetune": FinetuneConfig, "detect": DetectConfig}
    phases = ("ssl", "warmup", "refine", "finetune")

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        r = self.cfg.refine
        model = ctx.new_model()
        self.ssl = SSLInit(ctx, model) if self.cfg.ssl.epochs > 0 else None
        self.main_epochs = r.warmup_epochs + refinement_epochs(self.cfg)
        # lr_schedule=restart: the warmup has its own cosine, and each iteration restarts it.
        self.sup = Learner(ctx, r.warmup_epochs if r.lr_schedule == "restart" else self.main_epochs, model=model)
        self.finetuner: Learner | None = None
        self.all = torch.arange(ctx.n, device=ctx.device)
        self.labels = self.given.clone()  # current training labels
        self.copies = torch.zeros(ctx.n, dtype=torch.bool, device=ctx.device)  # get an augmented copy
        self.history: StageHistory | None = None
        self.n_stages = torch.zeros(ctx.n, dtype=torch.int64, device=ctx.device)  # over all iterations
        self.init_state: dict | None = None  # weights to re-initialise from (reinit=ssl); the auto probe's encoder
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None  # auto: val neighbours (idx, w) in SSL space
        # auto chooses each iteration's threshold on the noisy validation split; without one it
        # falls back to the fixed refine.threshold (said once, in the log).
        self.mode = r.threshold_mode
        if self.mode == "auto" and self.cfg.data.val_fraction <= 0:
            log.warning("refine.threshold_mode=auto needs a noisy validation split (data.val_fraction > 0); "
                        "using the fixed refine.threshold=%g instead", r.threshold)
            self.mode = "fixed"
        self._view: dict[str, torch.Tensor] = {}  # what the last epoch selected, for the oracle
        self._recorded: torch.Tensor | None = None  # the training pass's logits at a stage (stage_loss=train)
        # Wall seconds spent in stage evaluation and consensus (a diagnostic for `bench speed`;
        # not checkpointed). Each block ends in a host sync (int(...sum())), so on CUDA the
        # time is the work's, not just its launch.
        self.refine_overhead_seconds = 0.0
        self.refine_eval_seconds = 0.0  # the part of it spent in evaluation passes (stage_loss=eval)
        # Label-error detectors (labelrefine.detect): the training passes' dynamics (AUM), the
        # stage evaluation passes' p(given), and the SimCLR features' kNN votes (N, C).
        self.train_dynamics = Dynamics(self.given, reduce=True)
        self.stage_dynamics = Dynamics(self.given)
        self.ssl_votes: torch.Tensor | None = None
        self.ssl_sweep: dict[int, torch.Tensor] = {}  # detect.knn_k_sweep: the SimCLR kNN agreement at each k

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self) -> list[EpochSpec]:
        r, cfg = self.cfg.refine, self.cfg
        specs = self.ssl.specs() if self.ssl is not None else []
        specs += [EpochSpec("warmup", 0, e) for e in range(1, r.warmup_epochs + 1)]
        for it in range(1, r.iterations + 1):
            specs += [EpochSpec("refine", it, e) for e in range(1, iteration_length(cfg, it) + 1)]
        specs += [EpochSpec("finetune", 0, e) for e in range(1, cfg.finetune.epochs + 1)]
        return specs

    def _train_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Indices, targets and strong flags of an epoch: every sample, plus augmented copies."""
        if not self.cfg.refine.augment_copies or not bool(self.copies.any()):
            return self.all, self.labels, None
        extra = self.copies.nonzero().flatten()
        idx = torch.cat([self.all, extra])
        strong = torch.cat([torch.zeros(self.ctx.n, dtype=torch.bool, device=self.ctx.device),
                            torch.ones(len(extra), dtype=torch.bool, device=self.ctx.device)])
        return idx, self.labels[idx], strong

    def on_epoch_start(self, spec: EpochSpec) -> dict[str, float]:
        self._view = {}
        r = self.cfg.refine
        if spec.phase == "refine" and spec.epoch == 1:
            self.history = StageHistory.empty(self.ctx.n, self.ctx.num_classes, self.ctx.device)
            if spec.iteration > 1 and r.reinit != "none":
                self._reinit(spec.iteration)  # a fresh learner: its schedule starts over too
            elif r.lr_schedule == "restart":
                self.sup.progress, self.sup.total_epochs = 0.0, float(iteration_length(self.cfg, spec.iteration))
        if spec.phase == "finetune" and self.finetuner is None:
            self.finetuner = self._finetune_learner()
        return {}

    def passes(self, spec: EpochSpec):
        ctx, r, f = self.ctx, self.cfg.refine, self.cfg.finetune
        dyn = self.train_dynamics
        if spec.phase == "warmup":
            return [supervised_pass(ctx, self.sup, self.all, self.labels, dynamics=dyn)]
        idx, targets, strong = self._train_rows()
        if spec.phase == "finetune":
            return [supervised_pass(ctx, self.finetuner, idx, targets, strong=strong, loss=f.loss, weight=f.weight,
                                    dynamics=dyn)]
        if spec.phase != "refine":
            raise ValueError(f"unknown phase {spec.phase!r}")
        self._recorded = None
        if spec.epoch in stages_of(self.cfg, spec.iteration) and r.stage_loss == "train":
            self._recorded = torch.full((len(idx), ctx.num_classes), float("nan"), device=ctx.device)
        return [supervised_pass(ctx, self.sup, idx, targets, strong=strong, loss=r.loss, weight=f.weight,
                                record=self._recorded, dynamics=dyn)]

    def on_epoch_end(self, spec: EpochSpec, parts: list[dict[str, float]]) -> dict[str, float]:
        logs = dict(parts[0])
        if spec.phase != "refine":
            return logs
        if spec.epoch in stages_of(self.cfg, spec.iteration):
            logs.update(self._stage())
        if spec.epoch == iteration_length(self.cfg, spec.iteration):
            logs.update(self._consensus())
        return logs

    def _stage(self) -> dict[str, float]:
        """A stage: score every sample, select the low-loss ones, record them in the history."""
        r, ctx = self.cfg.refine, self.ctx
        t0 = time.perf_counter()
        # With stage_loss=train the first n rows are the samples themselves, weakly augmented.
        if self._recorded is not None:
            recorded = self._recorded
            if ctx.world > 1:  # every rank filled only its own rows
                recorded = ddp.all_reduce_sum(torch.nan_to_num(recorded, nan=0.0))
            logits = recorded[: ctx.n]
            self._recorded = None
        else:
            logits = ctx.logits_all(self.sup.model)
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)  # so the split below times the work, not its launch
            self.refine_eval_seconds += time.perf_counter() - t0
        losses = stage_losses(logits, self.labels, target=r.loss_target)
        if self.mode == "auto":  # the threshold is chosen at the consensus; log the loosest candidate's
            selected = losses < max(AUTO_THRESHOLDS)
        else:
            selected = select(losses, threshold=r.threshold, mode=self.mode, classes=self.labels,
                              num_classes=ctx.num_classes, quantile=r.quantile)
        self.history.record(selected, logits, losses)
        self.stage_dynamics.update(self.all, logits)
        self._view.update(stage_selected=selected, stage_labels=self.labels.clone())
        self.refine_overhead_seconds += time.perf_counter() - t0
        return {"stage_selected": int(selected.sum()), "stage_mean_loss": float(losses.mean())}

    def _consensus(self) -> dict[str, float]:
        """The end of an iteration: pseudo-labels for the samples selected at every stage."""
        r = self.cfg.refine
        t0 = time.perf_counter()
        mask, pseudo = consensus(self.history, require_agreement=r.require_agreement, label_source=r.label_source)
        guard_logs: dict[str, float] = {}
        if self.mode == "auto":
            mask, guard_logs = self._guard(pseudo)
        new = update_labels(self.labels, self.given, mask, pseudo, keep_previous=r.keep_previous)
        logs = {"pseudo_labelled": int(mask.sum()), "labels_changed": int((new != self.labels).sum()),
                "labels_differ_from_given": int((new != self.given).sum()), **guard_logs}
        self.labels = new
        # A copy for every sample that carries a pseudo-label: with keep_previous an earlier
        # iteration's pseudo-label survives, so its copy does too (copies=pseudo_labelled).
        keep = r.copies == "pseudo_labelled" and r.keep_previous
        self.copies = (new != self.given) if r.copies == "changed" else mask | self.copies if keep else mask
        self._view["pseudo_mask"] = mask
        self.n_stages += self.history.n_selected
        self.history = None
        self.refine_overhead_seconds += time.perf_counter() - t0
        return logs

    def _guard(self, pseudo: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``threshold_mode=auto``: the consensus mask under the threshold the noisy validation
        split chooses (:func:`~labelrefine.refine.guarded_threshold`), and its logs."""
        r, h = self.cfg.refine, self.history
        val = self.ctx.val
        if val is None:  # the Trainer hands the split over; a bare Context (bench speed) has none
            raise UserError("config key 'refine.threshold_mode': auto needs the noisy validation split")
        eligible = h.agree.clone() if r.require_agreement else torch.ones_like(h.agree)
        base = self.labels if r.keep_previous else self.given
        idx, w = self._probe_neighbours()
        choice = guarded_threshold(h.max_loss, eligible, pseudo, base, idx, w, val[1], self.ctx.num_classes,
                                   z_min=r.guard_z)
        mask = eligible & (h.max_loss < choice.threshold) if choice.threshold is not None \
            else torch.zeros_like(eligible)
        # The best candidate's evidence, kept or not: the mean change of the vote mass on the noisy
        # validation labels (x100: points of vote mass) and its paired t statistic.
        best_gain, best_z = choice.per_threshold.get(choice.best, (0.0, 0.0))
        return mask, {"auto_threshold": -1.0 if choice.threshold is None else choice.threshold,
                      "auto_best": -1.0 if choice.best is None else choice.best,
                      "auto_val_gain": 100 * best_gain, "auto_val_z": min(best_z, 1e6)}

    def _probe_neighbours(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each noisy-validation image's training-set neighbours for the auto threshold's kNN probe:
        in the SimCLR encoder's feature space when there is one (label-free, so the probe does not
        inherit what the model memorised; computed once), else the current model's."""
        if self._probe is not None:
            return self._probe
        ctx = self.ctx
        model = self.sup.model
        if self.init_state is not None:
            model = copy.deepcopy(self.sup.model)  # no new_model(): that would draw from the run's RNG
            model.load_state_dict(self.init_state)
        bank = ctx.features_all(model)
        query = ctx.features_all(model, ctx.val[0])
        probe = knn_neighbours(bank, query, k=PROBE_K)
        if self.init_state is not None:
            self._probe = probe
        return probe

    def _reinit(self, iteration: int) -> None:
        """Fresh weights (random, or the SimCLR encoder) and a fresh optimizer for this iteration."""
        ctx = self.ctx
        model = ctx.new_model()
        if self.cfg.refine.reinit == "ssl" and self.init_state is not None:
            model.load_state_dict(self.init_state)
        self.sup = Learner(ctx, iteration_length(self.cfg, iteration), model=model)

    def _finetune_learner(self) -> Learner:
        """The fine-tune's optimizer: ``finetune.lr_scale`` x the lr, without the run's lr warmup
        (``optim.warmup_lr_epochs`` ramps the start of the whole run, not of its last epochs)."""
        return Learner(self.ctx, self.cfg.finetune.epochs, model=self.sup.model,
                       lr_scale=self.cfg.finetune.lr_scale, warmup=0.0)

    def on_supervised_start(self) -> None:
        """Remember the initial (SimCLR) weights for ``reinit=ssl`` and the auto threshold's probe."""
        r = self.cfg.refine
        wanted = r.reinit == "ssl" or (self.mode == "auto" and self.ssl is not None)
        if wanted and self.init_state is None:
            self.init_state = {k: v.detach().clone() for k, v in self.sup.model.state_dict().items()}
        if self.ssl is not None and self.ssl_votes is None:  # the SimCLR encoder, before any supervised step
            feats = self.ctx.features_all(self.sup.model)
            d = self.cfg.detect
            self.ssl_votes = knn_label_votes(feats, self.given, self.ctx.num_classes, k=d.knn_k)
            self.ssl_sweep = knn_agreement_sweep(feats, self.given, self.ctx.num_classes, list(d.knn_k_sweep))

    # -- outputs -------------------------------------------------------------------------------
    def networks(self):
        return {"model": self.sup.model}

    def training_labels(self) -> torch.Tensor:
        return self.labels

    def oracle_view(self) -> dict[str, torch.Tensor]:
        return {"labels": self.labels, **self._view}

    def detector_scores(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every detector's quality score this run has (:data:`labelrefine.detect.DETECTORS`) and
        the final model's class probabilities ``(N, C)``."""
        ctx, d = self.ctx, self.cfg.detect
        logits = self.predict_logits()
        feats = ctx.features_all(self.sup.model)
        scores = final_scores(logits, feats, self.given, ctx.num_classes, k=d.knn_k, sweep=list(d.knn_k_sweep))
        stage = self.stage_dynamics.means()
        if stage is not None:
            scores["stage_confidence"] = stage[0]
        train = self.train_dynamics.means()
        if train is not None:
            scores["aum"] = aum_quality(train[1])
        if self.ssl_votes is not None:
            scores["knn_ssl"] = knn_agreement(self.ssl_votes, self.given)
        scores.update({f"knn_ssl_k{k}": v for k, v in self.ssl_sweep.items()})
        return scores, torch.softmax(logits.float(), dim=1)

    def label_report(self) -> LabelReport:
        """Refined label = the final training label; quality = the ``detect.score`` detector
        (default: ``aum``); flagged: ``detect.flag`` (default: the ``detect.estimate_from``
        estimate's count of lowest quality)."""
        d = self.cfg.detect
        scores, probs = self.detector_scores()
        quality = select_quality(d, scores)
        sources = {"model": probs}
        if self.ssl_votes is not None:
            sources.update(knn_ssl=self.ssl_votes, mean=(probs + self.ssl_votes) / 2)
        estimates = {k: estimate_issue_count(v, self.given, self.ctx.num_classes) for k, v in sources.items()}
        flagged, estimated = select_flags(d, quality, estimates, self.labels != self.given)
        return LabelReport(self.labels.clone(), quality, flagged, self.n_stages.clone(),
                           predicted_label=probs.argmax(1), scores=scores, estimated_issues=estimated,
                           estimates=estimates)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "sup": self.sup.state_dict(),
            "finetuner": None if self.finetuner is None else self.finetuner.state_dict(),
            "ssl": None if self.ssl is None else self.ssl.state_dict(),
            "labels": self.labels, "copies": self.copies, "n_stages": self.n_stages,
            "history": None if self.history is None else self.history.state_dict(),
            "init_state": self.init_state,
            "train_dynamics": self.train_dynamics.state_dict(), "stage_dynamics": self.stage_dynamics.state_dict(),
            "ssl_votes": self.ssl_votes, "ssl_sweep": self.ssl_sweep,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sup = Learner(self.ctx, state["sup"]["total_epochs"], model=self.sup.model)
        self.sup.load_state_dict(state["sup"])
        if state["finetuner"] is not None:
            self.finetuner = self._finetune_learner()
            self.finetuner.load_state_dict(state["finetuner"])
        if self.ssl is not None and state["ssl"] is not None:
            self.ssl.load_state_dict(state["ssl"])
        self.labels, self.copies, self.n_stages = state["labels"], state["copies"], state["n_stages"]
        self.history = None if state["history"] is None else StageHistory.from_state(state["history"])
        self.init_state = state["init_state"]
        # Checkpoints written before the detectors existed have no dynamics: they start empty.
        if "train_dynamics" in state:
            self.train_dynamics.load_state_dict(state["train_dynamics"])
            self.stage_dynamics.load_state_dict(state["stage_dynamics"])
            self.ssl_votes = state["ssl_votes"]
            self.ssl_sweep = state.get("ssl_sweep", {})
