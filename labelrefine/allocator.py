"""Keep freed tensor memory in the process (glibc), so that CPU training does not page-fault.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (at
most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free, so each large
activation of every training step is new memory that the kernel must fault in and zero page by
page, and the kernel's time, not the model's, grows with the batch.

:func:`tune_allocator` tells glibc (``mallopt``) to serve large blocks from its heap and never to
trim the heap, so freed blocks are reused (measured by ``scripts/allocator_bench.py``, its table in
docs/research/dividemix-cost.md: a batch-1024 step of the airbench net 1.17 -> 0.95 s on a 2-core
Xeon). The numbers computed do not change (only where the memory lives); the cost is that the
process keeps its peak heap until it exits. Applied once per
process by :func:`labelrefine.pipeline.run` and the CLI, on Linux with glibc only; set
``LABELREFINE_MALLOC=system`` to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("labelrefine")

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Apply the settings above once; True when they are in force in this process."""
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if os.environ.get("LABELREFINE_MALLOC", "").strip().lower() != "system" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # mallopt returns 1 on success
            tuned = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("allocator: %s", "glibc heap kept (no mmap, no trim)" if tuned else "left as it is")
    _state["tuned"] = tuned
    return tuned
