"""``digits``: scikit-learn's bundled 8×8 digits."""

from __future__ import annotations

import numpy as np

from ..imageset import DataSplits
from .decode import _adjust_array
from .plan import _build
from .registry import SourceRequest, register_source


@register_source("digits", needs_path=False, no_path_note="it is bundled with scikit-learn",
                 doc="scikit-learn's 8×8 digits, stratified 75/25 train/test split")
def load(req: SourceRequest) -> DataSplits:
    return _load_digits(req.size, req.channels)


def _load_digits(size: tuple[int, int] | None, channels: int | None) -> DataSplits:
    """scikit-learn's 1,797 8×8 digits, 75/25 stratified split with ``random_state=0``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # N×1×8×8
    y = d.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    x = _adjust_array(x, size, channels, "resizing digits")
    parts = {}
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        parts[split] = (x[idx], y[idx], [f"digits/{i}" for i in idx.tolist()], {})
    return _build("digits", [str(i) for i in range(10)], parts)

