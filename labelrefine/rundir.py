"""The run directory: claim it first, check what it holds, clean up after ourselves.

A run claims its output directory before anything slow happens (the CLI does it before it
imports torch or loads data): it creates the directory (and its parents) and takes an exclusive
``flock`` on ``DIR/.labelrefine.lock``, which holds the run's PID. The lock is held for the whole
run and released on exit (the kernel releases it when the process dies, so a killed run leaves
no lock behind, only a stale file that the next claim reuses). A second run on the same
directory gets a one-line error naming the holder's PID. Creating the lock file also proves the
directory is writable: a read-only file system, a path under ``/proc`` or a path below a regular
file is a one-line error before any data is loaded.

Under ``torchrun`` only rank 0 writes, so only rank 0 claims (``RANK`` in the environment).

Stdlib only: this module must stay cheap to import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .io import os_error_reason, tmp_pattern, write_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("labelrefine")

LOCK_NAME = ".labelrefine.lock"
#: The files a run writes, in the order it writes them. ``summary.json`` is written last: its
#: presence (with the planned config's hash) is what marks a run finished (``bench`` reuses it).
ARTIFACTS = ("config.yaml", "metrics.jsonl", "labels.csv", "summary.json", "model.pt", "report.html",
             "checkpoint.pt")
FINISHED_MARKER = "summary.json"
REPORT_FILES = ("accuracy.png", "labels.png", "confusion.png", "precision_recall.png")  # labelrefine.report's PNGs
#: Every file of ours a run directory can hold (besides the lock and temporary files).
RUN_FILES = ARTIFACTS + REPORT_FILES


def is_writer() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one process that writes the run."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@dataclass
class _Claim:
    fd: int | None
    lock: Path
    created: list[Path] = field(default_factory=list)  # directories this claim made, outermost first
    depth: int = 1
    pid: int = field(default_factory=os.getpid)


_held: dict[str, _Claim] = {}


def _drop_in_child() -> None:
    """After a fork (the decode pool, DataLoader workers): the child must not keep the lock.

    flock belongs to the open file description, which a forked child shares: a child outliving a
    killed parent would hold the directory. Closing the child's descriptor (never LOCK_UN, which
    would release the parent's lock too) leaves the parent the only holder.
    """
    for c in _held.values():
        if c.fd is not None:
            with contextlib.suppress(OSError):
                os.close(c.fd)
            c.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


def _read_pid(lock: Path) -> str:
    """The PID in the lock file; the holder writes it just after it takes the lock, so wait a little."""
    for _ in range(50):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = lock.read_text(encoding="ascii").strip()
            if text.isdigit():
                return text
        time.sleep(0.02)
    return "unknown"


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; return the ones made here (outermost first)."""
    missing = []
    p = out
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        missing.append(p)
        p = p.parent
    if missing and not p.is_dir():
        raise UserError(f"output directory {out} cannot be created: {p} is not a directory")
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                _remove_dirs(created)
                raise UserError(f"output path {d} exists and is not a directory") from None
        except OSError as e:
            _remove_dirs(created)
            raise UserError(f"output directory {out} cannot be created ({os_error_reason(e)})") from None
        else:
            created.append(d)
    return created


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def _lock(out: Path, created: list[Path]) -> _Claim:
    lock = out / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            _remove_dirs(created)
            raise UserError(f"output directory {out} is not writable ({os_error_reason(e)})") from None
        if fcntl is None:  # pragma: no cover
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"output directory {out} is in use by another labelrefine run (PID {_read_pid(lock)}); "
                            f"wait for it to end or choose another --out") from None
        except OSError as e:  # a file system without locks: run unlocked rather than not at all
            log.warning("%s: cannot lock %s (%s): two runs into this directory would not be stopped",
                        out, lock, os_error_reason(e))
            break
        # The holder we waited for may have removed the file on exit: then lock the new one.
        try:
            st = os.stat(lock)
            here = os.fstat(fd)
            if (st.st_ino, st.st_dev) == (here.st_ino, here.st_dev):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError as e:
        _unlock(_Claim(fd, lock, created), failed=True)
        raise write_error(lock, e) from None
    return _Claim(fd, lock, created)


def _unlock(c: _Claim, *, failed: bool) -> None:
    if c.pid != os.getpid():
        return  # a forked child unwinding the parent's stack: the parent still holds the claim
    with contextlib.suppress(OSError):
        c.lock.unlink()  # while still locked: a waiting claimant then sees another inode and retries
    if c.fd is not None:
        os.close(c.fd)
    if failed:
        _remove_dirs(c.created)  # only if empty: a run that wrote something keeps it for --resume


@contextlib.contextmanager
def claim(out: str | os.PathLike, *, writer: bool | None = None) -> Iterator[None]:
    """Hold ``out`` for this process: create it, lock it, release it on exit.

    Re-entrant within a process (the CLI claims before its slow imports, :func:`labelrefine.pipeline.run`
    claims again). If the body fails, the directories the claim created are removed again when
    they are empty, so a refused or failed command leaves nothing behind. ``writer`` (default:
    :func:`is_writer`) False makes it a no-op (torchrun ranks other than 0).
    """
    out = Path(out)
    if writer is None:
        writer = is_writer()
    if not writer:
        yield
        return
    key = os.path.realpath(out)
    held = _held.get(key)
    if held is not None:
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    c = _lock(out, _make_dirs(out))
    _held[key] = c
    failed = True
    try:
        yield
        failed = False
    finally:
        _held.pop(key, None)
        _unlock(c, failed=failed)


def made_by_claim(out: Path) -> bool:
    """This process's claim on ``out`` created the directory (it did not exist before)."""
    held = _held.get(os.path.realpath(out))
    return held is not None and any(os.path.realpath(d) == os.path.realpath(out) for d in held.created)


def holds_run(out: Path) -> bool:
    return (out / "checkpoint.pt").exists() or (out / "config.yaml").exists()


def is_unstarted(out: Path) -> bool:
    """``out`` is empty or holds only what a run killed before its first write leaves (the lock,
    temporary files of ours)."""
    if not out.is_dir():
        return False
    tmp = {p.name for name in RUN_FILES for p in out.glob(tmp_pattern(name))}
    return all(p.name == LOCK_NAME or p.name in tmp for p in out.iterdir())


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The output directory suits the request: a new run, ``--resume`` or ``--overwrite``.

    With ``resume``, a directory that existed before this claim but holds no run yet (empty, or
    only the lock and temporary files of a run killed during its imports or data load) is a fresh
    start; a directory that did not exist is refused (nothing ever claimed it: a typo?).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if resume:
        if not holds_run(out) and (made_by_claim(out) or not out.exists() or not is_unstarted(out)):
            raise UserError(f"--resume: {out} holds no run to resume (no checkpoint.pt)")
        return
    existing = [a for a in ARTIFACTS if (out / a).exists()]
    if existing and not overwrite:
        raise UserError(f"output directory {out} already holds a run ({existing[0]}); "
                        f"pass --resume to continue it or --overwrite to replace it")
    odd = [out / a for a in RUN_FILES if (out / a).exists() and not (out / a).is_file()]
    if odd and overwrite:
        raise UserError(f"--overwrite: {odd[0]} is not a regular file; remove it yourself")


def remove_stale_tmp(out: Path) -> list[Path]:
    """Delete the temporary files a run killed mid-write left (``.checkpoint.pt.*.tmp``, ...).

    Only call this while holding the claim: then no write of ours is in flight in ``out``.
    """
    removed = []
    for name in RUN_FILES:
        for p in out.glob(tmp_pattern(name)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted write", out, len(removed))
    return removed


def clear_run(out: Path) -> None:
    """``--overwrite``: delete every file of ours in ``out`` (artifacts, report PNGs, temporary
    files); other files are left alone."""
    for name in RUN_FILES:
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
        elif p.exists():
            raise UserError(f"--overwrite: {p} is not a regular file; remove it yourself")
    remove_stale_tmp(out)
