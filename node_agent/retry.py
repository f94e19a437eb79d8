"""The one retry policy: exponential backoff with full jitter, a cap on each wait and on the total.

Every loop that retries a call to a scheduler goes through a ``Backoff`` made from a ``RetryPolicy``, so that the
waits, the caps and the ``node_agent_retries_total{operation}`` metric are the same everywhere. Full jitter (each
wait drawn uniformly from [0, d], d growing exponentially up to the cap) is what spreads many nodes that failed
together, e.g. after a scheduler restart, so they do not retry in step (AWS Architecture Blog, "Exponential
Backoff And Jitter"). A server's ``Retry-After`` is honoured as a lower bound on the next wait.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


class RetryBudgetSpent(Exception):
    """The policy's total time is used up; the caller gives up with the last error it saw."""


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
    """One retry sequence: ``await backoff.wait()`` before each new try; False once the budget is spent."""

    def __init__(self, policy: RetryPolicy, operation: str, on_retry: Callable[[str], None] | None,
                 clock: Callable[[], float], rng: Callable[[], float]) -> None:
        self.policy = policy
        self.operation = operation
        self._on_retry = on_retry
        self._clock = clock
        self._rng = rng
        self._started = clock()
        self._ceiling = policy.initial_s
        self.retries = 0

    def elapsed(self) -> float:
        return self._clock() - self._started

    def remaining(self) -> float | None:
        """Seconds left in the total budget (None: unbounded)."""
        if self.policy.max_total_s is None:
            return None
        return max(0.0, self.policy.max_total_s - self.elapsed())

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """The wait before the next try, or None when it would end past the total budget."""
        delay = self._rng() * self._ceiling
        self._ceiling = min(self.policy.max_wait_s, self._ceiling * self.policy.multiplier)
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, self.policy.max_wait_s))
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay

    async def wait(self, retry_after: float | None = None) -> bool:
        """Sleep before the next try and count it; False (without sleeping) when the budget is spent."""
        delay = self.next_delay(retry_after)
        if delay is None:
            return False
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(self.operation)
        await asyncio.sleep(delay)
        return True

    def reset(self) -> None:
        """Start over after a success (lifetime loops: the next outage begins with short waits again)."""
        self._started = self._clock()
        self._ceiling = self.policy.initial_s
