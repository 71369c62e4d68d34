"""Plans of image-file sources (what to decode, with labels) and loading them through the cache.

A plan is cheap to build; decoding is the expensive part, done once and then read from the
cache (:mod:`labelrefine.data.cache`), keyed by every file's path, size and mtime. Ids are
printable UTF-8: a file name that is not valid UTF-8 keeps its valid characters and spells each
undecodable byte ``\\xNN`` (:func:`~labelrefine.data.sources.names.printable_name`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError
from .. import cache as _cache
from ..imageset import DataSplits, ImageSet
from . import decode
from .names import printable_name
from .registry import SourceRequest

log = logging.getLogger("labelrefine")

@dataclass
class _SplitPlan:
    """One split's files and labels, before decoding.

    ``files`` are absolute paths, ``ids`` the per-sample ids, ``labels`` an int64 ``(N,)``
    array, ``extra`` further int64 ``(N,)`` label columns, ``keyed`` the relative paths used in
    the cache key and ``sizes``/``mtimes`` the files' stat results.
    """

    files: list[str]
    ids: list[str]
    labels: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)


@dataclass
class _Plan:
    kind: str
    name: str
    root: Path
    classes: list[str]
    splits: dict[str, _SplitPlan]
    key_options: dict[str, object]
    manifests: list[Path] = field(default_factory=list)


def _printable_ids(plan: _Plan) -> None:
    """Give every id (and the data set's name) a printable form (:func:`printable_name`).

    Ids are written to ``labels.csv`` and the report as UTF-8, so a file name that is not
    valid UTF-8 gets its bytes spelled as ``\\xNN``, with one warning; the file is still read
    from its real path. Two files whose printable ids coincide raise :class:`UserError`.
    """
    plan.name = printable_name(plan.name)
    changed: list[tuple[str, str]] = []
    for split in plan.splits.values():
        ids = [printable_name(i) for i in split.ids]
        changed += [(new, f) for old, new, f in zip(split.ids, ids, split.files, strict=True) if new != old]
        split.ids = ids
    if not changed:
        return
    seen: dict[str, str] = {}
    for split in plan.splits.values():
        for i, f in zip(split.ids, split.files, strict=True):
            other = seen.setdefault(i, f)
            if other != f:
                raise UserError(
                    f"{printable_name(f)}: its file name is not UTF-8 and its printable id {i!r} is also the "
                    f"name of {printable_name(other)}; rename one of them"
                )
    log.warning(
        "%s %s: %d file name(s) are not valid UTF-8; their ids show the undecodable bytes as \\xNN, e.g. %s",
        plan.kind, plan.name, len(changed), changed[0][0],
    )


def _load_planned(
    plan: _Plan, size: tuple[int, int] | None, channels: int | None, cache_dir: str | Path | None
) -> DataSplits:
    """Images from the cache when it matches ``plan``, else decode them and fill the cache."""
    key = _cache.CacheKey(plan.kind, plan.root, {"size": size, "channels": channels, **plan.key_options})
    for m in plan.manifests:
        key.add_bytes(printable_name(str(m)), m.read_bytes())
    for name, s in plan.splits.items():
        key.add_files(name, s.ids, s.sizes, s.mtimes)
    directory = _cache.resolve_cache_dir(cache_dir)
    file = _cache.cache_file(directory, key, plan.name)
    counts = {n: len(s.files) for n, s in plan.splits.items()}
    images = _cache.load_images(file, key, counts)
    if images is None:
        images = decode._decode_plan(plan, size, channels)
        _cache.save_images(file, key, images)
    else:
        log.info("loaded decoded images of %s from the cache %s", plan.root, file)
    return _build(
        plan.name, plan.classes, {n: (images[n], s.labels, s.ids, s.extra) for n, s in plan.splits.items()}
    )


def _build(
    name: str,
    classes: list[str],
    parts: dict[str, tuple[torch.Tensor | np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]],
) -> DataSplits:
    sets = {}
    for split, (images, labels, ids, extra) in parts.items():
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        sets[split] = ImageSet(
            images=x,
            labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            classes=list(classes),
            ids=list(ids),
            extra_labels={
                k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in extra.items()
            },
        )
    return DataSplits(name=name, train=sets["train"], test=sets.get("test"), val=sets.get("val"))


def load_planned(plan: _Plan, req: SourceRequest) -> DataSplits:
    """Load an image-file source's plan: printable ids, then the cache or decoding."""
    _printable_ids(plan)
    return _load_planned(plan, req.size, req.channels, req.cache_dir)
