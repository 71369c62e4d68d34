"""Atomic file output: a reader never sees a half-written artifact.

Everything is written to a temporary file in the destination's directory and moved into place
with ``os.replace``, which is atomic on POSIX and Windows. A write that fails because of the
file system (disk full, quota, read-only, permission, a path below a regular file) is a one-line
:class:`~labelrefine.errors.UserError` naming the file (``no space left on device writing
DIR/model.pt``); the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TMP_SUFFIX = ".tmp"  # temporary files are ".{name}.XXXXXXXX.tmp" beside ``name``


def tmp_pattern(name: str) -> str:
    """The glob of the temporary files :func:`atomic_path` makes for ``name`` (stale after a kill)."""
    return f".{name}.*{TMP_SUFFIX}"


def os_error_reason(e: OSError) -> str:
    """``No space left on device`` -> ``no space left on device`` (for "REASON writing FILE")."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else type(e).__name__)
    return reason[:1].lower() + reason[1:]


def write_error(path: str | os.PathLike, e: BaseException) -> UserError:
    """A one-line UserError for a failed write of ``path``."""
    if isinstance(e, OSError):
        return UserError(f"{os_error_reason(e)} writing {path}")
    # torch.save straight to a file reports a short write (a full disk) as a RuntimeError from
    # its zip writer: "[enforce fail at inline_container.cc:...] . unexpected pos ...".
    free = _free_bytes(Path(path).parent)
    why = "no space left on device" if free is not None and free < 1 << 20 else "the write failed (disk full?)"
    return UserError(f"{why} writing {path}")


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _is_torch_write_failure(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, else delete it.

    An ``OSError`` while making, writing or moving the temporary file (ENOSPC, EDQUOT, EROFS,
    EACCES, ...) becomes a one-line UserError naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) or _is_torch_write_failure(e):
            raise write_error(path, e) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, header: list[str], rows: list[list[Any]]) -> None:
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def check_output_file(path: str | os.PathLike, *, option: str = "--out", overwrite: bool = False,
                      example: str = "out.csv") -> None:
    """Before any work: ``path`` can be written (its directory, or the nearest existing folder
    above it, takes a new file) and is not an existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name such as {path / example}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{option} {path} already exists; pass --overwrite to replace it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as e:
        raise UserError(f"{option} {path} cannot be written ({os_error_reason(e)} in {folder})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def read_text_file(path: str | os.PathLike, name: str, *, encoding: str = "utf-8") -> str:
    """The text of ``path``; an undecodable or unreadable file is a one-line UserError that
    starts with ``name`` (e.g. ``"config file 'c.yaml'"``)."""
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{name}: cannot be read ({e.strerror})") from None

