"""The splits a run trains and evaluates on: a fixed training subset, the noise, and the noisy
validation split carved from the training labels (model selection never sees a clean label)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..config import RunConfig
from ..errors import UserError
from .imageset import DataSplits, ImageSet
from .noise import NoiseResult, apply_noise, check_noise_type

log = logging.getLogger("labelrefine")


def stratified_sample(labels: torch.Tensor, fraction_or_count: float | int, rng: np.random.Generator,
                      num_classes: int) -> np.ndarray:
    """Indices of a class-stratified random sample (sorted).

    An int asks for that many samples in total, a float for that fraction; each class gives
    its proportional share (largest-remainder rounding, so the total is exact).
    """
    y = np.asarray(labels.cpu())
    n = len(y)
    total = fraction_or_count if isinstance(fraction_or_count, int) else int(round(fraction_or_count * n))
    total = min(max(total, 0), n)
    counts = np.bincount(y, minlength=num_classes)
    share = counts * (total / max(n, 1))
    quota = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - quota), kind="stable")
    quota[order[: total - int(quota.sum())]] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


@dataclass
class Prepared:
    """The data of a run after noise and the validation split."""

    name: str
    classes: list[str]
    train: ImageSet  # the samples the method trains on; labels are the noisy ones
    val: ImageSet | None  # held out from the noisy training split; labels are noisy
    test: ImageSet | None  # the test split with its own labels
    ssl_images: torch.Tensor  # every training-split image (train + val): SSL uses no labels
    noise: NoiseResult  # over the whole training split
    train_clean: torch.Tensor | None  # clean labels of ``train``, for the oracle only


def prepare_data(cfg: RunConfig, cache_dir: str, data: DataSplits | None = None) -> Prepared:
    """Load ``cfg.data.spec`` (or take ``data``, already in memory), apply the noise, carve the noisy val split."""
    from .sources import load_data

    d = cfg.data
    takes_rate = check_noise_type(d.noise)
    if data is None:
        data = load_data(d.spec, cache_dir=cache_dir)
    train = data.train
    if data.val is not None:
        log.info("%s: the data set's own val split (%d samples) is not used: model selection uses a split "
                 "carved from the noisy training labels (data.val_fraction)", data.name, len(data.val))
    if d.train_subset and d.train_subset < len(train):
        # A fixed subset (data.subset_seed, default 0): part of the data set's definition, not of the noise or the run.
        train = train.subset(torch.from_numpy(stratified_sample(train.labels, d.train_subset,
                                                                np.random.default_rng(d.subset_seed),
                                                                train.num_classes)))
    noise = apply_noise(train, d.noise, d.noise_rate if takes_rate else 0.0, seed=d.noise_seed,
                        pixel_scale=d.pixel_scale)
    noisy = noise.noisy_labels
    clean_known = d.noise != "none"
    val_idx = np.zeros(0, dtype=np.int64)
    if d.val_fraction > 0:
        val_idx = stratified_sample(noisy, float(d.val_fraction), np.random.default_rng(d.noise_seed + 1),
                                    train.num_classes)
    is_val = np.zeros(len(train), dtype=bool)
    is_val[val_idx] = True
    train_idx = torch.from_numpy(np.flatnonzero(~is_val))
    val = None
    if len(val_idx):
        val = train.subset(torch.from_numpy(val_idx))
        val.labels = noisy[torch.from_numpy(val_idx)].clone()
    tr = train.subset(train_idx)
    tr.labels = noisy[train_idx].clone()
    if len(tr) == 0:
        raise UserError(f"data {d.spec!r}: no training samples left after the validation split")
    test = data.test
    if test is not None and d.test_subset and d.test_subset < len(test):
        test = test.subset(torch.from_numpy(stratified_sample(test.labels, d.test_subset,
                                                              np.random.default_rng(0), test.num_classes)))
    return Prepared(
        name=data.name, classes=list(train.classes), train=tr, val=val, test=test,
        ssl_images=train.images if data.ssl_images is None else data.ssl_images, noise=noise,
        train_clean=train.labels[train_idx].clone() if clean_known else None,
    )


def fingerprint(prep: Prepared) -> dict:
    """What a checkpoint's state depends on in the data: the class list and the split sizes."""
    return {"num_classes": len(prep.classes), "classes": list(prep.classes), "n_train": len(prep.train),
            "n_val": 0 if prep.val is None else len(prep.val)}
