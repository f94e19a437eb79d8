"""What one scheduler replica remembers between its store's transactions: the live nodes' offers, the queue's load,
when it last reaped, and the nodes' device lists for PostgreSQL's single statements.

Each is a shortcut that a transaction can always do without (it then reads the store), kept here so that the
operations that use it do not each keep a copy. Times are this process's monotonic clock: none of this is shared.
"""

from __future__ import annotations

import json
import math
import threading
import time

from ..config import SchedulerSettings
from .db import Tx
from .rules import Served
from .schemas import NodeState, Priority, stored_devices

#: What the admission check may be behind the live nodes (each submission would otherwise read every node).
SERVED_CACHE_S = 1.0
#: Below this share of scheduler.max_queued_jobs / max_queued_bytes, the last reaping pass's count (plus this
#: replica's submissions since) stands in for counting the unfinished jobs at each submission; nearer the bounds,
#: every submission counts them exactly.
ADMIT_ESTIMATE_BELOW = 0.9
#: No reaping pass for this long means no scheduler could reach the store (or none ran): that time is given back
#: to the live leases, since no holder could renew meanwhile (docs/protocol.md, "The store").
PAUSE_AFTER_S = 2.0
#: Device lists remembered per node for the single-statement paths (each statement checks the list is unchanged).
NODE_DEVICES_KEPT = 10000


class Replica:
    """This replica's memory of the store (see the module's docstring)."""

    def __init__(self, settings: SchedulerSettings, keep_devices: bool) -> None:
        """``keep_devices``: remember device lists (only the single statements use them)."""
        self.settings = settings
        self._keep_devices = keep_devices
        self._served: Served | None = None
        self._served_at = -math.inf
        # Gauges read at scrape time from the last reaping pass (a scrape must not wait on the database).
        self.queue_depth_seen = 0
        self.node_states_seen: dict[str, int] = {}
        self.load_seen = (0, 0)  # unfinished jobs, their bytes
        self.interactive_seen = 0  # unfinished interactive jobs
        self._load_at = -math.inf  # when load_seen was read
        self._since_load = [0, 0, 0]  # jobs, interactive jobs and bytes this replica admitted since then
        # Jobs this replica admitted whose transactions have not yet ended: job id -> (bytes, interactive). Counted
        # by the estimate and by the exact count (which other transactions' uncommitted rows do not show). The
        # lock: SQLite's admissions are decided on its writer thread.
        self._admitting: dict[str, tuple[int, bool]] = {}
        self._admitting_lock = threading.Lock()
        self._reaped_at = -math.inf  # when this replica's last reaping pass committed
        # node id -> its device list and labels as stored, as last seen here
        self._node_devices: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------------------ what live nodes serve

    async def served(self, tx: Tx, fresh: bool = False) -> Served:
        """What the live nodes serve: read again when ``fresh`` or older than ``SERVED_CACHE_S``."""
        recent = None if fresh else self.served_recently()
        if recent is not None:
            return recent
        # Cordoned nodes count: a cordon is an operator's pause, and a job they serve waits for it to end. Their
        # slots do not (nor a draining node's): the interactive headroom is a share of the slots that take jobs.
        # A cluster is nodes of a few kinds: each distinct (devices, labels) comes once, with how many nodes have it
        # (every reaping pass reads this, in the store's write transaction: parsing and comparing 200 identical
        # nodes' device lists, each naming ~100 languages, held the writer for 2 ms of every pass).
        rows = await tx.fetch(
            "SELECT devices, labels, cordoned, state, COUNT(*) AS n FROM nodes "
            f"WHERE state <> '{NodeState.GONE}' GROUP BY devices, labels, cordoned, state")
        self._served = served = Served.of(
            ((stored_devices(r["devices"]), json.loads(r["labels"])) for r in rows),
            taking=(not r["cordoned"] and r["state"] != NodeState.DRAINING for r in rows),
            counts=(int(r["n"]) for r in rows))
        self._served_at = time.monotonic()
        return served

    def served_recently(self) -> Served | None:
        """What the live nodes serve, when read within ``SERVED_CACHE_S`` (no transaction needed), else None."""
        if self._served is None or time.monotonic() - self._served_at > SERVED_CACHE_S:
            return None
        return self._served

    def forget_served(self) -> None:
        """A node came or went: read what is served again at the next admission."""
        self._served = None

    # --------------------------------------------------------------------------------------------- load

    def load_estimate(self, size: int, priority: str) -> tuple[int, int, int] | None:
        """(unfinished jobs, of them interactive, their bytes) from the last count when a job of ``priority`` and
        ``size`` is far from its bounds (its class's cap and the bytes), else None: count now."""
        if time.monotonic() - self._load_at > SERVED_CACHE_S:
            return None
        with self._admitting_lock:
            pending = list(self._admitting.values())
        jobs = self.load_seen[0] + self._since_load[0] + len(pending)
        interactive = self.interactive_seen + self._since_load[1] + sum(1 for _, i in pending if i)
        audio_bytes = self.load_seen[1] + self._since_load[2] + sum(size for size, _ in pending)
        s = self.settings
        if priority == Priority.INTERACTIVE:
            far = interactive + 1 < ADMIT_ESTIMATE_BELOW * s.max_queued_interactive_jobs
        else:
            far = jobs + 1 < ADMIT_ESTIMATE_BELOW * s.max_queued_jobs
        if far and audio_bytes + size < ADMIT_ESTIMATE_BELOW * s.max_queued_bytes:
            return jobs, interactive, audio_bytes
        return None

    def admitting(self, job_id: str, size: int, priority: str) -> None:
        """A job was admitted; its transaction is under way (``settled`` follows, whatever its outcome). Called
        right after the admission check, with nothing awaited between, so the next check counts it."""
        with self._admitting_lock:
            self._admitting[job_id] = (size, priority == Priority.INTERACTIVE)

    def in_flight(self) -> tuple[list[str], int, int]:
        """The jobs admitted here whose transactions have not ended (their ids), how many are interactive, and
        their bytes."""
        with self._admitting_lock:
            pending = dict(self._admitting)
        return list(pending), sum(1 for _, i in pending.values() if i), sum(size for size, _ in pending.values())

    def settled(self, job_id: str, committed: bool) -> None:
        """The transaction of a job ``admitting`` named ended: committed (it now counts as admitted since the
        last count) or not (it never was)."""
        with self._admitting_lock:
            pending = self._admitting.pop(job_id, None)
        if pending is not None and committed:
            self._since_load[0] += 1
            self._since_load[1] += int(pending[1])
            self._since_load[2] += pending[0]

    def counted(self, node_states: dict[str, int], jobs: int, audio_bytes: int, queued: int,
                interactive: int = 0) -> None:
        """A reaping pass (or a scrape) read the gauges' values (``interactive``: unfinished interactive jobs)."""
        self.node_states_seen = node_states
        self.load_seen = (jobs, audio_bytes)
        self.interactive_seen = interactive
        self.queue_depth_seen = queued

    def reaped(self) -> None:
        """This replica's reaping pass committed. Called on the event loop (the transaction may have run on the
        SQLite writer thread): admissions from now on add to the count just read; one that committed meanwhile
        is missed, which ADMIT_ESTIMATE_BELOW's margin covers."""
        self._load_at = self._reaped_at = time.monotonic()
        self._since_load = [0, 0, 0]

    def fresh_reap(self) -> bool:
        """This replica's own reaping pass ran just now: no store pause can be pending."""
        return time.monotonic() - self._reaped_at < PAUSE_AFTER_S / 2

    # ----------------------------------------------------------------------------- device lists (PostgreSQL)

    def remember_devices(self, node_id: str, devices: str, labels: str = "{}") -> None:
        """A node's device list and labels as stored (the single statements check both are unchanged)."""
        if not self._keep_devices:
            return
        if len(self._node_devices) >= NODE_DEVICES_KEPT and node_id not in self._node_devices:
            self._node_devices.clear()  # node churn: start again (each entry is re-read on a node's next poll)
        self._node_devices[node_id] = (devices, labels)

    def devices_of(self, node_id: str) -> str | None:
        known = self._node_devices.get(node_id)
        return known[0] if known is not None else None

    def labels_of(self, node_id: str) -> str | None:
        known = self._node_devices.get(node_id)
        return known[1] if known is not None else None
