"""The one retry policy: exponential backoff with full jitter, a cap on each wait and on the total.

Every call to a scheduler that is retried goes through ``retrying`` with a named ``RetryPolicy``, so that the
waits, the caps and the ``node_agent_retries_total{operation}`` metric are the same everywhere. Full jitter (each
wait drawn uniformly from [0, d], d growing exponentially up to the cap) is what spreads many nodes that failed
together, e.g. after a scheduler restart, so they do not retry in step (AWS Architecture Blog, "Exponential
Backoff And Jitter"). A server's ``Retry-After`` is honoured as a lower bound on the next wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def jittered_delay(retry: int, initial_s: float, max_s: float, multiplier: float = 2.0,
                   rng: Callable[[], float] = random.random) -> float:
    """The wait before retry number ``retry`` (1-based): full jitter, uniform in [0, min(max_s, initial_s *
    multiplier ** (retry - 1))]. Pure apart from ``rng``; the supervisor's restart backoff uses it too."""
    ceiling = min(max_s, initial_s * multiplier ** max(0, retry - 1))
    return rng() * ceiling


def retry_after_of(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` carried by an error (``SchedulerUnavailable``, ``LeaseHeld``), if any."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, (int, float)) else None


@dataclass(frozen=True)
class RetryPolicy:
    """How one kind of call is retried.

    ``max_total_s`` bounds the whole sequence; ``None`` is only for loops that live as long as the agent
    (registration, the job poll) and are ended by its shutdown, never by a caller waiting on them.
    """

    initial_s: float = 0.2
    max_wait_s: float = 10.0
    max_total_s: float | None = 60.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_wait_s) or self.multiplier < 1:
            raise ValueError(f"invalid retry policy {self!r}")

    def start(self, operation: str, on_retry: Callable[[str], None] | None = None, *,
              clock: Callable[[], float] = time.monotonic,
              rng: Callable[[], float] = random.random) -> "Backoff":
        """A fresh sequence of waits for one operation (its clock starts now)."""
        return Backoff(self, operation, on_retry, clock, rng)


class Backoff:
    """One retry sequence: ``schedule()`` gives the wait before each new try, None once the budget is spent."""

    def __init__(self, policy: RetryPolicy, operation: str, on_retry: Callable[[str], None] | None,
                 clock: Callable[[], float], rng: Callable[[], float]) -> None:
        self.policy = policy
        self.operation = operation
        self._on_retry = on_retry
        self._clock = clock
        self._rng = rng
        self._started = clock()
        self._attempt = 0

    def remaining(self) -> float | None:
        """Seconds left in the total budget (None: unbounded)."""
        if self.policy.max_total_s is None:
            return None
        return max(0.0, self.policy.max_total_s - (self._clock() - self._started))

    def schedule(self, retry_after: float | None = None) -> float | None:
        """The wait before the next try, counted as a retry (metric included); None, and not counted, when it
        would end past the total budget."""
        p = self.policy
        self._attempt += 1
        delay = jittered_delay(self._attempt, p.initial_s, p.max_wait_s, p.multiplier, self._rng)
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, p.max_wait_s))
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        if self._on_retry is not None:
            self._on_retry(self.operation)
        return delay


#: Which errors ``retrying`` tries again after: exception classes, or a test of the error.
RetryIf = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


def policy_wait(backoff: Backoff, error: Exception) -> float | None:
    """The policy's own next wait: full jitter under its caps, the error's ``Retry-After`` as a floor."""
    return backoff.schedule(retry_after_of(error))


async def retrying(policy: RetryPolicy, operation: str, call: Callable[[], Awaitable[T]], *, retry_if: RetryIf,
                   on_retry: Callable[[str], None] | None = None,
                   on_error: Callable[[Any, float | None], None] | None = None,
                   after: Exception | None = None,
                   deadline: Callable[[], float] | None = None,
                   wait: Callable[[Backoff, Any], float | None] = policy_wait,
                   clock: Callable[[], float] = time.monotonic,
                   rng: Callable[[], float] = random.random,
                   sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> T:
    """Await ``call()`` until it returns, and return what it returns; the agent's one retry loop.

    An error that ``retry_if`` accepts is tried again after ``wait(backoff, error)`` (by default the policy's next
    wait, ``Retry-After`` as a floor; None once the total budget is spent, and then the error surfaces); any other
    error surfaces at once. ``on_retry(operation)`` counts each retry (the ``node_agent_retries_total`` metric);
    ``on_error(error, wait)`` hears of each retried error before its wait (``wait`` None: the last, about to
    surface). ``after``: an error of the caller's own try of this operation, made before this call: the first try
    here waits as after it (``on_error`` has not heard of it). ``deadline()`` (a time on ``clock``, read again before
    each try): no try starts at or after it; the last error surfaces then (``TimeoutError`` when there was none).
    """
    accepts = retry_if if not isinstance(retry_if, (type, tuple)) else (lambda exc: isinstance(exc, retry_if))
    backoff = policy.start(operation, on_retry, clock=clock, rng=rng)
    error, told = after, False
    while True:
        if error is not None:
            delay = wait(backoff, error)
            if told and on_error is not None:
                on_error(error, delay)
            if delay is None:
                raise error
            await sleep(delay)
        if deadline is not None and clock() >= deadline():
            raise error if error is not None else TimeoutError(f"{operation}: the deadline passed before a try")
        try:
            return await call()
        except Exception as exc:
            if not accepts(exc):
                raise
            error, told = exc, True


@dataclass(frozen=True)
class RetryPolicies:
    """The agent's policy for each operation it retries (the ``operation`` label of
    ``node_agent_retries_total``). Defaults are the production values; tests pass faster ones.

    Lease renewals are not here: their waits follow the granted TTL (``LeaseKeeper``), their total is the fence.
    """

    #: Registration lives as long as the agent: a node that cannot register has nothing else to do.
    register: RetryPolicy = RetryPolicy(initial_s=0.5, max_wait_s=30.0, max_total_s=None)
    #: One heartbeat, retried until the next one is due (the total is also cut to the heartbeat interval).
    heartbeat: RetryPolicy = RetryPolicy(initial_s=0.5, max_wait_s=5.0, max_total_s=30.0)
    #: Polling for jobs lives as long as the agent; reset after each answer.
    poll: RetryPolicy = RetryPolicy(initial_s=0.5, max_wait_s=10.0, max_total_s=None)
    #: A job's audio, fetched under its lease; after this the lease is given back and the job re-queued.
    audio: RetryPolicy = RetryPolicy(initial_s=0.2, max_wait_s=2.0, max_total_s=15.0)
    #: Waiting for a device (409 with Retry-After) or through a blip; the total is ``lease.acquire_timeout_s``.
    lease_acquire: RetryPolicy = RetryPolicy(initial_s=0.2, max_wait_s=5.0, max_total_s=20.0)
    #: Housekeeping only: an unreleased lease expires after its TTL anyway.
    lease_release: RetryPolicy = RetryPolicy(initial_s=0.2, max_wait_s=1.0, max_total_s=10.0)
    #: Segment events still undelivered when the job ends; short steps so several tries fit even if one hangs.
    events: RetryPolicy = RetryPolicy(initial_s=0.1, max_wait_s=0.5, max_total_s=4.0)
    #: The result: retried for minutes, after which the scheduler's lease expiry re-queues the job.
    result: RetryPolicy = RetryPolicy(initial_s=0.2, max_wait_s=10.0, max_total_s=300.0)


class OutageLog:
    """One log line when a repeating call starts failing or fails differently, one when it works again;
    not one per retry."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._reasons: dict[str, str] = {}

    def failed(self, what: str, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if self._reasons.get(what) != reason:
            self._log.warning("%s failed (retrying with backoff): %s", what, reason)
            self._reasons[what] = reason

    def recovered(self, what: str) -> None:
        if self._reasons.pop(what, None) is not None:
            self._log.info("%s works again", what)
