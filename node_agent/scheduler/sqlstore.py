"""The scheduler's state in a database (SQLite file or memory, or PostgreSQL): every operation is one transaction.

Each operation loads the rows it needs, asks ``rules`` what to do, and writes the answer in the same transaction.
Fencing is checked in the statement that writes: a renewal, events or a result update their rows only ``WHERE`` the
job's attempt, lease id, epoch and node all match a live, unexpired lease; when nothing matched, the rows are read
again only to say why. Claims lock the job row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has one writer), so
a job is assigned to at most one node however many replicas poll. Re-queues are conditional updates on the job's
attempt, so a job whose lease expired is re-queued exactly once even when every replica reaps at the same moment.

Times are seconds since the epoch on the store's clock (``Tx.now``: PostgreSQL's ``clock_timestamp()``; SQLite's
wall clock, or a test's), never a replica's, and survive restarts.

The operations are grouped by who calls them, each group a class of its own over one engine: ``Nodes`` (register,
heartbeat), ``Submissions`` (clients' jobs and audio), ``Dispatch`` (nodes' jobs, leases and reports), ``Reaper``
(what fell due), ``Cancels`` (jobs a client or operator ends), ``Operators`` (cordon, drain, the job listing and the
cluster summary), ``Identity`` (a node's secret, a job's client), ``Sections`` (long recordings' section jobs);
``Transitions`` holds what they share, ``Replica`` what this process remembers between transactions. ``SqlStore``
puts them together behind the ``store.Store`` interface.
"""

from __future__ import annotations

import logging

from ..config import SchedulerSettings
from .cancel import Cancels
from .db import Engine, PostgresEngine
from .dispatch import Dispatch
from .metrics import SchedulerMetrics
from .migrations import LATEST, migrate
from .nodes import Nodes
from .identity import Identity
from .operators import Operators
from .pgfast import PgFast
from .reaper import Reaper
from .replica import Replica
from .sections import Sections
from .submissions import SqlUpload, Submissions
from .transitions import Transitions

log = logging.getLogger("node_agent.scheduler")


class SqlStore:
    """Nodes, jobs, leases and audio in SQLite or PostgreSQL; any number of replicas may share a PostgreSQL store."""

    #: How often the server reaps (expired leases, vanished nodes, deadlines).
    reap_s = 0.25
    #: Long polls re-check this often even without a wake-up (jittered +-50 %): a job that the pollers woken for it
    #: could not serve (another language) waits at most about this long for a capable one. Every idle node's poll
    #: costs a transaction per period, so it is not shorter. (A lost NOTIFY is covered too, but the listener's
    #: reconnection already wakes every poll.)
    poll_s: float | None = 3.0

    def __init__(self, settings: SchedulerSettings, engine: Engine, metrics: SchedulerMetrics, *,
                 single_statements: bool = True) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.where = engine.where
        # PostgreSQL: the hot operations' common case in one statement each (pgfast.py); None on SQLite, and
        # where turned off (the store tests run PostgreSQL both ways, so the general path's common case is tested).
        fast = PgFast(engine) if isinstance(engine, PostgresEngine) and single_statements else None
        self.replica = Replica(settings, keep_devices=fast is not None)
        transitions = Transitions(settings, metrics, self.replica)
        parts = (settings, engine, metrics, self.replica, transitions)
        nodes, jobs, dispatch = Nodes(*parts, fast), Submissions(*parts, fast), Dispatch(*parts, fast)
        self._reaper = Reaper(*parts)
        self.register, self.heartbeat, self.list_nodes = nodes.register, nodes.heartbeat, nodes.list_nodes
        self.begin_upload, self.submit, self.queue_depth = jobs.begin_upload, jobs.submit, jobs.queue_depth
        self.view_job, self.job_settled, self.job_audio = jobs.view_job, jobs.job_settled, jobs.job_audio
        self.assign_next, self.post_events, self.report_result = (dispatch.assign_next, dispatch.post_events,
                                                                 dispatch.report_result)
        self.grant_lease, self.renew_lease, self.release_lease = (dispatch.grant_lease, dispatch.renew_lease,
                                                                 dispatch.release_lease)
        self.lease_state = dispatch.lease_state
        identity = Identity(*parts)
        self.node_secret, self.job_client = identity.node_secret, identity.job_client
        self.cancel_job = Cancels(*parts).cancel_job
        self.reap, self.refresh_gauges = self._reaper.reap, self._reaper.refresh_gauges
        operators = Operators(*parts)
        self.cordon, self.uncordon, self.drain = operators.cordon, operators.uncordon, operators.drain
        self.list_jobs, self.cluster = operators.list_jobs, operators.cluster
        sections = Sections(*parts)
        self.job_capacity, self.create_section, self.job_sections = (sections.capacity, sections.create_section,
                                                                    sections.sections)

    async def open(self) -> None:
        found = await self.engine.run(lambda tx: migrate(tx, self.where))
        if 0 < found < LATEST:  # an upgrade is news; a new store's creation is not
            log.info("scheduler store %s: schema migrated from version %d to %d", self.where, found, LATEST)
        log.debug("scheduler store %s ready", self.where)
        await self.reap()

    async def close(self) -> None:
        await self.engine.close()


__all__ = ["SqlStore", "SqlUpload"]
