"""Loss functions: small, pure, vectorised.

Each function takes logits or embeddings and returns a tensor; none holds state and none
touches a global RNG except where a ``generator`` is passed explicitly (:func:`mixup`).
Shapes: ``B`` is the batch size, ``K`` the number of classes, ``D`` the embedding size.

* :func:`nt_xent` - SimCLR's contrastive loss (Chen et al., ICML 2020).
* :func:`per_sample_ce`, :func:`soft_ce` - cross-entropy against hard or soft targets.
* :func:`softmax_weighted_ce` - the fine-tuning loss of the second paper: CE with a detached
  per-sample confidence weight, which downweights uncertain predictions.
* :func:`jocor_loss` - JoCoR's joint loss with co-regularisation (Wei et al., CVPR 2020).
* :func:`sharpen`, :func:`mixup` - MixMatch helpers used by DivideMix (Berthelot et al.,
  NeurIPS 2019; Li et al., ICLR 2020).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "jocor_loss",
    "mixup",
    "nt_xent",
    "per_sample_ce",
    "sharpen",
    "soft_ce",
    "softmax_weighted_ce",
]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy (NT-Xent), Chen et al., ICML 2020, eq. 1.

    The ``2n`` embeddings are L2-normalised; for every anchor the positive is the other view of
    the same image and the negatives are the remaining ``2n - 2`` embeddings. The loss is the
    mean over all ``2n`` anchors of ``-log softmax(sim / temperature)[positive]``, with the
    anchor's self-similarity excluded from the softmax.

    Args:
        z1: ``(n, D)`` embeddings of the first view.
        z2: ``(n, D)`` embeddings of the second view; row ``i`` is the same image as ``z1[i]``.
        temperature: softmax temperature τ (SimCLR on CIFAR: 0.5).

    Returns:
        Scalar loss. When all embeddings are equal it is ``log(2n - 1)``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: z1 and z2 must both be (n, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    # Normalise in float32 at least: under fp16 autocast the squared norms can overflow.
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    # Remove each anchor's similarity with itself from its softmax (it is always the maximum).
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    # Anchor i (first view) is positive with i + n (second view) and vice versa.
    idx = torch.arange(n, device=z.device)
    positives = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, positives)


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample: logits ``(B, K)``, int64 targets ``(B,)`` -> ``(B,)``."""
    return F.cross_entropy(logits, targets, reduction="none")


def soft_ce(
    logits: torch.Tensor,
    soft_targets: torch.Tensor,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Cross-entropy against a target distribution: ``-Σ_k q_k log softmax(logits)_k``.

    Args:
        logits: ``(B, K)``.
        soft_targets: ``(B, K)``, each row a probability distribution (e.g. MixMatch targets).
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (``(B,)``).
    """
    if logits.shape != soft_targets.shape:
        raise ValueError(f"soft_ce: logits {tuple(logits.shape)} and targets {tuple(soft_targets.shape)} differ")
    loss = -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    return _reduce(loss, reduction)


def softmax_weighted_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: Literal["max_prob", "target_prob"] = "max_prob",
    normalize: bool = True,
) -> torch.Tensor:
    """Softmax-weighted cross-entropy: CE that downweights uncertain predictions.

    The second paper's fine-tuning loss ("a softmax-weighted cross-entropy that dynamically
    downweights uncertain predictions"). The paper does not define the weight; two readings:

    * ``"max_prob"``: ``w_i = max_k p_ik``, the model's confidence in its own prediction;
    * ``"target_prob"``: ``w_i = p_{i, y_i}``, its confidence in the given label.

    The weight is detached: it scales each sample's gradient but is not itself optimised
    (otherwise the model could lower the loss by becoming less confident).

    Args:
        logits: ``(B, K)``.
        targets: int64 ``(B,)``.
        weight: which confidence to use, see above.
        normalize: if true return ``Σ w_i CE_i / Σ w_i`` (a weighted mean, on the same scale as
            plain CE whatever the average confidence); else ``mean(w_i CE_i)``.

    Returns:
        Scalar loss.
    """
    ce = per_sample_ce(logits, targets)
    with torch.no_grad():
        p = F.softmax(logits.float(), dim=1)
        if weight == "max_prob":
            w = p.amax(dim=1)
        elif weight == "target_prob":
            w = p.gather(1, targets[:, None]).squeeze(1)
        else:
            raise ValueError(f"softmax_weighted_ce: weight must be 'max_prob' or 'target_prob', got {weight!r}")
        w = w.to(ce.dtype)
    if normalize:
        # The clamp only matters if every weight underflows to 0 (target_prob on hopeless samples).
        return (w * ce).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    return (w * ce).mean()


def jocor_loss(logits1: torch.Tensor, logits2: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """JoCoR's per-sample joint loss (Wei et al., CVPR 2020, eq. 3-5).

    ``ℓ_i = (1 - λ)(CE(p1_i, y_i) + CE(p2_i, y_i)) + λ (KL(p1_i ‖ p2_i) + KL(p2_i ‖ p1_i))``.
    The caller keeps the ``1 - r(t)`` fraction of samples with the smallest ``ℓ`` and takes one
    optimiser step over both networks on their mean.

    Args:
        logits1, logits2: ``(B, K)`` from the two networks.
        targets: int64 ``(B,)`` (noisy) labels.
        lam: co-regularisation weight λ in ``[0, 1]`` (0.9 for CIFAR-10, 0.85 for CIFAR-100).

    Returns:
        ``(B,)`` per-sample losses. Gradients flow into both networks through both KL terms.
    """
    logp1 = F.log_softmax(logits1, dim=1)
    logp2 = F.log_softmax(logits2, dim=1)
    ce = F.nll_loss(logp1, targets, reduction="none") + F.nll_loss(logp2, targets, reduction="none")
    # Symmetric KL: Σ p1 (log p1 - log p2) + Σ p2 (log p2 - log p1) = Σ (p1 - p2)(log p1 - log p2).
    sym_kl = ((logp1.exp() - logp2.exp()) * (logp1 - logp2)).sum(dim=1)
    return (1.0 - lam) * ce + lam * sym_kl


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """Temperature sharpening ``p^(1/T) / Σ p^(1/T)`` along the last dim (MixMatch, DivideMix).

    Args:
        p: ``(..., K)`` probabilities.
        T: temperature; ``T < 1`` sharpens, ``T = 1`` is the identity (DivideMix: 0.5).
    """
    if T <= 0:
        raise ValueError(f"sharpen: T must be > 0, got {T}")
    # Work in log space so small T does not underflow every entry of a row to 0.
    logq = torch.log(p.clamp_min(0)) / T
    return F.softmax(logq, dim=-1)


def mixup(
    x: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp with MixMatch's asymmetric λ (Zhang et al., ICLR 2018; Berthelot et al., 2019).

    Draw one ``λ ~ Beta(α, α)`` per batch, set ``λ = max(λ, 1 - λ)`` so the mixed sample stays
    closer to the first input, and mix each sample with a random permutation of the batch:
    ``x' = λ x + (1 - λ) x[perm]``, ``q' = λ q + (1 - λ) q[perm]``.

    Args:
        x: ``(B, ...)`` float inputs.
        targets: ``(B, K)`` soft targets (one-hot rows for hard labels).
        alpha: Beta concentration α (DivideMix: 4). ``alpha <= 0`` disables mixing (λ = 1).
        generator: RNG for λ and the permutation; ``None`` uses torch's global RNG. Both draws
            happen on the generator's device (CPU for ``None``), so results do not depend on the
            data's device.

    Returns:
        ``(mixed_x, mixed_targets, lam)`` with ``lam`` a Python float in ``[0.5, 1]``.
    """
    if x.shape[0] != targets.shape[0]:
        raise ValueError(f"mixup: x has {x.shape[0]} rows, targets {targets.shape[0]}")
    if alpha <= 0:
        return x, targets, 1.0
    dev = generator.device if generator is not None else torch.device("cpu")
    # Beta(α, α) = G1 / (G1 + G2) = sigmoid(log G1 - log G2) with G ~ Gamma(α, 1), drawn here
    # because torch's Beta sampler takes no generator. For small α, Gamma(α) samples underflow
    # even in float64, so sample in log space: Gamma(α) = Gamma(α + 1) · U^(1/α).
    shape = torch.full((2,), float(alpha) + 1.0, dtype=torch.float64, device=dev)
    log_g = torch._standard_gamma(shape, generator=generator).log()
    log_g = log_g + torch.rand(2, dtype=torch.float64, device=dev, generator=generator).log() / alpha
    lam = float(torch.sigmoid(log_g[0] - log_g[1]))
    if not math.isfinite(lam):  # only if both uniforms were exactly 0
        lam = 1.0
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(x.shape[0], generator=generator, device=dev).to(x.device)
    mixed_x = lam * x + (1.0 - lam) * x[perm]
    mixed_t = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_x, mixed_t, lam


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
