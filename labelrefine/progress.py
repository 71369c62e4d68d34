"""Progress reporting that library code can use without printing.

Library code wraps long loops in :func:`progress`. What the user sees is decided by the CLI
through :func:`configure`:

* ``"auto"`` (the default): a tqdm bar with an ETA when stderr is a TTY, otherwise plain
  log lines at roughly every 10% of the work;
* ``"bar"`` / ``"log"``: force one of the two;
* ``"off"``: nothing.

Library callers who never call :func:`configure` get log records on the ``labelrefine``
logger only, which Python discards unless they set up logging.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("labelrefine")

T = TypeVar("T")

_MODE = "log"
LOG_INTERVAL = 5.0  # seconds between plain progress lines


class TqdmLoggingHandler(logging.StreamHandler):
    """Writes log records above any active tqdm bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging break a run
            self.handleError(record)


def mode() -> str:
    return _MODE


def configure(mode: str = "auto") -> None:
    """Choose how :func:`progress` reports: ``auto``, ``bar``, ``log`` or ``off``."""
    global _MODE
    if mode not in {"auto", "bar", "log", "off"}:
        raise ValueError(f"unknown progress mode {mode!r}")
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    _MODE = mode


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             inner: bool = False) -> Iterator[T]:
    """Iterate over ``iterable`` while reporting progress as configured.

    ``inner`` marks a loop nested in one that already reports (the batches of an epoch): it
    gets a bar on a terminal but no plain log lines, which would only repeat the outer ones.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if _MODE == "bar":
        from tqdm.auto import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        return
    if _MODE == "off" or not total or inner:
        yield from iterable
        return
    start = last = time.perf_counter()
    step = max(1, total // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if i % step == 0 or i == total:
            now = time.perf_counter()
            # Quiet for quick loops; at most one line per LOG_INTERVAL seconds for long ones.
            if now - last < LOG_INTERVAL and i != total or now - start < LOG_INTERVAL:
                continue
            last = now
            elapsed = now - start
            eta = elapsed / i * (total - i)
            log.info("%s: %d/%d %s (%.0f%%, %.1fs elapsed, ETA %.1fs)", desc, i, total, unit,
                     100.0 * i / total, elapsed, eta)
