"""DivideMix: learning with noisy labels as semi-supervised learning (Li, Socher, Hoi, ICLR 2020).

Two networks. After a CE warmup, every epoch:

1. **Co-divide.** Each net scores every training sample (per-sample CE against its training
   label, un-augmented, eval mode), the losses are min-max normalised and a 2-component GMM is
   fitted to them; a sample's clean probability is the posterior of the low-mean component.
   Net A's probabilities split the data for net B and vice versa (``p > p_threshold`` =
   labelled), so a net never selects its own training data (no confirmation bias).
2. **MixMatch with co-refinement and co-guessing**, per step, one labelled and one unlabelled
   batch of ``optim.batch_size`` each, two weak augmentations of each:

   * labelled targets: ``sharpen(w·y + (1 − w)·p̄, T)`` with ``w`` the clean probability from
     the other net and ``p̄`` the training net's mean softmax over the two augmentations;
   * unlabelled targets: ``sharpen`` of the mean of four softmaxes (2 nets × 2 augmentations);
   * mixup of the whole concatenated batch, ``λ ~ Beta(α, α)``, ``λ = max(λ, 1 − λ)``;
   * loss = soft-CE (labelled) + ``λu``·MSE (unlabelled) + ``KL(uniform ‖ mean prediction)``.

The test prediction is the sum of both nets' logits (:meth:`Method.predict_logits`).

Everything is batched on the device; the GMM (scikit-learn, a few hundred microseconds per
thousand samples) is the only step on the CPU.

:class:`DivideMix` takes its initial weights and training labels as arguments, so ``ours_dividemix``
(``labelrefine.methods.ours_dividemix``) reuses it unchanged on the refined labels.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Range, above, at_least, unit
from ..data.noise import check_noise_type
from ..engine import Context, EpochSpec, Learner, Pass, Step
from ..errors import UserError
from ..losses import mixup, sharpen, soft_ce
from ..models import encoder_state, is_classifier_key
from . import register
from .base import LabelReport, Method
from .schedule import supervised_budget
from .simclr import SSLInit

log = logging.getLogger("labelrefine")

__all__ = [
    "DivideMix",
    "co_divide",
    "co_guess",
    "co_refine",
    "default_lambda_u",
    "dividemix_specs",
    "encoder_weights",
    "gmm_clean_prob",
    "lambda_u_at",
    "neg_entropy",
    "uniform_prior_penalty",
]


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested in tests/test_dividemix.py)


def gmm_clean_prob(
    losses: torch.Tensor,
    *,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    random_state: int = 0,
) -> torch.Tensor:
    """Clean probability of each sample from a 2-component GMM on its loss (DivideMix's co-divide).

    The losses are min-max normalised to [0, 1], a 1-D two-component Gaussian mixture is fitted
    (scikit-learn, the reference's settings ``max_iter=10, tol=1e-2, reg_covar=5e-4``) and the
    clean probability is the posterior of the component with the lower mean.

    Degenerate inputs label everything clean (probability 1): fewer than two samples, or all
    losses equal (nothing to separate), or a fit that produced non-finite posteriors.

    Args:
        losses: ``(N,)`` per-sample losses (any float dtype and device); must be finite.
        random_state: seed of the GMM's k-means initialisation.

    Returns:
        ``(N,)`` float32 on ``losses.device``, in [0, 1].
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    n = losses.numel()
    ones = torch.ones(n, dtype=torch.float32, device=losses.device)
    x = losses.detach().to("cpu", torch.float64).flatten()
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("non-finite per-sample loss")
    if n < 2:
        return ones
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return ones
    x = ((x - lo) / (hi - lo)).numpy().reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar,
                          random_state=random_state)
    with warnings.catch_warnings():
        # 10 EM iterations often stop short of tol: the reference accepts that, so do we.
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    prob = gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]
    if not np.isfinite(prob).all():
        return ones
    return torch.from_numpy(np.clip(prob, 0.0, 1.0)).to(losses.device, torch.float32)


def co_divide(prob: torch.Tensor, threshold: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The data split each net trains on: net ``k`` uses the *other* net's clean probabilities.

    Args:
        prob: ``(2, N)``; row ``j`` is net ``j``'s GMM clean probability (from net ``j``'s losses).
        threshold: ``p > threshold`` puts a sample in the labelled set.

    Returns:
        ``[(labelled, w), (labelled, w)]`` indexed by the net that *trains*: entry ``k`` is
        ``(prob[1 - k] > threshold, prob[1 - k])``. So net 1's losses divide the data for net 2
        and net 2's for net 1, as in Li et al. (Algorithm 1: "co-divide").
    """
    if prob.dim() != 2 or prob.shape[0] != 2:
        raise ValueError(f"co_divide: prob must be (2, N), got {tuple(prob.shape)}")
    return [(prob[1 - k] > threshold, prob[1 - k]) for k in (0, 1)]


def co_refine(onehot: torch.Tensor, w: torch.Tensor, probs: list[torch.Tensor], T: float) -> torch.Tensor:
    """Label co-refinement of labelled samples (Li et al., eq. 3-4).

    ``sharpen(w·y + (1 − w)·mean(probs), T)``.

    Args:
        onehot: ``(B, K)`` one-hot training labels ``y``.
        w: ``(B,)`` clean probabilities (from the other net's GMM).
        probs: softmax outputs ``(B, K)`` of the training net, one per augmentation.
        T: sharpening temperature (0.5).
    """
    p = torch.stack(probs).mean(0)
    w = w.to(p.dtype)[:, None]
    return sharpen(w * onehot + (1.0 - w) * p, T)


def co_guess(probs: list[torch.Tensor], T: float) -> torch.Tensor:
    """Label co-guessing of unlabelled samples: ``sharpen(mean(probs), T)`` over both nets and both
    augmentations (Li et al., Section 3.3). ``probs``: softmax outputs, each ``(B, K)``."""
    return sharpen(torch.stack(probs).mean(0), T)


def uniform_prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """``Σ_k π_k log(π_k / p̄_k)`` with uniform ``π`` and ``p̄`` the batch-mean softmax
    (Li et al., eq. 12; Tanaka et al., CVPR 2018): keeps the nets from predicting one class."""
    k = logits.shape[1]
    mean = F.softmax(logits.float(), dim=1).mean(0)
    return (math.log(1.0 / k) - mean.clamp_min(1e-12).log()).mean()


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean ``Σ_k p_k log p_k`` (the negative entropy): the reference adds it to the warmup CE under
    asymmetric noise, penalising confident predictions."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(1).mean()


def default_lambda_u(noise_rate: float, noise: str = "symmetric") -> float:
    """The unlabelled-loss weight λu when ``dividemix.lambda_u = -1``, from the (requested) noise.

    Li et al. tune λu per noise level from {0, 25, 50, 150} (0 at 20%, 25 at 50%, 150 at 90%
    symmetric; 0 for 40% asymmetric). Between those calibrated rates we switch at the midpoints:

    * pair-flip (asymmetric) noise: 0;
    * rate < 0.35: 0;
    * 0.35 <= rate < 0.7: 25;
    * rate >= 0.7: 150.

    ``noise`` is a canonical noise type name (:func:`labelrefine.data.noise.resolve_noise_type`:
    the Context's ``cfg.data.noise`` is one, ``asymmetric`` having become ``pairflip``).
    """
    if noise == "pairflip":
        return 0.0
    if noise_rate < 0.35:
        return 0.0
    if noise_rate < 0.7:
        return 25.0
    return 150.0


def lambda_u_at(lambda_max: float, epochs_since_warmup: float, rampup_epochs: float) -> float:
    """λu after ``epochs_since_warmup`` (fractional) epochs of MixMatch training: a linear ramp
    from 0 to ``lambda_max`` over ``rampup_epochs`` (reference: 16), constant after."""
    if rampup_epochs <= 0:
        return float(lambda_max)
    return float(lambda_max) * min(max(epochs_since_warmup / rampup_epochs, 0.0), 1.0)


def dividemix_specs(cfg, phases: tuple[str, str] = ("warmup", "train")) -> list[EpochSpec]:
    """DivideMix's schedule: ``dividemix.warmup_epochs`` CE epochs, then MixMatch epochs up to
    :func:`supervised_budget` in total, and at least one MixMatch epoch."""
    warm = cfg.dividemix.warmup_epochs
    train = max(1, supervised_budget(cfg) - warm)
    return ([EpochSpec(phases[0], 0, e) for e in range(1, warm + 1)]
            + [EpochSpec(phases[1], 0, e) for e in range(1, train + 1)])


def encoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every weight except the classifier ``fc`` (what SimCLR trains)."""
    return {k: v.detach().clone() for k, v in encoder_state(model.state_dict()).items()}


def _load_init(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; it may leave out the classifier (an encoder) but nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not is_classifier_key(k) for k in missing):
        raise ValueError(f"initial weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _cycled_batches(indices: torch.Tensor, steps: int, batch_size: int, ctx: Context) -> torch.Tensor:
    """``(steps, batch_size)`` indices drawn from ``indices`` by concatenated random permutations:
    the reference's unlabelled loader, restarted with a fresh shuffle whenever it runs out.

    Data parallel: this rank's share of ``indices``, ``batch_size / world`` per step."""
    if ctx.world > 1:
        indices = indices[indices % ctx.world == ctx.rank]
        batch_size = max(1, batch_size // ctx.world)
        if not len(indices):
            return indices.new_zeros((steps, 0))
    need = steps * batch_size
    rounds = math.ceil(need / len(indices))
    stream = torch.cat([indices[ctx.permutation(len(indices))] for _ in range(rounds)])
    return stream[:need].view(steps, batch_size)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class DivideMixConfig:
    """The ``dividemix`` config section."""

    RANGES: ClassVar[dict[str, Range]] = {  # field -> allowed range (see labelrefine.config.Range)
        "warmup_epochs": at_least(0),
        "p_threshold": unit(),
        "temperature": above(0.0),
        "alpha": at_least(0.0),  # 0 = no mixup (losses.mixup)
        "lambda_u": Range(0.0, also=(-1.0,), meaning="from the noise rate"),
        "rampup_epochs": at_least(0),
        "gmm_max_iter": at_least(1),
        "gmm_tol": at_least(0.0),
        "gmm_reg_covar": at_least(0.0),
        "micro_batch": at_least(0),
    }
    warmup_epochs: int = 10  # CE warmup of both nets (Li et al.: 10 CIFAR-10, 30 CIFAR-100)
    p_threshold: float = 0.5  # GMM clean-probability threshold
    temperature: float = 0.5  # sharpening temperature T
    alpha: float = 4.0  # mixup Beta(alpha, alpha)
    lambda_u: float = -1.0  # unlabelled-loss weight; -1 = by noise rate: 0 under 0.35, 25 under 0.7, else 150
    rampup_epochs: int = 16  # lambda_u linear ramp-up length, in epochs after the warmup (Li et al.: 16)
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    # Rows per forward(-backward) of a MixMatch step's batches (the 4 x batch_size weak views the nets
    # guess on, the 4 x batch_size mixed rows they train on). A larger batch runs in interleaved parts
    # (rows j, j + n, j + 2n, ...: each part holds rows of all four view sets) and the mixed parts'
    # gradients are accumulated; BatchNorm statistics and the prior penalty are then each part's.
    # 0 = the whole batch at once, as the reference (the default: the parts change what BatchNorm
    # sees, and that has not been measured). Measured on a 2-core Xeon (airbench width 32): a
    # 4,096-row forward-backward costs 1.17 s per 1,024 rows, a 1,024-row one 0.95 s.
    micro_batch: int = 0
    # Initial weights of both nets. auto = the method's default: random for dividemix, ssl for
    # ours_dividemix. ssl = the SimCLR encoder (each net keeps its own random classifier);
    # refined = the ours model after refinement (ours_dividemix only).
    init: Literal["auto", "random", "ssl", "refined"] = "auto"
    # Training labels. auto = noisy for dividemix, refined for ours_dividemix (refined: ours_dividemix only).
    labels: Literal["auto", "noisy", "refined"] = "auto"


@register
class DivideMix(Method):
    """Two nets, GMM co-divide, MixMatch with co-refinement and co-guessing (Li et al., ICLR 2020).

    Args:
        ctx: the run context.
        init_state: initial weights for both nets; it may omit the classifier ``fc.*`` (an encoder:
            each net then keeps its own random classifier). ``None``: random, or SimCLR
            pretraining as this method's first phase when ``ssl`` says so.
        labels: ``(N,)`` training labels (default: the given noisy labels).
        phases: names of the warmup and MixMatch phases in the schedule.
        ssl: run SimCLR pretraining first (net 1 is pretrained, net 2 copies its encoder).
            ``None`` = as configured (``dividemix.init``), and then ``dividemix.init`` /
            ``dividemix.labels`` must not ask for ``refined`` (that is ``ours_dividemix``).
    """

    name = "dividemix"
    summary = "Two nets; GMM loss split of each net trains the other; MixMatch with co-refinement/co-guessing."
    paper = "Li, Socher, Hoi, ICLR 2020"
    sections = {"dividemix": DivideMixConfig}
    phases = ("ssl", "warmup", "train")  # as registered; ours_dividemix names its own two (phase_names)

    def __init__(self, ctx: Context, *, init_state: dict[str, torch.Tensor] | None = None,
                 labels: torch.Tensor | None = None, phases: tuple[str, str] = ("warmup", "train"),
                 ssl: bool | None = None):
        super().__init__(ctx)
        d = self.cfg.dividemix
        if ssl is None:
            for key, value in (("init", d.init), ("labels", d.labels)):
                if value == "refined":
                    raise UserError(f"config key 'dividemix.{key}': 'refined' needs method=ours_dividemix")
            ssl = d.init == "ssl"
            if ssl and self.cfg.ssl.epochs == 0:
                log.warning("dividemix.init=ssl but ssl.epochs=0: the nets start from random weights")
                ssl = False
        self.phase_names = phases
        self.labels = (self.given if labels is None else labels).to(ctx.device).clone()
        self.specs = dividemix_specs(self.cfg, phases)
        self.warmup_epochs = d.warmup_epochs
        nets = [ctx.new_model(), ctx.new_model()]
        if init_state is not None:
            for net in nets:
                _load_init(net, init_state)
        self.ssl = SSLInit(ctx, nets[0]) if ssl else None
        self.sups = [Learner(ctx, len(self.specs), model=net) for net in nets]
        if d.lambda_u < 0 and not check_noise_type(self.cfg.data.noise):
            raise UserError(f"config key 'dividemix.lambda_u': -1 takes lambda_u from data.noise_rate, which "
                            f"data.noise={self.cfg.data.noise!r} does not use; set dividemix.lambda_u (Li et al.: 0 "
                            f"below 35% noise, 25 up to 70%, 150 above)")
        self.lambda_max = d.lambda_u if d.lambda_u >= 0 else default_lambda_u(ctx.noise_rate, self.cfg.data.noise)
        # The reference adds a confidence penalty to the warmup CE under asymmetric noise only.
        self.warmup_penalty = self.cfg.data.noise == "pairflip"
        self.train_done = 0  # MixMatch epochs finished (the λu ramp and the GMM seed)
        self.prob: torch.Tensor | None = None  # (2, N) last GMM clean probabilities, row = scoring net
        self._split_sizes: list[dict[str, int]] = []  # this epoch's labelled-set size and steps, per net
        log.info("dividemix: lambda_u %.1f, %d warmup + %d MixMatch epochs", self.lambda_max,
                 self.warmup_epochs, len(self.specs) - self.warmup_epochs)

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self) -> list[EpochSpec]:
        return (self.ssl.specs() if self.ssl is not None else []) + list(self.specs)

    def on_supervised_start(self) -> None:
        """After SimCLR: net 2 gets net 1's pretrained encoder (its classifier stays its own)."""
        if self.ssl is not None:
            _load_init(self.sups[1].model, encoder_weights(self.sups[0].model))

    def on_epoch_start(self, spec: EpochSpec) -> dict[str, float]:
        if spec.phase == self.phase_names[1]:
            # Both splits come from the nets as they are before either trains this epoch (reference).
            self.prob = self.clean_probs()
        self._split_sizes = []
        return {}

    def passes(self, spec: EpochSpec):
        if spec.phase == self.phase_names[0]:
            return self._warmup_passes()
        if spec.phase == self.phase_names[1]:
            return self._mixmatch_passes()
        raise ValueError(f"unknown phase {spec.phase!r}")

    def on_epoch_end(self, spec: EpochSpec, parts: list[dict[str, float]]) -> dict[str, float]:
        """The two nets' logs side by side (``loss_net1``...), ``loss`` their mean, ``lr`` net 2's."""
        if spec.phase == self.phase_names[0]:
            logs = {f"loss_net{k + 1}": part["loss"] for k, part in enumerate(parts)}
        else:
            logs = {f"{key}_net{k + 1}": v for k, (part, sizes) in enumerate(zip(parts, self._split_sizes, strict=True))
                    for key, v in [*((key, part[key]) for key in ("loss", "lx", "lu", "penalty")), *sizes.items()]}
        logs["lr"] = parts[-1]["lr"]
        logs["loss"] = (logs["loss_net1"] + logs["loss_net2"]) / 2
        if spec.phase == self.phase_names[1]:
            self.train_done += 1
            logs["lambda_u"] = lambda_u_at(self.lambda_max, self.train_done, self.cfg.dividemix.rampup_epochs)
            logs["clean_prob_mean"] = float(self.prob.mean())
        return logs

    # -- warmup --------------------------------------------------------------------------------
    def _warmup_passes(self):
        """CE on the training labels, each net over the whole set with its own shuffle (drawn when
        its pass starts, after the other net's pass: a generator)."""
        ctx = self.ctx
        bs = ctx.cfg.optim.batch_size
        rows = torch.arange(ctx.n, device=ctx.device)
        for k, sup in enumerate(self.sups):
            batches = ctx.batches(rows, bs, drop_last=ctx.n > bs)
            yield Pass(batches, [sup], functools.partial(self._warmup_step, sup), desc=f"warmup net{k + 1}")

    def _warmup_step(self, sup: Learner, idx: torch.Tensor) -> Step:
        x = self.ctx.augment(idx)
        with self.ctx.autocast():
            logits = sup.nets[0](x)
        logits = logits.float()
        loss = F.cross_entropy(logits, self.labels[idx])
        if self.warmup_penalty:
            loss = loss + neg_entropy(logits)
        return Step([loss], {"loss": loss.detach()}, len(idx))

    # -- co-divide -----------------------------------------------------------------------------
    def clean_probs(self) -> torch.Tensor:
        """``(2, N)`` GMM clean probabilities of both nets on the current training labels.

        Row ``j`` comes from net ``j``'s own per-sample losses; :func:`co_divide` hands it to the
        other net. The GMM seed derives from the run seed, the MixMatch epoch and the net.
        """
        d, ctx = self.cfg.dividemix, self.ctx
        out = []
        for j, sup in enumerate(self.sups):
            logits = ctx.logits_all(sup.model)
            losses = F.cross_entropy(logits, self.labels, reduction="none")
            seed = int(np.random.SeedSequence([self.cfg.seed, self.train_done, j]).generate_state(1)[0])
            out.append(gmm_clean_prob(losses, max_iter=d.gmm_max_iter, tol=d.gmm_tol, reg_covar=d.gmm_reg_covar,
                                      random_state=seed))
        return torch.stack(out)

    # -- MixMatch ------------------------------------------------------------------------------
    def _mixmatch_passes(self):
        """One pass per net, net ``k`` on the split made by the *other* net's GMM (co-divide).

        A pass runs over the labelled set once (the last batch may be partial); the unlabelled
        set is cycled with fresh shuffles, ``batch_size`` per step. An empty labelled set makes the
        pass one sweep over the unlabelled set (unlabelled loss and prior penalty only); an empty
        unlabelled set leaves the labelled loss and the penalty. Each net's batches are drawn when
        its pass starts (a generator), after the other net's pass.
        """
        ctx = self.ctx
        bs = ctx.cfg.optim.batch_size
        for k, (labelled, w) in enumerate(co_divide(self.prob, self.cfg.dividemix.p_threshold)):
            lab = labelled.nonzero().flatten()
            unl = (~labelled).nonzero().flatten()
            if len(lab):
                lab_batches = ctx.batches(lab, bs)
                steps = len(lab_batches)
            else:
                steps = len(ctx.batches(unl, bs, shuffle=False))
                lab_batches = [lab[:0]] * steps
            unl_batches = _cycled_batches(unl, steps, bs, ctx) if len(unl) else unl[:0].expand(steps, 0)
            # The other net only guesses (co-guessing), in inference mode as in the reference.
            self.sups[1 - k].model.eval()
            self._split_sizes.append({"labelled": int(len(lab)), "steps": steps})
            batches = [(s, lab_batches[s], unl_batches[s]) for s in range(steps)]
            yield Pass(batches, [self.sups[k]], functools.partial(self._mixmatch_step, k, w, steps),
                       desc=f"dividemix net{k + 1}")

    def _mixmatch_step(self, k: int, w: torch.Tensor, steps: int, batch):
        """One MixMatch step of net ``k``: co-refined and co-guessed targets, mixup, the three losses.
        Returns per-step values (``size`` 1): the epoch reports their mean over steps. A mixed batch
        of more than ``dividemix.micro_batch`` rows is trained in parts (a generator of their losses:
        the Trainer accumulates the gradients)."""
        ctx, d = self.ctx, self.cfg.dividemix
        step, lb, ub = batch
        sup, other = self.sups[k], self.sups[1 - k].model
        T, C = d.temperature, ctx.num_classes
        lam_u = lambda_u_at(self.lambda_max, self.train_done + step / steps, d.rampup_epochs)
        nl, nu = len(lb), len(ub)
        # Two weak augmentations per sample, drawn in one call: rows [u1; u2; x1; x2].
        views = ctx.augment(torch.cat([ub, ub, lb, lb]))
        with torch.no_grad():
            with ctx.autocast():
                # The training net guesses in train mode (as the reference and MixMatch do).
                p_self = F.softmax(self._forward(sup.model, views).float(), dim=1)
                p_other = F.softmax(self._forward(other, views[: 2 * nu]).float(), dim=1) if nu else None
            parts = []  # targets in the order [x1; x2; u1; u2]
            if nl:
                onehot = F.one_hot(self.labels[lb], C).float()
                tx = co_refine(onehot, w[lb], [p_self[2 * nu:2 * nu + nl], p_self[2 * nu + nl:]], T)
                parts += [tx, tx]
            if nu:
                tu = co_guess([p_self[:nu], p_self[nu:2 * nu], p_other[:nu], p_other[nu:]], T)
                parts += [tu, tu]
            inputs = torch.cat([views[2 * nu:], views[: 2 * nu]])
            all_t = torch.cat(parts)
        mixed_x, mixed_t, _ = mixup(inputs, all_t, d.alpha, generator=ctx.generator)
        n = self._parts(len(mixed_x))
        if n > 1:
            return self._mixmatch_parts(sup, mixed_x, mixed_t, nl, nu, lam_u, n)
        with ctx.autocast():
            logits = sup.nets[0](mixed_x.contiguous(memory_format=ctx.memory_format))
        logits = logits.float()
        zero = logits.new_zeros(())
        lx = soft_ce(logits[: 2 * nl], mixed_t[: 2 * nl]) if nl else zero
        lu = ((F.softmax(logits[2 * nl:], dim=1) - mixed_t[2 * nl:]) ** 2).mean() if nu else zero
        penalty = uniform_prior_penalty(logits)
        loss = lx + lam_u * lu + penalty
        return Step([loss], {"loss": loss.detach(), "lx": lx.detach(), "lu": lu.detach(),
                             "penalty": penalty.detach()}, 1)

    def _parts(self, rows: int) -> int:
        """How many interleaved parts a batch of ``rows`` rows runs in (``dividemix.micro_batch``)."""
        limit = self.cfg.dividemix.micro_batch
        return 1 if limit <= 0 or rows <= limit else math.ceil(rows / limit)

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net(x)``, in interleaved parts when ``x`` has more than ``dividemix.micro_batch`` rows."""
        n = self._parts(len(x))
        if n == 1:
            return net(x)
        out = None
        for j in range(n):
            part = net(x[j::n].contiguous(memory_format=self.ctx.memory_format))
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[j::n] = part
        return out

    def _mixmatch_parts(self, sup: Learner, mixed_x: torch.Tensor, mixed_t: torch.Tensor, nl: int, nu: int,
                        lam_u: float, n: int):
        """The mixed batch's loss in ``n`` interleaved parts (rows ``j::n``), each part's share of the
        whole batch's ``lx`` (a mean over the ``2 nl`` labelled rows) and ``lu`` (a mean over the
        ``2 nu`` unlabelled rows and the classes) exactly, and of the prior penalty by the part's own
        mean prediction, weighted by its rows. Yields each part's loss; returns the step's Step."""
        ctx, C = self.ctx, self.ctx.num_classes
        rows = len(mixed_x)
        totals = mixed_x.new_zeros(4, dtype=torch.float32)  # loss, lx, lu, penalty
        for j in range(n):
            idx = torch.arange(j, rows, n, device=mixed_x.device)
            with ctx.autocast():
                logits = sup.nets[0](mixed_x[idx].contiguous(memory_format=ctx.memory_format))
            logits, t = logits.float(), mixed_t[idx]
            zero = logits.new_zeros(())
            lab = idx < 2 * nl
            lx = soft_ce(logits[lab], t[lab], reduction="sum") / (2 * nl) if nl else zero
            unl = ~lab
            lu = ((F.softmax(logits[unl], dim=1) - t[unl]) ** 2).sum() / (2 * nu * C) if nu else zero
            penalty = uniform_prior_penalty(logits) * (len(idx) / rows)
            loss = lx + lam_u * lu + penalty
            totals += torch.stack([loss, lx, lu, penalty]).detach().float()
            yield [loss]
        loss, lx, lu, penalty = totals.unbind()
        return Step([loss], {"loss": loss, "lx": lx, "lu": lu, "penalty": penalty}, 1)

    # -- outputs -------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"net1": self.sups[0].model, "net2": self.sups[1].model}

    def training_labels(self) -> torch.Tensor:
        return self.labels

    def oracle_view(self) -> dict[str, torch.Tensor]:
        """``labels``, and after a MixMatch epoch the labelled set (mean clean probability above
        ``p_threshold``) as ``stage_selected``: the oracle then reports its precision and recall."""
        view = {"labels": self.labels}
        if self.prob is not None:
            view.update(stage_selected=self.prob.mean(0) > self.cfg.dividemix.p_threshold,
                        stage_labels=self.labels)
        return view

    def label_report(self) -> LabelReport:
        """Quality = the last GMM clean probability of the training label, averaged over the two
        nets; refined label = argmax of the summed logits; an issue when quality < p_threshold."""
        prob = self.prob if self.prob is not None else self.clean_probs()
        quality = prob.mean(0).clamp(0.0, 1.0)
        refined = self.predict_logits().argmax(1)
        return LabelReport(refined, quality, quality < self.cfg.dividemix.p_threshold, torch.zeros_like(self.given))

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"sups": [s.state_dict() for s in self.sups], "labels": self.labels, "prob": self.prob,
                "train_done": self.train_done, "lambda_max": self.lambda_max,
                "ssl": None if self.ssl is None else self.ssl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for sup, s in zip(self.sups, state["sups"], strict=True):
            sup.load_state_dict(s)
        self.labels = state["labels"].to(self.ctx.device)
        self.prob = None if state["prob"] is None else state["prob"].to(self.ctx.device)
        self.train_done = state["train_done"]
        self.lambda_max = state["lambda_max"]
        if self.ssl is not None and state["ssl"] is not None:
            self.ssl.load_state_dict(state["ssl"])
