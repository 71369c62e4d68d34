"""The Python API: find the wrong labels of an in-memory data set, or fit a model that resists them.

    import labelrefine
    issues = labelrefine.find_label_issues(images, labels)          # a pandas DataFrame, like labels.csv
    model = labelrefine.fit(images, labels)                          # a Predictor

Both run the method (``ours``) with the same defaults as ``labelrefine clean``, chosen from the
data's size and resolution and the device (:func:`auto_settings`); ``overrides`` (``KEY=VALUE``
strings, as ``--set``) change any of them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import LABEL_COLUMNS as LABEL_COLUMNS  # re-exported: the table's columns
from .config import RunConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .data import DataSplits, ImageSet
from .engine import resolve_device
from .errors import UserError

log = logging.getLogger("labelrefine")



#: From this many training images a CPU run uses :data:`FAST_CPU_PROFILE` (its batch of 1024 then
#: still takes about 9 steps an epoch after the validation split). Not tuned: the recipe is measured
#: on colour 32x32 CIFAR-10 at 15,000 images (``cpu-cifar10``: clean-label CE 83%, against 48% for
#: the width-8 profile on 3,000) and 49,000 (``configs/cifar10-fast-ce.yaml``), and 10,000 is the
#: size the ``detect-cifar10n`` suite runs it at; on grayscale or larger images it is unmeasured.
#: Below it, the width-8 profile measured on X-rays and digits.
FAST_PROFILE_MIN_IMAGES = 10_000

#: The fast airbench-style CPU recipe (``configs/cifar10-fast-ce.yaml`` without label smoothing or
#: test-time augmentation) with the ``detect-cifar10n`` suite's schedule: 15 supervised epochs
#: (warmup 5, 3 iterations of 3 stage epochs, fine-tune 1), SimCLR 15.
FAST_CPU_PROFILE = (
    "model.backbone=airbench", "model.width=32", "optim.lr=1.5", "optim.momentum=0.85", "optim.nesterov=true",
    "optim.weight_decay=0.00133", "optim.batch_size=1024", "optim.schedule=linear",
    "optim.warmup_lr_epochs=3.45", "optim.warmup_start=0.2", "optim.final_lr=0.07",
    "optim.norm_bias_lr_scale=64", "optim.lookahead=true", "ssl.epochs=15", "ssl.batch_size=512",
    "epochs=15", "refine.warmup_epochs=5", "refine.iterations=3", "refine.first_stages=[1, 2, 3]",
    "refine.later_stages=[1, 2, 3]", "finetune.epochs=1",
)


def auto_settings(n_train: int, image_size: tuple[int, int], channels: int, device_type: str) -> list[tuple[str, str]]:
    """``(KEY=VALUE, reason)`` pairs: the run defaults ``clean`` and the API choose for a data set.

    On a GPU: the papers' schedule (SimCLR 30 epochs, warmup 5, stages (2,3,4) then (2,5,7),
    fine-tune 10) at the full width 64. On a CPU, by the data's size: below
    :data:`FAST_PROFILE_MIN_IMAGES` training images the ``cpu-pneumonia`` benchmark profile (width
    8, SimCLR 10, warmup 2, stages (1,2), fine-tune 2); from there on the fast airbench-style
    recipe of the ``cpu-cifar10`` and ``detect-cifar10n`` suites (:data:`FAST_CPU_PROFILE`), which
    needs that many images for enough steps at its batch of 1024. Both profiles' numbers are in the
    README.
    """
    out: list[tuple[str, str]] = [("method=ours", "the method: SimCLR + refinement + weighted fine-tune"),
                                  ("data.noise=none", "the labels are used as given")]
    val = 0.1 if n_train < 20000 else 0.05
    out.append((f"data.val_fraction={val}", f"{val:.0%} of the given labels held out to select the epoch"))
    out.append((f"flip={'true' if channels == 3 else 'false'}",
                "horizontal flips for colour images; off for grayscale (X-rays, digits: orientation matters)"))
    if device_type == "cuda":
        out += [("model.width=64", "GPU: the papers' ResNet-18 width"), ("ssl.epochs=30", "GPU: the papers' schedule"),
                ("refine.warmup_epochs=5", "GPU: the papers' schedule"), ("finetune.epochs=10", "GPU")]
    elif n_train >= FAST_PROFILE_MIN_IMAGES:
        why = f"CPU, {n_train} images: the fast recipe of the cpu-cifar10 benchmark"
        out += [(kv, why) for kv in FAST_CPU_PROFILE]
    else:
        out += [("model.width=8", "CPU: the cpu-pneumonia benchmark profile"), ("ssl.epochs=10", "CPU profile"),
                ("refine.warmup_epochs=2", "CPU profile"), ("refine.first_stages=[1, 2]", "CPU profile"),
                ("refine.later_stages=[1, 2]", "CPU profile"), ("finetune.epochs=2", "CPU profile"),
                ("optim.lr=0.05", "CPU profile"), ("optim.batch_size=128", "CPU profile")]
    if max(image_size) > 128:
        log.warning("images are %dx%d: training at this resolution is slow%s; add ,size=64 (or another size) to "
                    "the data spec to resize them", *image_size, " on a CPU" if device_type != "cuda" else "")
    return out


def config_for(train: ImageSet, *, device: str = "auto", config: str | Path | RunConfig | None = None,
               overrides: Sequence[str] = ()) -> tuple[RunConfig, list[tuple[str, str]]]:
    """The run config for ``train``: the automatic settings (or ``config``, a file or a
    :class:`RunConfig`, instead), then ``overrides``. Also returns the automatic choices made.

    Images smaller than the method's augmentation accepts (:data:`MIN_IMAGE_SIDE` pixels a side)
    raise :class:`UserError` naming the data (the ``data.spec=`` override, else "images")."""
    _check_image_size(train, next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("data.spec=")),
                                  None))
    if isinstance(config, RunConfig):
        data = apply_overrides(config_to_dict(config), list(overrides))
        return config_from_dict(data), []
    if config is not None:
        return load_config(config, list(overrides)), []
    chosen = auto_settings(len(train), train.shape[1:], train.shape[0], resolve_device(device).type)
    return load_config(None, [k for k, _ in chosen] + [f"device={device}", *overrides]), chosen


#: Largest side ``clean`` trains at without being asked, per device: the CPU profiles are measured at
#: 28-32 px (CIFAR-10, X-rays); twice that is 4x the cost and still a practical CPU run.
AUTO_MAX_SIDE = {"cpu": 64, "cuda": 128}


def auto_resize(spec: str, device_type: str) -> tuple[str, str] | None:
    """``(spec with ,size=SxS, reason)`` when a file-based data set's images are of mixed sizes or
    larger than :data:`AUTO_MAX_SIDE` for the device, else ``None``. ``S`` is the median shorter
    side, capped there (square: every backbone and augmentation takes it; aspect ratios are lost)."""
    from .data.sources.probe import probe_sizes

    found = probe_sizes(spec)
    if found is None:
        return None
    cap = AUTO_MAX_SIDE.get(device_type, AUTO_MAX_SIDE["cpu"])
    h, w = found.median
    too_big = max(int(found.sizes.max()), h, w) > cap
    if not found.mixed and not too_big:
        return None
    side = max(MIN_IMAGE_SIDE, min(cap, min(h, w)))
    rule = f"at most {cap} px on {device_type}" if min(h, w) > cap else "the median shorter side"
    why = (f"the images are {found.describe()}; training at {side}x{side} ({rule}); "
           f"choose another with ,size=HxW in the data spec")
    return f"{spec},size={side}x{side}", why


#: Smallest image side ``clean`` and the API accept: SimCLR's Gaussian blur (3×3, reflect) needs 2 pixels.
MIN_IMAGE_SIDE = 2


def _check_image_size(train: ImageSet, spec: str | None) -> None:
    _, h, w = train.shape
    if min(h, w) < MIN_IMAGE_SIDE:
        what = "images" if spec in (None, "array") else f"data {spec!r}"
        raise UserError(f"{what}: the training images are {h}x{w} pixels; the method needs at least "
                        f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (its SimCLR augmentation blurs them): resize them"
                        + ("" if what == "images" else " with ,size=HxW in the data spec"))


def as_image_tensor(images: Any, what: str = "images") -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` from numpy/torch ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, C in {1, 3}.

    Floats must be in [0, 1] (scaled by 255) or already in [0, 255] with integer values.
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise UserError(f"{what}: expected an array of shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                        f"got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise UserError(f"{what}: expected 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not (x.dtype.is_floating_point or x.dtype in (torch.int16, torch.int32, torch.int64)):
            raise UserError(f"{what}: unsupported dtype {x.dtype}")
        xf = x.double()
        if not bool(torch.isfinite(xf).all()):
            raise UserError(f"{what}: contains NaN or infinite values")
        if x.dtype.is_floating_point and float(xf.max()) <= 1.0:
            xf = xf * 255.0
        if float(xf.min()) < 0 or float(xf.max()) > 255:
            raise UserError(f"{what}: values must lie in [0, 1] (floats) or [0, 255], got "
                            f"[{float(xf.min()):g}, {float(xf.max()):g}]")
        x = xf.round().to(torch.uint8)
    return x.contiguous()


def _as_labels(labels: Any, n: int, classes: Sequence[str] | None, what: str = "labels", *,
               present: np.ndarray | None = None) -> tuple[torch.Tensor, list[str], np.ndarray | None]:
    """Class indices, class names and (integer labels without ``classes``) the integer classes.

    Integer labels index into ``classes`` when it is given; without it the classes are the
    distinct labels (:func:`labelrefine.data.sources.present_classes`), or, with ``present``
    (the training labels' classes), the labels must be among them. Names are looked up.
    """
    from .data.sources import index_labels, present_classes

    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise UserError(f"{what}: expected {n} labels (one per image), got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and n and int(arr.max()) > np.iinfo(np.int64).max:
            raise UserError(f"{what}: label {int(arr.max())} is too large (at most 2**63 - 1)")
        if classes is None and n and int(arr.min()) < 0:
            raise UserError(f"{what}: label {int(arr.min())} is negative; integer labels must be >= 0")
        if classes is None:
            present = present_classes([arr]) if present is None else present
            idx, bad = index_labels(present, arr)
            names = [str(v) for v in present.tolist()]
            if bad is not None:
                raise UserError(f"{what}: label {int(arr[bad])} is not one of the training classes "
                                f"({_class_list(names)})")
            return torch.from_numpy(idx), names, present
        names = list(classes)
        if n and (arr.min() < 0 or arr.max() >= len(names)):
            raise UserError(f"{what}: label {int(arr.max() if arr.max() >= len(names) else arr.min())} is outside "
                            f"[0, {len(names)})")
        return torch.as_tensor(arr.astype(np.int64)), names, None
    if arr.dtype.kind in "UO":
        values = [str(v) for v in arr.tolist()]
        names = list(classes) if classes is not None else sorted(set(values))
        index = {c: i for i, c in enumerate(names)}
        missing = [v for v in values if v not in index]
        if missing:
            raise UserError(f"{what}: label {_short(missing[0])!r} is not one of the classes {_class_list(names)}")
        return torch.tensor([index[v] for v in values], dtype=torch.int64), names, None
    raise UserError(f"{what}: expected integer class indices or class names, got dtype {arr.dtype}")


def make_data(images: Any, labels: Any, *, classes: Sequence[str] | None = None, test_images: Any = None,
              test_labels: Any = None, ids: Sequence[str] | None = None, name: str = "array") -> DataSplits:
    """An in-memory :class:`DataSplits` from arrays (ids default to each image's position).

    ``classes`` must not repeat a name. Without it, integer labels name their classes by value
    (the sorted distinct training labels: labels ``0..C-1`` keep their indices) and names are
    sorted. Test images must have the training images' shape (channels, height, width).
    """
    from .data.sources import check_class_names

    if classes is not None:
        check_class_names(list(classes), "classes")
    x = as_image_tensor(images)
    y, names, present = _as_labels(labels, x.shape[0], classes)
    ids = [str(i) for i in range(x.shape[0])] if ids is None else [str(i) for i in ids]
    train = ImageSet(x, y, names, ids)
    test = None
    if test_images is not None:
        tx = as_image_tensor(test_images, "test_images")
        if tuple(tx.shape[1:]) != tuple(x.shape[1:]):
            raise UserError(f"test_images: each image is {_chw(tx)} (CxHxW) but the training images are {_chw(x)}; "
                            f"give test images of the training shape")
        if test_labels is None:
            raise UserError("test_images given without test_labels")
        if present is not None and np.asarray(test_labels).dtype.kind in "iu":  # by value, as the training labels
            ty, _, _ = _as_labels(test_labels, tx.shape[0], None, "test_labels", present=present)
        else:
            ty, _, _ = _as_labels(test_labels, tx.shape[0], names, "test_labels")
        test = ImageSet(tx, ty, names, [f"test/{i}" for i in range(tx.shape[0])])
    return DataSplits(name, train, test)


def _chw(x: torch.Tensor) -> str:
    return "x".join(str(int(v)) for v in x.shape[1:])


def _short(value: object) -> str:
    from .data.sources import _short as short

    return short(value)


def _class_list(names: Sequence[str]) -> str:
    from .data.sources import _class_list as class_list

    return class_list(names)


def _train(images, labels, *, classes, test_images, test_labels, config, overrides, out, device, seed):
    """Run the method; the :class:`~labelrefine.artifacts.RunResult`. Without ``out`` the run
    directory is temporary and removed before returning (the result is in memory)."""
    from .pipeline import run

    data = make_data(images, labels, classes=classes, test_images=test_images, test_labels=test_labels)
    cfg, _ = config_for(data.train, device=device, config=config,
                        overrides=["data.spec=array", f"seed={seed}", *overrides])
    tmp = tempfile.mkdtemp(prefix="labelrefine-") if out is None else None
    try:
        return run(cfg, tmp or out, data=data)  # a directory that already holds a run is refused, never overwritten
    finally:
        if tmp is not None:  # the caller gets the result (or the error), not a directory to clean up
            shutil.rmtree(tmp, ignore_errors=True)


def find_label_issues(images: Any, labels: Any, *, classes: Sequence[str] | None = None, test_images: Any = None,
                      test_labels: Any = None, config: str | Path | RunConfig | None = None,
                      overrides: Sequence[str] = (), out: str | Path | None = None, device: str = "auto",
                      seed: int = 0):
    """Train the method on ``(images, labels)`` and return its ``labels.csv`` as a pandas DataFrame.

    Args:
        images: ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` array (uint8, or floats in [0, 1]).
        labels: ``(N,)`` class indices or class names (the given, possibly wrong labels).
        classes: class names, none repeated (default: the distinct labels, sorted: integers by value, so
            labels ``0..C-1`` keep their indices and labels {0, 5} give classes "0" and "5").
        test_images, test_labels: an optional labelled test set, only reported.
        config: a config file or :class:`RunConfig` instead of the automatic settings.
        overrides: ``KEY=VALUE`` strings applied last (``["refine.threshold=0.5"]``).
        out: keep every artifact (report.html, model.pt, ...) in this directory (one that already
            holds a run is refused); default: a temporary directory, removed afterwards.

    Returns:
        One row per image, suspected errors first: ``id`` (the image's position in ``images``,
        as in labels.csv), ``given_label``, ``predicted_label``, ``refined_label`` (class names),
        ``label_quality`` (low = likely wrong; unrounded, where labels.csv has 6 decimals),
        ``is_label_issue``, ``n_stages_selected`` (cleanlab's ``CleanLearning.find_label_issues``
        columns and ours), then each detector's score (:data:`labelrefine.detect.DETECTORS`).
        Built from the run's result in memory.
    """
    result = _train(images, labels, classes=classes, test_images=test_images, test_labels=test_labels,
                    config=config, overrides=overrides, out=out, device=device, seed=seed)
    return result.label_table()


def fit(images: Any, labels: Any, *, classes: Sequence[str] | None = None, test_images: Any = None,
        test_labels: Any = None, config: str | Path | RunConfig | None = None, overrides: Sequence[str] = (),
        out: str | Path | None = None, device: str = "auto", seed: int = 0):
    """Train the method as :func:`find_label_issues` does; return the model (a :class:`~labelrefine.predict.Predictor`).

    The model is the epoch with the best accuracy on the held-out (noisy) validation split;
    ``model.predict_proba(labelrefine.api.as_image_tensor(x))`` gives class probabilities.
    """
    return _train(images, labels, classes=classes, test_images=test_images, test_labels=test_labels,
                  config=config, overrides=overrides, out=out, device=device, seed=seed).predictor
