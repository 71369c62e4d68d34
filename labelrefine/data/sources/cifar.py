"""``cifar10:ROOT`` and ``cifar100:ROOT``: torchvision's pickled CIFAR batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ...errors import UserError
from ..imageset import DataSplits
from .decode import _adjust_array
from .plan import _build
from .registry import SourceRequest, register_source

_DOC = "torchvision's pickled batches under ``ROOT``: ``download``"


# The lower decorator registers first: cifar10 comes before cifar100.
@register_source("cifar100", options=("download",), flags=("download",), doc=_DOC)
@register_source("cifar10", options=("download",), flags=("download",), doc=_DOC)
def load(req: SourceRequest) -> DataSplits:
    assert req.path is not None
    return _load_cifar(req.kind, req.path, req.size, req.channels, bool(req.options.get("download", False)))


_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


def _unpickle(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise UserError(
            f"{file} is missing; the CIFAR folder is incomplete (re-download with ,download)"
        ) from None
    except Exception as e:
        raise UserError(f"{file}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{file}: not a CIFAR pickle (holds a {type(obj).__name__}, not a dict)")
    return obj


def _load_cifar(
    kind: str, path: str, size: tuple[int, int] | None, channels: int | None, download: bool
) -> DataSplits:
    """torchvision's on-disk CIFAR-10/100 (pickled batches of N×3072 uint8 in CHW order)."""
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[kind]
    root = Path(path).expanduser()
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
    base = root / folder
    if not base.is_dir():
        if (root / meta_file).is_file() and (root / train_files[0]).is_file():
            base = root  # the user pointed at the batches folder itself
        else:
            raise UserError(
                f"{kind}: {base} does not exist; add ,download to the spec to fetch {kind} into {root}"
            )
    meta = _unpickle(base / meta_file)
    if names_key not in meta:
        raise UserError(f"{base / meta_file}: no {names_key!r} entry")
    classes = [str(c) for c in meta[names_key]]
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for name in files:
            batch = _unpickle(base / name)
            for k in ("data", labels_key):
                if k not in batch:
                    raise UserError(f"{base / name}: no {k!r} entry")
            x = np.asarray(batch["data"], dtype=np.uint8)
            y = np.asarray(batch[labels_key], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
                raise UserError(
                    f"{base / name}: 'data' has shape {x.shape} and {len(y)} labels; "
                    "expected N×3072 and N labels"
                )
            xs.append(x)
            ys.append(y)
        x = np.concatenate(xs).reshape(-1, 3, 32, 32)
        y = np.concatenate(ys)
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"{base}: {split} labels outside [0, {len(classes) - 1}]")
        x = _adjust_array(x, size, channels, f"resizing {kind} {split}")
        parts[split] = (x, y, [f"{split}/{i}" for i in range(len(y))], {})
    return _build(kind, classes, parts)

