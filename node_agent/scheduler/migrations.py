"""The store's schema, as ordered migrations recorded in ``schema_version``.

Each migration is applied once, in order, in one transaction; on PostgreSQL under an advisory lock so that replicas
starting together do not race. A store whose schema is newer than this program knows is refused with one line
(running it would misread rows a newer version wrote). Times are seconds since the epoch (``DOUBLE PRECISION``) on
the store's clock; JSON documents are TEXT, read and written only by the scheduler.
"""

from __future__ import annotations

from typing import Iterable

from .db import Tx, serialize, sql_list
from .errors import StoreError
from .schemas import OPEN_JOB_STATES, JobState, LeaseState, Priority

#: Any constant: the key of PostgreSQL's advisory lock around migrations.
MIGRATION_LOCK = 4_708_470

_TYPES = {
    "sqlite": {"double": "REAL", "blob": "BLOB", "bigint": "INTEGER"},
    "postgresql": {"double": "DOUBLE PRECISION", "blob": "BYTEA", "bigint": "BIGINT"},
}

#: The states the partial indexes name (the text these make is version 1's schema, as it always was).
_STATES = {"queued": JobState.QUEUED, "open": sql_list(OPEN_JOB_STATES), "active": LeaseState.ACTIVE}


def jobs_in(states: Iterable[JobState], alias: str = "") -> str:
    """SQL: the jobs row (``alias``: its name in the query) is in one of ``states``, open states all, written so
    that SQLite uses the ``jobs_open`` partial index: SQLite takes a partial index only for a query that repeats
    its WHERE term as written (``state = 'assigned'`` alone does not count), and otherwise scans every job kept,
    finished ones included: the reaping pass (four a second, on the one writer) took 2.6 ms with 2,500 jobs kept and
    21 ms with 50,000 (0.4-0.5 ms with this), the headroom's busy count 25 ms per dispatch with 60,000. PostgreSQL proves the implication itself; the repeated term costs it nothing."""
    wanted = list(states)
    assert wanted and set(wanted) <= set(OPEN_JOB_STATES), wanted
    state = f"{alias}.state" if alias else "state"
    return f"{state} IN {_STATES['open']} AND {state} IN {sql_list(wanted)}"


_V1 = """
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    hardware TEXT NOT NULL,
    devices TEXT NOT NULL,
    registered_at {double} NOT NULL,
    last_heartbeat {double} NOT NULL,
    state TEXT NOT NULL,
    running_jobs TEXT NOT NULL DEFAULT '[]',
    cpu_percent {double} NOT NULL DEFAULT 0,
    memory_used_bytes {bigint} NOT NULL DEFAULT 0,
    memory_total_bytes {bigint} NOT NULL DEFAULT 0,
    gone_at {double}
);
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    seq {bigint} NOT NULL,
    spec TEXT NOT NULL,
    language TEXT,
    filename TEXT,
    audio_bytes {bigint} NOT NULL,
    upload_id TEXT,
    idempotency_key TEXT UNIQUE,
    submission TEXT,
    created_at {double} NOT NULL,
    queued_at {double} NOT NULL,
    deadline_at {double},
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    node_id TEXT,
    resource TEXT,
    assigned_at {double},
    started_at {double},
    finished_at {double},
    queued_total_s {double} NOT NULL DEFAULT 0,
    lease_id TEXT,
    lease_epoch {bigint},
    result TEXT,
    error TEXT,
    node_timings TEXT,
    unservable_since {double}
);
CREATE INDEX jobs_queue ON jobs (seq) WHERE state = '{queued}';
CREATE INDEX jobs_open ON jobs (state) WHERE state IN {open};
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE segments (
    job_id TEXT NOT NULL,
    seg_id INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seg_id)
);
CREATE TABLE leases (
    lease_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    resource TEXT NOT NULL,
    epoch {bigint} NOT NULL UNIQUE,
    ttl_s {double} NOT NULL,
    granted_at {double} NOT NULL,
    expires_at {double} NOT NULL,
    state TEXT NOT NULL,
    ended_at {double}
);
CREATE UNIQUE INDEX leases_holder ON leases (node_id, resource) WHERE state = '{active}';
CREATE INDEX leases_due ON leases (expires_at) WHERE state = '{active}';
CREATE INDEX leases_job ON leases (job_id);
CREATE TABLE reports (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    lease_id TEXT NOT NULL,
    epoch {bigint} NOT NULL,
    node_id TEXT NOT NULL,
    ack TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, lease_id, epoch, node_id)
);
CREATE TABLE uploads (
    upload_id TEXT PRIMARY KEY,
    started_at {double} NOT NULL,
    bytes {bigint} NOT NULL DEFAULT 0,
    job_id TEXT
);
CREATE TABLE store_clock (
    id INTEGER PRIMARY KEY,
    last_reap {double} NOT NULL
);
CREATE TABLE audio_chunks (
    upload_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (upload_id, n)
);
"""

_V1_SEQUENCES = {
    "sqlite": """
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('lease_epochs', 0), ('job_seqs', 0);
INSERT INTO store_clock (id, last_reap) VALUES (1, 0);
""",
    "postgresql": """
CREATE SEQUENCE lease_epochs;
CREATE SEQUENCE job_seqs;
INSERT INTO store_clock (id, last_reap) VALUES (1, 0);
""",
}

#: Version 2 (issue 23): what a job asks of its node (model, labels, priority) and who submitted it (the client
#: token's name: a client sees and cancels only its own jobs); operators' hold on a node (cordoned, a drain's
#: deadline), a node's labels, and the hash of its secret (a node acts only as itself). The queue index orders
#: by priority, then submission; the job listing (GET /v1/jobs) pages by submission, newest first.
_V2 = """
ALTER TABLE jobs ADD COLUMN model TEXT;
ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '{{}}';
ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT '{batch}';
ALTER TABLE jobs ADD COLUMN client TEXT;
ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;
ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{{}}';
ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN drain_deadline {double};
ALTER TABLE nodes ADD COLUMN secret_hash TEXT;
CREATE INDEX jobs_queue_priority ON jobs (priority, seq) WHERE state = '{queued}';
CREATE INDEX jobs_client ON jobs (client, seq);
CREATE INDEX jobs_seq ON jobs (seq);
"""

#: Version 3 (issue 24): section jobs. A child names its parent, the parent's attempt that made it, its index and
#: where it lies in the parent's audio; ``sections_made`` on a parent counts the children ever made of it, so that
#: only a job with some pays for the cascade when it ends (transitions.cancel_sections). The unique index makes a
#: section idempotent per (parent, attempt, index) and finds a parent's sections.
_V3 = """
ALTER TABLE jobs ADD COLUMN parent_id TEXT;
ALTER TABLE jobs ADD COLUMN parent_attempt INTEGER;
ALTER TABLE jobs ADD COLUMN section INTEGER;
ALTER TABLE jobs ADD COLUMN offset_s {double};
ALTER TABLE jobs ADD COLUMN duration_s {double};
ALTER TABLE jobs ADD COLUMN sections_made INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX jobs_sections ON jobs (parent_id, parent_attempt, section) WHERE parent_id IS NOT NULL;
"""

#: Version 4: what the reaping pass looks for four times a second, on the store's one writer, found by its due
#: time rather than by reading every row: uploads no job took (it read every upload kept: tests/test_store_plans.py)
#: and queued jobs past their deadline (every queued job: 1,000 queued, 0.2-0.8 ms of each pass on SQLite).
_V4 = """
CREATE INDEX uploads_orphan ON uploads (started_at) WHERE job_id IS NULL;
CREATE INDEX jobs_queued_deadline ON jobs (deadline_at) WHERE state = '{queued}';
"""

#: (version, what it does, {dialect: SQL}), in order. Add new ones at the end; never edit an applied one.
MIGRATIONS: list[tuple[int, str, dict[str, str]]] = [
    (1, "nodes, jobs, segments, leases, reports, audio, the reapers' clock; epoch and job sequences",
     {d: _V1.format(**_TYPES[d], **_STATES) + _V1_SEQUENCES[d] for d in _TYPES}),
    (2, "jobs' model, labels, priority, client and canceller; nodes' labels, cordon, drain deadline and secret",
     {d: _V2.format(**_TYPES[d], **_STATES, batch=Priority.BATCH) for d in _TYPES}),
    (3, "section jobs: a child's parent, the parent's attempt, index, offset and duration; a parent's count",
     {d: _V3.format(**_TYPES[d]) for d in _TYPES}),
    (4, "indexes of the uploads no job took and of the queued jobs' deadlines (the reaping pass's searches)",
     {d: _V4.format(**_STATES) for d in _TYPES}),
]

LATEST = MIGRATIONS[-1][0]


def _statements(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]


async def migrate(tx: Tx, where: str) -> int:
    """Bring the schema to ``LATEST``; return the version found before. Refuses a newer schema."""
    dialect = tx.dialect.name
    await serialize(tx, MIGRATION_LOCK)
    await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)")
    found = await tx.fetchval("SELECT MAX(version) FROM schema_version") or 0
    if found > LATEST:
        raise StoreError(
            f"scheduler store {where} has schema version {found}, newer than this node-agent knows ({LATEST}): "
            "upgrade node-agent, or point scheduler.store at another database"
        )
    for version, _what, sql in MIGRATIONS:
        if version <= found:
            continue
        for statement in _statements(sql[dialect]):
            await tx.execute(statement)
        await tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, CAST(CURRENT_TIMESTAMP AS TEXT))", version
        )
    return int(found)
