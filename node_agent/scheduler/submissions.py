"""What clients do with jobs in the store: audio streamed in, jobs submitted (admission: capable nodes, the queue's
bounds, idempotency keys), and jobs, their segments and their audio read back."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any, AsyncIterator

from .db import Conflict, Engine, Row, Tx, serialize
from .errors import InvalidInput, UnknownJob, Unservable
from .rules import Ask, Served, admission_refusal, queue_full, unservable_message
from .schemas import TERMINAL_JOB_STATES, JobErrorInfo, JobSpec, JobView, SectionSummary
from .schemas import JobState as J
from .schemas import Priority
from .topics import submitted_topic
from .transitions import OPEN, StorePart, Transitions, doc, section_summaries, unknown_job

log = logging.getLogger("node_agent.scheduler")

#: Audio is stored in chunks of this size, so neither an upload nor a download holds a whole file in memory.
CHUNK_BYTES = 1024 * 1024
#: PostgreSQL: the key of the transaction-scoped advisory lock under which a submission near the queue's bounds
#: counts the unfinished jobs, so that concurrent ones (on any replica) each see the others' jobs.
ADMISSION_LOCK = 4_708_471


class SqlUpload:
    """Audio streamed into the store in ``CHUNK_BYTES`` pieces while it arrives. An upload that fits in one chunk
    (most: a minute of 16 kHz PCM is 1.9 MB, of compressed audio far less) never touches the store until its job
    is submitted, and is then written in the submit's own transaction."""

    def __init__(self, engine: Engine, upload_id: str) -> None:
        self._engine = engine
        self.upload_id = upload_id
        self.size = 0
        self._buffer = bytearray()
        self._chunks = 0  # chunks written to the store so far
        self._sha256 = hashlib.sha256()  # of the audio so far: part of an idempotent submission's fingerprint

    async def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        self._sha256.update(data)
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

        await self._engine.run(op)

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
    def sha256(self) -> str:
        """The hex SHA-256 of the audio written so far."""
        return self._sha256.hexdigest()

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
            await self._engine.run(lambda tx: Transitions.drop_audio(tx, self.upload_id))

class Submissions(StorePart):
    """Jobs as clients see them: submitted, viewed, waited on, their audio read."""

    async def queue_depth(self) -> int:
        return int(await self.engine.run(
            lambda tx: tx.fetchval(f"SELECT COUNT(*) FROM jobs WHERE state = '{J.QUEUED}'")))

    async def begin_upload(self) -> SqlUpload:
        return SqlUpload(self.engine, f"upload-{secrets.token_hex(8)}")

    async def submit(self, spec: JobSpec, upload: SqlUpload, filename: str | None = None,
                     idempotency_key: str | None = None, client: str | None = None) -> tuple[str, str, bool]:
        """Queue a job whose audio is ``upload``, for ``client`` (the name of the token it came with; None where the
        scheduler has no per-client tokens): (job id, state, replayed). A repeated ``idempotency_key`` with the
        same submission answers the first job (replayed); with another, ``InvalidInput``. Empty audio is
        ``InvalidInput``, a job no live node serves ``Unservable``, one past the queue's bounds ``QueueFull``."""
        size = upload.size
        # What a replay must repeat: the spec, the audio (its length and digest) and the file name. A job stored
        # before the digest was part of it has the older form, without one: compared as that, it still replays.
        fingerprint = [spec.model_dump(mode="json"), size, filename]
        submission = json.dumps([*fingerprint, {"sha256": upload.sha256}], sort_keys=True)
        same = (submission, json.dumps(fingerprint, sort_keys=True))
        admitted: list[str] = []  # job ids this call told the replica of (a transaction run again adds one)

        async def op(tx: Tx) -> tuple[str, str, bool]:
            now = await tx.now()
            if idempotency_key is not None:
                earlier = await tx.fetchrow(
                    "SELECT job_id, state, submission FROM jobs WHERE idempotency_key = $1", idempotency_key
                )
                if earlier is not None:
                    if earlier["submission"] not in same:
                        raise InvalidInput(
                            f"Idempotency-Key {idempotency_key[:40]!r} was already used for a different submission "
                            f"(job {earlier['job_id']}); use a new key for a new job",
                            code="idempotency_key_reused", param="Idempotency-Key",
                        )
                    return earlier["job_id"], earlier["state"], True
            served = await self.replica.served(tx)
            self._capable(spec, served, size)
            load = self.replica.load_estimate(size, spec.priority)
            if load is None:
                load = await self._count_open(tx)
            self._admit(spec, *load, size)
            job_id = f"job-{secrets.token_hex(8)}"
            self.replica.admitting(job_id, size, spec.priority)
            admitted.append(job_id)
            seq = await tx.next_value("job_seqs")
            await tx.execute(
                f"""INSERT INTO jobs (job_id, seq, spec, language, filename, audio_bytes, upload_id, idempotency_key,
                       submission, created_at, queued_at, deadline_at, state, attempt, model, labels, priority, client)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, '{J.QUEUED}', 1, $12, $13, $14, $15)""",
                job_id, seq, doc(spec), spec.language, filename, size, upload.upload_id,
                idempotency_key, submission if idempotency_key is not None else None, now, now + self._deadline_s(spec),
                *self._asks(spec), client,
            )
            await upload.write_rest(tx, now, job_id)
            # (no job topic: nobody can be waiting on a job before its id is answered)
            tx.notify(submitted_topic(spec.priority))
            return job_id, J.QUEUED, False

        async def fast() -> tuple[str, str, bool] | None:
            """PostgreSQL, the common case (no Idempotency-Key, audio in one chunk, what is served and the load
            known from the last second): one statement."""
            served = self.replica.served_recently()
            if self._fast is None or idempotency_key is not None or not upload.single_chunk or served is None:
                return None
            load = self.replica.load_estimate(size, spec.priority)
            if load is None:
                return None
            self._capable(spec, served, size)
            self._admit(spec, *load, size)
            job_id = f"job-{secrets.token_hex(8)}"
            self.replica.admitting(job_id, size, spec.priority)
            admitted.append(job_id)
            await self._fast.submit(job_id, doc(spec), spec.language, filename, size, upload.upload_id,
                                    self._deadline_s(spec), upload.buffered, *self._asks(spec), client)
            return job_id, J.QUEUED, False

        # Live work goes ahead of bulk writes in the store (db: the priority lane), as its claim will.
        urgent = spec.priority == Priority.INTERACTIVE

        async def general() -> tuple[str, str, bool]:
            try:
                return await self.engine.run(op, urgent=urgent)
            except Conflict:
                if idempotency_key is None:
                    raise
                # PostgreSQL: a concurrent submission with this key inserted its job first and committed; run
                # again, this one finds it (and replays it, or refuses another submission under the key).
                return await self.engine.run(op, urgent=urgent)

        committed: str | None = None
        try:
            job_id, state, replayed = await fast() or await general()
            committed = None if replayed else job_id
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
        finally:
            for decided in admitted:
                self.replica.settled(decided, committed=decided == committed)
        if replayed:
            log.info("job submission replayed job_id=%s (same Idempotency-Key)", job_id)
        else:
            self.metrics.jobs_submitted.inc()
            log.info("job queued job_id=%s bytes=%d format=%s language=%s", job_id, size, spec.format,
                     spec.language or "auto")
        return job_id, state, replayed

    async def _count_open(self, tx: Tx) -> tuple[int, int, int]:
        """The unfinished jobs, those of them interactive, and their bytes, exactly: near the bounds, where the
        estimate is not used. On PostgreSQL under an advisory lock held to the commit, so that concurrent
        submissions (any replica's) count one after another, each seeing the jobs of those before it. This
        replica's own jobs whose transactions are still under way are counted from its memory (uncommitted, the
        count would miss them)."""
        await serialize(tx, ADMISSION_LOCK)
        ids, pending_interactive, pending_bytes = self.replica.in_flight()
        row = await tx.fetchrow(
            f"""SELECT COUNT(*) AS jobs, COALESCE(SUM(audio_bytes), 0) AS bytes,
                   COALESCE(SUM(CASE WHEN priority = '{Priority.INTERACTIVE}' THEN 1 ELSE 0 END), 0) AS interactive
               FROM jobs WHERE state IN {OPEN} AND job_id NOT IN ({tx.dialect.json_strings.format(p="$1")})""",
            json.dumps(ids),
        )
        assert row is not None
        return (int(row["jobs"]) + len(ids), int(row["interactive"]) + pending_interactive,
                int(row["bytes"]) + pending_bytes)

    def _capable(self, spec: JobSpec, served: Served, size: int) -> None:
        """Refuse empty audio, and a job no live node serves (rules.serves, over the live nodes' offers)."""
        if not size:
            raise InvalidInput("audio is empty", param="audio")
        # No live node at all is not a refusal: nodes may be starting (the embedded scheduler starts before its
        # agent registers). Such a job waits, and fails after unservable_after_s if none comes.
        ask = Ask.of(spec.language, spec.model, spec.labels)
        if served.live_nodes and not served.serves(ask):
            self.metrics.jobs_refused.labels("no_capable_node").inc()
            message = unservable_message(ask, served)
            log.info("job refused reason=no_capable_node %s", message)
            raise Unservable(message, param=served.unserved_part(ask) if served.offers else None)

    def _admit(self, spec: JobSpec, jobs: int, interactive: int, audio_bytes: int, size: int) -> None:
        """Refuse a job past its class's cap (scheduler.max_queued_jobs, or max_queued_interactive_jobs for an
        interactive one) or max_queued_bytes (429 queue_full, naming which)."""
        why = admission_refusal(self.settings, spec.priority, jobs, interactive, audio_bytes, size)
        if why is not None:
            self.metrics.jobs_refused.labels("queue_full").inc()
            log.warning("queue full, refusing a %s job: %s", spec.priority, why)
            raise queue_full(why)

    @staticmethod
    def _asks(spec: JobSpec) -> tuple[str | None, str, str]:
        """What the job asks of its node, as the jobs table keeps it: (model, labels, priority)."""
        return spec.model, json.dumps(spec.labels, sort_keys=True), str(spec.priority)

    def _deadline_s(self, spec: JobSpec) -> float:
        return spec.deadline_s if spec.deadline_s is not None else self.settings.default_deadline_s

    async def view_job(self, job_id: str) -> JobView:
        async def op(tx: Tx) -> tuple[float, Row, list[Row], list[SectionSummary]]:
            job = await self.tr.job(tx, job_id)
            segments = await tx.fetch("SELECT data FROM segments WHERE job_id = $1 ORDER BY seg_id", job_id)
            sections = (await section_summaries(tx, [job])).get(job_id, [])
            return await tx.now(), job, segments, sections

        now, job, segments, sections = await self.engine.run(op)
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
            model=job["model"],
            labels=json.loads(job["labels"]),
            priority=job["priority"],
            sections=sections,
            parent_id=job["parent_id"],
            section=job["section"],
            offset_s=job["offset_s"],
        )

    async def job_settled(self, job_id: str, after_segment: int | None = None) -> bool:
        async def op(tx: Tx) -> bool:
            job = await self.tr.job(tx, job_id)
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
                raise unknown_job(job_id)
            self._audio_kept(job_id, row)
            return int(row["audio_bytes"]), list(row["numbers"]), row["upload_id"], row["only_chunk"]

        async def op(tx: Tx) -> tuple[int, list[int], str, bytes | None]:
            job = await self.tr.job(tx, job_id)
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
