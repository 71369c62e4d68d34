"""Decoding image files into uint8 arrays (in a process pool for many files), and pixel conversions.

16-bit and float grayscale images are scaled to 8 bits as :func:`_to_mode` describes (float
data in [0, 1] × 255).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ...errors import UserError
from ...progress import progress

if TYPE_CHECKING:
    from .plan import _Plan

#: PIL modes treated as grayscale (decoded to one channel).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


#: Decode in a process pool (Linux, more than one core) when there are at least this many files.
DECODE_PARALLEL_MIN = 2000


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert to ``"L"`` or ``"RGB"``; 16/32-bit integer and float grayscale are scaled to 8 bits.

    The rule (per image): 16-bit modes (``I;16*``), and 32-bit integers (``I``) with a value
    above 255, are divided by 257 (65535 → 255); float images (``F``, e.g. a float32 TIFF)
    with every value in [0, 1] are multiplied by 255, those in [0, 255] are kept; then values
    are rounded and clipped to 0..255. A float image with NaN, infinite or other values (below
    0 or above 255) raises ``ValueError``, as float arrays of ``npz`` and the API do.
    """
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size:
            lo, hi = float(a.min()), float(a.max())
            if not np.isfinite([lo, hi]).all():
                raise ValueError("float image with NaN or infinite values")
            if lo < 0 or hi > 255:
                raise ValueError(f"float image with values in [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
            if hi <= 1.0:
                a = a * 255.0
        elif im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return im if im.mode == mode else im.convert(mode)


def _decode_file(path: str, size: tuple[int, int] | None, mode: str | None) -> tuple[np.ndarray, bool]:
    """Fully decode one image file to an ``H×W`` (gray) or ``H×W×3`` uint8 array.

    ``mode`` is ``"L"``, ``"RGB"`` or ``None`` (keep grayscale as L, everything else RGB).
    Returns the array and whether the file itself was grayscale.
    """
    with Image.open(path) as im:
        im.load()
        gray = im.mode in _GRAY_MODES
        out = _to_mode(im, mode or ("L" if gray else "RGB"))
        if size is not None and out.size != (size[1], size[0]):
            out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(out), gray


_Decoded = tuple[np.ndarray | None, bool, str | None]


def _decode_chunk(args: tuple[list[str], tuple[int, int] | None, str | None]) -> list[_Decoded]:
    """Decode a list of files; failures come back as ``(None, False, message)``."""
    files, size, mode = args
    out: list[_Decoded] = []
    for f in files:
        try:
            arr, gray = _decode_file(f, size, mode)
            out.append((arr, gray, None))
        except Exception as e:  # reported to the user with the file's name
            out.append((None, False, f"{type(e).__name__}: {e}"))
    return out


def _workers(n_files: int) -> int:
    if n_files < DECODE_PARALLEL_MIN or not sys.platform.startswith("linux"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _decode_all(
    files: list[str], size: tuple[int, int] | None, mode: str | None, desc: str
) -> Iterator[_Decoded]:
    """Decode ``files`` in order (in a process pool when worthwhile), reporting progress."""
    workers = _workers(len(files))
    if workers == 1:
        for f in progress(files, total=len(files), desc=desc, unit="img"):
            yield _decode_chunk(([f], size, mode))[0]
        return
    chunk = max(64, min(1000, len(files) // (workers * 8) or 1))
    tasks = [(files[i : i + chunk], size, mode) for i in range(0, len(files), chunk)]
    # fork: workers need only PIL and numpy, and must not re-import torch.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        flat = (d for part in pool.imap(_decode_chunk, tasks) for d in part)
        yield from progress(flat, total=len(files), desc=desc, unit="img")


def decode_images(
    files: Sequence[str | Path], size: tuple[int, int], channels: int, desc: str = "decoding images"
) -> torch.Tensor:
    """Decode image files as a data set's training images were decoded, into uint8 ``N×C×H×W``.

    Each file is decoded like an image file of ``imagefolder``/``csv``/``json`` loaded with
    ``size=HxW`` and ``channels=C`` (:func:`_decode_file`): 16-bit and float grayscale scaled
    to 8 bits, converted to L (``channels=1``) or RGB (``channels=3``) with PIL, then resized
    (PIL bilinear) to ``size`` = ``(H, W)`` when it differs. Raises :class:`UserError` naming
    the first file that cannot be decoded.
    """
    mode = {1: "L", 3: "RGB"}[channels]
    names = [str(f) for f in files]
    arrays: list[np.ndarray] = []
    for i, (arr, _, err) in enumerate(_decode_all(names, size, mode, desc)):
        if err is not None:
            raise UserError(f"cannot read image {names[i]}: {err}")
        assert arr is not None
        arrays.append(arr)
    if not arrays:
        return torch.zeros((0, channels, *size), dtype=torch.uint8)
    return torch.from_numpy(_stack_channels(arrays, channels))


def _rgb_to_gray(x: np.ndarray, axis: int) -> np.ndarray:
    """PIL's RGB→L conversion (ITU-R 601-2, same integer rounding), vectorised over ``axis``."""
    x = x.astype(np.uint32)
    r, g, b = (np.take(x, i, axis=axis) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _decode_plan(plan: _Plan, size: tuple[int, int] | None, channels: int | None) -> dict[str, torch.Tensor]:
    """Decode every split of ``plan`` into uint8 ``N×C×H×W`` tensors (same C, H, W for all)."""
    mode = {1: "L", 3: "RGB", None: None}[channels]
    names = list(plan.splits)
    files = [f for n in names for f in plan.splits[n].files]
    arrays: list[np.ndarray] = []
    gray = np.zeros(len(files), dtype=bool)
    ref_shape: tuple[int, ...] | None = None
    for i, (arr, is_gray, err) in enumerate(
        _decode_all(files, size, mode, f"decoding {plan.kind} {plan.name}")
    ):
        if err is not None:
            raise UserError(f"cannot read image {files[i]}: {err}")
        assert arr is not None
        if ref_shape is None:
            ref_shape = arr.shape[:2]
        elif arr.shape[:2] != ref_shape:
            raise UserError(
                f"{files[i]}: image is {arr.shape[0]}x{arr.shape[1]} (HxW) but {files[0]} is "
                f"{ref_shape[0]}x{ref_shape[1]}; all images must have the same size: add size=HxW "
                f"(e.g. ,size={ref_shape[0]}x{ref_shape[1]}) to the data spec"
            )
        arrays.append(arr)
        gray[i] = is_gray
    out: dict[str, torch.Tensor] = {}
    start = 0
    n_train = len(plan.splits[names[0]].files)
    if channels is None:
        channels = 1 if gray[:n_train].all() else 3
    for n in names:
        count = len(plan.splits[n].files)
        part = arrays[start : start + count]
        start += count
        out[n] = torch.from_numpy(_stack_channels(part, channels))
    return out


def _stack_channels(arrays: list[np.ndarray], channels: int) -> np.ndarray:
    """Stack ``H×W`` / ``H×W×3`` uint8 arrays into ``N×C×H×W`` with C = ``channels``."""
    is_rgb = np.array([a.ndim == 3 for a in arrays], dtype=bool)
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), channels, h, w), dtype=np.uint8)
    for want_rgb in (False, True):
        idx = np.flatnonzero(is_rgb == want_rgb)
        if not idx.size:
            continue
        block = np.stack([arrays[i] for i in idx.tolist()])
        if want_rgb:  # N×H×W×3
            out[idx] = block.transpose(0, 3, 1, 2) if channels == 3 else _rgb_to_gray(block, 3)[:, None]
        else:  # N×H×W
            out[idx] = block[:, None] if channels == 1 else np.repeat(block[:, None], 3, axis=1)
    return out


def _adjust_array(x: np.ndarray, size: tuple[int, int] | None, channels: int | None, desc: str) -> np.ndarray:
    """Resize (PIL bilinear) and/or convert channels of a uint8 ``N×C×H×W`` array."""
    if channels == 1 and x.shape[1] == 3:
        x = _rgb_to_gray(x, 1)[:, None]
    if size is not None and tuple(x.shape[2:]) != size:
        out = np.empty((x.shape[0], x.shape[1], *size), dtype=np.uint8)
        hwc = x.transpose(0, 2, 3, 1)
        for i in progress(range(x.shape[0]), desc=desc, unit="img"):
            img = hwc[i, :, :, 0] if x.shape[1] == 1 else hwc[i]
            r = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR))
            out[i] = r[None] if r.ndim == 2 else r.transpose(2, 0, 1)
        x = out
    if channels == 3 and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x)

