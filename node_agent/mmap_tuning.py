"""glibc malloc tuning for the agent process (not its workers).

The agent moves audio bodies of a few MB (download from the scheduler, frame to the worker). glibc serves such
blocks with mmap and, after the first one is freed, raises its mmap threshold to that size (the "dynamic
threshold"), so every later audio buffer comes from the heap instead, where a few long-lived small objects
pin the freed space: RSS climbs by tens of MiB over a soak while the Python heap stays flat (tracemalloc,
docs/reliability.md). Pinning the threshold keeps multi-MB buffers on mmap, returned to the OS on free.

Workers are left alone: what was measured is the agent's growth, a worker's RSS is already bounded by
recycling (``worker.max_rss_bytes``), and CTranslate2's allocation pattern under a fixed threshold is not what
this fix was measured with. Setting this with ``mallopt`` rather than ``MALLOC_MMAP_THRESHOLD_`` keeps it out of
the environment the workers inherit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's default, now fixed


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold; True when applied, False elsewhere (musl, macOS) or on failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; keeping glibc's dynamic threshold")
    return ok
