"""Label-noise generators: achieved rates, transition matrices, determinism, a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import truncnorm

from labelrefine.data import ImageSet
from labelrefine.data.noise import (
    apply_noise,
    given_noise,
    idn_noise,
    pairflip_noise,
    symmetric_noise,
    transition_matrix,
)
from labelrefine.errors import UserError


def _labels(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, c, size=n))


def _images(n: int, seed: int = 0, shape=(3, 8, 8)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8))


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.37, 0.5, 0.8])
def test_symmetric_exact_rate_and_no_self_flip(rate):
    y = _labels(1000, 10)
    res = symmetric_noise(y, 10, rate, generator=0)
    flipped = res.noisy_labels != y
    assert int(flipped.sum()) == round(rate * 1000)
    assert res.rate == round(rate * 1000) / 1000
    # Per class the flips are floor or ceil of rate * n_c: the rows are as exact as rounding allows.
    counts = torch.bincount(y, minlength=10)
    per_class = torch.bincount(y[flipped], minlength=10)
    assert torch.all((per_class - rate * counts).abs() < 1.0 + 1e-9)
    torch.testing.assert_close(res.transition.sum(1), torch.ones(10, dtype=torch.float64))
    assert res.noisy_labels.dtype == torch.int64


def test_symmetric_targets_are_uniform_over_other_classes():
    y = torch.zeros(60000, dtype=torch.int64)
    res = symmetric_noise(y, 4, 0.6, generator=1)
    row = res.transition[0]
    assert row[0].item() == pytest.approx(0.4)
    # 36000 flips over 3 classes: each gets 12000 ± a few sd (sd ≈ 89).
    torch.testing.assert_close(row[1:], torch.full((3,), 0.2, dtype=torch.float64), atol=0.006, rtol=0)


@pytest.mark.parametrize("rate", [0.1, 0.45])
def test_pairflip_goes_to_next_class(rate):
    y = _labels(2000, 5)
    res = pairflip_noise(y, 5, rate, generator=3)
    flipped = res.noisy_labels != y
    assert torch.equal(res.noisy_labels[flipped], (y[flipped] + 1) % 5)
    assert int(flipped.sum()) == round(rate * 2000)
    T = res.transition
    # Only the diagonal and the super-diagonal (cyclic) are non-zero.
    allowed = torch.eye(5, dtype=torch.bool) | torch.roll(torch.eye(5, dtype=torch.bool), 1, dims=1)
    assert torch.all(T[~allowed] == 0)
    # Each class flips floor or ceil of rate * n_c.
    counts = torch.bincount(y, minlength=5).double()
    assert torch.all((T.diagonal() - (1 - rate)).abs() <= 1 / counts)


@pytest.mark.parametrize(("tau", "expected"), [(0.2, 0.2055), (0.5, 0.50)])
def test_idn_achieved_rate(tau, expected):
    n = 10_000
    y = _labels(n, 10, seed=5)
    res = idn_noise(y, 10, tau, generator=0, images=_images(n, seed=6))
    assert res.rate == pytest.approx(expected, abs=0.01)
    torch.testing.assert_close(res.transition.sum(1), torch.ones(10, dtype=torch.float64))


def test_idn_expected_rate_is_truncated_normal_mean():
    # The 0.2055 of REFERENCES.md is the mean of N(0.2, 0.1²) truncated to [0, 1].
    assert truncnorm.mean(-2.0, 8.0, loc=0.2, scale=0.1) == pytest.approx(0.2055, abs=5e-4)


def test_idn_raw_pixels_make_flips_deterministic_per_image():
    """With raw 0-255 pixels each image has one dominant confusing class (REFERENCES.md: 99.9%).

    Recompute the per-sample flip distribution with the generator's draw order and check that
    its largest off-class probability is > 0.99 of the flip mass for > 99% of the images.
    """
    n, c = 3000, 10
    y = _labels(n, c, seed=2).numpy()
    x = _images(n, seed=3).reshape(n, -1).double().numpy()
    rng = np.random.default_rng(0)
    truncnorm.rvs(-2.0, 8.0, loc=0.2, scale=0.1, size=n, random_state=rng)
    top = []
    for k in range(c):
        logits = x[y == k] @ rng.standard_normal((x.shape[1], c))
        logits[:, k] = -np.inf
        p = np.exp(logits - logits.max(1, keepdims=True))
        top.append((p / p.sum(1, keepdims=True)).max(1))
    assert (np.concatenate(top) > 0.99).mean() > 0.99


def _idn_reference(y, c, tau, seed, x, pixel_scale=255.0):
    """Slow per-sample transcription of Xia et al.'s generator, same draw order."""
    rng = np.random.default_rng(seed)
    n = len(y)
    q = truncnorm.rvs((0 - tau) / 0.1, (1 - tau) / 0.1, loc=tau, scale=0.1, size=n, random_state=rng)
    flat = x.reshape(n, -1).astype(np.float64) * pixel_scale / 255.0
    W = [rng.standard_normal((flat.shape[1], c)) for _ in range(c)]
    u = rng.random(n)
    out = []
    for i in range(n):
        a = flat[i] @ W[y[i]]
        a[y[i]] = -np.inf
        a = np.exp(a - a.max())
        p = q[i] * a / a.sum()
        p[y[i]] = 1 - q[i]
        cdf = np.cumsum(p)
        cdf[-1] = np.inf
        out.append(int((cdf < u[i]).sum()))
    return np.array(out)


@pytest.mark.parametrize("pixel_scale", [255.0, 1.0])
def test_idn_matches_slow_reference(pixel_scale):
    n, c = 400, 6
    y = _labels(n, c, seed=8)
    x = _images(n, seed=9, shape=(1, 5, 5))
    fast = idn_noise(y, c, 0.4, generator=11, images=x, pixel_scale=pixel_scale).noisy_labels.numpy()
    slow = _idn_reference(y.numpy(), c, 0.4, 11, x.numpy(), pixel_scale)
    np.testing.assert_array_equal(fast, slow)


def test_idn_small_pixel_scale_spreads_flips():
    n = 4000
    y = torch.zeros(n, dtype=torch.int64)
    x = _images(n, seed=4)
    raw = idn_noise(y, 10, 0.5, generator=0, images=x, pixel_scale=255.0)
    unit = idn_noise(y, 10, 0.5, generator=0, images=x, pixel_scale=1e-3)
    # Tiny logits: the softmax is nearly uniform over the 9 other classes.
    torch.testing.assert_close(unit.transition[0, 1:], torch.full((9,), unit.rate / 9, dtype=torch.float64),
                               atol=0.02, rtol=0)
    assert raw.transition[0, 1:].max() > unit.transition[0, 1:].max()


@pytest.mark.parametrize("fn", ["symmetric", "pairflip", "idn"])
def test_same_seed_bit_identical_and_seed_matters(fn):
    y = _labels(3000, 10)
    x = _images(3000)
    ds = ImageSet(images=x, labels=y, classes=[str(i) for i in range(10)], ids=[str(i) for i in range(3000)])
    a = apply_noise(ds, fn, 0.3, seed=7)
    b = apply_noise(ds, fn, 0.3, seed=7)
    c = apply_noise(ds, fn, 0.3, seed=8)
    assert torch.equal(a.noisy_labels, b.noisy_labels)
    assert torch.equal(a.transition, b.transition)
    assert not torch.equal(a.noisy_labels, c.noisy_labels)


def test_transition_matrix_analytic():
    clean = torch.tensor([0, 0, 0, 0, 1, 1])
    noisy = torch.tensor([0, 1, 1, 2, 1, 1])
    T = transition_matrix(clean, noisy, 3)
    expected = torch.tensor([[0.25, 0.5, 0.25], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(T, expected)


def test_given_and_column_noise():
    y = torch.tensor([0, 1, 2, 0])
    ds = ImageSet(images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8), labels=y, classes=["a", "b", "c"],
                  ids=list("wxyz"), extra_labels={"human": torch.tensor([0, 2, 2, 1])})
    res = apply_noise(ds, "column:human")
    assert res.rate == 0.5
    assert torch.equal(res.noisy_labels, torch.tensor([0, 2, 2, 1]))
    assert given_noise(y, y, 3).rate == 0.0
    assert apply_noise(ds, "none").rate == 0.0
    with pytest.raises(UserError, match="no label column 'worse'.*human"):
        apply_noise(ds, "column:worse")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_out_of_range(rate):
    with pytest.raises(UserError, match=r"noise rate .* outside \[0, 1\)"):
        symmetric_noise(_labels(10, 3), 3, rate, generator=0)


def test_unknown_noise_type():
    ds = ImageSet(images=torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels=torch.tensor([0, 1]),
                  classes=["a", "b"], ids=["p", "q"])
    with pytest.raises(UserError, match="unknown noise type 'gaussian'"):
        apply_noise(ds, "gaussian", 0.2)


def test_idn_length_mismatch():
    with pytest.raises(UserError, match="differ in length"):
        idn_noise(_labels(10, 3), 3, 0.2, generator=0, images=_images(9))


def test_transition_matrix_is_computed_only_when_asked_for():
    """noise=none on a huge class count: no C×C matrix (it once allocated 8 TB for C = 10**6)."""
    labels = torch.tensor([0, 999_999, 5])
    res = given_noise(labels, labels, 1_000_000)
    assert res.rate == 0.0 and torch.equal(res.noisy_labels, labels)
    assert "transition" not in res.__dict__  # never built
    small = given_noise(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(small.transition, torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64))


def test_noise_registry_names_aliases_and_derived_lists():
    from labelrefine.data import noise

    assert noise.NOISE_TYPES[:5] == ("none", "symmetric", "pairflip", "idn", "column:NAME")  # then any added
    assert [t.takes_rate for t in noise.NOISE.values()][:5] == [False, True, True, True, False]
    assert all(t.doc for t in noise.NOISE.values())
    assert noise.resolve_noise_type("asymmetric") == "pairflip"  # the one place aliases are resolved
    assert noise.resolve_noise_type("pairflip") == "pairflip" and noise.resolve_noise_type("column:w") == "column:w"
    assert noise.check_noise_type("asymmetric") and not noise.check_noise_type("column:w")
    for bad in ["column", "column:", "none:x", "asymmetric:x", "Symmetric", "", ":"]:
        with pytest.raises(UserError, match=r"unknown noise type .*; known: none, symmetric, pairflip, idn, "
                                            r"column:NAME"):
            noise.resolve_noise_type(bad)
    y, x = _labels(500, 4), _images(500)
    ds = ImageSet(images=x, labels=y, classes=list("abcd"), ids=[str(i) for i in range(500)])
    assert torch.equal(apply_noise(ds, "asymmetric", 0.3, seed=1).noisy_labels,
                       apply_noise(ds, "pairflip", 0.3, seed=1).noisy_labels)


def test_a_registered_noise_type_is_known_everywhere():
    """Adding a noise type: one decorated function; NOISE_TYPES, the checks and apply_noise follow."""
    from labelrefine.data import noise

    @noise.register_noise("allzero", takes_rate=True, aliases=("zero",), doc="every flipped label becomes 0")
    def _allzero(data, rate, rng, **_):
        flip = rng.random(len(data.labels)) < rate
        return given_noise(data.labels, torch.where(torch.from_numpy(flip), 0, data.labels), data.num_classes)

    try:
        assert noise.NOISE_TYPES[-1] == "allzero" and noise.resolve_noise_type("zero") == "allzero"
        assert noise.check_noise_type("allzero")
        ds = ImageSet(images=_images(200), labels=_labels(200, 3) + 1, classes=list("abcd"),
                      ids=[str(i) for i in range(200)])
        res = apply_noise(ds, "zero", 0.5, seed=0)
        assert 0.3 < res.rate < 0.7 and set(res.noisy_labels[res.noisy_labels != ds.labels].tolist()) == {0}
        with pytest.raises(ValueError, match="taken"):
            noise.register_noise("pairflip", takes_rate=True)(_allzero)
    finally:
        del noise.NOISE["allzero"], noise._ALIASES["zero"]
