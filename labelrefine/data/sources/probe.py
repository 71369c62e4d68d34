"""Image sizes of a file-based data spec, read from the files' headers without decoding them:
what ``labelrefine clean`` reads to choose a resize for a user's own photos."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import parse_spec

#: Kinds whose images are files (a PIL header read gives each one's size).
FILE_KINDS = ("imagefolder", "csv", "json")


@dataclass
class SizeProbe:
    """Sizes (height, width) of up to ``sample`` training images, evenly spread over the list."""

    n_files: int
    sizes: np.ndarray  # (M, 2) int: height, width

    @property
    def mixed(self) -> bool:
        return bool(len(self.sizes) and (self.sizes != self.sizes[0]).any())

    @property
    def median(self) -> tuple[int, int]:
        h, w = np.median(self.sizes, axis=0)
        return int(h), int(w)

    def describe(self) -> str:
        lo, hi = self.sizes.min(0), self.sizes.max(0)
        h, w = self.median
        spread = (f"mixed sizes, {lo[0]}-{hi[0]} x {lo[1]}-{hi[1]} (HxW), median {h}x{w}" if self.mixed
                  else f"all {h}x{w}")
        return f"{spread} (read from {len(self.sizes)} of {self.n_files} training files)"


def probe_sizes(spec: str, *, sample: int = 256) -> SizeProbe | None:
    """The training images' sizes of ``spec``, or ``None`` when the kind is not file-based or the
    spec already says ``size=``. Errors in the spec or the files surface as the loader's would."""
    from PIL import Image

    kind, path, options = parse_spec(spec)
    if kind not in FILE_KINDS or "size" in options or path is None:
        return None
    from .csv_manifest import _plan_csv
    from .imagefolder import _plan_imagefolder
    from .json_manifest import _plan_json

    plan = {"imagefolder": lambda: _plan_imagefolder(path), "csv": lambda: _plan_csv(path, options),
            "json": lambda: _plan_json(path, options)}[kind]()
    files = plan.splits["train"].files
    if not files:
        return None
    picks = np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).round().astype(int))
    sizes = []
    for i in picks.tolist():
        try:
            with Image.open(files[i]) as im:
                w, h = im.size
        except OSError:
            continue  # the loader names an unreadable file when it decodes it
        sizes.append((h, w))
    if not sizes:
        return None
    return SizeProbe(len(files), np.asarray(sizes, dtype=np.int64))
