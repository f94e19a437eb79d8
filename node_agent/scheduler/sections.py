"""Long recordings split into section jobs (issue 24), over the store: how many sections a parent job could have
dispatched at once (its capacity), a section made (a child job of the parent's attempt), and the sections read back
as the parent's node follows them (the job views list them through ``transitions.section_summaries``).

Every call names the parent's live lease (a node's) or comes from the parent's client or an operator (reads only).
A child is an ordinary job from then on (dispatched, leased, fenced and re-queued as any); what ties it to its
parent is ``parent_id`` and ``parent_attempt``, and the cascade in ``transitions.Transitions._sections_moved``
(the parent's attempt ended without a result: its open sections are cancelled).
"""

from __future__ import annotations

import json
import logging
import math
import secrets

from .db import Conflict, Row, Tx
from .errors import ReportRejected, SectionRefused, Unservable
from .migrations import jobs_in
from .pgfast import ask_served_sql
from .rules import Ask, CapacityFacts, Offer, section_capacity, serves, unservable_message
from .schemas import (
    JobErrorInfo,
    JobSpec,
    SectionSummary,
    SectionView,
    TranscriptResult,
    stored_devices,
)
from .schemas import JobState as J
from .schemas import LeaseState as L
from .schemas import NodeState as N
from .schemas import Priority as P
from .submissions import SqlUpload
from .topics import sections_topic, submitted_topic
from .transitions import StorePart, doc, section_summary, unknown_job

log = logging.getLogger("node_agent.scheduler")

#: A section's declared duration may differ from its audio's length by this much (seconds): the plugin cuts at
#: samples, and rounds nothing, but a node may state it from the VAD's own times.
DURATION_SLACK_S = 1.0
#: The latest a section may start in its parent's audio (seconds): a week, the longest deadline a job may have.
MAX_OFFSET_S = 7 * 24 * 3600.0


async def held_parent(tx: Tx, job_id: str, lease_id: str, epoch: int | None, now: float, *,
                      lock: bool = False) -> Row:
    """The job's row when ``lease_id`` (with ``epoch``, when given) is its live lease, unexpired on the store's
    clock; else ``ReportRejected``: ``job_cancelled`` for a cancelled job, ``lease_lost`` for any other. An unknown
    job is ``UnknownJob``. ``lock``: the row stays locked to the commit (a section made under it cannot race the
    cascade that ends the attempt)."""
    job = await tx.fetchrow("SELECT * FROM jobs WHERE job_id = $1" + (" FOR UPDATE" if lock and tx.dialect.skip_locked
                                                                       else ""), job_id)
    if job is None:
        raise unknown_job(job_id)
    if job["state"] == J.CANCELLED:
        raise ReportRejected(f"job {job_id} was cancelled by {job['cancelled_by']}", code="job_cancelled")
    lease = await tx.fetchrow("SELECT state, epoch, expires_at FROM leases WHERE lease_id = $1", lease_id)
    if job["state"] != J.RUNNING or job["lease_id"] != lease_id or lease is None or lease["state"] != L.ACTIVE \
            or lease["expires_at"] <= now:
        why = f"job {job_id} is {job['state']}" if job["state"] != J.RUNNING else \
            f"lease {lease_id} is not the live lease of job {job_id}"
        raise ReportRejected(f"{why}: lease {lease_id} lost", code="lease_lost")
    if epoch is not None and lease["epoch"] != epoch:
        raise ReportRejected(f"lease_epoch {epoch} is not the epoch {lease['epoch']} of job {job_id}'s live lease "
                             f"{lease_id}", code="lease_lost")
    return job


class Sections(StorePart):
    """The section operations (see the module's docstring)."""

    async def capacity(self, job_id: str, lease_id: str) -> int:
        """How many section children of ``job_id`` would be dispatched at once now (``rules.section_capacity`` of
        the facts read here); the caller holds the job's live lease ``lease_id``. A section is never split again:
        0 for one."""
        async def op(tx: Tx) -> tuple[int, CapacityFacts | None]:
            now = await tx.now()
            await self.tr.resume_if_paused(tx, now)
            job = await held_parent(tx, job_id, lease_id, None, now)
            if job["parent_id"] is not None or self.settings.max_sections_per_job <= 1:
                return 0, None
            facts = await self._facts(tx, job, now)
            return section_capacity(facts, batch=job["priority"] == P.BATCH,
                                    headroom_fraction=self.settings.interactive_headroom,
                                    max_sections=self.settings.max_sections_per_job), facts

        free, facts = await self.engine.run(op)
        log.info("section capacity job_id=%s free_slots=%d facts=%s", job_id, free, facts)
        return free

    async def _facts(self, tx: Tx, job: Row, now: float) -> CapacityFacts:
        """The facts ``rules.section_capacity`` decides by, for the parent ``job``: one read of the nodes taking
        jobs and of the slots open jobs hold, and a count of the queued jobs ahead (bounded by the idle slots)."""
        nodes = await tx.fetch(f"SELECT node_id, devices, labels FROM nodes WHERE cordoned = 0 "
                               f"AND state NOT IN ('{N.GONE}', '{N.DRAINING}')")
        busy_rows = await tx.fetch(f"SELECT node_id, resource FROM jobs WHERE {jobs_in((J.ASSIGNED, J.RUNNING))}")
        busy_pairs = {(r["node_id"], r["resource"]) for r in busy_rows}
        ask = Ask.of(job["language"], job["model"], job["labels"])
        slots = busy = idle = 0
        offers: dict[Offer, None] = {}
        for node in nodes:
            labels = json.loads(node["labels"])
            for device in stored_devices(node["devices"]):
                if device.plugin != "asr":
                    continue
                slots += 1
                if (node["node_id"], device.resource) in busy_pairs:
                    busy += 1
                elif serves(device, labels, ask):
                    idle += 1
                    offers[Offer.of(device, labels)] = None
        ahead = 0
        if idle:
            served = ask_served_sql(tx.dialect.name, "$1")
            # A batch parent's sections are batch jobs not aged: every queued job they serve goes first. An
            # interactive parent's go before batch jobs not aged (rules.dispatch_class).
            ahead = int(await tx.fetchval(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = '{J.QUEUED}' AND {served} "
                f"AND ($2 = 1 OR priority = '{P.INTERACTIVE}' OR queued_at <= $3) LIMIT $4) AS q",
                json.dumps([o.wire() for o in offers]), int(job["priority"] == P.BATCH),
                now - self.settings.batch_max_wait_s, idle))
        return CapacityFacts(slots=slots, busy=busy, idle_serving=idle, queued_ahead=ahead)

    async def create_section(self, job_id: str, *, lease_id: str, lease_epoch: int, index: int, offset_s: float,
                             duration_s: float, sample_rate: int, upload: SqlUpload,
                             language: str | None = None) -> tuple[SectionSummary, bool]:
        """Make section ``index`` of the parent's current attempt, its audio ``upload`` (raw pcm_s16le at
        ``sample_rate``): a queued child job with the parent's language, model, labels, priority, client, options
        and deadline. ``language``: what a parent that names none was decoded in (section 0's), so the child decodes
        in it too. (its summary, whether it was made now): a retry of the same (parent, attempt, index) answers
        the child made first, and drops its own audio. The caller holds the parent's live lease (``lease_id`` at
        ``lease_epoch``), else ``ReportRejected``; a bad index, offset or duration, a parent that is a section, or a
        language other than the parent's own, is ``SectionRefused``; a language no live node serves (with the
        parent's model and labels) is ``Unservable``."""
        async def op(tx: Tx) -> tuple[SectionSummary, bool, str]:
            now = await tx.now()
            await self.tr.resume_if_paused(tx, now)
            parent = await held_parent(tx, job_id, lease_id, lease_epoch, now, lock=True)
            if parent["parent_id"] is not None:
                raise SectionRefused(f"job {job_id} is itself section {parent['section']} of job "
                                     f"{parent['parent_id']}: a section is not split again", param="job_id")
            if language is not None and parent["language"] is not None and language != parent["language"]:
                raise SectionRefused(f"language: {language!r} is not job {job_id}'s own language "
                                     f"{parent['language']!r} (a section decodes in its parent's)", param="language")
            earlier = await tx.fetchrow(
                "SELECT * FROM jobs WHERE parent_id = $1 AND parent_attempt = $2 AND section = $3",
                job_id, parent["attempt"], index)
            if earlier is not None:
                return section_summary(earlier), False, parent["priority"]
            child_language = parent["language"] if language is None else language
            if child_language != parent["language"]:
                # The parent was admitted without a language; the one its node found may be one no live node
                # serves (with the parent's model and labels). Refused as a submission would be: the parent's
                # node decodes that section itself rather than queue a job nobody takes.
                ask = Ask.of(child_language, parent["model"], parent["labels"])
                served = await self.replica.served(tx)
                if served.live_nodes and not served.serves(ask):
                    raise Unservable(f"section {index} of job {job_id}: {unservable_message(ask, served)}",
                                     param="language")
            spec = JobSpec.model_validate(json.loads(parent["spec"])).model_copy(
                update={"format": "pcm_s16le", "sample_rate": sample_rate, "deadline_s": None,
                        "language": child_language})
            child_id = f"job-{secrets.token_hex(8)}"
            seq = await tx.next_value("job_seqs")
            await tx.execute(
                f"""INSERT INTO jobs (job_id, seq, spec, language, filename, audio_bytes, upload_id, created_at,
                       queued_at, deadline_at, state, attempt, model, labels, priority, client, parent_id,
                       parent_attempt, section, offset_s, duration_s)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, '{J.QUEUED}', 1, $10, $11, $12, $13, $14, $15,
                       $16, $17, $18)""",
                child_id, seq, doc(spec), child_language, parent["filename"], upload.size, upload.upload_id, now,
                parent["deadline_at"], parent["model"], parent["labels"], parent["priority"], parent["client"],
                job_id, parent["attempt"], index, offset_s, duration_s,
            )
            await upload.write_rest(tx, now, child_id)
            await tx.execute("UPDATE jobs SET sections_made = sections_made + 1 WHERE job_id = $1", job_id)
            tx.notify(submitted_topic(parent["priority"]))
            tx.notify(sections_topic(job_id))
            made = SectionSummary(index=index, job_id=child_id, state=J.QUEUED, node_id=None, offset_s=offset_s,
                                  duration_s=duration_s)
            return made, True, parent["priority"]

        try:
            self._check_section(index, offset_s, duration_s, upload.size / 2 / sample_rate)
            try:
                summary, made, priority = await self.engine.run(op)
            except Conflict:
                # PostgreSQL: a retry of this section committed its child first; run again, this one finds it.
                summary, made, priority = await self.engine.run(op)
        except BaseException:
            await _discard(upload)
            raise
        if made:
            upload.written()
            self.metrics.sections.inc()
            log.info("section made job_id=%s parent_id=%s index=%d offset_s=%.3f duration_s=%.3f bytes=%d "
                     "priority=%s language=%s", summary.job_id, job_id, index, offset_s, duration_s, upload.size,
                     priority, language or "the parent's")
        else:
            await _discard(upload)  # the first try's audio is the section's
        return summary, made

    def _check_section(self, index: int, offset_s: float, duration_s: float, audio_s: float) -> None:
        """``SectionRefused`` naming the first of a section's index, offset and duration out of its bounds."""
        max_sections = self.settings.max_sections_per_job
        if not 1 <= index < max_sections:
            raise SectionRefused(f"index: {index} is not a section index 1..{max_sections - 1} "
                                 f"(scheduler.max_sections_per_job: {max_sections}; section 0 is the parent's own)",
                                 param="index")
        if not (math.isfinite(offset_s) and 0 < offset_s <= MAX_OFFSET_S):
            raise SectionRefused(f"offset_s: {offset_s:g} is not a start within the parent's audio (above 0, at "
                                 f"most {MAX_OFFSET_S:g} s; section 0 starts at 0)", param="offset_s")
        if not (math.isfinite(duration_s) and duration_s > 0 and abs(duration_s - audio_s) <= DURATION_SLACK_S):
            raise SectionRefused(f"duration_s: {duration_s:g} is not the length of the section's audio ({audio_s:.3f} "
                                 "s of pcm_s16le)", param="duration_s")

    async def sections(self, job_id: str, *, lease_id: str | None = None, client: str | None = None,
                       from_index: int = 0) -> list[SectionView]:
        """The sections of the job's current attempt, by index; ``result`` only for those that succeeded at index
        ``from_index`` or later (the follower has the ones before). With ``lease_id``: the caller must hold the
        job's live lease (``ReportRejected`` else); ``client``: the only client whose job this caller may read
        (another's is unknown, as if it did not exist)."""
        async def op(tx: Tx) -> list[Row]:
            now = await tx.now()
            if lease_id is not None:
                job = await held_parent(tx, job_id, lease_id, None, now)
            else:
                job = await self.tr.job(tx, job_id)
            if client is not None and job["client"] != client:
                raise unknown_job(job_id)
            if not job["sections_made"]:
                return []
            return await tx.fetch(
                "SELECT job_id, state, node_id, attempt, section, offset_s, duration_s, error, "
                f"CASE WHEN section >= $3 AND state = '{J.SUCCEEDED}' THEN result END AS result FROM jobs "
                "WHERE parent_id = $1 AND parent_attempt = $2 ORDER BY section",
                job_id, job["attempt"], from_index)

        rows = await self.engine.run(op)
        return [SectionView(
            **section_summary(r).model_dump(), attempt=r["attempt"],
            result=TranscriptResult.model_validate_json(r["result"]) if r["result"] else None,
            error=JobErrorInfo.model_validate_json(r["error"]) if r["error"] else None,
        ) for r in rows]


async def _discard(upload: SqlUpload) -> None:
    try:
        await upload.discard()
    except Exception:  # noqa: BLE001  (the reaper deletes orphan uploads later)
        log.warning("could not drop the audio of a section not made (%s)", upload.upload_id)


__all__ = ["Sections", "held_parent"]
