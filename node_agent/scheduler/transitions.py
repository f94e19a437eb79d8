"""The store's transitions that several operations share, each written once, run inside the caller's transaction:
a node released, a lease granted, expired or ended, a job re-queued or finished, a pause given back to the leases.

Every write is conditional on what the caller read (the job's attempt, the lease's state), so a transition that
several replicas attempt at the same moment happens once. ``rules`` decides; these write what it decided.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any, Iterable

from ..config import SchedulerSettings
from .db import Engine, Row, Tx, sql_list
from .errors import NodeNotFound, ReportRejected, UnknownJob
from .metrics import SchedulerMetrics
from .migrations import jobs_in
from .pgfast import PgFast
from .replica import PAUSE_AFTER_S, Replica
from . import rules
from .rules import Holder, check_holder
from .schemas import OPEN_JOB_STATES, TERMINAL_JOB_STATES, DeviceSpec, JobErrorInfo, SectionSummary, stored_devices
from .schemas import JobState as J
from .schemas import LeaseState as L
from .schemas import NodeState as N
from .topics import QUEUE_TOPIC, job_topic, sections_topic

log = logging.getLogger("node_agent.scheduler")

OPEN = sql_list(OPEN_JOB_STATES)
TERMINAL = sql_list(sorted(TERMINAL_JOB_STATES))


def _holder(job: Row, lease: Row | None) -> Holder:
    live = lease is not None and lease["state"] == L.ACTIVE
    return Holder(
        job_id=job["job_id"],
        terminal=job["state"] in TERMINAL_JOB_STATES,
        state=job["state"],
        attempt=job["attempt"],
        lease_id=lease["lease_id"] if live else None,  # type: ignore[index]
        epoch=lease["epoch"] if live else None,  # type: ignore[index]
        node_id=lease["node_id"] if live else None,  # type: ignore[index]
    )


def unknown_job(job_id: str) -> UnknownJob:
    return UnknownJob(f"job {job_id} is not known (never submitted, or finished and forgotten)")


def doc(model: Any) -> str:
    """A model as JSON text, escaped to ASCII: user text may hold lone surrogates that UTF-8 cannot encode."""
    return json.dumps(model.model_dump(mode="json"))


def devices_of(text: str) -> list[DeviceSpec]:
    return list(stored_devices(text))


def section_summary(row: Row) -> SectionSummary:
    """A section child's row as its parent's views list it."""
    return SectionSummary(index=row["section"], job_id=row["job_id"], state=row["state"], node_id=row["node_id"],
                          offset_s=row["offset_s"], duration_s=row["duration_s"])


async def section_summaries(tx: Tx, parents: Iterable[Row]) -> dict[str, list[SectionSummary]]:
    """The sections of each parent's current attempt, by index, for the job views; a job never split (most) costs
    nothing (``sections_made`` 0: no query)."""
    attempts = {p["job_id"]: p["attempt"] for p in parents if p["sections_made"]}
    if not attempts:
        return {}
    rows = await tx.fetch(
        "SELECT job_id, state, node_id, parent_id, parent_attempt, section, offset_s, duration_s FROM jobs "
        f"WHERE parent_id IN ({tx.dialect.json_strings.format(p='$1')}) ORDER BY parent_id, section",
        json.dumps(sorted(attempts)))
    found: dict[str, list[SectionSummary]] = {}
    for row in rows:
        if row["parent_attempt"] == attempts[row["parent_id"]]:
            found.setdefault(row["parent_id"], []).append(section_summary(row))
    return found


class Transitions:
    """The shared transitions (see the module's docstring), for one store's settings and metrics."""

    def __init__(self, settings: SchedulerSettings, metrics: SchedulerMetrics, replica: Replica) -> None:
        self.settings = settings
        self.metrics = metrics
        self.replica = replica

    async def release_node(self, tx: Tx, node_id: str, now: float, why: str) -> None:
        """The node is gone (or restarted): expire its live leases and re-queue what it was assigned."""
        for lease in await tx.fetch(f"SELECT * FROM leases WHERE node_id = $1 AND state = '{L.ACTIVE}'", node_id):
            await self.expire(tx, lease, now, "node_gone")
        for job in await tx.fetch(f"SELECT * FROM jobs WHERE node_id = $1 AND {jobs_in([J.ASSIGNED])}", node_id):
            await self.requeue_or_fail(tx, job, now, "node_gone", "worker_unavailable", f"node {node_id} {why}")

    @staticmethod
    async def live_node(tx: Tx, node_id: str) -> Row:
        node = await tx.fetchrow("SELECT node_id, state, devices FROM nodes WHERE node_id = $1", node_id)
        if node is None or node["state"] == N.GONE:
            why = "is gone (missed its heartbeats)" if node is not None else "is not registered"
            raise NodeNotFound(f"node {node_id} {why}; register again")
        return node

    @staticmethod
    async def job(tx: Tx, job_id: str, lock: bool = False) -> Row:
        job = await tx.fetchrow(
            "SELECT * FROM jobs WHERE job_id = $1" + (" FOR UPDATE" if lock and tx.dialect.skip_locked else ""),
            job_id,
        )
        if job is None:
            raise unknown_job(job_id)
        return job

    async def why_rejected(self, tx: Tx, job_id: str, attempt: int, lease_id: str, epoch: int, node_id: str,
                            now: float) -> ReportRejected:
        """Why a fenced write matched nothing: the first field that does not name the current holder."""
        job = await self.job(tx, job_id)
        lease = await tx.fetchrow("SELECT * FROM leases WHERE lease_id = $1", job["lease_id"]) \
            if job["lease_id"] is not None else None
        try:
            check_holder(_holder(job, lease), attempt, lease_id, epoch, node_id)
        except ReportRejected as exc:
            return exc
        return ReportRejected(f"lease {lease_id} of job {job_id} expired", code="stale_epoch")

    @staticmethod
    async def cancelled(tx: Tx, job_id: str) -> ReportRejected | None:
        """The refusal a holder of a cancelled job gets (renewal, events, result); None for any other job. Its own
        code (``job_cancelled``), so the node stops the decode between two segments and reports nothing, instead of
        taking it for a lost lease."""
        job = await tx.fetchrow("SELECT state, cancelled_by FROM jobs WHERE job_id = $1", job_id)
        if job is None or job["state"] != J.CANCELLED:
            return None
        return ReportRejected(f"job {job_id} was cancelled by {job['cancelled_by']}", code="job_cancelled")

    @staticmethod
    async def resource_holder(tx: Tx, node_id: str, resource: str) -> Row | None:
        """The live lease on ``resource`` of ``node_id``, if any."""
        return await tx.fetchrow(
            "SELECT lease_id, job_id, expires_at FROM leases WHERE node_id = $1 AND resource = $2 "
            f"AND state = '{L.ACTIVE}'", node_id, resource,
        )

    async def lease(self, tx: Tx, now: float, node_id: str, job: Row, resource: str, ttl: float) -> tuple[str, int]:
        """Grant ``job`` (assigned to ``node_id``) a lease on ``resource``, whose holder the caller checked: the
        job runs under it. (lease id, epoch)."""
        # The same job asks again (a retry after a lost answer, or another device): its older lease is fenced off
        # so only the newest epoch can report.
        if job["lease_id"] is not None:
            await self.end_leases(tx, job["job_id"], L.SUPERSEDED, now)
        epoch = await tx.next_value("lease_epochs")
        lease_id = f"lease-{secrets.token_hex(8)}"
        await tx.execute(
            f"""INSERT INTO leases (lease_id, node_id, job_id, attempt, resource, epoch, ttl_s, granted_at,
                   expires_at, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '{L.ACTIVE}')""",
            lease_id, node_id, job["job_id"], job["attempt"], resource, epoch, ttl, now, now + ttl,
        )
        await tx.execute(
            f"""UPDATE jobs SET state = '{J.RUNNING}', resource = $2, lease_id = $3, lease_epoch = $4,
                   started_at = COALESCE(started_at, $5) WHERE job_id = $1""",
            job["job_id"], resource, lease_id, epoch, now,
        )
        return lease_id, epoch

    @staticmethod
    async def end_leases(tx: Tx, job_id: str, state: str, now: float, attempt: int | None = None) -> None:
        """End the job's live leases (of ``attempt`` only, when given: a lease of a later attempt, granted after
        another replica re-queued the job, is not this caller's to end)."""
        if attempt is None:
            await tx.execute(f"UPDATE leases SET state = $2, ended_at = $3 WHERE job_id = $1 AND state = '{L.ACTIVE}'",
                             job_id, state, now)
        else:
            await tx.execute(f"UPDATE leases SET state = $2, ended_at = $3 WHERE job_id = $1 AND state = '{L.ACTIVE}' "
                             "AND attempt = $4", job_id, state, now, attempt)

    async def requeue_or_fail(self, tx: Tx, job: Row, now: float, reason: str, code: str, message: str) -> None:
        """Another attempt, or the error ``rules.requeue_or_fail`` names. Conditional on the attempt the caller
        read, so one loss re-queues a job once however many replicas see it."""
        await self.end_leases(tx, job["job_id"], L.RELEASED, now, job["attempt"])
        outcome = rules.requeue_or_fail(self.settings, job["attempt"], job["deadline_at"], now, code, message)
        if outcome != "requeue":
            await self.finish(tx, job, now, outcome)
            return
        changed = await tx.fetchrow(
            f"""UPDATE jobs SET attempt = attempt + 1, state = '{J.QUEUED}', node_id = NULL, resource = NULL,
                   lease_id = NULL, lease_epoch = NULL, assigned_at = NULL, queued_at = $3
               WHERE job_id = $1 AND attempt = $2 AND state IN {OPEN} RETURNING sections_made, parent_id""",
            job["job_id"], job["attempt"], now,
        )
        if changed is None:
            return
        self.metrics.jobs_requeued.labels(reason).inc()
        log.info("job requeued job_id=%s reason=%s from_node=%s attempt=%d", job["job_id"], reason,
                 job["node_id"] or "-", job["attempt"] + 1)
        tx.notify(QUEUE_TOPIC)
        tx.notify(job_topic(job["job_id"]))
        await self._sections_moved(tx, job["job_id"], changed, now, "parent_requeued",
                                   f"parent_requeued: its parent job {job['job_id']}'s attempt {job['attempt']} was "
                                   f"re-queued ({reason}); the next attempt splits afresh")

    async def finish(self, tx: Tx, job: Row, now: float, error: JobErrorInfo | None, *, result: str | None = None,
                      timings: str | None = None, cancelled_by: str | None = None) -> bool:
        """End the job (one statement: its state, error or result, the node's timings, the audio reference), its
        leases, and its audio unless scheduler.keep_audio. ``cancelled_by``: it ends ``cancelled`` (with
        ``error``), by that caller. False when it had ended already (or moved on to another attempt)."""
        state = J.CANCELLED if cancelled_by is not None else J.SUCCEEDED if error is None else J.FAILED
        drop_audio = not self.settings.keep_audio and job["upload_id"] is not None
        changed = await tx.fetchrow(
            f"""UPDATE jobs SET state = $2, error = $3, finished_at = $4, unservable_since = NULL,
                   queued_total_s = queued_total_s + CASE WHEN state = '{J.QUEUED}' THEN $4 - queued_at ELSE 0 END,
                   result = COALESCE($6, result), node_timings = COALESCE($7, node_timings),
                   upload_id = CASE WHEN $8 = 1 THEN NULL ELSE upload_id END, cancelled_by = $9
               WHERE job_id = $1 AND attempt = $5 AND state NOT IN {TERMINAL} RETURNING sections_made, parent_id""",
            job["job_id"], state, doc(error) if error is not None else None, now, job["attempt"], result, timings,
            int(drop_audio), cancelled_by,
        )
        if changed is None:
            return False
        await self.end_leases(tx, job["job_id"], L.RELEASED, now, job["attempt"])
        if drop_audio:
            await self.drop_audio(tx, job["upload_id"])
        self.finished_log(job, now, error)
        tx.notify(job_topic(job["job_id"]))
        if error is not None:  # a parent that succeeded leaves its sections as they are (all done by then)
            if cancelled_by is not None:
                await self._sections_moved(tx, job["job_id"], changed, now, cancelled_by,
                                           f"cancelled by {cancelled_by} with its parent job {job['job_id']}")
            else:
                await self._sections_moved(tx, job["job_id"], changed, now, "parent_failed",
                                           f"parent_failed: its parent job {job['job_id']} failed ({error.code})")
        elif changed["parent_id"] is not None:
            tx.notify(sections_topic(changed["parent_id"]))
        return True

    async def _sections_moved(self, tx: Tx, job_id: str, changed: Row, now: float, by: str, why: str) -> None:
        """After job ``job_id`` ended or went back to the queue (``changed``: its row's ``sections_made`` and
        ``parent_id`` as the write left them): a section child wakes its parent's follow; a parent's open sections
        are cancelled, ``cancelled_by`` ``by`` (the canceller of a DELETE, else ``parent_requeued`` or
        ``parent_failed``), so the next attempt splits afresh. The count is read from the row this transaction
        wrote, so a section made concurrently (it locks the parent first) is never missed; a job never split pays
        nothing more."""
        if changed["parent_id"] is not None:
            tx.notify(sections_topic(changed["parent_id"]))
        if not changed["sections_made"]:
            return
        for child in await tx.fetch(f"SELECT * FROM jobs WHERE parent_id = $1 AND state IN {OPEN}", job_id):
            error = JobErrorInfo(code="cancelled", message=why)
            if await self.finish(tx, child, now, error, cancelled_by=by):
                self.metrics.jobs_cancelled.labels(child["state"]).inc()
                log.info("section cancelled job_id=%s parent_id=%s by=%s state=%s", child["job_id"], job_id, by,
                         child["state"])

    def finished_log(self, job: Row, now: float, error: JobErrorInfo | None) -> None:
        outcome = "succeeded" if error is None else error.code
        self.metrics.job_finished(outcome)
        log.info("job finished job_id=%s outcome=%s attempt=%d node_id=%s seconds=%.3f%s", job["job_id"], outcome,
                 job["attempt"], job["node_id"] or "-", now - job["created_at"],
                 f" error={error.message!r}" if error is not None else "")

    @staticmethod
    async def drop_audio(tx: Tx, upload_id: str) -> None:
        await tx.execute("DELETE FROM audio_chunks WHERE upload_id = $1", upload_id)
        await tx.execute("DELETE FROM uploads WHERE upload_id = $1", upload_id)

    async def expire(self, tx: Tx, lease: Row, now: float, reason: str) -> None:
        changed = await tx.execute(
            f"UPDATE leases SET state = '{L.EXPIRED}', ended_at = $2 WHERE lease_id = $1 AND state = '{L.ACTIVE}'",
            lease["lease_id"], now,
        )
        if not changed:
            return
        self.metrics.leases_expired.labels(lease["node_id"]).inc()
        log.info("lease expired lease_id=%s node_id=%s resource=%s epoch=%d job_id=%s reason=%s", lease["lease_id"],
                 lease["node_id"], lease["resource"], lease["epoch"], lease["job_id"], reason)
        job = await tx.fetchrow("SELECT * FROM jobs WHERE job_id = $1", lease["job_id"])
        if job is not None and job["lease_id"] == lease["lease_id"] and job["state"] == J.RUNNING:
            await self.requeue_or_fail(tx, job, now, reason, "lease_expired",
                                        f"lease {lease['lease_id']} on node {lease['node_id']} expired")

    async def resume_if_paused(self, tx: Tx, now: float) -> None:
        """Before a fenced write: if no reaping pass ran for a while (the store was unreachable), give the leases
        their time back first, so a holder renewing right after the outage is not refused for it."""
        if self.replica.fresh_reap():
            return  # this replica's own pass ran just now: no pause to give back
        last = await tx.fetchval("SELECT last_reap FROM store_clock WHERE id = 1")
        if last and now - last > PAUSE_AFTER_S:
            await self.clock_tick(tx, now)

    async def clock_tick(self, tx: Tx, now: float) -> None:
        """Record a reaping pass; after a pause (no pass for PAUSE_AFTER_S), give its time back: every live lease is
        extended by it, and every live node's heartbeat counts as that much later (no node could reach a scheduler
        meanwhile, so neither a holder's missed renewals nor its missed heartbeats are its own). The row lock makes
        replicas take turns, so a pause is given back once."""
        lock = " FOR UPDATE" if tx.dialect.skip_locked else ""
        last = await tx.fetchval("SELECT last_reap FROM store_clock WHERE id = 1" + lock)
        if last and now - last > PAUSE_AFTER_S:
            gap = now - last
            extended = await tx.execute(
                f"UPDATE leases SET expires_at = expires_at + $1 WHERE state = '{L.ACTIVE}'", gap)
            await tx.execute(
                "UPDATE nodes SET last_heartbeat = CASE WHEN last_heartbeat + $1 < $2 THEN last_heartbeat + $1 "
                f"ELSE $2 END WHERE state <> '{N.GONE}'", gap, now)
            log.warning("no scheduler reached the store for %.1f s: %d live lease(s) extended by that time, and the "
                        "nodes' heartbeats", gap, extended)
        await tx.execute("UPDATE store_clock SET last_reap = $1 WHERE id = 1", now)


class StorePart:
    """One group of the store's operations (``sqlstore``'s docstring names them), over what every group shares."""

    def __init__(self, settings: SchedulerSettings, engine: Engine, metrics: SchedulerMetrics, replica: Replica,
                 transitions: Transitions, fast: PgFast | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.replica = replica
        self.tr = transitions
        #: PostgreSQL's single-statement forms of the hot operations, where they run.
        self._fast = fast
