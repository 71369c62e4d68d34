"""``npz:FILE``: Keras-convention arrays ``x_train y_train x_test y_test [x_val y_val class_names]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UserError
from ..imageset import DataSplits
from .decode import _adjust_array
from .files import _existing_file
from .names import check_class_names, index_labels, present_classes
from .plan import _build
from .registry import SourceRequest, register_source
from .spec import _parse_classes


@register_source("npz", options=("classes",),
                 doc="Keras arrays ``x_train y_train x_test y_test [x_val y_val class_names]``: ``classes=``")
def load(req: SourceRequest) -> DataSplits:
    assert req.path is not None
    return _load_npz(req.path, req.size, req.channels, _parse_classes(req.options.get("classes")))


def _npz_images(file: Path, key: str, x: np.ndarray) -> np.ndarray:
    """Normalise a Keras-style image array to uint8 ``N×C×H×W``."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise UserError(
                f"{file}: {key} has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3"
            )
    else:
        raise UserError(f"{file}: {key} has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind in "iu" and x.size:
        if x.min() >= 0 and x.max() <= 255:
            return np.ascontiguousarray(x.astype(np.uint8))
        raise UserError(f"{file}: {key} has integer values in [{x.min()}, {x.max()}]; expected 0..255")
    if x.dtype.kind == "f" and x.size:
        lo, hi = float(np.min(x)), float(np.max(x))
        if not np.isfinite([lo, hi]).all():
            raise UserError(f"{file}: {key} contains NaN or infinite values")
        if lo >= 0 and hi <= 1:
            return np.ascontiguousarray(np.rint(x * 255.0).astype(np.uint8))
        if lo >= 0 and hi <= 255:
            return np.ascontiguousarray(np.rint(x).astype(np.uint8))
        raise UserError(f"{file}: {key} has float values in [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
    raise UserError(f"{file}: {key} has dtype {x.dtype}; expected uint8 or float images")


def _npz_labels(file: Path, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"{file}: {key} has shape {y.shape}; expected (N,) or (N, 1)")
    if y.dtype.kind == "f" and y.size and np.array_equal(y, np.rint(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise UserError(f"{file}: {key} has dtype {y.dtype}; expected integer labels")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise UserError(f"{file}: {key} has negative label {int(y.min())} at row {int(np.argmin(y))}")
    return y


def _load_npz(
    path: str, size: tuple[int, int] | None, channels: int | None, classes: list[str] | None
) -> DataSplits:
    """Keras-convention ``.npz``: ``x_train y_train x_test y_test [x_val y_val class_names]``."""
    file = _existing_file(path, "npz: file")
    try:
        data = np.load(file, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{file}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with data:
        keys = set(data.files)
        for k in ("x_train", "y_train", "x_test", "y_test"):
            if k not in keys:
                raise UserError(f"{file}: missing array {k!r} (has {', '.join(sorted(keys)) or 'nothing'})")
        split_names = ["train", "test"]
        if "x_val" in keys or "y_val" in keys:
            for k in ("x_val", "y_val"):
                if k not in keys:
                    raise UserError(f"{file}: missing array {k!r} (x_val and y_val go together)")
            split_names.append("val")
        raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in split_names:
            try:
                x, y = data[f"x_{s}"], data[f"y_{s}"]
            except ValueError as e:
                raise UserError(f"{file}: cannot read x_{s}/y_{s} ({e})") from None
            if len(x) != len(y):
                raise UserError(f"{file}: x_{s} has {len(x)} rows but y_{s} has {len(y)}")
            if len(x) == 0 and s == "train":
                raise UserError(f"{file}: x_train is empty")
            raw[s] = (_npz_images(file, f"x_{s}", x), _npz_labels(file, f"y_{s}", y))
        if classes is None and "class_names" in keys:
            try:
                names = data["class_names"]
            except ValueError:
                raise UserError(
                    f"{file}: class_names must be a string array (saved without pickle)"
                ) from None
            classes = [str(c) for c in names.reshape(-1).tolist()]
            check_class_names(classes, f"{file}: class_names")
    shapes = {s: x.shape[2:] for s, (x, _) in raw.items()}
    if size is None and len(set(shapes.values())) > 1:
        raise UserError(
            f"{file}: image sizes differ between splits "
            f"({', '.join(f'x_{s} {h}x{w}' for s, (h, w) in shapes.items())}); "
            f"add size=HxW to the data spec"
        )
    if channels is None:
        channels = raw["train"][0].shape[1]
    if classes is None:  # integer labels name their classes: the values present, ascending
        present = present_classes([y for _, y in raw.values()])
        classes = [str(v) for v in present.tolist()]
        raw = {s: (x, index_labels(present, y)[0]) for s, (x, y) in raw.items()}
    for s, (_, y) in raw.items():
        if y.size and y.max() >= len(classes):
            raise UserError(
                f"{file}: y_{s} has label {int(y.max())} at row {int(np.argmax(y))} outside "
                f"[0, {len(classes) - 1}] ({len(classes)} classes)"
            )
    parts = {}
    for s, (x, y) in raw.items():
        x = _adjust_array(x, size, channels, f"resizing {file.name} {s}")
        parts[s] = (x, y, [f"{s}/{i}" for i in range(len(y))], {})
    return _build(file.stem, classes, parts)

