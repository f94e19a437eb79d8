"""The store's reaping pass: everything that fell due (vanished nodes, expired leases, assignments never leased,
deadlines, unservable jobs, retention, orphan uploads), and the gauges read from the store."""

from __future__ import annotations

import logging

from .db import Tx
from .migrations import jobs_in
from .operators import hand_back_drained, queue_groups
from .pgfast import ask_served_sql
from .rules import Ask, gone_after_s, unservable_error
from .schemas import JobErrorInfo, Priority
from .schemas import JobState as J
from .schemas import LeaseState as L
from .schemas import NodeState as N
from .topics import QUEUE_TOPIC
from .transitions import OPEN, StorePart

log = logging.getLogger("node_agent.scheduler")

#: Rows one reaping pass handles per kind; the rest wait for the next pass.
REAP_BATCH = 200
#: An upload never turned into a job (the scheduler died mid-upload) is deleted after this.
ORPHAN_UPLOAD_S = 3600.0
#: Audio one pass's retention drops (at least one job's): a pass is one transaction on the store's one writer, so
#: 200 kept 200 MB uploads due at once would hold every other write for the whole 40 GB; the rest wait a pass.
REAP_AUDIO_BYTES = 256 * 1024 * 1024


class Reaper(StorePart):
    """Runs the reaping pass (any replica, any time: each row is handled once) and reads the gauges."""

    async def reap(self) -> None:
        """Apply everything that fell due: vanished nodes, expired leases, assignments never leased, deadlines,
        unservable jobs, retention. Any replica may run it at any time; each row is handled once (rows are
        claimed with SKIP LOCKED and changed only by conditional updates)."""
        await self.engine.run(self._reap)
        self.replica.reaped()

    async def _reap(self, tx: Tx) -> None:
        s = self.settings
        now = await tx.now()
        skip = tx.dialect.skip_locked
        await self.tr.clock_tick(tx, now)
        gone = await tx.fetch(
            f"UPDATE nodes SET state = '{N.GONE}', gone_at = $1 WHERE state <> '{N.GONE}' AND last_heartbeat <= $2 "
            "RETURNING node_id, last_heartbeat", now, now - gone_after_s(s),
        )
        for node in gone:
            self.replica.forget_served()
            log.info("node gone node_id=%s last_heartbeat_age_s=%.1f", node["node_id"], now - node["last_heartbeat"])
            await self.tr.release_node(tx, node["node_id"], now, "is gone")
        for row in await tx.fetch(f"DELETE FROM nodes WHERE state = '{N.GONE}' AND gone_at <= $1 RETURNING node_id",
                                  now - s.job_retention_s):
            self.metrics.node_forgotten(row["node_id"])
        for lease in await tx.fetch(
            f"SELECT * FROM leases WHERE state = '{L.ACTIVE}' AND expires_at <= $1 LIMIT {REAP_BATCH}{skip}", now
        ):
            await self.tr.expire(tx, lease, now, "lease_expired")
        for job in await tx.fetch(
            f"SELECT * FROM jobs WHERE {jobs_in([J.ASSIGNED])} AND assigned_at <= $1 LIMIT {REAP_BATCH}{skip}",
            now - s.assign_timeout_s,
        ):
            await self.tr.requeue_or_fail(tx, job, now, "assign_timeout", "worker_unavailable",
                                        f"node {job['node_id']} took no lease within {s.assign_timeout_s:g} s")
        await hand_back_drained(tx, self.tr, now)
        for job in await tx.fetch(
            f"SELECT * FROM jobs WHERE state = '{J.QUEUED}' AND deadline_at <= $1 LIMIT {REAP_BATCH}{skip}", now
        ):
            await self.tr.finish(tx, job, now, JobErrorInfo(code="timeout", message="the deadline passed while queued"))
        await self._reap_unservable(tx, now)
        old = await tx.fetch(
            f"SELECT job_id, upload_id, audio_bytes FROM jobs WHERE finished_at <= $1 LIMIT {REAP_BATCH}{skip}",
            now - s.job_retention_s,
        )
        audio = 0
        for job in old:
            if job["upload_id"] is not None:
                if audio and audio + job["audio_bytes"] > REAP_AUDIO_BYTES:
                    continue  # its audio waits for a later pass; jobs without audio still go in this one
                audio += job["audio_bytes"]
            for table in ("segments", "reports", "leases"):
                await tx.execute(f"DELETE FROM {table} WHERE job_id = $1", job["job_id"])
            if job["upload_id"] is not None:
                await self.tr.drop_audio(tx, job["upload_id"])
            await tx.execute("DELETE FROM jobs WHERE job_id = $1", job["job_id"])
        for upload in await tx.fetch(
            f"SELECT upload_id FROM uploads WHERE job_id IS NULL AND started_at <= $1 LIMIT {REAP_BATCH}{skip}",
            now - ORPHAN_UPLOAD_S,
        ):
            await self.tr.drop_audio(tx, upload["upload_id"])
        await self._gauges(tx)

    async def refresh_gauges(self) -> None:
        """Read the gauges' values now (a /metrics scrape does, so it shows this moment, not the last pass)."""
        # The queue's breakdown by priority and model is read at scrape time only: every reaping pass grouping the
        # whole queue would cost far more than the scrapes do.
        async def op(tx: Tx) -> tuple[list[tuple[str, str, int, float]], int]:
            await self._gauges(tx)
            cordoned = await tx.fetchval(f"SELECT COUNT(*) FROM nodes WHERE cordoned = 1 AND state <> '{N.GONE}'")
            return await queue_groups(tx, await tx.now()), int(cordoned)

        self.metrics.queue_seen(*await self.engine.run(op))

    async def _gauges(self, tx: Tx) -> None:
        counts = await tx.fetch("SELECT state, COUNT(*) AS n FROM nodes GROUP BY state")
        open_row = await tx.fetchrow(
            f"""SELECT COUNT(*) AS jobs, COALESCE(SUM(audio_bytes), 0) AS bytes,
                   COALESCE(SUM(CASE WHEN state = '{J.QUEUED}' THEN 1 ELSE 0 END), 0) AS queued,
                   COALESCE(SUM(CASE WHEN priority = '{Priority.INTERACTIVE}' THEN 1 ELSE 0 END), 0) AS interactive
               FROM jobs WHERE state IN {OPEN}"""
        )
        assert open_row is not None
        self.replica.counted({r["state"]: int(r["n"]) for r in counts}, int(open_row["jobs"]),
                             int(open_row["bytes"]), int(open_row["queued"]), int(open_row["interactive"]))

    async def _reap_unservable(self, tx: Tx, now: float) -> None:
        """Mark queued jobs no live node serves, clear the mark when one does, and fail those marked for
        ``unservable_after_s`` with no_capable_node."""
        served = await self.replica.served(tx, fresh=True)
        # "Some live node serves this job" as SQL: the one capability rule (rules.serves) over the live offers. With
        # some offer live, a job that asks for nothing is served without reading them: most of a queue is such jobs,
        # and each pass asks this of every queued one (1,000 queued: the marking's p90 1.3 -> 0.3 ms on SQLite).
        serves = ask_served_sql(tx.dialect.name, "$1", some_offer=bool(served.offers))
        servable = await tx.execute(
            f"UPDATE jobs SET unservable_since = NULL WHERE state = '{J.QUEUED}' AND unservable_since IS NOT NULL "
            f"AND {serves}", served.offers_json(),
        )
        if servable:
            # A claim that met these rows locked here passed them by (SKIP LOCKED on PostgreSQL): the polls look
            # again once this commits, rather than at their next periodic re-check.
            tx.notify(QUEUE_TOPIC)
        await tx.execute(
            f"UPDATE jobs SET unservable_since = $2 WHERE state = '{J.QUEUED}' AND unservable_since IS NULL "
            f"AND NOT {serves}", served.offers_json(), now,
        )
        after = self.settings.unservable_after_s
        for job in await tx.fetch(
            f"SELECT * FROM jobs WHERE state = '{J.QUEUED}' AND unservable_since <= $1 LIMIT {REAP_BATCH}"
            + tx.dialect.skip_locked, now - after,
        ):
            await self.tr.finish(tx, job, now,
                               unservable_error(Ask.of(job["language"], job["model"], job["labels"]), served,
                                                now - job["unservable_since"], after))
