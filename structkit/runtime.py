"""Process-level settings that make CPU training measurably faster.

glibc returns every freed block larger than its mmap threshold to the kernel, so each new large tensor is
page-faulted in again: on this project's 2-core machine a fresh 11M-element ``x * x`` took 17 ms against 3 ms
into reused memory. :func:`reuse_freed_memory` raises glibc's mmap and trim thresholds so freed memory is
reused (the effect PyTorch's CPU tuning guide gets from jemalloc/tcmalloc). It changes the whole process
(the resident size stays at its peak), so it is an opt-in: nothing in structkit calls it, the ``structkit``
command included (its runs, and ``benchmarks/solver_overhead.py``, use the default allocator a user gets); call it
yourself at the start of a training script. ``STRUCTKIT_NO_MALLOC_TUNING=1`` turns it into a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks up to ``threshold_bytes`` for reuse. Returns True if applied (False on
    non-glibc platforms, where nothing changes, or when ``STRUCTKIT_NO_MALLOC_TUNING`` is set)."""
    if os.environ.get("STRUCTKIT_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))
    ok_trim = mallopt(_M_TRIM_THRESHOLD, int(2 * threshold_bytes))
    return bool(ok_mmap and ok_trim)
