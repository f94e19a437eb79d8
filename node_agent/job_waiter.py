"""Run a job on the scheduler and follow it to its end, riding through a scheduler that restarts or fails over.

The one place where a client (``node-agent submit``, ``POST /utterance``) submits a job and waits for it, and
cancels it (``node-agent cancel``, an utterance whose client hung up). A
submission is retried with one ``Idempotency-Key`` (a POST whose answer was lost creates no second job) through
refused connections, timeouts, 5xx, garbled answers and 429 (its ``Retry-After`` honoured); a poll is retried by
the job id through the same but garbled answers, until the caller's deadline. Every wait is the retry policy's (full jitter, a cap per
wait, never past the deadline). A scheduler that answers 404 ``unknown_job`` for a job submitted here has lost it
(``JobLost``: it restarted without its state), which is not a failure of the job and is said in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from .scheduler_client import (
    ConnectFailed,
    SchedulerClient,
    SchedulerError,
    SchedulerUnavailable,
    UnknownJob,
    lost_job_line,
    new_idempotency_key,
)
from .errors import NodeAgentError
from .retry import RetryPolicy, retrying
from .scheduler.schemas import TERMINAL_JOB_STATES, JobView

#: Failed submissions and polls are retried with full jitter, each wait at most ``max_wait_s`` (short: a client
#: is waiting on the answer); the total is what is left until the caller's deadline.
RETRY = RetryPolicy(initial_s=0.2, max_wait_s=5.0, max_total_s=None)
#: Longest single long poll, so a caller that checks something between polls (a draining node) does so often.
POLL_SLICE_S = 5.0


class JobLost(NodeAgentError):
    """The scheduler no longer knows a job submitted through it (it restarted and lost it); never retried."""

    def __init__(self, job_id: str) -> None:
        super().__init__(lost_job_line(job_id))
        self.job_id = job_id


class WaitExpired(NodeAgentError):
    """The job did not end by the caller's deadline; ``last_error`` is the failed poll whose retries ran into it,
    None when the job was simply still running."""

    def __init__(self, job_id: str, last_error: SchedulerUnavailable | None) -> None:
        super().__init__(f"job {job_id} did not end in time" + (f"; the last poll failed: {last_error}"
                                                                 if last_error is not None else ""))
        self.job_id = job_id
        self.last_error = last_error


@dataclass(frozen=True)
class Retrying:
    """A submit or poll that failed in a way worth another try, told to the caller before the wait."""

    stage: Literal["submit", "poll", "cancel"]
    job_id: str | None
    error: SchedulerUnavailable
    #: The first failure since the last answer (callers that log once per outage use it).
    first: bool


@dataclass(frozen=True)
class JobUpdate:
    """One answer of a long poll: the job's view and the segments not seen before it."""

    view: JobView
    new_segments: list[dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.view.state in TERMINAL_JOB_STATES


OnRetry = Callable[[Retrying], None]


def _telling(stage: Literal["submit", "poll", "cancel"], job_id: str | None,
             on_retry: OnRetry | None) -> Callable[[SchedulerUnavailable, float | None], None] | None:
    """``retrying``'s ``on_error`` for one run of failures: each told to ``on_retry``, the first marked so."""
    if on_retry is None:
        return None
    first = True

    def tell(exc: SchedulerUnavailable, _wait: float | None) -> None:
        nonlocal first
        on_retry(Retrying(stage, job_id, exc, first))
        first = False

    return tell


def _outage(exc: SchedulerUnavailable) -> bool:
    """No answer, a 5xx, or a 408/429 asking to come back: a scheduler restarting, failing over or full. A poll
    answered with a body that is not the protocol's is a broken peer instead, and waiting would not mend it (a
    submit retries that too: the job may exist, and its key finds it)."""
    return exc.status is None or exc.status >= 500 or exc.status in (408, 429)


class JobWaiter:
    """Submits jobs through ``client`` and follows them to their end under ``policy``.

    ``reached`` says whether some scheduler has answered through this waiter: while it is False a refused
    connection on submit is raised at once (``ConnectFailed``), since a wrong URL or a scheduler never started is
    far likelier than a restart; once anything has answered, a refusal is a restart and is retried.
    """

    def __init__(self, client: SchedulerClient, policy: RetryPolicy = RETRY, *, poll_slice_s: float = POLL_SLICE_S,
                 reached: bool = True) -> None:
        self.client = client
        self.policy = policy
        self.poll_slice_s = poll_slice_s
        self.reached = reached

    def _policy(self, until: float) -> RetryPolicy:
        """The policy, its total what is left until ``until`` (event-loop time)."""
        return dataclasses.replace(self.policy, max_total_s=max(0.0, until - asyncio.get_running_loop().time()))

    def _answered(self, exc: SchedulerError | None = None) -> None:
        if exc is None or exc.status is not None:
            self.reached = True

    async def submit(self, audio: bytes, *, until: float, on_retry: OnRetry | None = None, **fields: Any) -> str:
        """Submit ``audio`` (``fields`` as ``SchedulerClient.submit_job`` takes them) and return the job id,
        retrying a failed POST with one Idempotency-Key until ``until`` (event-loop time). Raises the last
        ``SchedulerUnavailable`` when time runs out, and any other ``SchedulerError`` (a refusal) at once."""
        key = new_idempotency_key()

        async def submit() -> str:
            try:
                submitted = await self.client.submit_job(audio, idempotency_key=key, **fields)
            except SchedulerError as exc:
                self._answered(exc)  # a refused connection (no status) tells nothing
                raise
            self._answered()
            return submitted.job_id

        def again(exc: Exception) -> bool:
            # A garbled answer too: the job may exist, and the key makes a retry find it instead of a twin.
            return isinstance(exc, SchedulerUnavailable) and (self.reached or not isinstance(exc, ConnectFailed))

        loop = asyncio.get_running_loop()
        return await retrying(self._policy(until), "job_submit", submit, retry_if=again,
                              on_error=_telling("submit", None, on_retry), clock=loop.time)

    async def cancel(self, job_id: str, until: float, on_retry: OnRetry | None = None) -> JobView:
        """Cancel ``job_id`` (``DELETE /v1/jobs/{id}``: a job that has ended is left as it is) and return its view,
        retried through refused connections, timeouts and 5xx until ``until`` (event-loop time): a cancel is
        idempotent. ``UnknownJob`` when the scheduler does not know the job (for a client's token: not its own);
        any other refusal at once. Before any scheduler has answered, a refused connection is raised at once."""

        async def cancel() -> JobView:
            try:
                view = await self.client.cancel_job(job_id)
            except SchedulerError as exc:
                self._answered(exc)
                raise
            self._answered()
            return view

        def again(exc: Exception) -> bool:
            return isinstance(exc, SchedulerUnavailable) and (self.reached or not isinstance(exc, ConnectFailed))

        loop = asyncio.get_running_loop()
        return await retrying(self._policy(until), "job_cancel", cancel, retry_if=again,
                              on_error=_telling("cancel", job_id, on_retry), clock=loop.time)

    async def follow(self, job_id: str, until: float, *, stream: bool = True,
                     on_retry: OnRetry | None = None) -> AsyncIterator[JobUpdate]:
        """Long-poll ``job_id`` and yield each answer until the one where the job has ended (the last yielded).

        ``stream``: a poll answers as soon as new segments exist (else only when the job ends or the slice is
        over). Polls that fail in transport, with 5xx, 408 or 429 are retried by the job id until ``until``
        (event-loop time); then ``WaitExpired``. ``JobLost`` when the scheduler no longer knows the job; any
        other ``SchedulerError`` (a refusal such as 401, or an answer that is not the protocol's) is raised at
        once. Close it (``contextlib.aclosing``) when leaving early.
        """
        loop = asyncio.get_running_loop()
        seen = 0

        async def poll() -> JobView:
            left = until - loop.time()
            if left <= 0:
                raise WaitExpired(job_id, None)
            try:
                view = await self.client.get_job(job_id, wait_s=min(self.poll_slice_s, left),
                                                 after_segment=seen if stream else None)
            except UnknownJob:
                # Submitted here, so the scheduler lost it: polling on would only repeat the 404.
                raise JobLost(job_id) from None
            except SchedulerUnavailable as exc:
                self._answered(exc)
                raise
            self._answered()
            return view

        while True:
            # One retry sequence per answer: a run of failed polls ends with the next answer.
            try:
                view = await retrying(self._policy(until), "job_poll", poll,
                                      retry_if=lambda exc: isinstance(exc, SchedulerUnavailable) and _outage(exc),
                                      on_error=_telling("poll", job_id, on_retry), clock=loop.time)
            except SchedulerUnavailable as exc:
                if not _outage(exc):
                    raise
                raise WaitExpired(job_id, exc) from None  # retried until the time ran out
            segments = view.segments
            if len(segments) < seen:
                seen = 0  # a new attempt started over
            update = JobUpdate(view, segments[seen:])
            seen = len(segments)
            yield update
            if update.finished:
                return

    async def wait(self, job_id: str, until: float, *, stream: bool = True,
                   on_update: Callable[[JobUpdate], None] | None = None,
                   on_retry: OnRetry | None = None) -> JobView:
        """``follow`` to the end and return the final view; ``on_update`` sees every answer first (it may print
        the new segments, or raise to stop waiting)."""
        async with contextlib.aclosing(self.follow(job_id, until, stream=stream, on_retry=on_retry)) as updates:
            async for update in updates:
                if on_update is not None:
                    on_update(update)
                if update.finished:
                    return update.view
        raise AssertionError("follow ends with a finished job or an error")  # unreachable: for the type checker
