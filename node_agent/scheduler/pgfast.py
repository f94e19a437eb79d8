"""The hot operations on PostgreSQL as single statements: the common case in one round trip.

A job's life on the SQL store costs about a dozen transactions; run as BEGIN, a clock read, several statements and
COMMIT, each is four to nine round trips, and the scheduler's event loop spent its time in them (docs/benchmarks.md:
86 statements and 10 ms of scheduler CPU per job). Here each hot operation's common case is one statement (data-
modifying CTEs; the clock, the sequence and ``pg_notify`` inside it), which PostgreSQL runs as a transaction of its
own. Every statement's conditions are those of the general path in ``sqlstore.py``, written the other way round:
when one does not hold (an unknown node, a changed device list, a rejected report, a duplicate, a lease already
held) the statement changes nothing and returns no row, and ``SqlStore`` takes its general path, which decides with
``rules`` and says why. So these functions never refuse anything: they either do the common thing or report that
they did not.

SQLite runs in-process (a statement costs microseconds there), so it has only the general path.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .db import CHANNEL, Conflict, PostgresEngine, Row
from .migrations import jobs_in
from .rules import Offer
from .schemas import JobState as J
from .schemas import Priority as P
from .schemas import LeaseState as L
from .schemas import NodeState as N
from .schemas import stored_devices
from .topics import job_topic, sections_topic, submitted_topic

#: The store's clock, read once per statement (a CTE referenced twice is evaluated once).
_CLOCK = "t AS (SELECT CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION) AS now)"


def fence(now: str) -> str:
    """The fence, for an ``UPDATE jobs`` on both paths: the job's current attempt ($2), live lease ($3, unexpired at
    ``now`` on the store's clock), epoch ($4) and node ($5) for job $1."""
    return f"""jobs.job_id = $1 AND jobs.state = '{J.RUNNING}' AND jobs.attempt = $2 AND jobs.lease_id = $3
    AND jobs.lease_epoch = $4 AND jobs.node_id = $5
    AND EXISTS (SELECT 1 FROM leases l WHERE l.lease_id = $3 AND l.state = '{L.ACTIVE}' AND l.expires_at > {now})"""


_FENCE = fence("t.now")


def renewal(now: str, clock_from: str = "") -> str:
    """The renewal, for both paths, checked and written in one statement: only the job's live lease $1, unexpired
    at ``now``, with the epoch ($2) and node ($3) it names, for the job's current attempt; the TTL $4 (NULL: the
    lease's own). ``clock_from`` brings ``now`` into the statement where it is a table's column."""
    return f"""UPDATE leases SET ttl_s = COALESCE(CAST($4 AS DOUBLE PRECISION), ttl_s),
        expires_at = {now} + COALESCE(CAST($4 AS DOUBLE PRECISION), ttl_s)
    {clock_from}
    WHERE lease_id = $1 AND state = '{L.ACTIVE}' AND expires_at > {now} AND epoch = $2 AND node_id = $3
      AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = leases.job_id AND j.lease_id = leases.lease_id
                  AND j.attempt = leases.attempt AND j.state = '{J.RUNNING}')
    RETURNING node_id, epoch, ttl_s"""


#: SQL: the slots that open jobs hold on the live nodes that take jobs (neither cordoned nor draining), the
#: interactive headroom's busy count, read where the dispatch decides (``jobs_in``: on the jobs_open index).
BUSY_SLOTS = f"""SELECT COUNT(*) FROM jobs b JOIN nodes bn ON bn.node_id = b.node_id
    WHERE {jobs_in((J.ASSIGNED, J.RUNNING), "b")}
      AND bn.cordoned = 0 AND bn.state NOT IN ('{N.GONE}', '{N.DRAINING}')"""


def _offer_serves(dialect: str, job: str, d: str) -> str:
    """SQL: the offer ``d`` (a JSON object as ``rules.Offer.wire`` writes it) serves the jobs row ``job``: its
    languages fit, its model is the one asked (if any), it carries every label asked. ``rules.Offer.serves``
    restated for SQL (tests/test_dispatch_fields.py holds the two to one table)."""
    if dialect == "postgresql":
        return f"""({job}.language IS NULL OR jsonb_typeof({d} -> 'languages') = 'null'
                  OR ({d} -> 'languages') ? {job}.language)
             AND ({job}.model IS NULL OR {job}.model = {d} ->> 'model')
             AND ({job}.labels = '{{}}' OR CAST({job}.labels AS jsonb) <@ ({d} -> 'labels'))"""
    return f"""({job}.language IS NULL OR json_type({d}, '$.languages') = 'null'
              OR {job}.language IN (SELECT value FROM json_each({d}, '$.languages')))
         AND ({job}.model IS NULL OR {job}.model = json_extract({d}, '$.model'))
         AND ({job}.labels = '{{}}' OR NOT EXISTS (
                 SELECT 1 FROM json_each({job}.labels) asked WHERE NOT EXISTS (
                     SELECT 1 FROM json_each({d}, '$.labels') has
                     WHERE has.key = asked.key AND has.value = asked.value)))"""


def ask_served_sql(dialect: str, offers: str, job: str = "jobs", some_offer: bool = False) -> str:
    """SQL: some offer of the JSON array ``offers`` (a parameter's place, e.g. ``$3``) serves the jobs row ``job``.
    Assignment (a node's devices, ``offers_of``) and the reaper (every live node's, ``rules.Served``) both ask it.
    ``some_offer``: the array is known not to be empty (a polling node's), so a job that asks for nothing is
    served without reading it (most jobs: the queue's scan stays as cheap as before there were asks)."""
    if dialect == "postgresql":
        test = (f"EXISTS (SELECT 1 FROM jsonb_array_elements(CAST({offers} AS jsonb)) AS o(d) "
                f"WHERE {_offer_serves(dialect, job, 'o.d')})")
    else:
        test = f"EXISTS (SELECT 1 FROM json_each({offers}) AS o WHERE {_offer_serves(dialect, job, 'o.value')})"
    if some_offer:
        return f"(({job}.language IS NULL AND {job}.model IS NULL AND {job}.labels = '{{}}') OR {test})"
    return test


@functools.lru_cache(maxsize=1024)
def offers_of(devices_text: str, labels_text: str, resource: str | None = None) -> str | None:
    """A node's ASR devices (those on ``resource``; None: all) as a JSON array of offers with their resource, in
    device order (``rules.pick_device``'s), for ``ask_served_sql``: once per distinct (devices, labels). None when
    no ASR device answers (the general path says why, or that there is nothing to take)."""
    node_labels = json.loads(labels_text)
    offers = [{"resource": d.resource, **Offer.of(d, node_labels).wire()} for d in stored_devices(devices_text)
              if d.plugin == "asr" and (resource is None or d.resource == resource)]
    return json.dumps(offers) if offers else None


class PgFast:
    """The single-statement forms. Each returns None (or False) when the common case did not apply."""

    def __init__(self, engine: PostgresEngine) -> None:
        self.engine = engine

    async def heartbeat(self, node_id: str, state: str, running_jobs: str, cpu_percent: float, used: int,
                        total: int) -> bool:
        row = await self.engine.statement(
            f"""UPDATE nodes SET last_heartbeat = CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION),
                   state = $2, running_jobs = $3, cpu_percent = $4, memory_used_bytes = $5, memory_total_bytes = $6
               WHERE node_id = $1 AND state <> '{N.GONE}' RETURNING 1""",
            node_id, state, running_jobs, cpu_percent, used, total,
        )
        return row is not None

    async def submit(self, job_id: str, spec: str, language: str | None, filename: str | None, size: int,
                     upload_id: str, deadline_s: float, audio: bytes, model: str | None, labels: str, priority: str,
                     client: str | None) -> float:
        """Queue a job whose audio is one chunk, without an Idempotency-Key; returns the store's time. An
        interactive job takes the priority lane (db), as its claim will."""
        row = await self.engine.statement(
            f"""WITH {_CLOCK},
               j AS (INSERT INTO jobs (job_id, seq, spec, language, filename, audio_bytes, upload_id, created_at,
                         queued_at, deadline_at, state, attempt, model, labels, priority, client)
                     SELECT $1, nextval('job_seqs'), $2, $3, $4, $5, $6, t.now, t.now, t.now + $7, '{J.QUEUED}', 1,
                            $11, $12, $13, $14
                     FROM t),
               u AS (INSERT INTO uploads (upload_id, started_at, bytes, job_id) SELECT $6, t.now, $5, $1 FROM t),
               c AS (INSERT INTO audio_chunks (upload_id, n, data) VALUES ($6, 0, $8))
               SELECT t.now, pg_notify($9, $10) FROM t""",
            job_id, spec, language, filename, size, upload_id, deadline_s, audio, CHANNEL,
            submitted_topic(priority), model, labels, priority, client, urgent=priority == P.INTERACTIVE,
        )
        assert row is not None
        return float(row["now"])

    async def claim(self, node_id: str, devices_text: str, labels_text: str, offers: str, max_wait_s: float,
                    lease_id: str | None = None, ttl_s: float | None = None, slots: int = 0,
                    headroom: int = 0) -> tuple[bool, Row | None, bool]:
        """(node as expected, the claimed job's row or None, whether the headroom held a batch job back). The node
        must be live, not draining, not cordoned, and still have ``devices_text`` and ``labels_text``; the first
        queued job one of its ``offers`` serves, in the dispatch order (``rules.dispatch_class``: interactive jobs
        and batch jobs queued ``max_wait_s``, then the other batch jobs; each by seq), becomes assigned to it, on
        the first device that serves it. With ``lease_id`` and ``ttl_s``, the job's first lease is granted too
        (``lease_epoch`` in the row) when no active lease holds its resource on this node (as ``grant`` requires);
        else the job is only assigned (``lease_epoch`` None). The batch class's head goes only where
        ``rules.batch_allowed`` lets it, given the ``slots`` taking jobs, the ``headroom`` kept of them, and the
        busy ones counted here: held back is when that head was the one job to take and the rule refused it."""
        served = ask_served_sql("postgresql", "$3", some_offer=True)
        try:
            row = await self.engine.statement(
                f"""WITH {_CLOCK},
                   n AS (SELECT 1 FROM nodes WHERE node_id = $1 AND devices = $2 AND labels = $6 AND cordoned = 0
                             AND state NOT IN ('{N.GONE}', '{N.DRAINING}')),
                   qi AS (SELECT job_id, seq, queued_at, language, model, labels FROM jobs
                          WHERE state = '{J.QUEUED}' AND priority = '{P.INTERACTIVE}' AND EXISTS (SELECT 1 FROM n)
                              AND {served}
                          ORDER BY priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED),
                   qb AS (SELECT job_id, seq, queued_at, language, model, labels FROM jobs
                          WHERE state = '{J.QUEUED}' AND priority = '{P.BATCH}' AND EXISTS (SELECT 1 FROM n)
                              AND {served}
                          ORDER BY priority, seq LIMIT 1 FOR UPDATE SKIP LOCKED),
                   j AS (SELECT * FROM (SELECT qi.*, 0 AS cls FROM qi
                                        UNION ALL SELECT qb.*, CASE WHEN t.now - qb.queued_at >= $7 THEN 0 ELSE 1 END
                                        FROM qb, t
                                        -- rules.batch_allowed, for a head not aged past max_wait_s and not behind
                                        -- an interactive one (the count runs only when it decides)
                                        WHERE t.now - qb.queued_at >= $7 OR CAST($9 AS INTEGER) <= 0
                                            OR EXISTS (SELECT 1 FROM qi)
                                            OR CAST($8 AS INTEGER) - ({BUSY_SLOTS}) - 1 >= CAST($9 AS INTEGER)
                                        ) AS c
                         ORDER BY cls, seq LIMIT 1),
                   r AS (SELECT j.job_id,
                                (SELECT o.d ->> 'resource' FROM jsonb_array_elements(CAST($3 AS jsonb))
                                     WITH ORDINALITY AS o(d, i)
                                 WHERE {_offer_serves("postgresql", "j", "o.d")} ORDER BY o.i LIMIT 1) AS resource
                         FROM j),
                   g AS (SELECT r.job_id, nextval('lease_epochs') AS epoch FROM r
                         WHERE CAST($5 AS DOUBLE PRECISION) IS NOT NULL
                           AND NOT EXISTS (SELECT 1 FROM leases h WHERE h.node_id = $1 AND h.resource = r.resource
                                           AND h.state = '{L.ACTIVE}')),
                   u AS (UPDATE jobs SET state = CASE WHEN g.epoch IS NULL THEN '{J.ASSIGNED}' ELSE '{J.RUNNING}' END,
                             node_id = $1, resource = r.resource, assigned_at = t.now,
                             lease_id = CASE WHEN g.epoch IS NULL THEN NULL ELSE CAST($4 AS TEXT) END,
                             lease_epoch = g.epoch,
                             started_at = CASE WHEN g.epoch IS NULL THEN jobs.started_at
                                               ELSE COALESCE(jobs.started_at, t.now) END,
                             queued_total_s = queued_total_s + (t.now - jobs.queued_at), unservable_since = NULL
                         FROM r LEFT JOIN g ON g.job_id = r.job_id, t WHERE jobs.job_id = r.job_id
                         RETURNING jobs.job_id, jobs.attempt, jobs.spec, jobs.audio_bytes, jobs.deadline_at,
                             jobs.resource, jobs.lease_epoch, jobs.priority, jobs.model, jobs.parent_id,
                             t.now - jobs.queued_at AS waited),
                   l AS (INSERT INTO leases (lease_id, node_id, job_id, attempt, resource, epoch, ttl_s, granted_at,
                             expires_at, state)
                         SELECT CAST($4 AS TEXT), $1, u.job_id, u.attempt, u.resource, u.lease_epoch, $5, t.now,
                             t.now + CAST($5 AS DOUBLE PRECISION), '{L.ACTIVE}'
                         FROM u, t WHERE u.lease_epoch IS NOT NULL),
                   d AS (DELETE FROM segments WHERE job_id IN (SELECT job_id FROM u WHERE attempt > 1))
                   SELECT (SELECT COUNT(*) FROM n) AS node_ok, t.now, u.*,
                       EXISTS (SELECT 1 FROM qb) AND NOT EXISTS (SELECT 1 FROM j) AS held_back
                   FROM t LEFT JOIN u ON true""",
                node_id, devices_text, offers, lease_id, ttl_s, labels_text, max_wait_s, slots, headroom,
                urgent=True,  # a node waits on it (db: the priority lane)
            )
        except Conflict:  # a lease took the resource meanwhile (the statement changed nothing): the general path
            return False, None, False
        assert row is not None
        if not row["node_ok"]:
            return False, None, False
        return True, (row if row["job_id"] is not None else None), bool(row["held_back"])

    async def audio(self, job_id: str) -> Row | None:
        """The job's state, audio reference and chunk numbers, and the chunk itself when it is the only one."""
        return await self.engine.statement(
            """SELECT j.state, j.upload_id, j.audio_bytes,
                   ARRAY(SELECT n FROM audio_chunks c WHERE c.upload_id = j.upload_id ORDER BY n) AS numbers,
                   (SELECT data FROM audio_chunks c WHERE c.upload_id = j.upload_id AND c.n = 0
                        AND NOT EXISTS (SELECT 1 FROM audio_chunks c2 WHERE c2.upload_id = j.upload_id
                                        AND c2.n <> 0)) AS only_chunk
               FROM jobs j WHERE j.job_id = $1""",
            job_id,
        )

    async def grant(self, node_id: str, devices_text: str, job_id: str, resource: str, lease_id: str,
                    ttl_s: float) -> Row | None:
        """A job's first lease: the node unchanged and live, the job assigned to it without a lease, the
        resource free. Returns the lease's epoch and attempt."""
        try:
            return await self.engine.statement(
                f"""WITH {_CLOCK},
                   n AS (SELECT 1 FROM nodes WHERE node_id = $1 AND devices = $2 AND state <> '{N.GONE}'),
                   j AS (SELECT job_id, attempt FROM jobs WHERE job_id = $3 AND node_id = $1
                             AND state IN ('{J.ASSIGNED}', '{J.RUNNING}') AND lease_id IS NULL
                             AND EXISTS (SELECT 1 FROM n)
                         FOR UPDATE),
                   l AS (INSERT INTO leases (lease_id, node_id, job_id, attempt, resource, epoch, ttl_s, granted_at,
                             expires_at, state)
                         SELECT $5, $1, j.job_id, j.attempt, $4, nextval('lease_epochs'), $6, t.now, t.now + $6,
                             '{L.ACTIVE}'
                         FROM j, t
                         WHERE NOT EXISTS (SELECT 1 FROM leases h WHERE h.node_id = $1 AND h.resource = $4
                                           AND h.state = '{L.ACTIVE}')
                         RETURNING epoch, attempt, granted_at),
                   u AS (UPDATE jobs SET state = '{J.RUNNING}', resource = $4, lease_id = $5, lease_epoch = l.epoch,
                             started_at = COALESCE(jobs.started_at, l.granted_at)
                         FROM l WHERE jobs.job_id = $3)
                   SELECT l.epoch, l.attempt FROM l""",
                node_id, devices_text, job_id, resource, lease_id, ttl_s,
            )
        except Conflict:  # another lease took the resource meanwhile: the general path names it
            return None

    async def renew(self, lease_id: str, epoch: int, node_id: str, ttl_s: float | None) -> Row | None:
        return await self.engine.statement(
            f"WITH {_CLOCK} " + renewal("t.now", "FROM t"),
            lease_id, epoch, node_id, ttl_s,
        )

    async def events(self, holder: tuple[Any, ...], seg_ids: list[int], data: list[str]) -> bool:
        """Store segments from the current holder (distinct ids): whether the fence held."""
        row = await self.engine.statement(
            f"""WITH {_CLOCK},
               f AS (UPDATE jobs SET state = jobs.state FROM t WHERE {_FENCE} RETURNING jobs.job_id),
               s AS (INSERT INTO segments (job_id, seg_id, data)
                     SELECT f.job_id, x.seg_id, x.data FROM f, unnest(CAST($6 AS INTEGER[]), CAST($7 AS TEXT[]))
                         AS x(seg_id, data)
                     ON CONFLICT (job_id, seg_id) DO UPDATE SET data = excluded.data)
               SELECT f.job_id, CASE WHEN cardinality(CAST($6 AS INTEGER[])) > 0 THEN pg_notify($8, $9) END
               FROM f""",
            *holder, seg_ids, data, CHANNEL, job_topic(holder[0]),
        )
        return row is not None

    async def succeed(self, holder: tuple[Any, ...], result: str, timings: str, ack: str, seg_ids: list[int],
                      data: list[str], drop_audio: bool) -> Row | None:
        """Accept a succeeded result from the current holder: the job finished, its leases released, its
        segments those of the result (when it lists any), its audio dropped unless kept, the report recorded.
        Returns the finished job's fields for the log."""
        return await self.engine.statement(
            f"""WITH {_CLOCK},
               o AS (SELECT upload_id FROM jobs WHERE job_id = $1),
               f AS (UPDATE jobs SET state = '{J.SUCCEEDED}', error = NULL, finished_at = t.now,
                         unservable_since = NULL,
                         result = $6, node_timings = $7,
                         upload_id = CASE WHEN $10 THEN NULL ELSE jobs.upload_id END
                     FROM t WHERE {_FENCE}
                     RETURNING jobs.job_id, jobs.attempt, jobs.node_id, jobs.created_at, jobs.parent_id),
               ls AS (UPDATE leases SET state = '{L.RELEASED}', ended_at = t.now FROM f, t
                      WHERE leases.job_id = f.job_id AND leases.state = '{L.ACTIVE}' AND leases.attempt = f.attempt),
               ds AS (DELETE FROM segments WHERE cardinality(CAST($8 AS INTEGER[])) > 0
                          AND job_id IN (SELECT job_id FROM f) AND NOT (seg_id = ANY(CAST($8 AS INTEGER[])))),
               si AS (INSERT INTO segments (job_id, seg_id, data)
                      SELECT f.job_id, x.seg_id, x.data FROM f, unnest(CAST($8 AS INTEGER[]), CAST($9 AS TEXT[]))
                          AS x(seg_id, data)
                      ON CONFLICT (job_id, seg_id) DO UPDATE SET data = excluded.data),
               da AS (DELETE FROM audio_chunks WHERE $10 AND EXISTS (SELECT 1 FROM f)
                          AND upload_id = (SELECT upload_id FROM o)),
               du AS (DELETE FROM uploads WHERE $10 AND EXISTS (SELECT 1 FROM f)
                          AND upload_id = (SELECT upload_id FROM o)),
               r AS (INSERT INTO reports (job_id, attempt, lease_id, epoch, node_id, ack)
                     SELECT f.job_id, $2, $3, $4, $5, $11 FROM f)
               SELECT f.*, t.now, pg_notify($12, $13),
                   -- a section's parent's follow wakes (topics.sections_topic); a parent succeeding cancels nothing
                   CASE WHEN f.parent_id IS NOT NULL THEN pg_notify($12, '{sections_topic("")}' || f.parent_id) END
               FROM f, t""",
            *holder, result, timings, seg_ids, data, drop_audio, ack, CHANNEL, job_topic(holder[0]),
        )


__all__ = ["BUSY_SLOTS", "PgFast", "ask_served_sql", "fence", "offers_of"]
