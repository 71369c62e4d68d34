"""On-disk cache of decoded images, so a folder of 60,000 JPEGs is decoded once.

A cache entry holds the decoded images of every split of one data source as one uint8
``N×C×H×W`` tensor per split, written with :func:`labelrefine.store.save` and read back with
:func:`labelrefine.store.load`: its SHA-256 is checked before anything is unpickled, and it is
unpickled with ``torch.load(weights_only=True)``, so a damaged or planted file is detected and
decoded again, never used. Labels and ids are *not* cached: they come from the
(cheap) listing or manifest on every load, so only the expensive part is stored.

Each source (kind, absolute path, resolved options) owns one cache file whose name is a hash
of those three; inside it sits the full content key (:class:`CacheKey`), which also covers the
manifest bytes and every image's relative path, size and mtime. A file whose key no longer
matches is simply overwritten by the next decode, so the cache does not grow when the data
changes. Files are written atomically (temporary file in the cache directory, then
:func:`os.replace`); a file that cannot be read, or fails its checksum, is logged and ignored.

The cache never lives next to the data: it is ``cache_dir`` if given, else the environment
variable ``LABELREFINE_CACHE``, else ``~/.cache/labelrefine``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import PIL
import torch

from ..errors import UserError
from ..store import LegacyFile, StoreError
from ..store import load as store_load
from ..store import save as store_save

log = logging.getLogger("labelrefine")

#: Bump when the decoding or the stored layout changes; old entries then stop matching.
FORMAT_VERSION = 2
#: The cache file's format (labelrefine.store): checksummed, unpickled with weights_only.
STORE_FORMAT = "labelrefine-image-cache-v2"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$LABELREFINE_CACHE``, else ``~/.cache/labelrefine``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LABELREFINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "labelrefine"


class CacheKey:
    """A sha256 over everything a decoded data set depends on.

    Feed it with :meth:`add` (any JSON-able value), :meth:`add_bytes` (manifest contents) and
    :meth:`add_files` (one ``(relative path, size, mtime_ns)`` triple per image).
    """

    def __init__(self, kind: str, path: str | Path, options: Mapping[str, object]):
        self.kind = kind
        self.path = str(path)
        self.options = dict(options)
        ident = json.dumps([FORMAT_VERSION, kind, self.path, self.options], sort_keys=True, default=str)
        #: Hash of (version, kind, absolute path, options): names the cache file.
        self.source_id = hashlib.sha256(ident.encode()).hexdigest()
        self._h = hashlib.sha256(ident.encode())
        # The decoder's version matters too (libjpeg versions differ in rounding).
        self.add(["pillow", PIL.__version__])

    def add(self, value: object) -> None:
        """Add a JSON-able value."""
        self._h.update(b"\x00v" + json.dumps(value, sort_keys=True, default=str).encode())

    def add_bytes(self, label: str, data: bytes) -> None:
        """Add raw bytes (for example a manifest file's contents) under a label."""
        self._h.update(b"\x00b" + label.encode() + b"\x00" + hashlib.sha256(data).digest())

    def add_files(
        self, label: str, relpaths: Iterable[str], sizes: Iterable[int], mtimes: Iterable[int]
    ) -> None:
        """Add one ``(relative path, size in bytes, mtime in ns)`` triple per image file."""
        text = "\n".join(f"{p}\t{s}\t{m}" for p, s, m in zip(relpaths, sizes, mtimes, strict=True))
        self._h.update(b"\x00f" + label.encode() + b"\x00" + text.encode("utf-8", "surrogateescape"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def cache_file(cache_dir: Path, key: CacheKey, name: str) -> Path:
    """The cache file for one source: ``<kind>-<name>-<source hash>.pt`` inside ``cache_dir``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "data"
    return cache_dir / f"{key.kind}-{slug}-{key.source_id[:16]}.pt"


def load_images(file: Path, key: CacheKey, counts: Mapping[str, int]) -> dict[str, torch.Tensor] | None:
    """The cached images per split, or ``None`` when absent, stale or unreadable.

    ``counts`` maps each expected split name to its number of images; an entry whose splits
    or sizes differ is treated as stale. Each returned tensor is uint8 ``N×C×H×W``.
    """
    if not file.is_file():
        return None
    try:
        blob = store_load(file, kind=STORE_FORMAT, name="image cache")
    except LegacyFile:  # written before checksums: not trusted, decoded again (once)
        log.info("cache %s has no checksum header (an older labelrefine's file, or not ours); decoding again", file)
        return None
    except StoreError as e:  # a damaged cache must never stop a run
        log.warning("ignoring unreadable cache file: %s; decoding again", e)
        return None
    try:
        if not isinstance(blob, dict) or blob.get("version") != FORMAT_VERSION:
            log.info("cache %s has another format version; decoding again", file)
            return None
        if blob.get("key") != key.hexdigest():
            log.info("cache %s is stale (the data changed); decoding again", file)
            return None
        images = blob["images"]
        if not isinstance(images, dict) or set(images) != set(counts):
            raise ValueError(f"splits {sorted(images)} instead of {sorted(counts)}")
        for split, x in images.items():
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"split {split!r} is not a uint8 N×C×H×W tensor")
            if x.shape[0] != counts[split]:
                raise ValueError(f"split {split!r} has {x.shape[0]} images, expected {counts[split]}")
        return images
    except Exception as e:  # a damaged cache must never stop a run
        log.warning("ignoring unreadable cache file %s (%s: %s); decoding again", file, type(e).__name__, e)
        return None


def save_images(file: Path, key: CacheKey, images: Mapping[str, torch.Tensor]) -> None:
    """Write the decoded images atomically; log (do not raise) when the cache is not writable."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        store_save(file, {"version": FORMAT_VERSION, "key": key.hexdigest(), "images": dict(images)},
                   kind=STORE_FORMAT)
        log.info("cached decoded images in %s", file)
    except (OSError, UserError) as e:  # UserError: a write error as labelrefine.io reports it
        log.warning("could not write the image cache %s (%s); continuing without it", file, e)
