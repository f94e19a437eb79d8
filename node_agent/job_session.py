"""One job on one plugin process: send it, stream its segments, hold its time limits, hand back its result.

Time limits are enforced here, one level above the decode. A job past its deadline is asked to stop (a
``cancel`` frame): the plugin stops at its next segment boundary, answers ``stopped`` and stays loaded, and the
job fails ``timeout``. A job cancelled by its client or an operator (``stop``) is stopped the same way. Only a process that does not stop within ``worker.stop_grace_s``, or that is silent for
``asr.timeout.stall_s``, is killed: the only way to end a native decode stuck inside one segment. An abort (lease
lost, shutdown) kills at once. Kills and crashes go to the process's life cycle (``worker_lifecycle``), which
replaces the process; a session ends in exactly one ``ResultMessage`` or one ``JobError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import wire
from .config import TimeoutSettings
from .contracts import DecodeOptions
from .errors import JobError, JobStalled, JobTimeout, WireError, job_error
from .plugin_messages import (
    CancelMessage,
    ErrorMessage,
    JobMessage,
    LongAudioMessage,
    ResultMessage,
    SectionMessage,
    SectionsMessage,
    SegmentMessage,
    SplitMessage,
    StartedMessage,
    StoppedMessage,
    parse_from_plugin,
    to_header,
)
from .worker_lifecycle import ProcessLifecycle
from .worker_process import PluginProcess

log = logging.getLogger("node_agent.supervisor")

#: A wait in a job's path (for the worker, for the plugin to take the job) longer than this is logged, and again
#: every this long: no wait there may be both long and silent.
WAIT_LOG_S = 5.0


async def wait_logged(task: "asyncio.Future[Any]", until: float, what: Callable[[], str],
                      also: "asyncio.Future[Any] | None" = None) -> None:
    """Wait for ``task`` (or ``also``, if given, to finish first) until loop time ``until``; say what is waited for
    every ``WAIT_LOG_S``. Returns on time-out with both still pending: the caller decides what that means."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    waits = {task} if also is None else {task, also}
    while True:
        left = until - loop.time()
        if left <= 0:
            return
        done, _ = await asyncio.wait(waits, timeout=min(left, WAIT_LOG_S), return_when=asyncio.FIRST_COMPLETED)
        if done:
            return
        if loop.time() < until:
            log.warning("%s for %.0f s (%.0f s left)", what(), loop.time() - started, until - loop.time())


class Splitter(Protocol):
    """What a job that may be cut into sections answers the plugin with (``sections.SectionSplit``)."""

    async def sections_for(self, duration_s: float) -> int:
        """How many sections to cut ``duration_s`` of audio into (1: none); never raises, bounded in time."""
        ...

    def cut(self, bounds: list[tuple[float, float]], cut_s: float) -> None:
        """The plugin's cut: every section's (offset_s, duration_s), section 0 first."""
        ...

    def section(self, index: int, offset_s: float, duration_s: float, sample_rate: int, audio: bytes,
                language: str | None = None) -> None:
        """Section ``index``'s audio (pcm_s16le), to be decoded elsewhere in ``language`` (None: the job's own);
        must not block."""
        ...


@dataclass
class JobRequest:
    """One transcription job as the supervisor sees it. ``options`` were checked where they entered (the
    scheduler's submission, ``/utterance``, the command line) and are handed on as they are."""

    job_id: str
    audio: bytes
    format: str = "auto"
    sample_rate: int | None = None
    language: str | None = None
    options: DecodeOptions = field(default_factory=DecodeOptions)
    #: Absolute deadline on the event loop's monotonic clock, if the caller has one.
    deadline: float | None = None
    #: Audio at least this long is offered to ``splitter`` for cutting into sections; None (or no splitter): never.
    split_min_s: float | None = None
    splitter: Splitter | None = None


class JobSession:
    """Runs ``job`` on ``proc`` (taken busy from ``lifecycle``); ``run`` once. ``current`` is what the worker's
    status shows of the job while it runs."""

    def __init__(self, proc: PluginProcess, job: JobRequest, lifecycle: ProcessLifecycle, timeouts: TimeoutSettings,
                 *, on_started: Callable[[float], None], on_segment: Callable[[dict[str, Any]], None]) -> None:
        self.resource = lifecycle.resource
        self.proc = proc
        self.job = job
        self.lifecycle = lifecycle
        self.timeouts = timeouts
        self.stop_grace_s = lifecycle.settings.stop_grace_s
        self._on_started = on_started
        self._on_segment = on_segment
        self._abort: asyncio.Future[JobError] = asyncio.get_running_loop().create_future()
        self._stop: asyncio.Future[JobError] = asyncio.get_running_loop().create_future()
        self.current: dict[str, Any] = {"job_id": job.job_id, "audio_s": None, "segments": 0,
                                        "started": time.monotonic(), "last_segment": None}

    def abort(self, error: JobError) -> bool:
        """End the job now with ``error``, killing the process; False if it has ended already."""
        if self._abort.done():
            return False
        self._abort.set_result(error)
        return True

    def stop(self, error: JobError) -> bool:
        """Stop the job between two segments, as at its deadline (a ``cancel`` frame; the process is kept unless
        it does not stop within ``worker.stop_grace_s``), and end it with ``error``; False if it has ended
        already."""
        if self._stop.done() or self._abort.done():
            return False
        self._stop.set_result(error)
        return True

    def close(self) -> None:
        """The session is over: a late abort or stop finds nothing to stop."""
        for future in (self._abort, self._stop):
            if not future.done():
                future.cancel()

    async def run(self) -> ResultMessage:
        """The job's result, or its ``JobError``."""
        proc, job, t, abort = self.proc, self.job, self.timeouts, self._abort
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # Until the plugin has decoded the audio we do not know its length; min_s bounds that phase.
        deadline = t0 + t.min_s
        if job.deadline is not None:
            deadline = min(deadline, job.deadline)
        stall_at = t0 + t.stall_s
        #: Once the deadline passed (or ``stop`` was called): the cancel is out and the plugin has until then to
        #: answer ``stopped``.
        stop_by: float | None = None
        overrun = ""  # what the deadline was, for the error message
        #: What a ``stop`` ends the job with (None: the deadline's ``JobTimeout``); ``stop_wanted`` is waited on
        #: until it comes.
        stopping: JobError | None = None
        stop_wanted: asyncio.Future[JobError] | None = self._stop
        segments: list[dict[str, Any]] = []
        split_min_s = job.split_min_s if job.splitter is not None else None
        header = to_header(JobMessage(job_id=job.job_id, format=job.format, sample_rate=job.sample_rate,
                                      language=job.language, options=job.options, split_min_s=split_min_s))
        # A plugin that does not read its socket (stuck, or blocked writing to us) would hold the drain for ever:
        # it has until the first limit to take the job, as it has to answer.
        late = min(deadline, stall_at)
        await self._send(header, job.audio, "the job", late, lambda: self.lifecycle.killed(
            proc, "stall", JobStalled(f"job {job.job_id}: worker pid {proc.pid} did not take the job within "
                                      f"{late - t0:.1f} s; worker killed")))

        read: asyncio.Task[Any] | None = None
        try:
            while True:
                if read is None:
                    read = loop.create_task(wire.read_frame(proc.reader))
                now = loop.time()
                limit = (stop_by if stop_by is not None else min(deadline, stall_at)) - now
                waits = {read, abort} if stop_wanted is None else {read, abort, stop_wanted}
                done, _ = await asyncio.wait(waits, timeout=max(0.0, limit), return_when=asyncio.FIRST_COMPLETED)
                if abort in done:
                    raise await self._aborted()
                if stop_wanted is not None and stop_wanted in done:
                    wanted, stop_wanted = stop_wanted.result(), None
                    if stop_by is None:  # (past the deadline, the cancel is out already: that stop stands)
                        stopping, overrun = wanted, wanted.message
                        stop_by = loop.time() + self.stop_grace_s
                        log.info("%s: asking worker pid %d to stop it", overrun, proc.pid)
                        await self._send_cancel(stop_by, overrun, stopping)
                    if read not in done:
                        continue
                if read not in done:
                    now = loop.time()
                    if stop_by is not None:
                        # Stuck inside one segment (or ignoring us): only a kill ends a native decode. The grace
                        # is spent already, so no second one before SIGKILL.
                        raise await self.lifecycle.killed(proc, "timeout", self._stop_error(
                            stopping, f"{overrun}; worker pid {proc.pid} did not stop within worker.stop_grace_s = "
                                      f"{self.stop_grace_s:g} s and was killed"), grace_s=0.0)
                    if now >= deadline:
                        overrun = f"job {job.job_id} exceeded its deadline of {deadline - t0:.1f} s on {self.resource}"
                        stop_by = now + self.stop_grace_s
                        log.info("%s: asking worker pid %d to stop it", overrun, proc.pid)
                        await self._send_cancel(stop_by, overrun, None)
                        continue
                    raise await self.lifecycle.killed(proc, "stall", JobStalled(
                        f"job {job.job_id}: no progress from worker pid {proc.pid} for "
                        f"{t.stall_s:g} s (asr.timeout.stall_s); worker killed"))
                try:
                    frame = read.result()
                    msg = parse_from_plugin(frame[0]) if frame is not None else None
                except WireError as exc:
                    raise await self.lifecycle.crashed(proc, job.job_id, f"protocol error: {exc}")
                except (ConnectionError, OSError) as exc:
                    raise await self.lifecycle.crashed(proc, job.job_id, f"connection lost: {exc}")
                finally:
                    read = None
                if msg is None:
                    raise await self.lifecycle.crashed(proc, job.job_id, None)
                msg_job = getattr(msg, "job_id", job.job_id)
                if msg_job != job.job_id:
                    log.warning("job %s: dropping a stale %r for job %s from worker pid %d", job.job_id, msg.type,
                                msg_job, proc.pid)
                    continue
                now = loop.time()
                stall_at = now + t.stall_s
                if isinstance(msg, StartedMessage):
                    duration = msg.duration_s
                    budget = max(t.min_s, t.per_audio_s * duration)
                    if stop_by is None:
                        deadline = t0 + budget if job.deadline is None else min(t0 + budget, job.deadline)
                    self.current["audio_s"] = duration
                    self._on_started(duration)
                elif isinstance(msg, SegmentMessage):
                    event = msg.event()
                    segments.append(event)
                    self.current["segments"] = len(segments)
                    self.current["last_segment"] = time.monotonic()
                    self._on_segment(event)
                elif isinstance(msg, LongAudioMessage):
                    await self._answer_split(msg.duration_s, stall_at)
                elif isinstance(msg, SectionsMessage) and job.splitter is not None:
                    job.splitter.cut(msg.bounds, msg.cut_s)
                elif isinstance(msg, SectionMessage) and job.splitter is not None:
                    job.splitter.section(msg.index, msg.offset_s, msg.duration_s, msg.sample_rate, frame[1],
                                         msg.language)
                elif isinstance(msg, StoppedMessage) and stop_by is not None:
                    proc.jobs_served += 1
                    log.info("job %s: stopped after %d segments in %.2f s; worker pid %d kept", job.job_id,
                             len(segments), now - (stop_by - self.stop_grace_s), proc.pid)
                    raise self._stop_error(stopping, f"{overrun}; stopped after {len(segments)} segments, worker pid "
                                                     f"{proc.pid} kept")
                elif isinstance(msg, ResultMessage):
                    proc.jobs_served += 1
                    if stop_by is not None:
                        # Finished as the cancel went out; the plugin drops that cancel. The deadline (or the stop)
                        # still holds.
                        raise self._stop_error(stopping, f"{overrun} (finished just after it); worker pid "
                                                         f"{proc.pid} kept")
                    return msg.model_copy(update={"segments": segments, "worker_pid": proc.pid})
                elif isinstance(msg, ErrorMessage):
                    # Also after a cancel went out: the job failed on its own first, and that error says why.
                    proc.jobs_served += 1
                    raise job_error(msg.code, msg.message)
                else:
                    raise await self.lifecycle.crashed(proc, job.job_id, f"unexpected message {msg.type!r}")
        finally:
            if read is not None and not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read

    async def _answer_split(self, duration_s: float, until: float) -> None:
        """Answer ``long_audio``: how many sections (the splitter's bounded answer; 1 without one). An abort
        meanwhile ends the job as always."""
        splitter, n = self.job.splitter, 1
        if splitter is not None:
            ask = asyncio.ensure_future(splitter.sections_for(duration_s))
            try:
                await asyncio.wait({ask, self._abort}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not ask.done():
                    ask.cancel()
            if self._abort.done():
                raise await self._aborted()
            try:
                n = ask.result()
            except Exception:  # a split must never fail the job: decode it whole
                log.exception("job %s: choosing its sections failed; decoding it whole", self.job.job_id)
        proc = self.proc
        await self._send(to_header(SplitMessage(job_id=self.job.job_id, sections=n)), b"", "the split answer",
                         until, lambda: self.lifecycle.killed(proc, "stall", JobStalled(
                             f"job {self.job.job_id}: worker pid {proc.pid} did not take the split answer")))

    @staticmethod
    def _stop_error(stopping: JobError | None, message: str) -> JobError:
        """The error a stopped job ends with: a ``stop``'s own kind, or the deadline's ``JobTimeout``."""
        return JobTimeout(message) if stopping is None else type(stopping)(message)

    async def _send_cancel(self, stop_by: float, overrun: str, stopping: JobError | None) -> None:
        """Ask the plugin to stop the job at its next segment boundary; one that does not take the frame by
        ``stop_by`` is killed."""
        proc = self.proc
        await self._send(to_header(CancelMessage(job_id=self.job.job_id)), b"", "the cancel", stop_by,
                         lambda: self.lifecycle.killed(proc, "timeout", self._stop_error(
                             stopping, f"{overrun}; worker pid {proc.pid} did not take the cancel within "
                                       "worker.stop_grace_s and was killed"), grace_s=0.0))

    async def _aborted(self) -> JobError:
        error = self._abort.result()
        reason = "lease_lost" if error.code == "lease_lost" else "shutdown"
        log.warning("job %s: aborting on %s (%s): killing worker pid %d", self.job.job_id, self.resource, error.code,
                    self.proc.pid)
        return await self.lifecycle.killed(self.proc, reason, error)

    async def _send(self, header: dict[str, Any], payload: bytes, what: str, until: float,
                    late: Callable[[], Awaitable[JobError]]) -> None:
        """Hand ``what`` to the plugin by loop time ``until``, or raise: ``late()``'s error past it, the abort's
        error if one comes first, ``WorkerCrashed`` if the connection is gone."""
        proc, job, abort = self.proc, self.job, self._abort
        try:
            proc.writer.writelines(wire.encode(header, payload))
        except (ConnectionError, RuntimeError) as exc:
            raise await self.lifecycle.crashed(proc, job.job_id, f"could not send {what}: {exc}")
        if proc.writer.transport.get_write_buffer_size() == 0:
            return  # all in the socket already: nothing to wait for
        drain = asyncio.ensure_future(proc.writer.drain())
        try:
            await wait_logged(drain, until, lambda: f"job {job.job_id}: worker pid {proc.pid} on {self.resource} "
                                                    f"has not taken {what} yet", also=abort)
        finally:
            if not drain.done():
                drain.cancel()
        if abort.done():
            if drain.done() and not drain.cancelled():
                drain.exception()  # seen: the abort's error is the job's
            raise await self._aborted()
        if not drain.done():
            raise await late()
        try:
            drain.result()
        except (ConnectionError, RuntimeError) as exc:
            raise await self.lifecycle.crashed(proc, job.job_id, f"could not send {what}: {exc}")
