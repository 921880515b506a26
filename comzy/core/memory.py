"""glibc malloc settings for a process that moves bulk data (comzy-server and the agent).

Each message on the agent link (up to 512 KiB) is a fresh allocation. glibc serves
allocations of 128 KiB and more from its own mmap, or, once its dynamic threshold has risen,
from the heap, which it trims back to the system as soon as 128 KiB are free at its top:
either way every message lands on fresh pages. Measured on a 1 GiB download through the tunnel:
100,000-290,000 minor page faults per GiB, 0.3-1 s of system CPU per GiB in each process, and
most of the run-to-run noise. With a 1 MiB mmap threshold and a 4 MiB trim threshold the
pages are reused: about 1,500 faults per GiB, and the server's CPU per GiB fell by about a
third (docs/benchmarks.md). The cost is up to 4 MiB of freed heap kept per malloc arena (one
per thread that allocates, in practice the main thread and a few workers).

Both values are set together: setting only the trim threshold turns glibc's dynamic mmap
threshold off and made things three times worse. Other C libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger("comzy.memory")

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap, whose freed pages are reused.
MMAP_THRESHOLD = 1024 * 1024
#: Freed memory at the top of the heap is given back to the system only past this.
TRIM_THRESHOLD = 4 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the settings above when the C library is glibc; whether they were applied.

    An operator's own setting wins: nothing is changed when MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, or a ``glibc.malloc.mmap_threshold`` / ``trim_threshold`` in
    GLIBC_TUNABLES is set.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
            or "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # glibc only: elsewhere mallopt may mean something else
        version.restype = ctypes.c_char_p
        version()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc: mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD, TRIM_THRESHOLD,
              "applied" if applied else "refused")
    return applied


#: The garbage collector's thresholds for both processes: a young collection every 10,000
#: allocations instead of 700. Both keep many long-lived objects (the server its tunnels, the agent
#: the inspector's exchanges) and make few cycles per request; with the defaults the agent spent
#: 6-9% of its CPU in the collector under load (measured with gc.callbacks, 2026-12-07), and the
#: server ~30% of it while 10,000 agents registered.
GC_THRESHOLDS = (10_000, 10, 100)


def tune_gc() -> None:
    """Apply ``GC_THRESHOLDS``."""
    gc.set_threshold(*GC_THRESHOLDS)

