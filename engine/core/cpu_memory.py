"""Large CPU allocations without page faults: glibc's malloc settings for sampling.

glibc serves every allocation above its mmap threshold (at most 32 MB by default) with a fresh
mmap, so each large op output is zeroed page by page by the kernel before the op writes it. At
MAR-B batch 16 (fc1 outputs of 126 MB) that costs more than the op: on the development Xeon a
loop of F.gelu on [10240, 3072] took 84 ms a call with glibc's defaults and 18 ms (one page fault
in five calls instead of 92 000) with mmap off and the trim threshold at 1 GB: freed blocks stay
in the heap and, once glibc's heap has settled (a few calls: its 64-byte aligned blocks need a
neighbour to coalesce with), every later output reuses them. The process keeps its peak memory instead of
returning it to the system, which is what an inference process wants (jemalloc / tcmalloc, which
PyTorch recommends for CPU inference, behave alike). Applied once per process when the native
CPU backend binds a head; ENGINE_MALLOC_TUNE=0 leaves malloc alone. glibc on Linux only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD_BYTES = 1 << 30

_lock = threading.Lock()
_state: dict = {}


def keep_large_allocations() -> bool:
    """Serve large allocations from the heap and keep freed memory up to 1 GB; once per process.
    True when the settings are in effect."""
    with _lock:
        if "applied" not in _state:
            _state["applied"] = _apply()
        return _state["applied"]


def _apply() -> bool:
    if os.environ.get("ENGINE_MALLOC_TUNE", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  glibc only (musl's mallopt is a no-op)
    except (OSError, AttributeError):
        return False
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
