"""Finding files: image folders (symbolic links followed, loops refused), class folders, stat
results, option paths, and the check that no image is listed twice.

Image folders follow symbolic links, except one back into a folder that contains it (an error
naming the link); an unresolvable link is skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ...errors import UserError
from .names import _short, printable_name
from .plan import _SplitPlan

log = logging.getLogger("labelrefine")

#: File extensions (lower case) that count as images in folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


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

