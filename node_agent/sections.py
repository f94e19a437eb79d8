"""A long job split into sections, the parent's agent side: how many, the children posted, followed and merged.

The job's worker session calls this object (``job_session.Splitter``) while section 0 decodes: ``sections_for``
once the plugin says the audio is long (one capacity call; any failure means no split), ``cut`` with the plugin's
cut, ``section`` with each child's audio, which is posted at once as a child job (concurrently with section 0's
decode). Once section 0 has its result, ``finish`` follows the children (``GET .../sections`` long polls), streams
each one's segments in time order (its offset added, ids continuing section 0's), and returns the parent's
result with one decode's shape. A section the scheduler refused to take is decoded here after section 0, so the
split never fails a job that would have succeeded whole. Cancel, lease loss and the deadline end the follow
(``abort``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .config import AsrSettings
from .errors import JobError, JobTimeout, LeaseLost, TranscriptionFailed, job_error
from .lease import Lease
from .metrics import AgentMetrics
from .plugin_messages import ResultMessage
from .scheduler.schemas import TERMINAL_JOB_STATES, JobState, SectionView
from .scheduler_client import Gone, Rejected, SchedulerClient, SchedulerError
from .section_plan import Span, sections_for

log = logging.getLogger("node_agent.jobs")

#: The capacity call's bound: the plugin waits ``plugin_messages.SPLIT_ANSWER_WAIT_S`` (5 s) for the answer.
CAPACITY_WAIT_S = 3.0
#: Each ``GET .../sections`` long poll waits up to this (the scheduler caps it at 30 s).
FOLLOW_POLL_S = 10.0
#: How often the children's states are read for status while section 0 decodes (``SectionSplit._watch``).
WATCH_EVERY_S = 1.0

#: Decodes section ``index``'s audio (pcm_s16le) on this node's own worker, in a language (None: the job's): a
#: section the scheduler refused.
LocalDecode = Callable[[int, bytes, str | None], Awaitable[ResultMessage]]


def _section_error(view: SectionView) -> JobError:
    """A section that failed for good, as its parent's error: the same code, the message naming the section."""
    code = view.error.code if view.error else "failed"
    message = f"section {view.index} (job {view.job_id}) {view.state.value}: " + (
        view.error.message if view.error else "no reason given")
    try:
        return job_error(code, message)
    except ValueError:  # a code this agent does not know (a newer scheduler's): a plain failure
        return TranscriptionFailed(message)


def shifted(segments: list[dict[str, Any]], offset_s: float, first_id: int) -> list[dict[str, Any]]:
    """A section's segments in the parent's time (``offset_s`` added, words too) with ids from ``first_id``."""
    out = []
    for i, seg in enumerate(segments):
        seg = {**seg, "id": first_id + i, "start": round(seg["start"] + offset_s, 3),
               "end": round(seg["end"] + offset_s, 3)}
        if seg.get("words"):
            seg["words"] = [{**w, "start": round(w["start"] + offset_s, 3), "end": round(w["end"] + offset_s, 3)}
                            for w in seg["words"]]
        out.append(seg)
    return out


class SectionSplit:
    """One parent job's split on its agent (see the module docstring); made per scheduler job, used once."""

    def __init__(self, client: SchedulerClient, job_id: str, lease: Lease, asr: AsrSettings, metrics: AgentMetrics,
                 *, on_segment: Callable[[dict[str, Any]], None], decode_local: LocalDecode) -> None:
        self.client = client
        self.job_id = job_id
        self.lease = lease
        self.asr = asr
        self.metrics = metrics
        self._on_segment = on_segment
        self._decode_local = decode_local
        loop = asyncio.get_running_loop()
        #: The cut, as the plugin made it (section 0 first); empty until then (and for a job not split). The
        #: silence between two sections belongs to neither.
        self.bounds: list[Span] = []
        #: The whole audio's length, as the plugin said it.
        self.duration_s = 0.0
        self.cut_s = 0.0
        #: Each child's post (its job id; None when it was refused and the section is decoded here).
        self._posts: dict[int, asyncio.Task[str | None]] = {}
        self._local: dict[int, tuple[bytes, str | None]] = {}
        #: The latest view of the children, for status.
        self.views: dict[int, dict[str, Any]] = {}
        self._abort: asyncio.Future[JobError] = loop.create_future()
        #: While section 0 decodes: the children's states for status (``_watch``); ``finish``'s follow takes over.
        self._watcher: asyncio.Task[None] | None = None

    @property
    def split(self) -> bool:
        return len(self.bounds) > 1

    # ----- the session's Splitter ------------------------------------------------------------------------------

    async def sections_for(self, duration_s: float) -> int:
        """How many sections: the parent's slot plus the free ones the scheduler reports. Any failure: 1."""
        self.duration_s = duration_s
        try:
            async with asyncio.timeout(CAPACITY_WAIT_S):
                free = await self.client.job_capacity(self.job_id, self.lease.lease_id)
        except (SchedulerError, TimeoutError) as exc:
            log.warning("job %s: capacity not known (%s); decoding it whole", self.job_id, exc or "timed out")
            return 1
        n = sections_for(duration_s, free, section_min_s=self.asr.split_section_min_s,
                         max_sections=self.asr.split_max_sections)
        log.info("job %s: %.1f s of audio, %d free slot(s): %d section(s)", self.job_id, duration_s, free, n)
        return n

    def cut(self, bounds: list[Span], cut_s: float) -> None:
        self.bounds = list(bounds)
        self.cut_s = cut_s
        self.metrics.job_sections.observe(len(bounds))

    def section(self, index: int, offset_s: float, duration_s: float, sample_rate: int, audio: bytes,
                language: str | None = None) -> None:
        """Post section ``index`` as a child job now, in the background, to be decoded in ``language`` (section
        0's, for a job that named none; None: the job's own); ``finish`` waits for it."""
        if index in self._posts or not 0 < index < len(self.bounds):
            log.warning("job %s: dropping an unexpected section %d", self.job_id, index)
            return
        self.views[index] = {"index": index, "job_id": None, "state": "posting", "node_id": None,
                             "offset_s": offset_s, "duration_s": duration_s}
        self._posts[index] = asyncio.get_running_loop().create_task(
            self._post(index, offset_s, duration_s, sample_rate, audio, language),
            name=f"section-{self.job_id}-{index}")

    async def _post(self, index: int, offset_s: float, duration_s: float, sample_rate: int, audio: bytes,
                    language: str | None) -> str | None:
        lease = self.lease
        try:
            child = await self.client.create_section(
                self.job_id, lease_id=lease.lease_id, lease_epoch=lease.epoch, index=index, offset_s=offset_s,
                duration_s=duration_s, audio=audio, sample_rate=sample_rate, language=language)
        except (Rejected, Gone) as exc:
            # The parent's attempt is no longer ours (fenced, cancelled): nothing this job does counts now.
            self.abort(lease.cancelled or LeaseLost(f"job {self.job_id}: section {index} refused: {exc}"))
            return None
        except SchedulerError as exc:
            log.warning("job %s: section %d could not be posted (%s); decoding it on this node", self.job_id, index,
                        exc)
            self._local[index] = (audio, language)
            self.views[index].update(state="local")
            return None
        self.views[index].update(job_id=child, state=JobState.QUEUED.value)
        log.info("job %s: section %d (%.1f s at %.1f s, language %s) is job %s", self.job_id, index, duration_s,
                 offset_s, language or "the job's", child)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"sections-{self.job_id}")
        return child

    async def _watch(self) -> None:
        """While section 0 decodes, keep the children's states and nodes in ``views``, so that status says where
        each runs: a read every ``WATCH_EVERY_S`` asking for no results (``from`` past the last section), until
        every child has ended or ``finish`` follows them itself. Reads, not a long poll: an assignment wakes no
        poll (topics.job_topic says why)."""
        beyond = len(self.bounds)
        while True:
            try:
                views = await self.client.job_sections(self.job_id, self.lease.lease_id, from_index=beyond)
            except (Rejected, Gone):
                return  # the attempt is over; the decode's own path says how
            except SchedulerError:
                views = []
            self._seen(views)
            if len(views) >= beyond - 1 and all(v.state in TERMINAL_JOB_STATES for v in views):
                return
            await asyncio.sleep(WATCH_EVERY_S)

    def _seen(self, views: list[SectionView]) -> None:
        for view in views:
            if view.index in self.views:
                self.views[view.index].update(job_id=view.job_id, state=view.state.value, node_id=view.node_id)

    # ----- after section 0 -------------------------------------------------------------------------------------

    def abort(self, error: JobError) -> None:
        """End ``finish`` with ``error`` (lease lost, cancelled)."""
        if not self._abort.done():
            self._abort.set_result(error)

    def close(self) -> None:
        """The job is over: posts still under way are dropped (the scheduler cancels what they made)."""
        self._stop_watching()
        for task in self._posts.values():
            task.cancel()
        if not self._abort.done():
            self._abort.cancel()

    def _stop_watching(self) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()

    async def _race(self, work: Awaitable[Any], until: float | None) -> Any:
        """``work``'s result, unless the follow is aborted or the deadline (loop time) passes first."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        try:
            left = None if until is None else max(0.0, until - loop.time())
            done, _ = await asyncio.wait({task, self._abort}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if self._abort in done:
                raise self._abort.result()
            if task not in done:
                raise JobTimeout(f"job {self.job_id} exceeded its deadline waiting for its sections")
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    async def finish(self, first: ResultMessage, started: float, until: float | None) -> ResultMessage:
        """The parent's result: section 0's (``first``, streamed already) and every child's, in order.
        ``started``: loop time the job's decode began (for the time saved); ``until``: the deadline (loop time)."""
        loop = asyncio.get_running_loop()
        self._stop_watching()  # the follow below reads the same states, with the results
        segments = list(first.segments)
        decode_s = float(first.timings.get("total_s") or 0.0)
        fallbacks = first.fallback_segments
        section0_at = loop.time()
        index = 1
        while index < len(self.bounds):
            child = await self._race(asyncio.shield(self._posts[index]), until) if index in self._posts else None
            if child is None:  # refused by the scheduler: decoded here, after section 0
                local = self._local.get(index)
                if local is None:
                    raise TranscriptionFailed(f"job {self.job_id}: section {index} never arrived from the plugin")
                result = await self._race(self._decode_local(index, *local), until)
                self.views[index].update(state=JobState.SUCCEEDED.value)
                got = [{**s} for s in result.segments]
                decode_s += float(result.timings.get("total_s") or 0.0)
                fallbacks += result.fallback_segments
            else:
                view = await self._next_done(index, until)
                assert view.result is not None
                got = [s.model_dump() for s in view.result.segments]
                timings = getattr(view.result, "timings", None) or {}
                decode_s += float(timings.get("total_s") or 0.0)
                fallbacks += int(getattr(view.result, "fallback_segments", 0) or 0)
            # Ids continue section 0's, numbered as faster-whisper numbers one decode's (from 1).
            next_id = segments[-1]["id"] + 1 if segments else 1
            for seg in shifted(got, self.bounds[index][0], next_id):
                segments.append(seg)
                self._on_segment(seg)
            index += 1
        wall_s = loop.time() - started
        self.metrics.split_seconds_saved.inc(max(0.0, decode_s - wall_s))
        return first.model_copy(update={
            "text": "".join(s["text"] for s in segments).strip(),
            "duration_s": self.duration_s,
            "segments_count": len(segments),
            "fallback_segments": fallbacks,
            "segments": segments,
            "timings": {**first.timings, "sections": float(len(self.bounds)), "cut_s": round(self.cut_s, 6),
                        "sections_wait_s": round(loop.time() - section0_at, 6),
                        "sections_decode_s": round(decode_s, 6)},
        })

    async def _next_done(self, index: int, until: float | None) -> SectionView:
        """Section ``index`` once it succeeded (long-polling the scheduler); its error once it failed for good."""
        loop = asyncio.get_running_loop()
        while True:
            wait_s = FOLLOW_POLL_S if until is None else max(0.0, min(FOLLOW_POLL_S, until - loop.time()))
            try:
                views = await self._race(self.client.job_sections(
                    self.job_id, self.lease.lease_id, from_index=index, wait_s=wait_s), until)
            except (Rejected, Gone) as exc:
                raise self.lease.cancelled or LeaseLost(f"job {self.job_id}: its sections refused: {exc}") from None
            except SchedulerError as exc:
                # The lease keeper fences the job if the scheduler stays away; until then, keep asking.
                log.warning("job %s: following its sections: %s", self.job_id, exc)
                await self._race(asyncio.sleep(1.0), until)
                continue
            self._seen(views)
            view = next((v for v in views if v.index == index), None)
            if view is None:
                continue
            if view.state is JobState.SUCCEEDED and view.result is not None:
                return view
            if view.state is JobState.CANCELLED and self.lease.cancelled is not None:
                raise self.lease.cancelled
            if view.state in (JobState.FAILED, JobState.CANCELLED):
                raise _section_error(view)

    def status(self) -> list[dict[str, Any]]:
        """The sections as status shows them: index, job id, state, node (section 0 is the parent itself)."""
        return [dict(self.views[i]) for i in sorted(self.views)]


__all__ = ["CAPACITY_WAIT_S", "FOLLOW_POLL_S", "WATCH_EVERY_S", "SectionSplit", "shifted"]
