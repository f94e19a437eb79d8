"""One job, start to end: lease -> fetch audio -> decode with streamed events -> result report.

``JobRunner.run`` is handed an assignment and returns a ``JobOutcome``; it is given everything it talks to (the
scheduler client, the device's lease keeper and worker, the retry policies, metrics) and keeps no other state
than the ``JobLedger`` it writes for status. The lease normally comes with the assignment (the poll asks for it),
else it is asked for; it is renewed from then on, through the audio download and the decode. The report runs
under ``asyncio.shield`` and is awaited to the end, so a shutdown never loses a result. Accepting the result
releases the lease on the scheduler; a job given up without an accepted result (no audio, a shutdown, a report
that never got through) releases it in a background task, so the scheduler re-queues it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any

from .scheduler_client import (
    BadRequest,
    Gone,
    Rejected,
    SchedulerClient,
    SchedulerError,
    SchedulerUnavailable,
    UnknownJob,
    lost_job_line,
)
from .errors import InvalidRequest, JobCancelled, JobError, LeaseLost
from .lease import JOB_CANCELLED, Lease, LeaseKeeper, LeaseUnavailable
from .lone_worker import LoneWorker
from .metrics import AgentMetrics, job_outcome
from .registration import NodeIdentity
from .retry import RetryPolicies, retry_after_of, retrying
from .scheduler.schemas import SECTION_SAMPLE_RATE, JobAssignment
from .sections import SectionSplit
from .supervisor import JobRequest, ResultMessage, Worker

log = logging.getLogger("node_agent.jobs")

#: Failures kept for status.
RECENT_FAILURES = 10
#: How far back status counts lease losses.
LEASE_LOSS_WINDOW_S = 600.0
#: The longest a scheduler's Retry-After holds back segment events during a job (they pile up meanwhile; the
#: result carries every segment anyway, so a long hold only delays what streaming clients see).
EVENTS_HOLD_MAX_S = 5.0
#: A segment waits up to this long for the ones after it before it is posted. faster-whisper yields a window's
#: segments together, so a burst goes as one post; and the segments that come with the end of the decode (all of
#: a short clip's) are not posted at all: the result carries every segment and the scheduler stores them with it,
#: which saves a request and a store write per short job. Streaming clients see segments this much later.
EVENTS_LINGER_S = 0.1


class _End(enum.Enum):
    """The last item of a job's segment queue: how the decode ended."""

    result = "result"  # with a result, which carries every segment: what is pending goes with it
    failed = "failed"  # without one: what is pending is still posted (a failed job's partial transcript)


@dataclass
class RunningJob:
    """What status shows about a job in flight."""

    assignment: JobAssignment
    resource: str
    received: float  # event-loop time
    polled_at: float  # event-loop time the poll that brought it was sent (no later than its lease's grant)
    lease: Lease | None = None
    #: Where it decodes: its slot's worker, or the device's lone-job worker (``lone_worker``).
    worker: Worker | None = None
    #: The job's sections once it was cut (issue 24); None for a job that could not be split.
    split: SectionSplit | None = None

    def view(self, now: float) -> dict[str, Any]:
        current = (self.worker.current_job or {}) if self.worker else {}
        lease = self.lease
        last_seg = current.get("last_segment")
        return {
            "job_id": self.assignment.job_id,
            "attempt": self.assignment.attempt,
            "resource": self.resource,
            "worker": self.worker.resource if self.worker else None,
            "audio_s": current.get("audio_s"),
            "elapsed_s": round(now - self.received, 2),
            "segments": current.get("segments", 0),
            "since_last_segment_s": round(time.monotonic() - last_seg, 2) if last_seg else None,
            "lease_id": lease.lease_id if lease else None,
            "epoch": lease.epoch if lease else None,
            "since_last_renewal_s": round(now - lease.renewed_at, 2) if lease else None,
            "lease_margin_s": round(lease.last_margin_s, 3) if lease and lease.last_margin_s is not None else None,
            "renewals": lease.renewals if lease else 0,
            "sections": self.split.status() if self.split is not None and self.split.split else [],
        }


class JobLedger:
    """The node's record of jobs, shared by its runners and read by status: in flight, totals, recent failures,
    lease losses."""

    def __init__(self) -> None:
        self.running: dict[str, RunningJob] = {}
        self.totals: Counter[str] = Counter()
        self.recent_failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self.lease_losses: deque[float] = deque(maxlen=100)  # event-loop times

    def lease_losses_since(self, since: float) -> int:
        return sum(1 for t in self.lease_losses if t >= since)


class Report(enum.Enum):
    """What became of the result report."""

    accepted = "accepted"
    rejected = "rejected"  # stale attempt or epoch, or already completed: definitive
    abandoned = "abandoned"  # the scheduler stayed unreachable for the result policy's total
    not_sent = "not_sent"  # the job never ran: no audio, or no lease
    cancelled = "cancelled"  # a client or operator cancelled the job: nothing to report (or the report was refused)


@dataclass(frozen=True)
class JobOutcome:
    """How one assignment ended."""

    job_id: str
    attempt: int
    #: The ``node_agent_jobs_total`` label ("succeeded", "timeout", ...); None when the job never ran.
    outcome: str | None
    report: Report
    error: JobError | None = None
    #: Why the job never ran (its audio could not be fetched, no lease), for logs and tests.
    reason: str | None = None
    seconds: float = 0.0
    requeued: bool = False


def _report_again(exc: Exception) -> bool:
    """Whether a failed result report is worth another try: not once the scheduler answered definitively."""
    return isinstance(exc, SchedulerError) and not isinstance(exc, (Rejected, Gone, BadRequest))


def _accepted(report: asyncio.Task[tuple[Report, bool]]) -> bool:
    """Whether the report task ended with the scheduler accepting the result."""
    return report.done() and not report.cancelled() and report.exception() is None \
        and report.result()[0] is Report.accepted


class JobRunner:
    """Runs jobs on one slot, one at a time: each on the slot's ``worker``, or on the device's lone-job worker
    (``lone``) when it finds the other slots idle."""

    def __init__(self, client: SchedulerClient, keeper: LeaseKeeper, worker: Worker, identity: NodeIdentity, *,
                 metrics: AgentMetrics, policies: RetryPolicies | None = None,
                 ledger: JobLedger | None = None, lone: LoneWorker | None = None) -> None:
        self.client = client
        self.keeper = keeper
        self.worker = worker
        self.lone = lone
        self._decoding_on: Worker | None = None  # the worker of the job in flight
        self.identity = identity
        self.metrics = metrics
        self.policies = policies or RetryPolicies()
        self.ledger = ledger if ledger is not None else JobLedger()
        self._background: set[asyncio.Task[Any]] = set()

    async def run(self, assignment: JobAssignment, polled_at: float | None = None) -> JobOutcome:
        """Run one assignment to its end and say how it ended. Never raises but for cancellation.
        ``polled_at`` (event-loop time): when the poll that brought it was sent, for a lease that came with it."""
        loop = asyncio.get_running_loop()
        a = assignment
        now = loop.time()
        worker = self.lone.take(self.worker) if self.lone is not None else self.worker
        self._decoding_on = worker
        running = RunningJob(a, self.worker.resource, now, polled_at if polled_at is not None else now,
                             worker=worker)
        self.ledger.running[a.job_id] = running
        self.metrics.jobs_in_progress.inc()
        self.metrics.job_queue_wait.observe(max(0.0, a.queued_s))
        if worker is not self.worker:
            self.metrics.lone_jobs.labels(worker.resource).inc()
        log.info("job %s attempt %d received on %s%s", a.job_id, a.attempt, self.worker.resource,
                 "" if worker is self.worker else f" (decoding on the idle device's {worker.resource})")
        try:
            return await self._execute(running)
        except Exception as exc:
            log.exception("job %s: unexpected error", a.job_id)
            return JobOutcome(a.job_id, a.attempt, None, Report.not_sent, reason=f"unexpected error: {exc!r}")
        finally:
            if self.lone is not None:
                self.lone.give_back(worker)
            self._decoding_on = None
            self.ledger.running.pop(a.job_id, None)
            self.metrics.jobs_in_progress.dec()

    def decoding_on(self) -> Worker:
        """The worker the job in flight decodes on (the slot's own when none is)."""
        return self._decoding_on or self.worker

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for background housekeeping (lease releases) to finish."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)

    def _own(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task referenced until done; ``settle`` waits for the stragglers."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _execute(self, running: RunningJob) -> JobOutcome:
        loop = asyncio.get_running_loop()
        a = running.assignment
        deadline = running.received + a.deadline_s if a.deadline_s else None
        if a.lease is not None:  # granted with the assignment (one round trip less)
            lease = self.keeper.adopt(self.identity.node_id or "", a.job_id, a.lease,
                                      running.polled_at + (a.poll_held_s or 0.0))
        else:  # a scheduler that did not grant it so, or the resource was still held
            try:
                lease = await self.keeper.acquire(self.identity.node_id or "", a.job_id)
            except LeaseUnavailable as exc:
                log.error("job %s: %s", a.job_id, exc)
                return JobOutcome(a.job_id, a.attempt, None, Report.not_sent, reason=str(exc))
        running.lease = lease

        try:
            result, error = await self._decode(running, lease, deadline)
        except SchedulerError as exc:  # the audio could not be had
            if lease.cancelled is not None:  # (dropped with the cancelled job)
                return self._cancelled(running, lease.cancelled)
            # Given back, the job goes back to the queue at once (rather than when the lease expires).
            log.error("job %s: could not fetch audio, giving the job back to the scheduler: %s", a.job_id, exc)
            self._own(loop.create_task(self.keeper.release(lease), name=f"release-{lease.lease_id}"))
            return JobOutcome(a.job_id, a.attempt, None, Report.not_sent, reason=f"audio: {exc}")
        if lease.cancelled is not None:
            # The scheduler ended the job and its lease: whatever the decode gave, nobody takes it.
            return self._cancelled(running, lease.cancelled)
        if isinstance(error, LeaseLost):
            self.ledger.lease_losses.append(loop.time())
        # The report must survive cancellation (shutdown): shield it, and await it to the end.
        report = loop.create_task(self._report(running, lease, result, error))
        try:
            reported, requeued = await asyncio.shield(report)
        except asyncio.CancelledError:
            await report
            raise
        finally:
            if _accepted(report):  # accepting the result released the lease on the scheduler: nothing to send
                self.keeper.released_by_result(lease)
            else:
                # Releasing is housekeeping and may retry through a partition, so it must not hold up the node.
                self._own(loop.create_task(self.keeper.release(lease), name=f"release-{lease.lease_id}"))
        code = None if result is not None else (error.code if error else "failed")
        if reported is Report.cancelled:
            code = JobCancelled.code
        return JobOutcome(a.job_id, a.attempt, job_outcome(code), reported, error,
                          seconds=loop.time() - running.received, requeued=requeued)

    def _cancelled(self, running: RunningJob, error: JobCancelled) -> JobOutcome:
        """A job its client or an operator cancelled: stopped (the worker kept), nothing reported, and counted as
        what it is: neither a failure nor a lease loss."""
        a = running.assignment
        seconds = asyncio.get_running_loop().time() - running.received
        self.ledger.totals[job_outcome(JobCancelled.code)] += 1
        self.metrics.count_job(JobCancelled.code, seconds)
        log.info("job %s attempt %d cancelled after %.2f s on %s; nothing reported, worker kept", a.job_id,
                 a.attempt, seconds, self.worker.resource)
        return JobOutcome(a.job_id, a.attempt, job_outcome(JobCancelled.code), Report.cancelled, error,
                          seconds=seconds)

    async def _decode(self, running: RunningJob, lease: Lease,
                      deadline: float | None) -> tuple[ResultMessage | None, JobError | None]:
        """Under the lease (renewed throughout): the audio (a ``SchedulerError`` when it cannot be had), then the
        decode, its segments streamed to the scheduler as they come."""
        a = running.assignment

        # A cancelled job is stopped between two segments and its worker kept; a lost lease kills the decode. Either
        # also ends the following of its sections, if it was split.
        worker = running.worker
        assert worker is not None

        def lost(error: LeaseLost) -> None:
            worker.abort(error)
            if running.split is not None:
                running.split.abort(error)

        def cancelled(error: JobCancelled) -> None:
            worker.cancel(error)
            if running.split is not None:
                running.split.abort(error)

        async with self.keeper.hold(lease, on_lost=lost, on_cancelled=cancelled):
            if a.options_error is not None:  # reported under the lease, as any failure of the job's own
                return None, InvalidRequest(a.options_error)
            audio = await self._fetch_audio(a, deadline)
            if lease.lost is not None or lease.cancelled is not None:  # during the fetch: no decode is started
                return None, lease.lost or lease.cancelled
            return await self._decode_held(running, lease, audio, deadline)

    def _splittable(self, a: JobAssignment) -> float | None:
        """The ``split_min_s`` a job is offered for splitting at; None: never (the node's setting is off, or the
        job is a section itself: a section is never cut again)."""
        split_min_s = self.worker.spec.asr.split_min_s
        if not split_min_s or a.parent_id is not None:
            return None
        return split_min_s

    async def _decode_held(self, running: RunningJob, lease: Lease, audio: bytes,
                           deadline: float | None) -> tuple[ResultMessage | None, JobError | None]:
        loop = asyncio.get_running_loop()
        a = running.assignment
        events: asyncio.Queue[dict[str, Any] | _End] = asyncio.Queue()
        sender = loop.create_task(self._send_events(a.job_id, a.attempt, lease, events))
        end = _End.failed
        split_min_s = self._splittable(a)
        started = loop.time()
        worker = running.worker
        assert worker is not None

        async def decode_here(index: int, section: bytes, language: str | None) -> ResultMessage:
            # A section the scheduler would not take: decoded on this worker after section 0 (in section 0's
            # language when the job named none), never cut again.
            return await worker.run_job(JobRequest(
                job_id=f"{a.job_id}.{index}", audio=section, format="pcm_s16le", sample_rate=SECTION_SAMPLE_RATE,
                language=language or a.language, options=a.options, deadline=deadline))

        if split_min_s is not None:
            running.split = SectionSplit(self.client, a.job_id, lease, self.worker.spec.asr, self.metrics,
                                         on_segment=events.put_nowait, decode_local=decode_here)
        split = running.split
        try:
            result = await worker.run_job(
                JobRequest(job_id=a.job_id, audio=audio, format=a.audio.format,
                           sample_rate=a.audio.sample_rate, language=a.language, options=a.options,
                           deadline=deadline, split_min_s=split_min_s, splitter=split),
                on_segment=events.put_nowait)
            if split is not None and split.split:
                result = await split.finish(result, started, self._follow_until(split, started, deadline))
            end = _End.result
            return result, None
        except JobError as exc:
            return None, exc
        finally:
            if split is not None:
                split.close()
            events.put_nowait(end)
            flush_s = self.policies.events.max_total_s or 0.0
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                # A little longer than the sender's own flush budget: it normally ends by itself.
                await asyncio.wait_for(asyncio.shield(sender), flush_s + 1.0)

    def _follow_until(self, split: SectionSplit, started: float, deadline: float | None) -> float:
        """How long a split job may wait for its sections: its deadline, else the time budget the whole file
        would have had on one worker (``asr.timeout``), from when its decode began."""
        t = self.worker.timeouts
        budget = started + max(t.min_s, t.per_audio_s * split.duration_s)
        return budget if deadline is None else min(budget, deadline)

    async def _fetch_audio(self, a: JobAssignment, deadline: float | None) -> bytes:
        """The job's audio, retried through refused connections and 5xx under the ``audio`` policy, and never
        past the job's deadline (loop time): a job that can no longer finish in time is not waited for."""
        policy = self.policies.audio
        if deadline is not None:
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            policy = replace(policy, max_total_s=min(left, policy.max_total_s if policy.max_total_s is not None
                                                     else left))

        async def fetch() -> bytes:
            data = await self.client.fetch_audio(a.audio.url)
            # A proxy error page or a cut connection must not reach the decoder as "audio".
            if len(data) != a.audio.bytes:
                raise SchedulerUnavailable(f"audio: got {len(data)} bytes, the assignment announced {a.audio.bytes}")
            return data

        def failed(exc: SchedulerUnavailable, wait: float | None) -> None:
            if wait is not None:  # the last failure is the caller's to tell
                log.warning("job %s: audio fetch failed (%s); retrying", a.job_id, exc)

        return await retrying(policy, "audio", fetch, retry_if=SchedulerUnavailable,
                              on_retry=self.metrics.count_retry, on_error=failed)

    async def _send_events(self, job_id: str, attempt: int, lease: Lease,
                           queue: asyncio.Queue[dict[str, Any] | _End]) -> None:
        """Forward segment events in order, batching what comes within ``EVENTS_LINGER_S``. Never blocks the
        decode.

        A batch that could not be delivered is carried into the next post (the scheduler replaces segments by
        id, so a resend is harmless). When the decode ends with a result, what is still pending goes with it (the
        result carries every segment). When it ends without one, what is still undelivered is retried under the
        ``events`` policy (4 s in all): the failure report waits for that flush, so a blip at the very end of a
        job costs no events, and a dead scheduler costs seconds.
        """
        loop = asyncio.get_running_loop()
        pending: list[dict[str, Any]] = []
        done = False
        failed: SchedulerError | None = None  # the last post's error, while what it carried is still pending
        hold_until = 0.0  # after a refusal with Retry-After, later segments pile up until then
        while not done:
            items = [await queue.get()]
            linger_until = loop.time() + EVENTS_LINGER_S
            while not isinstance(items[-1], _End):
                if queue.empty():
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (see lease.hold).
                        async with asyncio.timeout(linger_until - loop.time()):
                            items.append(await queue.get())
                    except TimeoutError:
                        break
                else:
                    items.append(queue.get_nowait())
            end = items[-1] if isinstance(items[-1], _End) else None
            done = end is not None
            pending.extend(e for e in items if not isinstance(e, _End))
            if end is _End.result:
                return
            if not pending or (not done and loop.time() < hold_until):
                continue
            try:
                await self.client.post_events(job_id, lease.node_id, lease.lease_id, attempt, lease.epoch, pending)
                pending = []
                failed, hold_until = None, 0.0
            except Rejected as exc:
                # (A cancelled job's are refused too: its decode stops at the next renewal, no warning needed.)
                log.log(logging.INFO if exc.code == JOB_CANCELLED else logging.WARNING,
                        "job %s: segment events rejected (%s); no more will be sent", job_id, exc)
                return
            except SchedulerError as exc:
                log.warning("job %s: %d segment event(s) not delivered yet: %s", job_id, len(pending), exc)
                failed = exc
                retry_after = retry_after_of(exc)
                if retry_after:
                    hold_until = loop.time() + min(retry_after, EVENTS_HOLD_MAX_S)
        if not pending:
            return
        policy = self.policies.events
        flush_until = loop.time() + (policy.max_total_s or 0.0)

        async def post_pending() -> None:
            # Each try is bounded by what is left, so one hanging request cannot outlast the flush.
            await asyncio.wait_for(
                self.client.post_events(job_id, lease.node_id, lease.lease_id, attempt, lease.epoch, pending),
                max(0.1, flush_until - loop.time()))

        def retryable(exc: Exception) -> bool:
            return isinstance(exc, (SchedulerError, asyncio.TimeoutError)) and not isinstance(exc, Rejected)

        def not_delivered(exc: Exception, _wait: float | None) -> None:
            log.warning("job %s: %d segment event(s) not delivered yet: %s", job_id, len(pending), exc or "timed out")

        try:
            # The first try waits as after the post that just failed (its Retry-After included).
            await retrying(policy, "events", post_pending, retry_if=retryable, on_retry=self.metrics.count_retry,
                           on_error=not_delivered, after=failed, clock=loop.time)
        except Rejected as exc:
            log.warning("job %s: segment events rejected (%s); no more will be sent", job_id, exc)
        except (SchedulerError, asyncio.TimeoutError):
            log.warning("job %s: %d segment event(s) never delivered; the result carries every segment",
                        job_id, len(pending))

    async def _report(self, running: RunningJob, lease: Lease, result: ResultMessage | None,
                      error: JobError | None) -> tuple[Report, bool]:
        """Report the result (the same body on every try: reports are idempotent); count the job once."""
        loop = asyncio.get_running_loop()
        a = running.assignment
        # A plain mapping: ``report_result`` validates it, so a body the scheduler would refuse is BadRequest.
        body: dict[str, Any] = {
            # The holder's identity, as the lease was granted: the scheduler accepts nothing else.
            "node_id": lease.node_id,
            "lease_id": lease.lease_id,
            "attempt": a.attempt,
            "lease_epoch": lease.epoch,
            "outcome": "succeeded" if result is not None else "failed",
            "result": result.transcript() if result is not None else None,
            "error": error.to_dict() if error is not None else None,
            "timings": {**(result.timings if result else {}),
                        "node_s": round(loop.time() - running.received, 4)},
        }
        code = None if result is not None else (error.code if error else "failed")
        report, requeued = Report.abandoned, False
        started = loop.time()
        try:
            ack = await retrying(self.policies.result, "result", lambda: self.client.report_result(a.job_id, body),
                                 retry_if=_report_again, on_retry=self.metrics.count_retry, clock=loop.time)
        except UnknownJob:
            # Definitive like a rejection; the one line says why (the scheduler restarted without the job).
            report = Report.rejected
            log.warning("job %s attempt %d: result dropped: %s", a.job_id, a.attempt, lost_job_line(a.job_id))
        except (Rejected, Gone, BadRequest) as exc:
            if exc.code == JOB_CANCELLED:  # cancelled as the decode ended: not a failure of this node's
                report, code, error = Report.cancelled, JobCancelled.code, None
                log.info("job %s attempt %d: cancelled before its result arrived; result dropped", a.job_id,
                         a.attempt)
            else:
                # Gone: the lease or assignment no longer exists, so no retry can make this report count.
                report = Report.rejected
                log.warning("job %s attempt %d: result rejected by the scheduler: %s", a.job_id, a.attempt, exc)
        except SchedulerError as exc:
            log.error("job %s: giving up reporting after %.0f s: %s", a.job_id, loop.time() - started, exc)
        else:
            report, requeued = Report.accepted, ack.requeued
            log.info("job %s attempt %d %s in %.2f s (result accepted%s)", a.job_id, a.attempt,
                     job_outcome(code), loop.time() - running.received, ", requeued" if ack.requeued else "")
        self.ledger.totals[job_outcome(code)] += 1
        self.metrics.count_job(code, loop.time() - running.received)
        if error is not None:
            self.ledger.recent_failures.append({"job_id": a.job_id, "code": error.code, "message": error.message,
                                                "at": time.time(), "accepted": report is Report.accepted})
        return report, requeued
