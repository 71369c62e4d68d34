"""Data sources: turn a data spec string into :class:`DataSplits`.

Spec grammar::

    SPEC    := KIND [":" PATH] ("," OPTION)*
    OPTION  := KEY "=" VALUE | FLAG

``KIND`` is one of :data:`KNOWN_KINDS`; every kind except ``digits`` needs a ``PATH`` (which
therefore cannot contain a comma). Options by kind (``size``/``channels`` work for all):

=============  ==============================================================================
digits         scikit-learn's 8×8 digits, stratified 75/25 train/test split
imagefolder    ``DIR/{train,test,val}/<class>/<image>``
csv            manifest: ``path=COL label=COL split=COL test=PATH classes=a;b;c``
json           Chaoyang-style ``[{"name": path, "label": int}, ...]``: ``test=FILE classes=a;b;c``
npz            Keras arrays ``x_train y_train x_test y_test [x_val y_val class_names]``: ``classes=``
cifar10/100    torchvision's pickled batches under ``ROOT``: ``download``
=============  ==============================================================================

Common options: ``size=S`` or ``size=HxW`` resizes every image (PIL bilinear); ``channels=1|3``
converts (default: 1 when every training image is grayscale, else 3).

Decoded image files (imagefolder, csv, json) are cached; see :mod:`labelrefine.data.cache`.

Rules every loader follows:

* Integer labels without a class list name their classes by value, as folder names do: the
  classes are the distinct values present (all splits), ascending, named ``str(value)``; so
  labels ``0..C-1`` that all occur keep their indices, and labels {0, 100000000} are 2 classes.
  With ``classes=`` (or an npz's ``class_names``) integers are indices into that list.
* A CSV test table must use the manifest's kind of labels (integers or names); an image listed
  twice (within a split or across splits; paths compared after normalisation) is an error
  naming both lines (CSV) or entries (JSON).
* Ids and class names are printable UTF-8: a file name that is not valid UTF-8 keeps its
  valid characters and spells each undecodable byte ``\\xNN`` (:func:`printable_name`).
* Image folders follow symbolic links, except one back into a folder that contains it (an
  error naming the link); an unresolvable link is skipped.
* 16-bit and float grayscale images are scaled to 8 bits as :func:`_to_mode` describes (float
  data in [0, 1] × 255).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..io import read_text_file
from ..progress import progress
from . import cache as _cache
from .imageset import DataSplits, ImageSet

log = logging.getLogger("labelrefine")

KNOWN_KINDS: tuple[str, ...] = ("digits", "imagefolder", "csv", "json", "npz", "cifar10", "cifar100")

_COMMON_OPTIONS = frozenset({"size", "channels"})
_KIND_OPTIONS: dict[str, frozenset[str]] = {
    "digits": _COMMON_OPTIONS,
    "imagefolder": _COMMON_OPTIONS,
    "csv": _COMMON_OPTIONS | {"path", "label", "split", "test", "classes"},
    "json": _COMMON_OPTIONS | {"test", "classes"},
    "npz": _COMMON_OPTIONS | {"classes"},
    "cifar10": _COMMON_OPTIONS | {"download"},
    "cifar100": _COMMON_OPTIONS | {"download"},
}
_FLAG_OPTIONS = frozenset({"download"})

#: File extensions (lower case) that count as images in folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
#: PIL modes treated as grayscale (decoded to one channel).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_PATH_COLUMNS = ("path", "file", "filename", "image", "name")
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

_INT64_MAX = 2**63 - 1

#: Decode in a process pool (Linux, more than one core) when there are at least this many files.
DECODE_PARALLEL_MIN = 2000


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str | bool]]:
    """Split a data spec into ``(kind, path or None, options)``.

    ``options`` maps each option name to its string value, or to ``True`` for a bare flag.
    Raises :class:`UserError` for an unknown kind, an unknown or repeated option, a missing or
    superfluous path, or a flag/value mismatch.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"empty data spec; expected KIND[:PATH][,option=value...] with KIND one of {_kinds()}"
        )
    head, *tokens = spec.strip().split(",")
    kind, colon, path = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KNOWN_KINDS:
        raise UserError(f"data spec {spec!r}: unknown kind {kind!r}; known kinds: {_kinds()}")
    path = path.strip()
    if kind == "digits":
        if path:
            raise UserError(
                f"data spec {spec!r}: kind 'digits' takes no path (it is bundled with scikit-learn)"
            )
        path_out: str | None = None
    else:
        if not path:
            raise UserError(f"data spec {spec!r}: kind {kind!r} needs a path, as in {kind}:PATH")
        path_out = path
    allowed = _KIND_OPTIONS[kind]
    options: dict[str, str | bool] = {}
    for token in tokens:
        token = token.strip()
        if not token:
            continue
        key, eq, value = token.partition("=")
        key = key.strip().lower()
        if key not in allowed:
            raise UserError(
                f"data spec {spec!r}: unknown option {key!r} for kind {kind!r}; "
                f"known options: {', '.join(sorted(allowed))}"
            )
        if key in options:
            raise UserError(f"data spec {spec!r}: option {key!r} given twice")
        if key in _FLAG_OPTIONS:
            options[key] = _parse_bool(spec, key, value.strip()) if eq else True
        else:
            if not eq or not value.strip():
                raise UserError(f"data spec {spec!r}: option {key!r} needs a value, as in {key}=VALUE")
            options[key] = value.strip()
    return kind, path_out, options


def _kinds() -> str:
    return ", ".join(KNOWN_KINDS)


def _parse_bool(spec: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise UserError(
        f"data spec {spec!r}: option {key!r} is a flag; use ,{key} or {key}=true/false, not {value!r}"
    )


def _parse_size(value: str | bool | None) -> tuple[int, int] | None:
    """``"32"`` → ``(32, 32)``; ``"24x32"`` → ``(24, 32)`` as (H, W)."""
    if value is None:
        return None
    text = str(value).lower().replace("×", "x")
    parts = text.split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums, default=0) < 1:
        raise UserError(f"option size={value}: expected a positive size S or HxW, e.g. size=32 or size=24x32")
    return (nums[0], nums[0]) if len(nums) == 1 else (nums[0], nums[1])


def _parse_channels(value: str | bool | None) -> int | None:
    if value is None:
        return None
    if str(value) not in {"1", "3"}:
        raise UserError(f"option channels={value}: expected 1 (grayscale) or 3 (RGB)")
    return int(value)


def _parse_classes(value: str | bool | None) -> list[str] | None:
    if value is None:
        return None
    names = [c.strip() for c in str(value).split(";")]
    check_class_names(names, f"option classes={value}", hint="; expected classes=a;b;c")
    return names


def check_class_names(names: Sequence[object], what: str, *, hint: str = "") -> None:
    """Refuse an empty class name or a name listed twice: a :class:`UserError` starting with ``what``."""
    texts = [str(c) for c in names]
    if any(not c for c in texts):
        raise UserError(f"{what}: empty class name{hint}")
    seen: set[str] = set()
    for c in texts:
        if c in seen:
            raise UserError(f"{what}: class {_short(c)!r} listed twice")
        seen.add(c)


def _short(value: object, limit: int = 60) -> str:
    """``str(value)`` cut to ``limit`` characters: never put an unbounded value into a message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"  # no str(): it may be refused
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _class_list(classes: Sequence[str], limit: int = 20) -> str:
    """``a, b, c`` for a message; long lists show their first ``limit`` names and the count."""
    if len(classes) <= limit:
        return ", ".join(classes)
    return f"{', '.join(classes[:limit])}, ... ({len(classes)} classes)"


def printable_name(name: str) -> str:
    """``name`` itself when it is valid Unicode text, else a lossless printable form of it.

    A file name that is not valid UTF-8 reaches Python with each undecodable byte as a lone
    surrogate (``os.fsdecode``); such a string cannot be written as UTF-8. Its printable form
    spells every byte that is not UTF-8 as ``\\xNN`` (Python's ``backslashreplace``), so
    ``b"caf\\xe9.png"`` becomes ``caf\\xe9.png``. Valid names come back unchanged.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (e.g. JSON "\\ud800")
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_data(spec: str, *, cache_dir: str | Path | None = None) -> DataSplits:
    """Load the data set described by ``spec`` (see the module docstring for the grammar).

    Every split comes back as an :class:`ImageSet` with uint8 ``N×C×H×W`` images and int64
    ``(N,)`` labels; all splits share the class list, channel count and image size.
    Image-file kinds (imagefolder, csv, json) are decoded once and then read from the cache in
    ``cache_dir`` (default ``$LABELREFINE_CACHE`` or ``~/.cache/labelrefine``).
    """
    kind, path, options = parse_spec(spec)
    size = _parse_size(options.get("size"))
    channels = _parse_channels(options.get("channels"))
    if kind == "digits":
        return _load_digits(size, channels)
    assert path is not None
    if kind == "imagefolder":
        plan = _plan_imagefolder(path)
    elif kind == "csv":
        plan = _plan_csv(path, options)
    elif kind == "json":
        plan = _plan_json(path, options)
    elif kind == "npz":
        return _load_npz(path, size, channels, _parse_classes(options.get("classes")))
    else:
        return _load_cifar(kind, path, size, channels, bool(options.get("download", False)))
    _printable_ids(plan)
    return _load_planned(plan, size, channels, cache_dir)


# --------------------------------------------------------------------------------------------
# Plans: what to decode, with labels (cheap to build; decoding is the expensive part)
# --------------------------------------------------------------------------------------------


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


def _existing_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {p} is not a directory")
    return p.resolve()


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a file")
    return p.resolve()


def _walk_images(folder: str | Path, rel: str) -> Iterator[tuple[os.DirEntry, str]]:
    """Image files under ``folder`` (recursive, hidden entries skipped), unordered.

    Yields each file's ``DirEntry`` and its id: ``rel`` + ``/`` + the path below ``folder``
    with forward slashes. Symbolic links are followed, except that a link to a folder that
    contains it (a loop, which would list the same images without end) raises
    :class:`UserError` naming the link; a link that cannot be resolved is skipped, with a
    warning when it is a loop of links or has an image extension (a dangling link to a
    non-image stays silent). A folder that cannot be listed raises :class:`UserError`.
    """
    stack = [(str(folder), rel, (_folder_key(str(folder)),))]
    while stack:
        here, prefix, ancestors = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            raise UserError(f"cannot read folder {here} ({e.strerror})") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError as err:  # ELOOP: a link to itself, or a cycle of links
                if not e.is_symlink():
                    raise UserError(f"cannot read {e.path} ({err.strerror})") from None
                log.warning("%s: skipped: a symbolic link that does not resolve (%s)", e.path, err.strerror)
                continue
            if is_dir:
                key = _folder_key(e.path) if e.is_symlink() else _entry_key(e)
                if key in ancestors:
                    raise UserError(
                        f"{e.path}: symbolic link loop: it points to {os.path.realpath(e.path)}, a folder "
                        f"that contains it; remove the link"
                    )
                stack.append((e.path, f"{prefix}/{e.name}", (*ancestors, key)))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                if e.is_file():
                    yield e, f"{prefix}/{e.name}"
                elif e.is_symlink():
                    log.warning("%s: skipped: a symbolic link that does not resolve to a file", e.path)


def _folder_key(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read folder {path} ({e.strerror})") from None
    return st.st_dev, st.st_ino


def _entry_key(e: os.DirEntry) -> tuple[int, int]:
    try:
        st = e.stat()
    except OSError as err:
        raise UserError(f"cannot read folder {e.path} ({err.strerror})") from None
    return st.st_dev, st.st_ino


def list_image_files(folder: str | Path) -> list[tuple[Path, str]]:
    """Image files under ``folder``, recursively, as the data loaders find them.

    Returns ``(path, relative path with forward slashes)`` pairs sorted by the relative path;
    ``path`` is ``folder`` joined with the relative path (absolute only if ``folder`` is).
    Extensions: :data:`IMAGE_EXTENSIONS`; hidden files and folders are skipped.
    """
    folder = Path(folder)
    found = sorted(rel[2:] for _, rel in _walk_images(folder, "."))
    return [(folder.joinpath(*rel.split("/")), rel) for rel in found]


def _list_class_folders(
    split_dir: Path, root: Path
) -> tuple[list[str], list[list[tuple[str, str, int, int]]]]:
    """Image files of ``split_dir/<class>/...`` (recursive), sorted by class then path.

    Returns the sorted class names and, per class, ``(absolute path, id, size, mtime_ns)`` with
    ``id`` the path relative to ``root`` using forward slashes. Raises :class:`UserError` when
    there are no class folders or a class folder holds no images.
    """
    try:
        with os.scandir(split_dir) as it:
            folders = [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
    except OSError as e:
        raise UserError(f"cannot read folder {split_dir} ({e.strerror})") from None
    # Class names (and ids) in printable form: the same as the folder names unless those are not UTF-8.
    named = sorted((printable_name(f), f) for f in folders)
    classes = [c for c, _ in named]
    if not classes:
        raise UserError(f"{split_dir}: no class folders; expected {split_dir}{os.sep}<class>{os.sep}<image>")
    per_class = []
    for _, folder in named:
        class_dir = split_dir / folder
        found: list[tuple[str, str, int, int]] = []
        for e, rel in _walk_images(class_dir, os.path.relpath(class_dir, root).replace(os.sep, "/")):
            try:
                st = e.stat()
            except OSError as err:
                raise UserError(f"cannot read image {e.path} ({err.strerror})") from None
            found.append((e.path, rel, st.st_size, st.st_mtime_ns))
        if not found:
            raise UserError(
                f"{class_dir}: class folder has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        found.sort(key=lambda t: t[1])
        per_class.append(found)
    return classes, per_class


def _folder_split(
    split_dir: Path, root: Path, classes: Sequence[str] | None
) -> tuple[list[str], _SplitPlan]:
    """A split from ``split_dir/<class>/*``; returns the class list and the split.

    With ``classes`` given, every class folder must be one of them; without, the sorted folder
    names are the classes. Labels are int64 ``(N,)``; ids are relative to ``root``.
    """
    names, per_class = _list_class_folders(split_dir, root)
    classes = list(names if classes is None else classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise UserError(
            f"{split_dir / unknown[0]}: class folder {unknown[0]!r} is not one of the training classes "
            f"({', '.join(classes)})"
        )
    counts = [len(f) for f in per_class]
    labels = np.repeat(np.array([index[n] for n in names], dtype=np.int64), counts)
    flat = [t for files in per_class for t in files]
    return classes, _SplitPlan(
        files=[t[0] for t in flat],
        ids=[t[1] for t in flat],
        labels=labels,
        sizes=[t[2] for t in flat],
        mtimes=[t[3] for t in flat],
    )


def _plan_imagefolder(path: str) -> _Plan:
    root = _existing_dir(path, "imagefolder: data folder")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"imagefolder: {root} has no 'train' folder; expected {train_dir}{os.sep}<class>{os.sep}<image>"
        )
    classes, train = _folder_split(train_dir, root, None)
    splits = {"train": train}
    for split in ("val", "test"):
        if (root / split).is_dir():
            splits[split] = _folder_split(root / split, root, classes)[1]
    if "test" not in splits:
        log.warning("imagefolder: %s has no 'test' folder; loading without a test split", root)
    return _Plan("imagefolder", root.name, root, classes, splits, {})


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


def _stat_files(split: _SplitPlan, source: Path, lines: Sequence[int] | None = None) -> None:
    """Fill ``split.sizes``/``mtimes``; a missing image raises :class:`UserError` naming it."""
    sizes, mtimes = [], []
    for i, f in enumerate(split.files):
        try:
            st = os.stat(f)
        except (OSError, ValueError):  # ValueError: a NUL character in the path
            where = f"line {lines[i]}" if lines is not None else f"entry {i}"
            raise UserError(f"{source}: {where}: image {split.ids[i]!r} not found ({f})") from None
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    split.sizes, split.mtimes = sizes, mtimes


def _option_path(value: str, manifest: Path, option: str) -> Path:
    """A path given in an option: relative to the current directory, else to the manifest's folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        if not p.exists():
            raise UserError(f"option {option}={value}: {p} does not exist")
        return p.resolve()
    q = manifest.parent / p
    if q.exists():
        return q.resolve()
    raise UserError(f"option {option}={value}: not found in the current directory nor next to {manifest}")


# ---- CSV manifests ---------------------------------------------------------------------------


@dataclass
class ManifestSplit:
    """One split of a manifest: ids (paths as written), absolute files, int64 ``(N,)`` labels.

    ``extra_labels`` holds the further label columns (int64 ``(N,)``, same class indexing);
    ``lines`` the 1-based line of each row in ``source`` (``None`` for a folder split).
    """

    ids: list[str]
    files: list[str]
    labels: np.ndarray
    extra_labels: dict[str, np.ndarray]
    source: Path
    lines: list[int] | None


@dataclass
class Manifest:
    """A parsed CSV manifest: its classes, main label column and splits (no images loaded)."""

    file: Path
    classes: list[str]
    label_column: str
    path_column: str
    splits: dict[str, ManifestSplit]
    test_source: Path | None = None


@dataclass
class _CsvTable:
    file: Path
    header: list[str]
    columns: dict[str, np.ndarray]  # stripped string values, one array per column
    lines: np.ndarray  # 1-based line number of each row


def _read_csv_table(file: Path) -> _CsvTable:
    text = read_text_file(file, str(file), encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{file}: empty manifest (no header line)") from None
    except csv.Error as e:
        raise UserError(f"{file}: line 1: malformed CSV ({e})") from None
    header = [h.strip() for h in header]
    if any(not h for h in header):
        raise UserError(f"{file}: header has an empty column name (column {header.index('') + 1})")
    dups = [h for h in header if header.count(h) > 1]
    if dups:
        raise UserError(f"{file}: column {dups[0]!r} appears twice in the header")
    rows: list[list[str]] = []
    lines: list[int] = []
    ncol = len(header)
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != ncol:
                raise UserError(f"{file}: line {reader.line_num}: {len(row)} fields, the header has {ncol}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise UserError(f"{file}: line {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise UserError(f"{file}: empty manifest (a header but no rows)")
    cols = {
        h: np.char.strip(np.array(vals, dtype=str))
        for h, vals in zip(header, zip(*rows, strict=True), strict=True)
    }
    return _CsvTable(file, header, cols, np.array(lines, dtype=np.int64))


def _pick_column(table: _CsvTable, option: str, given: str | None, defaults: Sequence[str]) -> str | None:
    if given is not None:
        if given not in table.columns:
            raise UserError(
                f"{table.file}: no column {given!r} (from {option}={given}); "
                f"columns: {', '.join(table.header)}"
            )
        return given
    return next((c for c in defaults if c in table.columns), None)


def _int_column(values: np.ndarray) -> np.ndarray | None:
    """The column as int64 when every value parses as an int, else ``None``."""
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        return None


def present_classes(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The sorted distinct values of integer label arrays: the classes of integer labels.

    Integer labels name their classes by value, as folder names do for ``imagefolder``: the
    classes are the values that occur in the training labels, in ascending order, and class
    ``i`` is named ``str(values[i])``. Labels ``0..C-1`` that all occur keep their indices.
    """
    arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)


def index_labels(present: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Class indices of integer ``values`` among ``present`` (sorted), and the position of the
    first value that is not one of them (``None`` when all are)."""
    values = np.asarray(values, dtype=np.int64)
    idx = np.searchsorted(present, values)
    found = np.zeros(values.shape, dtype=bool)
    inside = idx < len(present)
    found[inside] = present[idx[inside]] == values[inside]
    bad = None if found.all() else int(np.flatnonzero(~found)[0])
    return idx.astype(np.int64), bad


def _resolve_label_columns(
    tables: Sequence[_CsvTable], label_cols: Sequence[Sequence[str]], classes: list[str] | None
) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Map every label column of every table to int64 class indices.

    ``tables[0]`` is the manifest, a second one the test table. Without ``classes``: when
    every label column of the manifest holds integers, the classes are the integers present in
    all tables (:func:`present_classes`), and a test table must hold integers too; otherwise a
    column holds class names when any of its values is not an integer, the classes are the
    sorted names of all tables and the integer columns index into them. With ``classes``:
    integers index into it, names must be in it. Returns the class list and, per table,
    column → int64 array.
    """
    names = sorted({c for cols in label_cols for c in cols})
    parsed: list[dict[str, np.ndarray | None]] = []
    for table, cols in zip(tables, label_cols, strict=True):
        parsed.append({c: _int_column(table.columns[c]) for c in cols})
    if classes is None and all(v is not None for v in parsed[0].values()):
        return _resolve_int_labels(tables, label_cols, parsed)
    is_int = {c: all(p[c] is not None for p in parsed if c in p) for c in names}
    if classes is None:
        _check_label_kinds(tables, label_cols, parsed)
        found: set[str] = set()
        for table, cols in zip(tables, label_cols, strict=True):
            for c in cols:
                if not is_int[c]:
                    values = np.unique(table.columns[c])
                    if values[0] == "":
                        bad = int(np.flatnonzero(table.columns[c] == "")[0])
                        raise UserError(f"{table.file}: line {table.lines[bad]}: column {c!r} is empty")
                    found.update(values.tolist())
        classes = sorted(found)
    index = {c: i for i, c in enumerate(classes)}
    out: list[dict[str, np.ndarray]] = []
    for table, cols, ints in zip(tables, label_cols, parsed, strict=True):
        mapped: dict[str, np.ndarray] = {}
        for c in cols:
            values = ints[c] if is_int[c] else None
            if values is not None:
                bad_mask = (values < 0) | (values >= len(classes))
                if bad_mask.any():
                    bad = int(np.flatnonzero(bad_mask)[0])
                    raise UserError(
                        f"{table.file}: line {table.lines[bad]}: column {c!r} has label {int(values[bad])} "
                        f"outside [0, {len(classes) - 1}] ({len(classes)} classes)"
                    )
                mapped[c] = values
            else:
                uniq, inverse = np.unique(table.columns[c], return_inverse=True)
                missing = [u for u in uniq.tolist() if u not in index]
                if missing:
                    bad = int(np.flatnonzero(table.columns[c] == missing[0])[0])
                    what = (
                        "is empty"
                        if missing[0] == ""
                        else f"has label {_short(missing[0])!r}, not one of the classes"
                    )
                    raise UserError(
                        f"{table.file}: line {table.lines[bad]}: column {c!r} {what} ({_class_list(classes)})"
                    )
                lut = np.array([index[u] for u in uniq.tolist()], dtype=np.int64)
                mapped[c] = lut[inverse.reshape(-1)]
        out.append(mapped)
    return classes, out


def _check_label_kinds(
    tables: Sequence[_CsvTable], label_cols: Sequence[Sequence[str]], parsed: Sequence[dict[str, np.ndarray | None]]
) -> None:
    """A test table's label column must be of the manifest's kind (integers or names): where
    the kinds differ, a test value that is not one of the manifest's values of that column
    raises :class:`UserError` (it would silently become a class of its own)."""
    main = tables[0]
    for table, cols, ints in zip(tables[1:], label_cols[1:], parsed[1:], strict=True):
        for c in cols:
            if c not in parsed[0] or (parsed[0][c] is None) == (ints[c] is None):
                continue
            known = np.unique(main.columns[c])
            outside = ~np.isin(table.columns[c], known)
            if outside.any():
                bad = int(np.flatnonzero(outside)[0])
                kind = "class names" if parsed[0][c] is None else "integer labels"
                raise UserError(
                    f"{table.file}: line {table.lines[bad]}: column {c!r} has label "
                    f"{_short(str(table.columns[c][bad]))!r}, not one of the training classes "
                    f"({_class_list(known.tolist())}: {main.file.name} has {kind})"
                )


def _resolve_int_labels(
    tables: Sequence[_CsvTable],
    label_cols: Sequence[Sequence[str]],
    parsed: Sequence[dict[str, np.ndarray | None]],
) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Integer labels without a class list: the classes are the integers present, by value."""
    for table, cols, ints in zip(tables, label_cols, parsed, strict=True):
        for c in cols:
            values = ints[c]
            if values is not None and values.size and values.min() < 0:
                bad = int(np.argmax(values < 0))
                raise UserError(
                    f"{table.file}: line {table.lines[bad]}: column {c!r} has label {int(values[bad])}; "
                    f"integer labels must be >= 0"
                )
    present = present_classes([v for ints in parsed for v in ints.values() if v is not None])
    classes = [str(v) for v in present.tolist()]
    for table, cols, ints in zip(tables[1:], label_cols[1:], parsed[1:], strict=True):
        for c in cols:
            if ints[c] is None:  # names (or an empty value) where the training labels are integers
                text = table.columns[c].tolist()
                bad = next(i for i, v in enumerate(text) if _int_column(np.array([v])) is None)
                what = "is empty" if text[bad] == "" else (
                    f"has label {_short(text[bad])!r}, not one of the training classes ({_class_list(classes)}: "
                    f"{tables[0].file.name} has integer labels)"
                )
                raise UserError(f"{table.file}: line {table.lines[bad]}: column {c!r} {what}")
    out = [{c: index_labels(present, v)[0] for c, v in ints.items()} for ints in parsed]  # type: ignore[arg-type]
    return classes, out


def read_manifest(
    file: str | Path,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    test: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> Manifest:
    """Parse a CSV manifest into labels per split without decoding any image.

    Args:
        file: the CSV; image paths in it are relative to its folder.
        path_column: column of image paths (default: first of path, file, filename, image, name).
        label_column: main label column (default ``label``, else ``clean``, else the first
            column that is neither the path nor the split column). Every other column except
            path and split becomes an extra label column.
        split_column: column with train/val/test (default ``split`` when present; without one
            every row is train).
        test: an extra test split: a folder of ``<class>/<image>`` or a CSV of the same format.
        classes: explicit class list; labels are then names from it or indices into it.

    Returns:
        a :class:`Manifest`; each split's ``labels`` is int64 ``(N,)``.
    """
    file = _existing_file(file, "csv: manifest")
    table = _read_csv_table(file)
    pcol = _pick_column(table, "path", path_column, _PATH_COLUMNS)
    if pcol is None:
        raise UserError(
            f"{file}: no path column (looked for {', '.join(_PATH_COLUMNS)}); name it with path=COL"
        )
    scol = _pick_column(table, "split", split_column, ("split",))
    candidates = [c for c in table.header if c not in (pcol, scol)]
    lcol = _pick_column(table, "label", label_column, ("label", "clean", *candidates))
    if lcol is None or lcol in (pcol, scol):
        raise UserError(
            f"{file}: no label column (columns: {', '.join(table.header)}); name it with label=COL"
        )
    label_cols = [lcol] + [c for c in candidates if c != lcol]

    tables, cols = [table], [label_cols]
    test_path: Path | None = None
    test_table: _CsvTable | None = None
    if test is not None:
        test_path = _option_path(str(test), file, "test")
        if test_path.is_file():
            test_table = _read_csv_table(test_path)
            if pcol not in test_table.columns:
                raise UserError(
                    f"{test_path}: no path column {pcol!r} (columns: {', '.join(test_table.header)})"
                )
            if lcol not in test_table.columns:
                raise UserError(
                    f"{test_path}: no label column {lcol!r} (columns: {', '.join(test_table.header)})"
                )
            test_scol = (
                scol if scol in test_table.columns else ("split" if "split" in test_table.columns else None)
            )
            tcols = [lcol] + [c for c in test_table.header if c not in (pcol, test_scol, lcol)]
            tables.append(test_table)
            cols.append(tcols)
    canon: np.ndarray | None = None
    if scol is not None:
        raw = np.char.lower(table.columns[scol])
        known = np.isin(raw, list(_SPLIT_NAMES))
        if not known.all():
            bad = int(np.flatnonzero(~known)[0])
            raise UserError(
                f"{file}: line {table.lines[bad]}: column {scol!r} has {_short(str(table.columns[scol][bad]))!r}; "
                f"expected train, val or test"
            )
        canon = np.array([_SPLIT_NAMES[v] for v in raw.tolist()])
        if not (canon == "train").any():
            raise UserError(f"{file}: no rows with {scol}=train")
    if test_path is not None and canon is not None and (canon == "test").any():
        raise UserError(f"{file}: has test rows in column {scol!r} and test={test} was given too; use one")
    class_list, mapped = _resolve_label_columns(tables, cols, list(classes) if classes is not None else None)

    def make_split(
        t: _CsvTable, m: dict[str, np.ndarray], main: str, rows: np.ndarray | None
    ) -> ManifestSplit:
        paths = t.columns[pcol] if rows is None else t.columns[pcol][rows]
        lines = t.lines if rows is None else t.lines[rows]
        empty = np.flatnonzero(paths == "")
        if empty.size:
            raise UserError(f"{t.file}: line {lines[empty[0]]}: column {pcol!r} is empty")
        ids = paths.tolist()
        base = str(t.file.parent)
        return ManifestSplit(
            ids=ids,
            files=[os.path.join(base, p) for p in ids],
            labels=m[main] if rows is None else m[main][rows],
            extra_labels={c: (v if rows is None else v[rows]) for c, v in m.items() if c != main},
            source=t.file,
            lines=lines.tolist(),
        )

    splits: dict[str, ManifestSplit] = {}
    if canon is None:
        splits["train"] = make_split(table, mapped[0], lcol, None)
    else:
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(canon == name)
            if rows.size:
                splits[name] = make_split(table, mapped[0], lcol, rows)
    if test_path is not None:
        if test_table is not None:
            splits["test"] = make_split(test_table, mapped[1], lcol, None)
        else:
            plan = _folder_split(test_path, test_path.parent, class_list)[1]
            splits["test"] = ManifestSplit(plan.ids, plan.files, plan.labels, {}, test_path, None)
    _check_duplicates(
        [(s.files, s.ids, s.labels, s.source, s.lines) for s in splits.values()], class_list, "line"
    )
    return Manifest(file, class_list, lcol, pcol, splits, test_path)


def _check_duplicates(
    parts: Sequence[tuple[Sequence[str], Sequence[str], np.ndarray, Path, Sequence[int] | None]],
    classes: Sequence[str],
    unit: str,
) -> None:
    """Refuse an image listed twice, within a split or across splits (train/val/test).

    ``parts`` holds per split ``(files, ids, labels, source, positions)``, positions being the
    line (CSV) or entry (JSON) numbers, ``None`` for a folder. Files are compared by their
    normalised absolute path. The error names the image and both places, and both labels
    when they differ.
    """
    seen: dict[str, tuple[int, int]] = {}
    for k, (files, ids, labels, source, positions) in enumerate(parts):
        for i, f in enumerate(files):
            first = seen.setdefault(os.path.normpath(f), (k, i))
            if first == (k, i):
                continue
            k0, i0 = first
            src0, pos0 = parts[k0][3], parts[k0][4]
            here = f"{source}: {unit} {positions[i]}" if positions is not None else f"{source}: file"
            there = f"{unit} {pos0[i0]}" if pos0 is not None else "a file"
            if src0 != source:
                there = f"{there} of {src0}" if pos0 is not None else f"the folder {src0}"
            label0, label = int(parts[k0][2][i0]), int(labels[i])
            how = "" if label0 == label else (
                f" with another label ({_short(classes[label])!r} here, {_short(classes[label0])!r} there)"
            )
            raise UserError(
                f"{here}: image {printable_name(ids[i])!r} is listed again{how} (first at {there}); "
                f"each image may appear once, in one split"
            )


def _plan_csv(path: str, options: dict[str, str | bool]) -> _Plan:
    def opt(key: str) -> str | None:
        v = options.get(key)
        return None if v is None else str(v)

    classes = _parse_classes(options.get("classes"))
    m = read_manifest(
        path,
        path_column=opt("path"),
        label_column=opt("label"),
        split_column=opt("split"),
        test=opt("test"),
        classes=classes,
    )
    splits: dict[str, _SplitPlan] = {}
    for name, s in m.splits.items():
        plan = _SplitPlan(files=s.files, ids=s.ids, labels=s.labels, extra=s.extra_labels)
        _stat_files(plan, s.source, s.lines)
        splits[name] = plan
    manifests = [m.file] + ([m.test_source] if m.test_source is not None and m.test_source.is_file() else [])
    key_options = {
        "path": m.path_column,
        "label": m.label_column,
        "split": opt("split"),
        "test": str(m.test_source) if m.test_source is not None else None,
        "classes": m.classes,
    }
    return _Plan("csv", m.file.stem, m.file, m.classes, splits, key_options, manifests)


# ---- JSON manifests (Chaoyang) ---------------------------------------------------------------


def _read_json_manifest(file: Path) -> tuple[list[str], np.ndarray]:
    """Paths (as written) and int64 ``(N,)`` labels of a ``[{"name": ..., "label": int}]`` file."""
    text = read_text_file(file, str(file), encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{file}: not valid JSON for a manifest (lists or objects nested too deeply)") from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise UserError(f"{file}: not valid JSON for a manifest ({str(e).split(':')[0]})") from None
    if not isinstance(data, list):
        raise UserError(
            f'{file}: expected a JSON list of {{"name": path, "label": int}}, got {type(data).__name__}'
        )
    if not data:
        raise UserError(f"{file}: empty manifest (an empty list)")
    names: list[str] = []
    labels: list[int] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(
                f"{file}: entry {i} is a {type(entry).__name__}, expected an object with name and label"
            )
        for key in ("name", "label"):
            if key not in entry:
                raise UserError(f"{file}: entry {i} has no {key!r}")
        name, label = entry["name"], entry["label"]
        if not isinstance(name, str) or not name:
            raise UserError(f"{file}: entry {i}: 'name' must be a non-empty path string, got {_short(name)}")
        if isinstance(label, bool) or not isinstance(label, int):
            raise UserError(f"{file}: entry {i}: 'label' must be an integer, got {_short(label)}")
        if label < 0:
            raise UserError(f"{file}: entry {i}: 'label' {_short(label)} is negative")
        if label > _INT64_MAX:
            raise UserError(f"{file}: entry {i}: 'label' {_short(label)} is too large (at most 2**63 - 1)")
        names.append(name)
        labels.append(label)
    return names, np.array(labels, dtype=np.int64)


def _plan_json(path: str, options: dict[str, str | bool]) -> _Plan:
    file = _existing_file(path, "json: manifest")
    classes = _parse_classes(options.get("classes"))
    test_file: Path | None = None
    if options.get("test") is not None:
        test_file = _option_path(str(options["test"]), file, "test")
        if not test_file.is_file():
            raise UserError(f"option test={options['test']}: {test_file} is not a file")
    elif "train" in file.name:
        guess = file.with_name(file.name.replace("train", "test"))
        if guess.is_file():
            test_file = guess.resolve()
            log.info("json: using %s as the test split", test_file)
    sources = {"train": file} | ({"test": test_file} if test_file is not None else {})
    read = {name: _read_json_manifest(f) for name, f in sources.items()}
    present = None
    if classes is None:  # integer labels name their classes: the values present, ascending
        present = present_classes([labels for _, labels in read.values()])
        classes = [str(v) for v in present.tolist()]
    splits: dict[str, _SplitPlan] = {}
    for name, (names, labels) in read.items():
        src = sources[name]
        if present is not None:
            labels = index_labels(present, labels)[0]
        elif labels.max() >= len(classes):
            bad = int(np.flatnonzero(labels >= len(classes))[0])
            raise UserError(
                f"{src}: entry {bad}: 'label' {int(labels[bad])} outside [0, {len(classes) - 1}] "
                f"({len(classes)} classes)"
            )
        base = str(src.parent)
        plan = _SplitPlan(files=[os.path.join(base, n) for n in names], ids=names, labels=labels)
        splits[name] = plan
    _check_duplicates(
        [(p.files, p.ids, p.labels, sources[n], range(len(p.files))) for n, p in splits.items()], classes, "entry"
    )
    for name, plan in splits.items():
        _stat_files(plan, sources[name])
    if test_file is None:  # after the checks: a bad manifest is one error line, not a warning and an error
        log.warning("json: no test split for %s (give one with test=FILE)", file)
    key_options = {"test": str(test_file) if test_file else None, "classes": classes}
    return _Plan("json", file.stem, file, classes, splits, key_options, list(sources.values()))


# --------------------------------------------------------------------------------------------
# Decoding image files (with the cache)
# --------------------------------------------------------------------------------------------


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
        images = _decode_plan(plan, size, channels)
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


# --------------------------------------------------------------------------------------------
# Array sources: digits, npz, CIFAR pickles
# --------------------------------------------------------------------------------------------


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
