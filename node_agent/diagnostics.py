"""Operator diagnostics that cost nothing unless asked for.

``kill -USR1 <agent pid>`` logs where the agent's Python memory sits. With tracing on
(``PYTHONTRACEMALLOC=1``, or ``-X tracemalloc``) the first signal records a baseline and each later one logs
the allocation sites that grew most since it, which tells a Python-level leak (a site that keeps growing)
from allocator fragmentation (RSS up, traced sizes flat). Without tracing it logs the interpreter's own
counters only, so the handler is safe to leave installed in production.
"""

from __future__ import annotations

import gc
import logging
import sys
import tracemalloc

log = logging.getLogger(__name__)

TOP = 12


class MemoryReport:
    """Baseline-and-compare over tracemalloc snapshots; one instance per process."""

    def __init__(self) -> None:
        self._baseline: tracemalloc.Snapshot | None = None

    def __call__(self) -> None:
        log.info("memory: gc objects %d, gc counts %s, allocated blocks %d", len(gc.get_objects()),
                 gc.get_count(), sys.getallocatedblocks())
        if not tracemalloc.is_tracing():
            log.info("memory: tracemalloc is off (start with PYTHONTRACEMALLOC=1 for allocation sites)")
            return
        snap = tracemalloc.take_snapshot().filter_traces((tracemalloc.Filter(False, tracemalloc.__file__),))
        current, peak = tracemalloc.get_traced_memory()
        log.info("memory: traced %.1f MiB (peak %.1f MiB)", current / 2**20, peak / 2**20)
        if self._baseline is None:
            self._baseline = snap
            log.info("memory: baseline recorded; send USR1 again to see growth since now")
            return
        # One record for the whole list, so that a reader of the log sees the report complete or not at all.
        growth = snap.compare_to(self._baseline, "lineno")[:TOP]
        log.info("memory growth since the baseline, top %d:\n%s", TOP, "\n".join(f"  {s}" for s in growth))
