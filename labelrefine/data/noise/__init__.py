"""Synthetic and given label noise, as pure functions with an explicit RNG.

Every generator has the signature ``(labels, num_classes, rate, *, generator[, images])`` and
returns a :class:`NoiseResult`: the noisy labels, the empirical transition matrix
``T[i, j] = P(noisy = j | clean = i)`` and the achieved noise rate. Nothing reads a global RNG:
the same ``generator`` seed gives the same labels, bit for bit.

Generators:

* :func:`symmetric_noise` - an exact fraction of every class flips to a uniformly chosen
  *other* class, so the achieved rate equals the requested one (up to rounding to 1/N).
* :func:`pairflip_noise` - an exact fraction of every class flips to class ``c + 1 mod C``
  (the "pair-flip" / asymmetric noise of Co-teaching, Han et al. 2018).
* :func:`idn_noise` - instance-dependent noise, the generator of Xia et al., NeurIPS 2020,
  "Part-dependent label noise", as used by PES, CAL and most IDN benchmarks.
* :func:`given_noise` - noisy labels that already exist, e.g. CIFAR-10N's human annotations.

Named noise types (what ``data.noise`` and ``labelrefine noise --type`` take) are a registry:
``@register_noise(name, takes_rate=..., aliases=(...))`` on an ``apply(data, rate, rng, *, arg,
pixel_scale) -> NoiseResult`` function. :func:`resolve_noise_type` maps a name (or an alias, such
as ``asymmetric`` for ``pairflip``) to its canonical name; :data:`NOISE_TYPES`,
:func:`check_noise_type` and :func:`apply_noise` derive from the registry. The built-in types
are registered below; every other module of this package is imported (and so registers its
types) when the package is: a new noise type is one new file here plus its test.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import UserError
from ..imageset import ImageSet


@dataclass(frozen=True)
class NoiseResult:
    """Noisy labels and what they did to the clean ones.

    Attributes:
        noisy_labels: int64 tensor ``(N,)``.
        clean_labels: int64 tensor ``(N,)``, the labels the noise was applied to.
        num_classes: C.
        rate: achieved fraction of samples whose noisy label differs from the clean one.
        transition: float64 tensor ``(C, C)``; row ``i`` is the empirical distribution of the
            noisy label among samples whose clean label is ``i``. Rows sum to 1; a class with
            no samples gets an identity row. Computed on first access (C² values: a run that
            never looks at it never allocates it, however many classes there are).
    """

    noisy_labels: torch.Tensor
    clean_labels: torch.Tensor = field(repr=False)
    num_classes: int
    rate: float

    @functools.cached_property
    def transition(self) -> torch.Tensor:
        return transition_matrix(self.clean_labels, self.noisy_labels, self.num_classes)


def transition_matrix(clean: torch.Tensor, noisy: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Empirical ``C×C`` transition matrix, row-normalised (identity row for absent classes)."""
    clean = torch.as_tensor(clean, dtype=torch.int64)
    noisy = torch.as_tensor(noisy, dtype=torch.int64)
    counts = torch.bincount(clean * num_classes + noisy, minlength=num_classes * num_classes)
    counts = counts.reshape(num_classes, num_classes).to(torch.float64)
    totals = counts.sum(dim=1, keepdim=True)
    eye = torch.eye(num_classes, dtype=torch.float64)
    return torch.where(totals > 0, counts / totals.clamp_min(1), eye)


def _result(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> NoiseResult:
    noisy_t = torch.from_numpy(np.ascontiguousarray(noisy, dtype=np.int64))
    clean_t = torch.from_numpy(np.ascontiguousarray(clean, dtype=np.int64))
    rate = float((noisy_t != clean_t).double().mean()) if len(clean_t) else 0.0
    return NoiseResult(noisy_t, clean_t, num_classes, rate)


def _as_rng(generator: np.random.Generator | int) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(generator)


def _check(labels, num_classes: int, rate: float) -> np.ndarray:
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if y.ndim != 1:
        raise UserError(f"labels must be a vector, got shape {y.shape}")
    if not (isinstance(rate, (int, float)) and 0.0 <= float(rate) < 1.0):
        raise UserError(f"noise rate {rate!r} is outside [0, 1)")
    if num_classes < 2 and rate > 0:
        raise UserError(f"noise needs at least 2 classes, got {num_classes}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes - 1}], got [{y.min()}, {y.max()}]")
    return y


def _exact_flip_mask(y: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Choose exactly ``round(rate * N)`` samples, spread over classes in proportion to size.

    The per-class quotas come from largest-remainder rounding of ``rate * n_c``, so each class
    flips ``floor`` or ``ceil`` of its share and the total is exact.
    """
    counts = np.bincount(y, minlength=num_classes)
    total = int(round(rate * len(y)))
    share = rate * counts
    quota = np.floor(share).astype(np.int64)
    remainder = share - quota
    extra = total - int(quota.sum())
    if extra > 0:
        # Stable sort: ties go to the lower class index, so the allocation is deterministic.
        order = np.argsort(-remainder, kind="stable")
        quota[order[:extra]] += 1
    quota = np.minimum(quota, counts)
    mask = np.zeros(len(y), dtype=bool)
    for c in range(num_classes):
        if quota[c]:
            members = np.flatnonzero(y == c)
            mask[rng.choice(members, size=quota[c], replace=False)] = True
    return mask


def symmetric_noise(
    labels, num_classes: int, rate: float, *, generator: np.random.Generator | int
) -> NoiseResult:
    """Flip exactly ``rate`` of each class to a uniformly drawn *different* class.

    Args:
        labels: int ``(N,)`` clean labels in ``[0, num_classes)``.
        num_classes: C.
        rate: requested noise rate in ``[0, 1)``; achieved rate is ``round(rate * N) / N``.
        generator: a ``numpy.random.Generator`` or an int seed.
    """
    y = _check(labels, num_classes, rate)
    rng = _as_rng(generator)
    mask = _exact_flip_mask(y, num_classes, rate, rng)
    noisy = y.copy()
    # Draw from the C-1 other classes: offsets 0..C-2, shifted past the true class.
    other = rng.integers(0, num_classes - 1, size=int(mask.sum())) if mask.any() else np.empty(0, np.int64)
    other = other + (other >= y[mask])
    noisy[mask] = other
    return _result(y, noisy, num_classes)


def pairflip_noise(
    labels, num_classes: int, rate: float, *, generator: np.random.Generator | int
) -> NoiseResult:
    """Flip exactly ``rate`` of each class ``c`` to ``(c + 1) mod C`` (Han et al. 2018)."""
    y = _check(labels, num_classes, rate)
    rng = _as_rng(generator)
    mask = _exact_flip_mask(y, num_classes, rate, rng)
    noisy = y.copy()
    noisy[mask] = (y[mask] + 1) % num_classes
    return _result(y, noisy, num_classes)


def idn_noise(
    labels,
    num_classes: int,
    rate: float,
    *,
    generator: np.random.Generator | int,
    images,
    pixel_scale: float = 255.0,
    rate_std: float = 0.1,
    chunk: int = 4096,
) -> NoiseResult:
    """Instance-dependent noise of Xia et al., NeurIPS 2020 ("Part-dependent label noise").

    1. Each sample's flip rate ``q_i ~ N(rate, rate_std²)`` truncated to ``[0, 1]``.
    2. One projection ``W[c] ~ N(0, 1)`` of shape ``(d, C)`` per true class ``c``, where
       ``d = C_in·H·W`` is the flattened image size.
    3. For sample ``i`` of class ``y``: ``logits = x_i · W[y]``, ``logits[y] = -inf``,
       ``p = q_i · softmax(logits)``, ``p[y] = 1 - q_i``; the noisy label is drawn from ``p``.

    Because of the truncation the expected rate is 0.2055 at ``rate=0.2`` (0.40 at 0.4, 0.50 at
    0.5).

    Args:
        labels: int ``(N,)`` clean labels.
        num_classes: C.
        rate: nominal noise rate τ in ``[0, 1)``.
        generator: a ``numpy.random.Generator`` or an int seed. Draw order: the N flip rates,
            then ``W[0] .. W[C-1]``, then N uniforms for the categorical draws.
        images: uint8 ``(N, C_in, H, W)`` tensor or array, flattened in C-H-W order.
        pixel_scale: the value a white pixel takes in ``x_i``. The reference code feeds raw
            0-255 pixels (``pixel_scale=255``), which makes the logits ~1e3-1e4, the softmax
            effectively one-hot, and every flipped image go to one deterministic "confusing"
            class. That is what the published IDN numbers used, hence the default. Use 1.0 for
            pixels in [0, 1], which spreads flips over more classes.
        rate_std: standard deviation of the per-sample flip rate (0.1 in the reference).
        chunk: rows per matrix product, to bound memory (float64 ``chunk × d``).
    """
    from scipy.stats import truncnorm

    y = _check(labels, num_classes, rate)
    x = np.asarray(torch.as_tensor(images).cpu())
    if x.shape[0] != len(y):
        raise UserError(f"images and labels differ in length: {x.shape[0]} images, {len(y)} labels")
    if not pixel_scale > 0:
        raise UserError(f"pixel_scale must be positive, got {pixel_scale}")
    rng = _as_rng(generator)
    n = len(y)
    x = x.reshape(n, -1)
    d = x.shape[1]

    if rate_std > 0:
        lo, hi = (0.0 - rate) / rate_std, (1.0 - rate) / rate_std
        q = truncnorm.rvs(lo, hi, loc=rate, scale=rate_std, size=n, random_state=rng)
    else:
        q = np.full(n, float(rate))
    q = np.asarray(q, dtype=np.float64)

    probs = np.empty((n, num_classes), dtype=np.float64)
    scale = pixel_scale / 255.0
    for c in range(num_classes):
        # Drawn for every class, present or not, so W[c] does not depend on which classes occur.
        w = rng.standard_normal((d, num_classes))
        members = np.flatnonzero(y == c)
        for start in range(0, len(members), chunk):
            rows = members[start : start + chunk]
            logits = (x[rows].astype(np.float64) * scale) @ w
            logits[:, c] = -np.inf
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            p *= q[rows, None]
            p[:, c] = 1.0 - q[rows]
            probs[rows] = p
    u = rng.random(n)
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = np.inf  # guard against round-off: the last class absorbs u > sum(p)
    noisy = (cdf < u[:, None]).sum(axis=1).astype(np.int64)
    return _result(y, noisy, num_classes)


def given_noise(labels, noisy_labels, num_classes: int) -> NoiseResult:
    """Noisy labels that already exist (e.g. CIFAR-10N's ``worse`` column)."""
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    z = np.asarray(torch.as_tensor(noisy_labels).cpu(), dtype=np.int64)
    if y.shape != z.shape:
        raise UserError(f"clean and noisy labels differ in length: {len(y)} and {len(z)}")
    return _result(y, z, num_classes)


# --------------------------------------------------------------------------------------------
# The registry of named noise types
# --------------------------------------------------------------------------------------------

#: ``apply(data, rate, rng, *, arg, pixel_scale)``: ``arg`` is the text after ``NAME:`` for a
#: parametrised type (``column:worse`` -> ``"worse"``), else ``None``.
NoiseApply = Callable[..., NoiseResult]


@dataclass(frozen=True)
class NoiseType:
    """A registered noise type: its canonical name, its function, whether it takes a rate."""

    name: str
    apply: NoiseApply
    takes_rate: bool
    aliases: tuple[str, ...]
    param: str | None  # a parametrised type is spelled NAME:PARAM (column:NAME); None: plain NAME
    doc: str

    @property
    def spelling(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param}"


NOISE: dict[str, NoiseType] = {}
_ALIASES: dict[str, str] = {}  # alias -> canonical name


def register_noise(
    name: str, *, takes_rate: bool, aliases: tuple[str, ...] = (), param: str | None = None, doc: str = ""
) -> Callable[[NoiseApply], NoiseApply]:
    """Register the decorated ``apply(data, rate, rng, *, arg, pixel_scale)`` as noise type ``name``.

    ``takes_rate``: whether ``data.noise_rate`` applies; ``aliases``: other names resolved to
    ``name`` by :func:`resolve_noise_type`; ``param``: spell the type ``name:PARAM`` (the text
    after the colon reaches ``apply`` as ``arg``).
    """

    def deco(apply: NoiseApply) -> NoiseApply:
        for n in (name, *aliases):
            if n in NOISE or n in _ALIASES or not n or ":" in n:
                raise ValueError(f"noise type name {n!r} is taken or invalid")
        NOISE[name] = NoiseType(name, apply, takes_rate, tuple(aliases), param, doc)
        _ALIASES.update(dict.fromkeys(aliases, name))
        return apply

    return deco


def noise_types() -> tuple[str, ...]:
    """The registered noise types as spelled in a config (``column:NAME``), without aliases."""
    return tuple(t.spelling for t in NOISE.values())


def __getattr__(name: str) -> object:
    if name == "NOISE_TYPES":  # derived from the registry
        return noise_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lookup(noise_type: str) -> tuple[NoiseType, str | None]:
    """The registered type of a name (aliases resolved) and its ``:PARAM`` text; else UserError."""
    head, colon, arg = noise_type.partition(":")
    t = NOISE.get(_ALIASES.get(head, head))
    if t is not None and (t.param is not None) == bool(colon) and (not colon or arg):
        return t, (arg if colon else None)
    raise UserError(f"unknown noise type {noise_type!r}; known: {', '.join(noise_types())}")


def resolve_noise_type(noise_type: str) -> str:
    """The canonical name of a noise type: an alias becomes its type (``asymmetric`` -> ``pairflip``).

    The one place aliases are resolved: config validation stores the canonical name in
    ``data.noise``, so methods only ever compare canonical names. Raises :class:`UserError`
    for an unknown type.
    """
    t, arg = _lookup(noise_type)
    return t.name if arg is None else f"{t.name}:{arg}"


def check_noise_type(noise_type: str) -> bool:
    """Validate a noise type name; return True when it takes a rate (symmetric, pairflip, idn)."""
    return _lookup(noise_type)[0].takes_rate


def apply_noise(
    data: ImageSet,
    noise_type: str,
    rate: float = 0.0,
    *,
    seed: int = 0,
    pixel_scale: float = 255.0,
) -> NoiseResult:
    """Apply a named noise type to a split's labels.

    Args:
        data: the split; its ``labels`` are taken as the clean labels.
        noise_type: a registered type (:func:`noise_types`): ``none``, ``symmetric``, ``pairflip``
            (alias ``asymmetric``), ``idn`` or ``column:NAME`` (one of ``data.extra_labels``).
        rate: noise rate in ``[0, 1)`` (ignored by ``none`` and ``column:``).
        seed: seed of the ``numpy.random.Generator`` the generator draws from.
        pixel_scale: see :func:`idn_noise`.
    """
    t, arg = _lookup(noise_type)
    return t.apply(data, rate, np.random.default_rng(seed), arg=arg, pixel_scale=pixel_scale)


@register_noise("none", takes_rate=False, doc="the labels as given (no noise)")
def _apply_none(data: ImageSet, rate: float, rng: np.random.Generator, **_: object) -> NoiseResult:
    return given_noise(data.labels, data.labels, data.num_classes)


@register_noise("symmetric", takes_rate=True, doc="an exact fraction of each class to a uniform other class")
def _apply_symmetric(data: ImageSet, rate: float, rng: np.random.Generator, **_: object) -> NoiseResult:
    return symmetric_noise(data.labels, data.num_classes, rate, generator=rng)


@register_noise("pairflip", takes_rate=True, aliases=("asymmetric",),
                doc="an exact fraction of each class c to c + 1 mod C (Han et al. 2018)")
def _apply_pairflip(data: ImageSet, rate: float, rng: np.random.Generator, **_: object) -> NoiseResult:
    return pairflip_noise(data.labels, data.num_classes, rate, generator=rng)


@register_noise("idn", takes_rate=True, doc="instance-dependent noise (Xia et al. 2020)")
def _apply_idn(
    data: ImageSet, rate: float, rng: np.random.Generator, *, pixel_scale: float, **_: object
) -> NoiseResult:
    return idn_noise(data.labels, data.num_classes, rate, generator=rng, images=data.images, pixel_scale=pixel_scale)


@register_noise("column", takes_rate=False, param="NAME", doc="a label column of the data (e.g. CIFAR-10N worse)")
def _apply_column(data: ImageSet, rate: float, rng: np.random.Generator, *, arg: str, **_: object) -> NoiseResult:
    if arg not in data.extra_labels:
        have = ", ".join(sorted(data.extra_labels)) or "none"
        raise UserError(f"noise type {f'column:{arg}'!r}: the data has no label column {arg!r} (columns: {have})")
    return given_noise(data.labels, data.extra_labels[arg], data.num_classes)


def _import_type_modules() -> None:
    """Import (register) every module of this package: one noise type (or a few) per file."""
    for name in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{name}")


_import_type_modules()
