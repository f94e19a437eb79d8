"""The scheduler's state in a database (SQLite or PostgreSQL): every operation is one transaction.

Each operation loads the rows it needs, asks ``rules`` what to do, and writes the answer in the same transaction.
Fencing is checked in the statement that writes: a renewal, events or a result update their rows only ``WHERE`` the
job's attempt, lease id, epoch and node all match a live, unexpired lease; when nothing matched, the rows are read
again only to say why. Claims lock the job row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has one writer), so
a job is assigned to at most one node however many replicas poll. Re-queues are conditional updates on the job's
attempt, so a job whose lease expired is re-queued exactly once even when every replica reaps at the same moment.

Times are seconds since the epoch on the store's clock (``Tx.now``: PostgreSQL's ``clock_timestamp()``), never a
replica's, and survive restarts.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from typing import Any, AsyncIterator

from ..config import SchedulerSettings
from .db import Engine, PostgresEngine, Row, Tx, sql_list
from .errors import (
    InvalidInput,
    JobNotAssigned,
    LeaseUnusable,
    NodeNotFound,
    ReportRejected,
    ResourceHeld,
    UnknownJob,
    Unservable,
)
from .metrics import SchedulerMetrics
from .migrations import LATEST, migrate
from .pgfast import PgFast, dispatch_of, fence, renewal
from .rules import (
    Holder,
    Served,
    admission_refusal,
    check_holder,
    clamp_ttl,
    gone_after_s,
    pick_device,
    poll_languages,
    queue_full,
    requeue_or_fail,
    unservable_error,
    unservable_message,
)
from .schemas import (
    OPEN_JOB_STATES,
    JOB_ERROR_CODES,
    RETRYABLE_ERROR_CODES,
    TERMINAL_JOB_STATES,
    AudioRef,
    DeviceSpec,
    EventsReport,
    Hardware,
    HeartbeatRequest,
    HeartbeatResponse,
    JobAssignment,
    JobErrorInfo,
    JobSpec,
    JobView,
    LeaseBounds,
    LeaseGrant,
    LeaseRequest,
    NodeList,
    NodeView,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    RenewResponse,
    ResultAck,
    ResultReport,
    stored_devices,
)
from .schemas import JobState as J
from .schemas import LeaseState as L
from .schemas import NodeState as N
from .topics import QUEUE_TOPIC, job_topic

log = logging.getLogger("node_agent.scheduler")

#: Audio is stored in chunks of this size, so neither an upload nor a download holds a whole file in memory.
CHUNK_BYTES = 1024 * 1024
#: What the admission check may be behind the live nodes (each submission would otherwise read every node).
SERVED_CACHE_S = 1.0
#: Rows one reaping pass handles per kind; the rest wait for the next pass.
REAP_BATCH = 200
#: No reaping pass for this long means no scheduler could reach the store (or none ran): that time is given back
#: to the live leases, since no holder could renew meanwhile (docs/protocol.md, "The store").
PAUSE_AFTER_S = 2.0
#: Below this share of scheduler.max_queued_jobs / max_queued_bytes, the last reaping pass's count (plus this
#: replica's submissions since) stands in for counting the unfinished jobs at each submission; nearer the bounds,
#: every submission counts them exactly.
ADMIT_ESTIMATE_BELOW = 0.9
#: An upload never turned into a job (the scheduler died mid-upload) is deleted after this.
ORPHAN_UPLOAD_S = 3600.0
#: Device lists remembered per node for the single-statement paths (each statement checks the list is unchanged).
NODE_DEVICES_KEPT = 10000
_OPEN = sql_list(OPEN_JOB_STATES)
_TERMINAL = sql_list(sorted(TERMINAL_JOB_STATES))


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


def _unknown_job(job_id: str) -> UnknownJob:
    return UnknownJob(f"job {job_id} is not known (never submitted, or finished and forgotten)")


def _doc(model: Any) -> str:
    """A model as JSON text, escaped to ASCII: user text may hold lone surrogates that UTF-8 cannot encode."""
    return json.dumps(model.model_dump(mode="json"))


def _devices(text: str) -> list[DeviceSpec]:
    return list(stored_devices(text))


class SqlUpload:
    """Audio streamed into the store in ``CHUNK_BYTES`` pieces while it arrives. An upload that fits in one chunk
    (most: a minute of 16 kHz PCM is 1.9 MB, of compressed audio far less) never touches the store until its job
    is submitted, and is then written in the submit's own transaction."""

    def __init__(self, store: "SqlStore", upload_id: str) -> None:
        self._store = store
        self.upload_id = upload_id
        self.size = 0
        self._buffer = bytearray()
        self._chunks = 0  # chunks written to the store so far

    async def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) > CHUNK_BYTES:
            await self._flush(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]

    async def _flush(self, chunk: bytes) -> None:
        n = self._chunks
        self._chunks += 1
        upload_id, size = self.upload_id, self.size

        async def op(tx: Tx) -> None:
            if n == 0:  # the first chunk of a large upload: from now on it is an upload the reaper knows of
                await tx.execute("INSERT INTO uploads (upload_id, started_at, bytes) VALUES ($1, $2, 0)",
                                 upload_id, await tx.now())
            await tx.execute("INSERT INTO audio_chunks (upload_id, n, data) VALUES ($1, $2, $3)", upload_id, n, chunk)
            await tx.execute("UPDATE uploads SET bytes = $2 WHERE upload_id = $1", upload_id, size)

        await self._store.engine.run(op)

    async def write_rest(self, tx: Tx, now: float, job_id: str) -> None:
        """Inside the submit's transaction: the last (or only) chunk, and the upload's row, now the job's."""
        if self._chunks == 0:
            await tx.execute("INSERT INTO uploads (upload_id, started_at, bytes, job_id) VALUES ($1, $2, $3, $4)",
                             self.upload_id, now, self.size, job_id)
        else:
            await tx.execute("UPDATE uploads SET job_id = $2, bytes = $3 WHERE upload_id = $1", self.upload_id,
                             job_id, self.size)
        if self._buffer:
            await tx.execute("INSERT INTO audio_chunks (upload_id, n, data) VALUES ($1, $2, $3)",
                             self.upload_id, self._chunks, bytes(self._buffer))

    @property
    def single_chunk(self) -> bool:
        """Nothing of it is in the store yet: all of it is the buffer (at most one chunk)."""
        return self._chunks == 0

    @property
    def buffered(self) -> bytes:
        return bytes(self._buffer)

    def written(self) -> None:
        """The submit committed: what was buffered is in the store."""
        if self._buffer:
            self._chunks += 1
            self._buffer = bytearray()

    async def discard(self) -> None:
        self._buffer = bytearray()
        if self._chunks:
            await self._store.engine.run(lambda tx: self._store._drop_audio(tx, self.upload_id))


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
        self._served: Served | None = None
        self._served_at = -math.inf
        # Gauges read at scrape time from the last reaping pass (a scrape must not wait on the database).
        self.queue_depth_seen = 0
        self.node_states_seen: dict[str, int] = {}
        self.load_seen = (0, 0)
        self._load_at = -math.inf  # when load_seen was read (monotonic)
        self._since_load = [0, 0]  # jobs and bytes this replica admitted since then
        self._reaped_at = -math.inf  # when this replica's last reaping pass committed (monotonic)
        # PostgreSQL: the hot operations' common case in one statement each (pgfast.py); None on SQLite, and
        # where turned off (the store tests run PostgreSQL both ways, so the general path's common case is tested).
        self._fast = PgFast(engine) if isinstance(engine, PostgresEngine) and single_statements else None
        self._node_devices: dict[str, str] = {}  # node id -> its device list as stored, as last seen here

    async def close(self) -> None:
        await self.engine.close()

    async def queue_depth(self) -> int:
        return int(await self.engine.run(
            lambda tx: tx.fetchval(f"SELECT COUNT(*) FROM jobs WHERE state = '{J.QUEUED}'")))

    async def open(self) -> None:
        found = await self.engine.run(lambda tx: migrate(tx, self.where))
        if 0 < found < LATEST:  # an upgrade is news; a new store's creation is not
            log.info("scheduler store %s: schema migrated from version %d to %d", self.where, found, LATEST)
        log.debug("scheduler store %s ready", self.where)
        await self.reap()

    # ------------------------------------------------------------------------------------------- nodes

    async def register(self, req: RegisterRequest) -> RegisterResponse:
        node_id = req.node_id or f"node-{secrets.token_hex(6)}"
        devices = json.dumps([d.model_dump(mode="json") for d in req.devices])

        async def op(tx: Tx) -> bool:
            now = await tx.now()
            known = await tx.fetchval("SELECT state FROM nodes WHERE node_id = $1", node_id)
            if known is not None and known != N.GONE:
                # A live node registering again is a new agent process (an agent registers once at start, and
                # after a 404 for a node that went gone): what its previous process held is void now, rather than
                # blocking its devices until the TTL runs out.
                await self._release_node(tx, node_id, now, "restarted")
            await tx.execute(
                f"""INSERT INTO nodes (node_id, hostname, agent_version, hardware, devices, registered_at,
                       last_heartbeat, state, running_jobs, cpu_percent, memory_used_bytes, memory_total_bytes, gone_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $6, '{N.READY}', '[]', 0, 0, 0, NULL)
                   ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,
                       agent_version = excluded.agent_version, hardware = excluded.hardware,
                       devices = excluded.devices, registered_at = excluded.registered_at,
                       last_heartbeat = excluded.last_heartbeat, state = '{N.READY}', running_jobs = '[]',
                       gone_at = NULL""",
                node_id, req.hostname, req.agent_version, _doc(req.hardware), devices, now,
            )
            tx.notify(QUEUE_TOPIC)  # new capacity: queued jobs it serves may go now
            return known is not None

        known = await self.engine.run(op)
        self._served = None
        self._remember_devices(node_id, devices)
        self.metrics.node_seen(node_id)
        log.info("node registered node_id=%s hostname=%s devices=%s%s", node_id, req.hostname,
                 ",".join(d.resource for d in req.devices) or "-", " (again)" if known else "")
        s = self.settings
        return RegisterResponse(
            node_id=node_id,
            heartbeat_interval_s=s.heartbeat_interval_s,
            lease=LeaseBounds(min_ttl_s=s.lease_min_ttl_s, max_ttl_s=s.lease_max_ttl_s),
        )

    def _remember_devices(self, node_id: str, devices: str) -> None:
        if self._fast is None:
            return
        if len(self._node_devices) >= NODE_DEVICES_KEPT and node_id not in self._node_devices:
            self._node_devices.clear()  # node churn: start again (each entry is re-read on a node's next poll)
        self._node_devices[node_id] = devices

    def _fresh_reap(self) -> bool:
        """This replica's own reaping pass ran just now: no store pause can be pending (see _resume_if_paused)."""
        return time.monotonic() - self._reaped_at < PAUSE_AFTER_S / 2

    async def _release_node(self, tx: Tx, node_id: str, now: float, why: str) -> None:
        """The node is gone (or restarted): expire its live leases and re-queue what it was assigned."""
        for lease in await tx.fetch(f"SELECT * FROM leases WHERE node_id = $1 AND state = '{L.ACTIVE}'", node_id):
            await self._expire(tx, lease, now, "node_gone")
        for job in await tx.fetch(f"SELECT * FROM jobs WHERE node_id = $1 AND state = '{J.ASSIGNED}'", node_id):
            await self._requeue_or_fail(tx, job, now, "node_gone", "worker_unavailable", f"node {node_id} {why}")

    @staticmethod
    async def _live_node(tx: Tx, node_id: str) -> Row:
        node = await tx.fetchrow("SELECT node_id, state, devices FROM nodes WHERE node_id = $1", node_id)
        if node is None or node["state"] == N.GONE:
            why = "is gone (missed its heartbeats)" if node is not None else "is not registered"
            raise NodeNotFound(f"node {node_id} {why}; register again")
        return node

    async def heartbeat(self, node_id: str, req: HeartbeatRequest) -> HeartbeatResponse:
        if self._fast is not None and await self._fast.heartbeat(
                node_id, req.state, json.dumps(req.running_jobs), float(req.cpu_percent), req.memory_used_bytes,
                req.memory_total_bytes):
            return HeartbeatResponse(heartbeat_interval_s=self.settings.heartbeat_interval_s)

        async def op(tx: Tx) -> None:
            now = await tx.now()
            changed = await tx.execute(
                f"""UPDATE nodes SET last_heartbeat = $2, state = $3, running_jobs = $4, cpu_percent = $5,
                       memory_used_bytes = $6, memory_total_bytes = $7
                   WHERE node_id = $1 AND state <> '{N.GONE}'""",
                node_id, now, req.state, json.dumps(req.running_jobs), float(req.cpu_percent),
                req.memory_used_bytes, req.memory_total_bytes,
            )
            if not changed:
                await self._live_node(tx, node_id)  # raises, naming why

        await self.engine.run(op)
        return HeartbeatResponse(heartbeat_interval_s=self.settings.heartbeat_interval_s)

    async def list_nodes(self) -> NodeList:
        async def op(tx: Tx) -> tuple[float, list[Row]]:
            return await tx.now(), await tx.fetch("SELECT * FROM nodes ORDER BY registered_at")

        now, rows = await self.engine.run(op)
        return NodeList(nodes=[
            NodeView(
                node_id=r["node_id"],
                hostname=r["hostname"],
                agent_version=r["agent_version"],
                state=r["state"],
                hardware=Hardware.model_validate(json.loads(r["hardware"])),
                devices=_devices(r["devices"]),
                running_jobs=json.loads(r["running_jobs"]),
                last_heartbeat_age_s=round(now - r["last_heartbeat"], 3),
                registered_age_s=round(now - r["registered_at"], 3),
            )
            for r in rows
        ])

    async def _served_now(self, tx: Tx, fresh: bool = False) -> Served:
        if fresh or self._served is None or time.monotonic() - self._served_at > SERVED_CACHE_S:
            rows = await tx.fetch(f"SELECT devices FROM nodes WHERE state <> '{N.GONE}'")
            self._served = Served.of(_devices(r["devices"]) for r in rows)
            self._served_at = time.monotonic()
        return self._served

    # ------------------------------------------------------------------------------------ jobs: client

    async def begin_upload(self) -> SqlUpload:
        return SqlUpload(self, f"upload-{secrets.token_hex(8)}")

    async def submit(self, spec: JobSpec, upload: SqlUpload, filename: str | None = None,
                     idempotency_key: str | None = None) -> tuple[str, str, bool]:
        """Queue a job whose audio is ``upload``: (job id, state, replayed). A repeated ``idempotency_key`` with the
        same submission answers the first job (replayed); with another, ``InvalidInput``. Empty audio is
        ``InvalidInput``, a job no live node serves ``Unservable``, one past the queue's bounds ``QueueFull``."""
        size = upload.size
        submission = json.dumps([spec.model_dump(mode="json"), size, filename], sort_keys=True)

        async def op(tx: Tx) -> tuple[str, str, bool]:
            now = await tx.now()
            if idempotency_key is not None:
                earlier = await tx.fetchrow(
                    "SELECT job_id, state, submission FROM jobs WHERE idempotency_key = $1", idempotency_key
                )
                if earlier is not None:
                    if earlier["submission"] != submission:
                        raise InvalidInput(
                            f"Idempotency-Key {idempotency_key[:40]!r} was already used for a different submission "
                            f"(job {earlier['job_id']}); use a new key for a new job",
                            code="idempotency_key_reused", param="Idempotency-Key",
                        )
                    return earlier["job_id"], earlier["state"], True
            served = await self._served_now(tx)
            self._capable(spec, served, size)
            jobs, audio_bytes = self._open_load_estimate(size)
            if jobs is None:
                open_row = await tx.fetchrow(
                    f"SELECT COUNT(*) AS jobs, COALESCE(SUM(audio_bytes), 0) AS bytes FROM jobs WHERE state IN {_OPEN}"
                )
                assert open_row is not None
                jobs, audio_bytes = int(open_row["jobs"]), int(open_row["bytes"])
            self._admit(jobs, audio_bytes, size)
            job_id = f"job-{secrets.token_hex(8)}"
            seq = await tx.next_value("job_seqs")
            await tx.execute(
                f"""INSERT INTO jobs (job_id, seq, spec, language, filename, audio_bytes, upload_id, idempotency_key,
                       submission, created_at, queued_at, deadline_at, state, attempt)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, '{J.QUEUED}', 1)""",
                job_id, seq, _doc(spec), spec.language, filename, size, upload.upload_id,
                idempotency_key, submission if idempotency_key is not None else None, now, now + self._deadline_s(spec),
            )
            await upload.write_rest(tx, now, job_id)
            tx.notify(QUEUE_TOPIC)  # (no job topic: nobody can be waiting on a job before its id is answered)
            return job_id, J.QUEUED, False

        async def fast() -> tuple[str, str, bool] | None:
            """PostgreSQL, the common case (no Idempotency-Key, audio in one chunk, what is served and the load
            known from the last second): one statement."""
            served = self._served
            if self._fast is None or idempotency_key is not None or not upload.single_chunk or served is None \
                    or time.monotonic() - self._served_at > SERVED_CACHE_S:
                return None
            jobs, audio_bytes = self._open_load_estimate(size)
            if jobs is None:
                return None
            self._capable(spec, served, size)
            self._admit(jobs, audio_bytes, size)
            job_id = f"job-{secrets.token_hex(8)}"
            await self._fast.submit(job_id, _doc(spec), spec.language, filename, size, upload.upload_id,
                                    self._deadline_s(spec), upload.buffered)
            return job_id, J.QUEUED, False

        try:
            job_id, state, replayed = await fast() or await self.engine.run(op)
            if replayed:
                await upload.discard()  # the first submission's audio is the job's
            else:
                upload.written()
        except BaseException:
            try:
                await upload.discard()
            except Exception:  # noqa: BLE001  (the reaper deletes orphan uploads later)
                log.warning("could not drop the audio of a refused submission (%s)", upload.upload_id)
            raise
        if replayed:
            log.info("job submission replayed job_id=%s (same Idempotency-Key)", job_id)
        else:
            self._since_load[0] += 1
            self._since_load[1] += size
            self.metrics.jobs_submitted.inc()
            log.info("job queued job_id=%s bytes=%d format=%s language=%s", job_id, size, spec.format,
                     spec.language or "auto")
        return job_id, state, replayed

    def _capable(self, spec: JobSpec, served: Served, size: int) -> None:
        """Refuse empty audio, and a job no live node serves."""
        if not size:
            raise InvalidInput("audio is empty", param="audio")
        # No live node at all is not a refusal: nodes may be starting (the embedded scheduler starts before its
        # agent registers). Such a job waits, and fails after unservable_after_s if none comes.
        if served.live_nodes and not served.serves(spec.language):
            self.metrics.jobs_refused.labels("no_capable_node").inc()
            message = unservable_message(spec.language, served)
            log.info("job refused reason=no_capable_node %s", message)
            raise Unservable(message, param="language" if spec.language is not None else None)

    def _admit(self, jobs: int, audio_bytes: int, size: int) -> None:
        """Refuse a job past scheduler.max_queued_jobs or max_queued_bytes (429 queue_full)."""
        why = admission_refusal(self.settings, jobs, audio_bytes, size)
        if why is not None:
            self.metrics.jobs_refused.labels("queue_full").inc()
            log.warning("queue full, refusing a job: %s", why)
            raise queue_full(why)

    def _deadline_s(self, spec: JobSpec) -> float:
        return spec.deadline_s if spec.deadline_s is not None else self.settings.default_deadline_s

    def _open_load_estimate(self, size: int) -> tuple[int | None, int]:
        """(unfinished jobs, their bytes) from the last count when a job of ``size`` is far from both bounds, else
        (None, 0): count now."""
        if time.monotonic() - self._load_at > SERVED_CACHE_S:
            return None, 0
        jobs = self.load_seen[0] + self._since_load[0]
        audio_bytes = self.load_seen[1] + self._since_load[1]
        s = self.settings
        if jobs + 1 < ADMIT_ESTIMATE_BELOW * s.max_queued_jobs and \
                audio_bytes + size < ADMIT_ESTIMATE_BELOW * s.max_queued_bytes:
            return jobs, audio_bytes
        return None, 0

    @staticmethod
    async def _job(tx: Tx, job_id: str, lock: bool = False) -> Row:
        job = await tx.fetchrow(
            "SELECT * FROM jobs WHERE job_id = $1" + (" FOR UPDATE" if lock and tx.dialect.skip_locked else ""),
            job_id,
        )
        if job is None:
            raise _unknown_job(job_id)
        return job

    async def view_job(self, job_id: str) -> JobView:
        async def op(tx: Tx) -> tuple[float, Row, list[Row]]:
            job = await self._job(tx, job_id)
            segments = await tx.fetch("SELECT data FROM segments WHERE job_id = $1 ORDER BY seg_id", job_id)
            return await tx.now(), job, segments

        now, job, segments = await self.engine.run(op)
        queued = job["queued_total_s"] + (now - job["queued_at"] if job["state"] == J.QUEUED else 0.0)
        timings: dict[str, Any] = {"queued_s": round(queued, 3)}
        if job["finished_at"] is not None:
            timings["total_s"] = round(job["finished_at"] - job["created_at"], 3)
        if job["node_timings"]:
            timings["node"] = json.loads(job["node_timings"])
        return JobView(
            job_id=job["job_id"],
            state=job["state"],
            attempt=job["attempt"],
            node_id=job["node_id"],
            language=job["language"],
            segments=[json.loads(s["data"]) for s in segments],
            result=json.loads(job["result"]) if job["result"] else None,
            error=JobErrorInfo.model_validate(json.loads(job["error"])) if job["error"] else None,
            created_age_s=round(now - job["created_at"], 3),
            timings=timings,
            filename=job["filename"],
        )

    async def job_settled(self, job_id: str, after_segment: int | None = None) -> bool:
        async def op(tx: Tx) -> bool:
            job = await self._job(tx, job_id)
            if job["state"] in TERMINAL_JOB_STATES:
                return True
            if after_segment is None:
                return False
            count = await tx.fetchval("SELECT COUNT(*) FROM segments WHERE job_id = $1", job_id)
            return int(count) > after_segment

        return await self.engine.run(op)

    def _audio_kept(self, job_id: str, job: Row) -> None:
        if job["upload_id"] is None or (job["state"] in TERMINAL_JOB_STATES and not self.settings.keep_audio):
            raise UnknownJob(f"job {job_id} has finished; its audio was dropped")

    async def job_audio(self, job_id: str) -> tuple[int, AsyncIterator[bytes]]:
        """The job's audio as (size, chunks), read chunk by chunk as the caller sends them on."""
        async def one_statement() -> tuple[int, list[int], str, bytes | None]:
            assert self._fast is not None
            row = await self._fast.audio(job_id)
            if row is None:
                raise _unknown_job(job_id)
            self._audio_kept(job_id, row)
            return int(row["audio_bytes"]), list(row["numbers"]), row["upload_id"], row["only_chunk"]

        async def op(tx: Tx) -> tuple[int, list[int], str, bytes | None]:
            job = await self._job(tx, job_id)
            self._audio_kept(job_id, job)
            numbers = [r["n"] for r in await tx.fetch(
                "SELECT n FROM audio_chunks WHERE upload_id = $1 ORDER BY n", job["upload_id"])]
            # Most audio is one chunk: sent from this same transaction.
            first = await tx.fetchval("SELECT data FROM audio_chunks WHERE upload_id = $1 AND n = $2",
                                      job["upload_id"], numbers[0]) if len(numbers) == 1 else None
            return int(job["audio_bytes"]), numbers, job["upload_id"], first

        size, numbers, upload_id, first = await (one_statement() if self._fast is not None else self.engine.run(op))

        async def chunks() -> AsyncIterator[bytes]:
            if first is not None:
                yield bytes(first)
                return
            for n in numbers:
                data = await self.engine.run(lambda tx, n=n: tx.fetchval(
                    "SELECT data FROM audio_chunks WHERE upload_id = $1 AND n = $2", upload_id, n))
                if data is None:
                    raise UnknownJob(f"job {job_id}'s audio was dropped while it was being sent")
                yield bytes(data)

        return size, chunks()

    # --------------------------------------------------------------------------------------- jobs: node

    async def assign_next(self, node_id: str, resource: str | None = None,
                          lease_ttl_s: float | None = None) -> JobAssignment | None:
        """Hand the oldest queued job one of the node's devices can run to that node, or None. With
        ``lease_ttl_s``, the job's lease is granted in the same transaction when its resource is free on that node
        (``assignment.lease``); else the node asks with ``grant_lease``, which names the holder."""
        # A device list is remembered only where the single statements run (PostgreSQL).
        devices_text = self._node_devices.get(node_id)
        dispatch = dispatch_of(devices_text, resource) if devices_text is not None else None
        if dispatch is not None:
            assert self._fast is not None and devices_text is not None
            ttl = clamp_ttl(self.settings, lease_ttl_s) if lease_ttl_s is not None else None
            lease_id = f"lease-{secrets.token_hex(8)}" if ttl is not None else None
            node_as_known, row = await self._fast.claim(node_id, devices_text, dispatch, lease_id, ttl)
            if node_as_known:
                if row is None:
                    return None
                self._assigned_log(row["job_id"], node_id, row["resource"], row["attempt"], row["waited"])
                assignment = self._assignment(row, row["resource"], row["now"], row["waited"])
                if row["lease_epoch"] is not None:
                    assert lease_id is not None and ttl is not None
                    assignment.lease = self._granted(lease_id, node_id, row["resource"], row["lease_epoch"],
                                                     row["job_id"], row["attempt"], ttl)
                return assignment
            # Gone, draining, or registered again with other devices: the general path reads it and says which.

        ttl = clamp_ttl(self.settings, lease_ttl_s) if lease_ttl_s is not None else None

        async def op(tx: Tx) -> tuple[JobAssignment, tuple[str, int] | None] | None:
            now = await tx.now()
            node = await self._live_node(tx, node_id)
            self._remember_devices(node_id, node["devices"])
            devices = [d for d in _devices(node["devices"])
                       if d.plugin == "asr" and (resource is None or d.resource == resource)]
            if resource is not None and not devices:
                raise InvalidInput(f"resource {resource} is not a registered device of node {node_id}",
                                   param="resource")
            if node["state"] == N.DRAINING or not devices:
                return None
            languages = poll_languages(devices)
            sql = f"SELECT * FROM jobs WHERE state = '{J.QUEUED}'"
            args: list[Any] = []
            if languages is not None:
                sql += (" AND (language IS NULL OR language IN ("
                        + tx.dialect.json_strings.format(p="$1") + "))")
                args.append(json.dumps(sorted(languages)))
            job = await tx.fetchrow(sql + " ORDER BY seq LIMIT 1" + tx.dialect.skip_locked, *args)
            if job is None:
                return None
            device = pick_device(devices, job["language"])
            assert device is not None  # the query chose a job these devices serve
            waited = now - job["queued_at"]
            await tx.execute(
                f"""UPDATE jobs SET state = '{J.ASSIGNED}', node_id = $2, resource = $3, assigned_at = $4,
                       lease_id = NULL, lease_epoch = NULL, queued_total_s = queued_total_s + $5, unservable_since = NULL
                   WHERE job_id = $1""",
                job["job_id"], node_id, device.resource, now, waited,
            )
            if job["attempt"] > 1:  # a new attempt starts from scratch: an earlier one's segments are not its output
                await tx.execute("DELETE FROM segments WHERE job_id = $1", job["job_id"])
            lease = None
            if ttl is not None and await self._resource_holder(tx, node_id, device.resource) is None:
                lease = await self._lease(tx, now, node_id, job, device.resource, ttl)
            return self._assignment(job, device.resource, now, waited), lease

        done = await self.engine.run(op)
        if done is None:
            return None
        assignment, lease = done
        # Logged once committed (the transaction may have run more than once).
        assert assignment.resource is not None and assignment.queued_s is not None
        self._assigned_log(assignment.job_id, node_id, assignment.resource, assignment.attempt, assignment.queued_s)
        if lease is not None:
            assert ttl is not None
            assignment.lease = self._granted(lease[0], node_id, assignment.resource, lease[1], assignment.job_id,
                                             assignment.attempt, ttl)
        return assignment

    @staticmethod
    def _assigned_log(job_id: str, node_id: str, resource: str, attempt: int, waited: float) -> None:
        log.info("job assigned job_id=%s node_id=%s resource=%s attempt=%d queued_s=%.3f", job_id, node_id, resource,
                 attempt, waited)

    @staticmethod
    def _assignment(job: Row, resource: str, now: float, waited: float) -> JobAssignment:
        spec = JobSpec.model_validate(json.loads(job["spec"]))
        return JobAssignment(
            job_id=job["job_id"],
            attempt=job["attempt"],
            language=spec.language,
            options=spec.options.model_dump(exclude_none=True),
            audio=AudioRef(format=spec.format, sample_rate=spec.sample_rate, bytes=job["audio_bytes"],
                           url=f"/v1/jobs/{job['job_id']}/audio"),
            deadline_s=max(0.0, job["deadline_at"] - now) if job["deadline_at"] is not None else None,
            queued_s=round(waited, 6),
            resource=resource,
        )

    async def _why_rejected(self, tx: Tx, job_id: str, attempt: int, lease_id: str, epoch: int, node_id: str,
                            now: float) -> ReportRejected:
        """Why a fenced write matched nothing: the first field that does not name the current holder."""
        job = await self._job(tx, job_id)
        lease = await tx.fetchrow("SELECT * FROM leases WHERE lease_id = $1", job["lease_id"]) \
            if job["lease_id"] is not None else None
        try:
            check_holder(_holder(job, lease), attempt, lease_id, epoch, node_id)
        except ReportRejected as exc:
            return exc
        return ReportRejected(f"lease {lease_id} of job {job_id} expired", code="stale_epoch")

    #: The fence: the job's current attempt, live lease (unexpired on the store's clock), epoch and node.
    _FENCE = fence("$6")

    async def post_events(self, job_id: str, report: EventsReport) -> None:
        """Store streamed segments from the job's current holder (a segment id seen before is replaced)."""
        ids = [seg.id for seg in report.events]
        if self._fast is not None and self._fresh_reap() and len(set(ids)) == len(ids) and await self._fast.events(
                (job_id, report.attempt, report.lease_id, report.lease_epoch, report.node_id), ids,
                [_doc(seg) for seg in report.events]):
            return  # (a refusal, a repeated segment id in one report, or a pending store pause: the general path)

        async def op(tx: Tx) -> None:
            now = await tx.now()
            await self._resume_if_paused(tx, now)
            held = await tx.execute(
                "UPDATE jobs SET state = state WHERE " + self._FENCE,
                job_id, report.attempt, report.lease_id, report.lease_epoch, report.node_id, now,
            )
            if not held:
                exc = await self._why_rejected(tx, job_id, report.attempt, report.lease_id, report.lease_epoch,
                                               report.node_id, now)
                log.info("events rejected job_id=%s node_id=%s lease_id=%s attempt=%d lease_epoch=%d reason=%s",
                         job_id, report.node_id, report.lease_id, report.attempt, report.lease_epoch, exc.code)
                raise exc
            if report.events:
                await tx.executemany(
                    """INSERT INTO segments (job_id, seg_id, data) VALUES ($1, $2, $3)
                       ON CONFLICT (job_id, seg_id) DO UPDATE SET data = excluded.data""",
                    [(job_id, s.id, _doc(s)) for s in report.events],
                )
                tx.notify(job_topic(job_id))

        await self.engine.run(op)

    async def report_result(self, job_id: str, report: ResultReport) -> ResultAck:
        """Accept the one final result of a job from its current holder."""
        holder_key = (job_id, report.attempt, report.lease_id, report.lease_epoch, report.node_id)
        outcome: dict[str, Any] = {}
        if self._fast is not None and report.outcome == "succeeded" and self._fresh_reap():
            assert report.result is not None  # ResultReport guarantees it
            ids = [seg.id for seg in report.result.segments]
            if len(set(ids)) == len(ids):
                ack = ResultAck()
                done = await self._fast.succeed(
                    holder_key, _doc(report.result), json.dumps(report.timings), _doc(ack), ids,
                    [_doc(seg) for seg in report.result.segments], not self.settings.keep_audio)
                if done is not None:
                    self._finished_log(done, done["now"], None)
                    self.metrics.results_accepted.inc()
                    return ack
            # Not the holder, a repeated report, a pending store pause: the general path decides and says why.

        async def op(tx: Tx) -> ResultAck:
            now = await tx.now()
            await self._resume_if_paused(tx, now)
            previous = await tx.fetchval(
                "SELECT ack FROM reports WHERE job_id = $1 AND attempt = $2 AND lease_id = $3 AND epoch = $4 "
                "AND node_id = $5", *holder_key,
            )
            if previous is not None:
                # The accepted holder retrying (its answer was lost): the same answer again, nothing changes.
                return ResultAck.model_validate_json(previous).model_copy(update={"duplicate": True})
            job = await tx.fetchrow("UPDATE jobs SET state = state WHERE " + self._FENCE + " RETURNING *",
                                    *holder_key, now)
            if job is None:
                exc = await self._why_rejected(tx, *holder_key, now)
                log.info("result rejected job_id=%s node_id=%s lease_id=%s attempt=%d lease_epoch=%d reason=%s",
                         job_id, report.node_id, report.lease_id, report.attempt, report.lease_epoch, exc.code)
                outcome["rejected"] = exc.code
                raise exc
            timings = json.dumps(report.timings)
            if report.outcome == "succeeded":
                assert report.result is not None  # ResultReport guarantees it
                if report.result.segments:
                    await tx.execute("DELETE FROM segments WHERE job_id = $1", job_id)
                    await tx.executemany(
                        "INSERT INTO segments (job_id, seg_id, data) VALUES ($1, $2, $3)",
                        [(job_id, s.id, _doc(s)) for s in report.result.segments],
                    )
                ack = ResultAck()
                await self._finish(tx, job, now, None, result=_doc(report.result), timings=timings)
            else:
                error = report.error or JobErrorInfo(code="failed", message="the node reported a failure")
                if error.code not in JOB_ERROR_CODES:
                    error = JobErrorInfo(code="failed", message=f"{error.code}: {error.message}")
                if error.code in RETRYABLE_ERROR_CODES and job["attempt"] < self.settings.max_attempts:
                    ack = ResultAck(requeued=True)
                    await tx.execute("UPDATE jobs SET node_timings = $2 WHERE job_id = $1", job_id, timings)
                    await self._requeue_or_fail(tx, job, now, "retryable_error", error.code, error.message)
                else:
                    ack = ResultAck()
                    await self._finish(tx, job, now, error, timings=timings)
            await tx.execute(
                "INSERT INTO reports (job_id, attempt, lease_id, epoch, node_id, ack) VALUES ($1, $2, $3, $4, $5, $6)",
                *holder_key, _doc(ack),
            )
            outcome["accepted"] = True
            return ack

        try:
            return await self.engine.run(op)
        finally:
            if "rejected" in outcome:
                self.metrics.results_rejected.labels(outcome["rejected"]).inc()
            elif outcome.get("accepted"):
                self.metrics.results_accepted.inc()

    # ------------------------------------------------------------------------------------------ leases

    async def grant_lease(self, req: LeaseRequest) -> LeaseGrant:
        """Grant a fenced lease on (node, resource) for a job assigned to that node."""
        ttl = clamp_ttl(self.settings, req.ttl_s)
        devices_text = self._node_devices.get(req.node_id)  # (PostgreSQL only, as in assign_next)
        if devices_text is not None and any(d.resource == req.resource for d in _devices(devices_text)):
            assert self._fast is not None
            lease_id = f"lease-{secrets.token_hex(8)}"
            row = await self._fast.grant(req.node_id, devices_text, req.job_id, req.resource, lease_id, ttl)
            if row is not None:
                return self._granted(lease_id, req.node_id, req.resource, row["epoch"], req.job_id, row["attempt"],
                                     ttl)
            # A refusal, a repeated request, a resource still held: the general path decides and says why.

        async def op(tx: Tx) -> tuple[str, int, str, int]:
            now = await tx.now()
            node = await self._live_node(tx, req.node_id)
            self._remember_devices(req.node_id, node["devices"])
            if not any(d.resource == req.resource for d in _devices(node["devices"])):
                raise InvalidInput(f"resource {req.resource} is not a registered device of node {req.node_id}",
                                   param="resource")
            job = await tx.fetchrow(
                "SELECT * FROM jobs WHERE job_id = $1" + (" FOR UPDATE" if tx.dialect.skip_locked else ""),
                req.job_id,
            )
            if job is None or job["node_id"] != req.node_id or job["state"] not in (J.ASSIGNED, J.RUNNING):
                state = "unknown" if job is None else f"{job['state']} on node {job['node_id'] or 'none'}"
                raise JobNotAssigned(f"job {req.job_id} is not assigned to node {req.node_id} (it is {state})")
            holder = await self._resource_holder(tx, req.node_id, req.resource)
            if holder is not None and holder["job_id"] != job["job_id"]:
                raise ResourceHeld(
                    f"{req.resource} on node {req.node_id} is held by lease {holder['lease_id']} "
                    f"(job {holder['job_id']})",
                    retry_after_s=max(1, math.ceil(holder["expires_at"] - now)),
                )
            lease_id, epoch = await self._lease(tx, now, req.node_id, job, req.resource, ttl)
            return lease_id, epoch, job["job_id"], job["attempt"]

        lease_id, epoch, job_id, attempt = await self.engine.run(op)
        return self._granted(lease_id, req.node_id, req.resource, epoch, job_id, attempt, ttl)

    @staticmethod
    async def _resource_holder(tx: Tx, node_id: str, resource: str) -> Row | None:
        """The live lease on ``resource`` of ``node_id``, if any."""
        return await tx.fetchrow(
            "SELECT lease_id, job_id, expires_at FROM leases WHERE node_id = $1 AND resource = $2 "
            f"AND state = '{L.ACTIVE}'", node_id, resource,
        )

    async def _lease(self, tx: Tx, now: float, node_id: str, job: Row, resource: str, ttl: float) -> tuple[str, int]:
        """Grant ``job`` (assigned to ``node_id``) a lease on ``resource``, whose holder the caller checked: the
        job runs under it. (lease id, epoch)."""
        # The same job asks again (a retry after a lost answer, or another device): its older lease is fenced off
        # so only the newest epoch can report.
        if job["lease_id"] is not None:
            await self._end_leases(tx, job["job_id"], L.SUPERSEDED, now)
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

    def _granted(self, lease_id: str, node_id: str, resource: str, epoch: int, job_id: str, attempt: int,
                 ttl: float) -> LeaseGrant:
        """A committed grant, logged and counted once (the transaction may have run more than once)."""
        log.info("lease granted lease_id=%s node_id=%s resource=%s epoch=%d job_id=%s attempt=%d ttl_s=%g",
                 lease_id, node_id, resource, epoch, job_id, attempt, ttl)
        self.metrics.leases_granted.labels(node_id).inc()
        return LeaseGrant(lease_id=lease_id, epoch=epoch, ttl_s=ttl, resource=resource)

    async def renew_lease(self, lease_id: str, req: RenewRequest) -> RenewResponse:
        ttl = clamp_ttl(self.settings, req.ttl_s) if req.ttl_s is not None else None
        if self._fast is not None and self._fresh_reap():
            row = await self._fast.renew(lease_id, req.epoch, req.node_id, ttl)
            if row is not None:
                self.metrics.leases_renewed.labels(row["node_id"]).inc()
                return RenewResponse(lease_id=lease_id, epoch=row["epoch"], ttl_s=row["ttl_s"])

        async def op(tx: Tx) -> tuple[str, RenewResponse]:
            now = await tx.now()
            await self._resume_if_paused(tx, now)
            row = await tx.fetchrow(renewal("$5"), lease_id, req.epoch, req.node_id, ttl, now)
            if row is not None:
                return row["node_id"], RenewResponse(lease_id=lease_id, epoch=row["epoch"], ttl_s=row["ttl_s"])
            lease = await tx.fetchrow("SELECT * FROM leases WHERE lease_id = $1", lease_id)
            if lease is None:
                raise LeaseUnusable(f"lease {lease_id} is not known", code="unknown_lease")
            if lease["state"] != L.ACTIVE:
                raise LeaseUnusable(f"lease {lease_id} is {lease['state']}", code=f"lease_{lease['state']}")
            if lease["expires_at"] <= now:
                raise LeaseUnusable(f"lease {lease_id} is expired", code="lease_expired")
            exc = await self._why_rejected(tx, lease["job_id"], lease["attempt"], lease_id, req.epoch, req.node_id,
                                           now)
            log.info("renewal rejected lease_id=%s node_id=%s epoch=%d reason=%s", lease_id, req.node_id, req.epoch,
                     exc.code)
            raise LeaseUnusable(exc.message, code=exc.code)

        node_id, response = await self.engine.run(op)
        self.metrics.leases_renewed.labels(node_id).inc()
        return response

    async def release_lease(self, lease_id: str) -> None:
        """Give a lease back (idempotent). A job without an accepted result goes back to the queue."""
        async def op(tx: Tx) -> None:
            now = await tx.now()
            lease = await tx.fetchrow(
                f"UPDATE leases SET state = '{L.RELEASED}', ended_at = $2 WHERE lease_id = $1 AND state = '{L.ACTIVE}' "
                "RETURNING node_id, job_id", lease_id, now,
            )
            if lease is None:
                return
            log.info("lease released lease_id=%s node_id=%s job_id=%s", lease_id, lease["node_id"], lease["job_id"])
            job = await tx.fetchrow("SELECT * FROM jobs WHERE job_id = $1", lease["job_id"])
            if job is not None and job["lease_id"] == lease_id and job["state"] == J.RUNNING:
                await self._requeue_or_fail(tx, job, now, "released", "lease_lost",
                                            f"node {lease['node_id']} released the lease without a result")

        await self.engine.run(op)

    async def lease_state(self, lease_id: str) -> dict[str, Any] | None:
        """A lease's row (tests and status pages)."""
        row = await self.engine.run(lambda tx: tx.fetchrow("SELECT * FROM leases WHERE lease_id = $1", lease_id))
        return dict(row) if row is not None else None

    @staticmethod
    async def _end_leases(tx: Tx, job_id: str, state: str, now: float, attempt: int | None = None) -> None:
        """End the job's live leases (of ``attempt`` only, when given: a lease of a later attempt, granted after
        another replica re-queued the job, is not this caller's to end)."""
        if attempt is None:
            await tx.execute(f"UPDATE leases SET state = $2, ended_at = $3 WHERE job_id = $1 AND state = '{L.ACTIVE}'",
                             job_id, state, now)
        else:
            await tx.execute(f"UPDATE leases SET state = $2, ended_at = $3 WHERE job_id = $1 AND state = '{L.ACTIVE}' "
                             "AND attempt = $4", job_id, state, now, attempt)

    # ------------------------------------------------------------------------------- requeue and finish

    async def _requeue_or_fail(self, tx: Tx, job: Row, now: float, reason: str, code: str, message: str) -> None:
        """Another attempt, or the error ``rules.requeue_or_fail`` names. Conditional on the attempt the caller
        read, so one loss re-queues a job once however many replicas see it."""
        await self._end_leases(tx, job["job_id"], L.RELEASED, now, job["attempt"])
        outcome = requeue_or_fail(self.settings, job["attempt"], job["deadline_at"], now, code, message)
        if outcome != "requeue":
            await self._finish(tx, job, now, outcome)
            return
        changed = await tx.execute(
            f"""UPDATE jobs SET attempt = attempt + 1, state = '{J.QUEUED}', node_id = NULL, resource = NULL,
                   lease_id = NULL, lease_epoch = NULL, assigned_at = NULL, queued_at = $3
               WHERE job_id = $1 AND attempt = $2 AND state IN {_OPEN}""",
            job["job_id"], job["attempt"], now,
        )
        if not changed:
            return
        self.metrics.jobs_requeued.labels(reason).inc()
        log.info("job requeued job_id=%s reason=%s from_node=%s attempt=%d", job["job_id"], reason,
                 job["node_id"] or "-", job["attempt"] + 1)
        tx.notify(QUEUE_TOPIC)
        tx.notify(job_topic(job["job_id"]))

    async def _finish(self, tx: Tx, job: Row, now: float, error: JobErrorInfo | None, *, result: str | None = None,
                      timings: str | None = None) -> None:
        """End the job (one statement: its state, error or result, the node's timings, the audio reference), its
        leases, and its audio unless scheduler.keep_audio."""
        state = J.SUCCEEDED if error is None else J.FAILED
        drop_audio = not self.settings.keep_audio and job["upload_id"] is not None
        changed = await tx.execute(
            f"""UPDATE jobs SET state = $2, error = $3, finished_at = $4, unservable_since = NULL,
                   queued_total_s = queued_total_s + CASE WHEN state = '{J.QUEUED}' THEN $4 - queued_at ELSE 0 END,
                   result = COALESCE($6, result), node_timings = COALESCE($7, node_timings),
                   upload_id = CASE WHEN $8 = 1 THEN NULL ELSE upload_id END
               WHERE job_id = $1 AND attempt = $5 AND state NOT IN {_TERMINAL}""",
            job["job_id"], state, _doc(error) if error is not None else None, now, job["attempt"], result, timings,
            int(drop_audio),
        )
        if not changed:
            return
        await self._end_leases(tx, job["job_id"], L.RELEASED, now, job["attempt"])
        if drop_audio:
            await self._drop_audio(tx, job["upload_id"])
        self._finished_log(job, now, error)
        tx.notify(job_topic(job["job_id"]))

    def _finished_log(self, job: Row, now: float, error: JobErrorInfo | None) -> None:
        outcome = "succeeded" if error is None else error.code
        self.metrics.job_finished(outcome)
        log.info("job finished job_id=%s outcome=%s attempt=%d node_id=%s seconds=%.3f%s", job["job_id"], outcome,
                 job["attempt"], job["node_id"] or "-", now - job["created_at"],
                 f" error={error.message!r}" if error is not None else "")

    @staticmethod
    async def _drop_audio(tx: Tx, upload_id: str) -> None:
        await tx.execute("DELETE FROM audio_chunks WHERE upload_id = $1", upload_id)
        await tx.execute("DELETE FROM uploads WHERE upload_id = $1", upload_id)

    # ------------------------------------------------------------------------------------------ reaping

    async def reap(self) -> None:
        """Apply everything that fell due: vanished nodes, expired leases, assignments never leased, deadlines,
        unservable jobs, retention. Any replica may run it at any time; each row is handled once (rows are
        claimed with SKIP LOCKED and changed only by conditional updates)."""
        await self.engine.run(self._reap)
        # Here, on the event loop (the transaction may have run on the SQLite writer thread): admissions from now
        # on add to the count just read. One that committed meanwhile is missed: ADMIT_ESTIMATE_BELOW's margin.
        self._load_at = self._reaped_at = time.monotonic()
        self._since_load = [0, 0]

    async def _resume_if_paused(self, tx: Tx, now: float) -> None:
        """Before a fenced write: if no reaping pass ran for a while (the store was unreachable), give the leases
        their time back first, so a holder renewing right after the outage is not refused for it."""
        if self._fresh_reap():
            return  # this replica's own pass ran just now: no pause to give back
        last = await tx.fetchval("SELECT last_reap FROM store_clock WHERE id = 1")
        if last and now - last > PAUSE_AFTER_S:
            await self._clock_tick(tx, now)

    async def _clock_tick(self, tx: Tx, now: float) -> None:
        """Record a reaping pass; after a pause (no pass for PAUSE_AFTER_S), extend every live lease by it. The row
        lock makes replicas take turns, so a pause is given back once."""
        lock = " FOR UPDATE" if tx.dialect.skip_locked else ""
        last = await tx.fetchval("SELECT last_reap FROM store_clock WHERE id = 1" + lock)
        if last and now - last > PAUSE_AFTER_S:
            gap = now - last
            extended = await tx.execute(
                f"UPDATE leases SET expires_at = expires_at + $1 WHERE state = '{L.ACTIVE}'", gap)
            log.warning("no scheduler reached the store for %.1f s: %d live lease(s) extended by that time",
                        gap, extended)
        await tx.execute("UPDATE store_clock SET last_reap = $1 WHERE id = 1", now)

    async def _reap(self, tx: Tx) -> None:
        s = self.settings
        now = await tx.now()
        skip = tx.dialect.skip_locked
        await self._clock_tick(tx, now)
        gone = await tx.fetch(
            f"UPDATE nodes SET state = '{N.GONE}', gone_at = $1 WHERE state <> '{N.GONE}' AND last_heartbeat <= $2 "
            "RETURNING node_id, last_heartbeat", now, now - gone_after_s(s),
        )
        for node in gone:
            self._served = None
            log.info("node gone node_id=%s last_heartbeat_age_s=%.1f", node["node_id"], now - node["last_heartbeat"])
            await self._release_node(tx, node["node_id"], now, "is gone")
        for row in await tx.fetch(f"DELETE FROM nodes WHERE state = '{N.GONE}' AND gone_at <= $1 RETURNING node_id",
                                  now - s.job_retention_s):
            self.metrics.node_forgotten(row["node_id"])
        for lease in await tx.fetch(
            f"SELECT * FROM leases WHERE state = '{L.ACTIVE}' AND expires_at <= $1 LIMIT {REAP_BATCH}{skip}", now
        ):
            await self._expire(tx, lease, now, "lease_expired")
        for job in await tx.fetch(
            f"SELECT * FROM jobs WHERE state = '{J.ASSIGNED}' AND assigned_at <= $1 LIMIT {REAP_BATCH}{skip}",
            now - s.assign_timeout_s,
        ):
            await self._requeue_or_fail(tx, job, now, "assign_timeout", "worker_unavailable",
                                        f"node {job['node_id']} took no lease within {s.assign_timeout_s:g} s")
        for job in await tx.fetch(
            f"SELECT * FROM jobs WHERE state = '{J.QUEUED}' AND deadline_at <= $1 LIMIT {REAP_BATCH}{skip}", now
        ):
            await self._finish(tx, job, now, JobErrorInfo(code="timeout", message="the deadline passed while queued"))
        await self._reap_unservable(tx, now)
        old = await tx.fetch(
            f"SELECT job_id, upload_id FROM jobs WHERE finished_at <= $1 LIMIT {REAP_BATCH}{skip}",
            now - s.job_retention_s,
        )
        for job in old:
            for table in ("segments", "reports", "leases"):
                await tx.execute(f"DELETE FROM {table} WHERE job_id = $1", job["job_id"])
            if job["upload_id"] is not None:
                await self._drop_audio(tx, job["upload_id"])
            await tx.execute("DELETE FROM jobs WHERE job_id = $1", job["job_id"])
        for upload in await tx.fetch(
            f"SELECT upload_id FROM uploads WHERE job_id IS NULL AND started_at <= $1 LIMIT {REAP_BATCH}{skip}",
            now - ORPHAN_UPLOAD_S,
        ):
            await self._drop_audio(tx, upload["upload_id"])
        await self._gauges(tx)

    async def refresh_gauges(self) -> None:
        """Read the gauges' values now (a /metrics scrape does, so it shows this moment, not the last pass)."""
        await self.engine.run(self._gauges)

    async def _gauges(self, tx: Tx) -> None:
        counts = await tx.fetch("SELECT state, COUNT(*) AS n FROM nodes GROUP BY state")
        self.node_states_seen = {r["state"]: int(r["n"]) for r in counts}
        open_row = await tx.fetchrow(
            f"""SELECT COUNT(*) AS jobs, COALESCE(SUM(audio_bytes), 0) AS bytes,
                   COALESCE(SUM(CASE WHEN state = '{J.QUEUED}' THEN 1 ELSE 0 END), 0) AS queued
               FROM jobs WHERE state IN {_OPEN}"""
        )
        assert open_row is not None
        self.load_seen = (int(open_row["jobs"]), int(open_row["bytes"]))
        self.queue_depth_seen = int(open_row["queued"])

    async def _expire(self, tx: Tx, lease: Row, now: float, reason: str) -> None:
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
            await self._requeue_or_fail(tx, job, now, reason, "lease_expired",
                                        f"lease {lease['lease_id']} on node {lease['node_id']} expired")

    async def _reap_unservable(self, tx: Tx, now: float) -> None:
        """Mark queued jobs no live node serves, clear the mark when one does, and fail those marked for
        ``unservable_after_s`` with no_capable_node."""
        served = await self._served_now(tx, fresh=True)
        # One SQL condition for "some live node serves this job's language" (rules.Served.serves).
        serves = ("((language IS NULL AND $1 = 1) OR (language IS NOT NULL AND ($2 = 1 OR language IN ("
                  + tx.dialect.json_strings.format(p="$3") + "))))")
        args = (int(served.has_device), int(served.any_language), json.dumps(sorted(served.languages)))
        await tx.execute(
            f"UPDATE jobs SET unservable_since = NULL WHERE state = '{J.QUEUED}' AND unservable_since IS NOT NULL "
            f"AND {serves}", *args,
        )
        await tx.execute(
            f"UPDATE jobs SET unservable_since = $4 WHERE state = '{J.QUEUED}' AND unservable_since IS NULL "
            f"AND NOT {serves}", *args, now,
        )
        after = self.settings.unservable_after_s
        for job in await tx.fetch(
            f"SELECT * FROM jobs WHERE state = '{J.QUEUED}' AND unservable_since <= $1 LIMIT {REAP_BATCH}"
            + tx.dialect.skip_locked, now - after,
        ):
            await self._finish(tx, job, now,
                               unservable_error(job["language"], served, now - job["unservable_since"], after))
