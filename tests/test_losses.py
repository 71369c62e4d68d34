"""Losses against slow references, analytic values and invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelrefine.losses import (
    jocor_loss,
    mixup,
    nt_xent,
    per_sample_ce,
    sharpen,
    soft_ce,
    softmax_weighted_ce,
)


def _nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-anchor loop, straight from SimCLR's eq. 1 (cosine similarity, self excluded)."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = [F.cosine_similarity(z[i], z[k], dim=0) / temperature for k in range(n2)]
        denom = sum(torch.exp(sims[k]) for k in range(n2) if k != i)
        total += -torch.log(torch.exp(sims[pos]) / denom)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(temperature):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = nt_xent(z1, z2, temperature)
    assert got.dim() == 0
    torch.testing.assert_close(got.double(), _nt_xent_reference(z1, z2, temperature), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_nt_xent_all_identical_is_log_2n_minus_1(n):
    z = torch.ones(n, 8) * 3.0
    torch.testing.assert_close(nt_xent(z, z.clone(), 0.5), torch.tensor(math.log(2 * n - 1)))


def test_nt_xent_is_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    torch.testing.assert_close(nt_xent(z1, z2), nt_xent(z2, z1))
    torch.testing.assert_close(nt_xent(3 * z1, 0.5 * z2), nt_xent(z1, z2))


def test_nt_xent_decreases_under_adam():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(16, 8, generator=g).requires_grad_()
    z2 = torch.randn(16, 8, generator=g).requires_grad_()
    opt = torch.optim.Adam([z1, z2], lr=0.05)
    first = nt_xent(z1, z2).item()
    for _ in range(20):
        opt.zero_grad()
        loss = nt_xent(z1, z2)
        loss.backward()
        opt.step()
    assert nt_xent(z1, z2).item() < first - 0.5


def test_per_sample_ce_and_soft_ce():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=g)
    y = torch.randint(0, 4, (7,), generator=g)
    torch.testing.assert_close(per_sample_ce(logits, y), F.cross_entropy(logits, y, reduction="none"))
    onehot = F.one_hot(y, 4).float()
    torch.testing.assert_close(soft_ce(logits, onehot, reduction="none"), per_sample_ce(logits, y))
    torch.testing.assert_close(soft_ce(logits, onehot), F.cross_entropy(logits, y))
    torch.testing.assert_close(soft_ce(logits, onehot, reduction="sum"), F.cross_entropy(logits, y, reduction="sum"))
    with pytest.raises(ValueError, match="reduction"):
        soft_ce(logits, onehot, reduction="max")


def test_softmax_weighted_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([1, 2])
    e2 = math.exp(2.0)
    p0 = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    ce = [-math.log(p0[1]), math.log(3.0)]
    # max_prob: w = (p0[0], 1/3)
    w = [p0[0], 1 / 3]
    expected = (w[0] * ce[0] + w[1] * ce[1]) / (w[0] + w[1])
    assert softmax_weighted_ce(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert softmax_weighted_ce(logits, y, normalize=False).item() == pytest.approx(
        (w[0] * ce[0] + w[1] * ce[1]) / 2, rel=1e-6
    )
    # target_prob: w = (p0[1], 1/3)
    w = [p0[1], 1 / 3]
    expected = (w[0] * ce[0] + w[1] * ce[1]) / (w[0] + w[1])
    assert softmax_weighted_ce(logits, y, weight="target_prob").item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="weight"):
        softmax_weighted_ce(logits, y, weight="entropy")


@pytest.mark.parametrize("weight", ["max_prob", "target_prob"])
@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_weighted_ce_weight_is_detached(weight, normalize):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 5, generator=g).requires_grad_()
    y = torch.randint(0, 5, (9,), generator=g)
    softmax_weighted_ce(logits, y, weight=weight, normalize=normalize).backward()
    # Same loss with the weights as constants.
    p = F.softmax(logits.detach(), dim=1)
    w = p.amax(1) if weight == "max_prob" else p.gather(1, y[:, None]).squeeze(1)
    ref_logits = logits.detach().clone().requires_grad_()
    ce = F.cross_entropy(ref_logits, y, reduction="none")
    ref = (w * ce).sum() / w.sum() if normalize else (w * ce).mean()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_softmax_weighted_ce_equals_ce_for_confident_uniform_weights():
    # Equal weights (every row the same shape) -> the normalised loss is plain mean CE.
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(softmax_weighted_ce(logits, y), F.cross_entropy(logits, y))


def test_jocor_loss_matches_formula():
    g = torch.Generator().manual_seed(5)
    l1 = torch.randn(6, 4, generator=g)
    l2 = torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    lam = 0.85
    lp1, lp2 = F.log_softmax(l1, 1), F.log_softmax(l2, 1)
    # F.kl_div(input=log q, target=p) computes KL(p || q).
    kl_12 = F.kl_div(lp2, lp1, reduction="none", log_target=True).sum(1)
    kl_21 = F.kl_div(lp1, lp2, reduction="none", log_target=True).sum(1)
    ce = F.cross_entropy(l1, y, reduction="none") + F.cross_entropy(l2, y, reduction="none")
    expected = (1 - lam) * ce + lam * (kl_12 + kl_21)
    got = jocor_loss(l1, l2, y, lam)
    assert got.shape == (6,)
    torch.testing.assert_close(got, expected)
    # λ = 0 is the sum of the two CEs; identical nets have zero disagreement.
    torch.testing.assert_close(jocor_loss(l1, l2, y, 0.0), ce)
    torch.testing.assert_close(jocor_loss(l1, l1, y, 1.0), torch.zeros(6), atol=1e-6, rtol=0)


def test_jocor_gradients_reach_both_networks():
    l1 = torch.randn(3, 4).requires_grad_()
    l2 = torch.randn(3, 4).requires_grad_()
    jocor_loss(l1, l2, torch.tensor([0, 1, 2]), 0.9).mean().backward()
    assert l1.grad.abs().sum() > 0 and l2.grad.abs().sum() > 0


def test_sharpen_invariants():
    g = torch.Generator().manual_seed(6)
    p = F.softmax(torch.randn(5, 7, generator=g), dim=1)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    q = sharpen(p, 0.5)
    torch.testing.assert_close(q.sum(1), torch.ones(5))
    assert torch.all(q.amax(1) > p.amax(1))
    assert torch.equal(q.argmax(1), p.argmax(1))
    torch.testing.assert_close(q, p**2 / (p**2).sum(1, keepdim=True))
    # Very low temperature neither underflows nor NaNs: it tends to one-hot.
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.45, 0.35]])
    h = sharpen(p, 1e-3)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, F.one_hot(p.argmax(1), 4).float())


def test_mixup_invariants_and_reproducibility():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 3, 4, 4, generator=g)
    t = F.softmax(torch.randn(10, 5, generator=g), dim=1)
    for seed in range(20):
        mx, mt, lam = mixup(x, t, 4.0, generator=torch.Generator().manual_seed(seed))
        assert 0.5 <= lam <= 1.0
        assert mx.shape == x.shape and mt.shape == t.shape
        torch.testing.assert_close(mt.sum(1), torch.ones(10))
        assert torch.all(mt >= 0)
    a = mixup(x, t, 4.0, generator=torch.Generator().manual_seed(3))
    b = mixup(x, t, 4.0, generator=torch.Generator().manual_seed(3))
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(11)
    c = mixup(x, t, 4.0)
    torch.manual_seed(11)
    d = mixup(x, t, 4.0)
    assert c[2] == d[2] and torch.equal(c[0], d[0])


def test_mixup_mixes_with_a_permutation():
    x = torch.arange(6, dtype=torch.float32)[:, None]
    t = F.one_hot(torch.arange(6), 6).float()
    mx, mt, lam = mixup(x, t, 1.0, generator=torch.Generator().manual_seed(0))
    # Each mixed target puts λ on its own sample and 1-λ on one partner; partners form a permutation.
    partner = (mt - lam * t).argmax(1) if lam < 1 else torch.arange(6)
    assert sorted(partner.tolist()) == list(range(6))
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x[partner])


def test_mixup_lambda_one_limit():
    x = torch.randn(4, 3)
    t = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    mx, mt, lam = mixup(x, t, 0.0)
    assert lam == 1.0 and torch.equal(mx, x) and torch.equal(mt, t)
    # A tiny α puts Beta's mass at 0 and 1, so max(λ, 1-λ) is ~1.
    _, _, lam = mixup(x, t, 1e-3, generator=torch.Generator().manual_seed(0))
    assert lam > 0.99
