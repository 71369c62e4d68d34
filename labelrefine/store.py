"""Checksummed, code-free torch files: checkpoints, ``model.pt`` and the two caches.

Every torch file labelrefine reads back is written by :func:`save` and read by :func:`load`.
A file is one header line followed by the payload::

    labelrefine-store-v1 <kind> <payload length, 20 digits> <sha256 of the payload, hex>\\n
    <payload: torch.save's zip archive of tensors and plain containers>

:func:`load` checks the magic, the kind (the file's format, e.g. ``labelrefine-checkpoint-v2``),
the length and the SHA-256 of the payload *before* any byte of it is unpickled, and then
unpickles it with ``torch.load(weights_only=True)``: a pickle that would import or call anything
but tensors and plain containers is refused by torch, whatever the checksum says. :func:`save`
refuses (``TypeError``) to write anything else, so every file it writes loads.

Both directions stream: the payload is hashed as torch writes it and as it is read back, so a
multi-gigabyte image cache is never held twice in memory. ``load`` hashes and unpickles through
one open file descriptor, so a file replaced (``os.replace``) in between cannot slip through.

Errors are :class:`StoreError` subclasses whose message is one line naming the file, e.g.
``checkpoint out/checkpoint.pt is damaged (SHA-256 mismatch)``; callers add the advice.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import torch

from .io import atomic_path

MAGIC = b"labelrefine-store-v1"
_MAGIC_PREFIX = b"labelrefine-store-v"
_HEADER_MAX = 200
_HEADER_RE = re.compile(rb"labelrefine-store-v1 ([a-z0-9][a-z0-9.-]{0,80}) ([0-9]{20}) ([0-9a-f]{64})\n")
_KIND_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,80}")
_CHUNK = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"


class StoreError(Exception):
    """A file that :func:`load` refuses; ``str(e)`` is one line naming the file."""

    def __init__(self, name: str, path: Path, what: str):
        self.name, self.path, self.what = name, path, what
        super().__init__(f"{name} {path} {what}")


class NotAFile(StoreError):
    """Missing, a directory, not a regular file, or unreadable (permissions, I/O error)."""


class NotOurs(StoreError):
    """No labelrefine header: not a file written by :func:`save`."""


class LegacyFile(NotOurs):
    """A plain torch file (zip) without a header: what labelrefine wrote before this module."""


class OtherFormat(StoreError):
    """A labelrefine file of another kind or format version; ``found`` is its kind."""

    def __init__(self, name: str, path: Path, what: str, found: str):
        super().__init__(name, path, what)
        self.found = found


class Damaged(StoreError):
    """Truncated, with bytes appended, a damaged header, or a checksum mismatch."""


class Undecodable(StoreError):
    """The checksum matches but the payload is not a safe torch file (foreign objects, or not torch)."""


def _family(kind: str) -> str:
    return re.sub(r"-v[0-9]+$", "", kind)


def _header(kind: str, length: int, digest: str) -> bytes:
    return b"%s %s %020d %s\n" % (MAGIC, kind.encode(), length, digest.encode())


def frame(kind: str, payload: bytes) -> bytes:
    """The bytes of a file holding ``payload`` (already serialised) as ``kind``: header + payload.

    For tests and tools that must build a file :func:`save` would refuse to write.
    """
    return _header(kind, len(payload), hashlib.sha256(payload).hexdigest()) + payload


_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj: Any, where: str = "") -> None:
    """Raise ``TypeError`` naming the first value that is not a tensor or a plain container.

    Plain: ``dict``/``OrderedDict`` (str or int keys), ``list``, ``tuple``, ``bool``, ``int``,
    ``float``, ``str``, ``bytes``, ``None``, ``torch.Tensor``/``Parameter``, ``torch.dtype``,
    ``torch.device``, ``torch.Size``. Exact types: a numpy scalar (a ``float`` subclass) is refused.
    """
    t = type(obj)
    if t in _PLAIN or t is torch.Tensor or t is torch.nn.Parameter:
        return
    if t is dict or t is collections.OrderedDict:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"store: key {k!r} at {where or 'top level'} is {type(k).__name__}, not str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if t is list or t is tuple:
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"store: the value at {where or 'top level'} is {t.__module__}.{t.__qualname__}, "
                    f"not a tensor or a plain container")


class _HashingWriter:
    """What torch.save writes into: hashes, counts and forwards to a file, remembering an OSError
    (torch turns the writer's exception into an opaque RuntimeError; :func:`save` re-raises it)."""

    def __init__(self, f):
        self.f, self.sha, self.n, self.error = f, hashlib.sha256(), 0, None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(b)
        self.n += len(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def save(path: str | os.PathLike, obj: Any, *, kind: str) -> None:
    """Write ``obj`` (tensors and plain containers only: :func:`check_plain`) to ``path`` atomically.

    A failed write (a full disk) re-raises the ``OSError`` of the failing ``write`` (not torch's
    opaque ``RuntimeError``), which :func:`labelrefine.io.atomic_path` turns into a one-line
    :class:`~labelrefine.errors.UserError` naming ``path``; ``path`` is then untouched.
    """
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"store: bad kind {kind!r}")
    check_plain(obj)
    placeholder = _header(kind, 0, "0" * 64)
    with atomic_path(path) as tmp, open(tmp, "r+b") as f:
        f.write(placeholder)
        w = _HashingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise
        header = _header(kind, w.n, w.sha.hexdigest())
        assert len(header) == len(placeholder)
        f.seek(0)
        f.write(header)
        f.flush()
        os.fsync(f.fileno())


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes of ``f`` from ``start`` (what torch.load reads)."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _open(path: Path, name: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotAFile(name, path, "does not exist") from None
    except OSError as e:
        raise NotAFile(name, path, f"cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise NotAFile(name, path, "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(name, path, "is not a regular file")
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise NotAFile(name, path, f"cannot be read ({e.strerror})") from None


def _read_header(f, path: Path, name: str, kind: str) -> tuple[int, int, str]:
    """(header length, payload length, hex digest) after checking magic and kind."""
    head = f.read(_HEADER_MAX)
    if not head:
        raise Damaged(name, path, "is empty")
    if head.startswith(_ZIP_MAGIC):
        raise LegacyFile(name, path, "is a plain torch file without labelrefine's checksum header (written by an "
                                     "older labelrefine, or not by labelrefine)")
    if not head.startswith(_MAGIC_PREFIX):
        raise NotOurs(name, path, "is not a labelrefine file")
    if not head.startswith(MAGIC + b" "):
        version = head[len(_MAGIC_PREFIX):].split(b" ", 1)[0][:20].decode("ascii", "replace")
        raise OtherFormat(name, path, f"was written by another labelrefine version (file format v{version}, this "
                                      f"version reads {MAGIC.decode()})", found="")
    end = head.find(b"\n")
    m = _HEADER_RE.fullmatch(head[: end + 1]) if end >= 0 else None
    if m is None:
        raise Damaged(name, path, "is damaged (unreadable header)")
    found = m.group(1).decode()
    if found != kind:
        if _family(found) == _family(kind):
            raise OtherFormat(name, path, f"was written by another labelrefine version (format {found}, this "
                                          f"version reads {kind})", found=found)
        raise OtherFormat(name, path, f"is a {found} file, not a {kind} file", found=found)
    return end + 1, int(m.group(2)), m.group(3).decode()


def load(path: str | os.PathLike, *, kind: str, name: str) -> Any:
    """The object :func:`save` wrote to ``path`` as ``kind``, loaded on the CPU.

    ``name`` says what the file is in messages ("checkpoint", "model file", ...). Raises a
    :class:`StoreError` subclass; nothing of the payload is unpickled before its length and
    SHA-256 have been checked, and then only tensors and plain containers (``weights_only``).
    """
    path = Path(path)
    with _open(path, name) as f:
        try:
            start, length, digest = _read_header(f, path, name, kind)
            size = os.fstat(f.fileno()).st_size
            have = size - start
            if have < length:
                raise Damaged(name, path, f"is truncated ({have} of {length} payload bytes)")
            if have > length:
                raise Damaged(name, path, f"is damaged ({have - length} bytes after the end of its payload)")
            f.seek(start)
            sha, left = hashlib.sha256(), length
            buf = bytearray(_CHUNK)
            while left:
                got = f.readinto(memoryview(buf)[: min(left, _CHUNK)])
                if not got:
                    raise Damaged(name, path, "is truncated (it shrank while being read)")
                sha.update(memoryview(buf)[:got])
                left -= got
            if sha.hexdigest() != digest:
                raise Damaged(name, path, "is damaged (SHA-256 checksum mismatch)")
        except OSError as e:
            raise NotAFile(name, path, f"cannot be read ({e.strerror or type(e).__name__})") from None
        try:
            return torch.load(io.BufferedReader(_Window(f, start, length), _CHUNK), map_location="cpu",
                              weights_only=True)
        except pickle.UnpicklingError as e:
            raise _unsafe(name, path, e) from None
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise Undecodable(name, path, f"is not a valid torch file ({type(e).__name__}: {first})") from None


def _unsafe(name: str, path: Path, e: pickle.UnpicklingError) -> Undecodable:
    """torch's weights_only unpickler refused the payload: say which global it asked for."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e), flags=re.IGNORECASE)
    why = f"it asks for {m.group(1)[:80]}" if m else "refused by weights_only loading"
    return Undecodable(name, path, f"holds objects other than tensors and plain containers ({why}); "
                                   f"refused without running it")


def load_legacy(path: str | os.PathLike, *, name: str) -> Any:
    """A plain torch file (no header, no checksum) loaded with ``weights_only=True``.

    Only for formats that were always loaded that way (``labelrefine-model-v1``); it can run no
    code, but damage to it goes undetected.
    """
    path = Path(path)
    with _open(path, name) as f:
        try:
            return torch.load(io.BufferedReader(f, _CHUNK), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _unsafe(name, path, e) from None
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise Undecodable(name, path, f"is unreadable ({type(e).__name__}: {first})") from None
