"""The one retry policy and the one retry loop (``retrying``): full jitter under a cap per wait, a total budget,
Retry-After as a floor, a metric per operation, errors that are not retried surfacing at once. Pure: a fake clock,
a fake sleep that moves it, and a scripted random source."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from node_agent.metrics import RETRY_OPERATIONS, AgentMetrics
from node_agent.retry import RetryPolicies, RetryPolicy, jittered_delay, retrying


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_jitter_draws_from_zero_to_a_growing_capped_ceiling():
    assert jittered_delay(1, 0.5, 8.0, rng=lambda: 0.999999) == pytest.approx(0.5, rel=1e-5)
    assert jittered_delay(3, 0.5, 8.0, rng=lambda: 1.0) == 2.0
    assert jittered_delay(10, 0.5, 8.0, rng=lambda: 1.0) == 8.0  # capped
    assert jittered_delay(10, 0.5, 8.0, rng=lambda: 0.0) == 0.0  # full jitter: from zero, not from d/2
    assert jittered_delay(2, 0.5, 8.0, multiplier=3.0, rng=lambda: 0.5) == pytest.approx(0.75)


def test_the_total_budget_ends_the_sequence_and_retry_after_is_a_floor():
    clock = Clock()
    seen: list[str] = []
    backoff = RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=10.0).start(
        "result", seen.append, clock=clock, rng=lambda: 1.0)
    assert backoff.schedule() == 1.0
    assert backoff.schedule() == 2.0
    clock.now += 3.0
    assert backoff.schedule(retry_after=0.5) == 4.0  # the floor is below the jittered wait
    assert backoff.schedule(retry_after=60.0) == 4.0  # ... and never above the cap per wait
    clock.now += 4.0
    assert backoff.remaining() == pytest.approx(3.0)
    assert backoff.schedule() is None  # 4 s would end past the total
    assert seen == ["result"] * 4  # counted once per wait given, not for the one refused
    low = RetryPolicy(initial_s=1.0, max_wait_s=4.0).start("audio", clock=clock, rng=lambda: 0.0)
    assert low.schedule(retry_after=1.5) == 1.5  # a server asking for a wait gets at least that


def test_lifetime_loops_have_no_total():
    clock = Clock()
    backoff = RetryPolicy(initial_s=0.5, max_wait_s=2.0, max_total_s=None).start("poll", clock=clock,
                                                                               rng=lambda: 1.0)
    delays = [backoff.schedule() for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]
    clock.now += 1e6
    assert backoff.remaining() is None and backoff.schedule() == 2.0


class Down(Exception):
    """A failure worth another try; ``retry_after`` as a scheduler's 503 carries it."""

    def __init__(self, n: int = 0, retry_after: float | None = None) -> None:
        super().__init__(f"down #{n}")
        self.retry_after = retry_after


class Refused(Exception):
    """A definitive answer: never retried."""


class Script:
    """A call that raises the scripted errors in turn, then returns "ok"; a fake sleep that moves the fake clock."""

    def __init__(self, *errors: Exception) -> None:
        self.clock = Clock()
        self.errors = list(errors)
        self.tries: list[float] = []  # clock time of each try
        self.slept: list[float] = []
        self.counted: list[str] = []  # the metric's calls
        self.told: list[tuple[str, float | None]] = []  # on_error's calls

    async def call(self) -> str:
        self.tries.append(self.clock.now)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds

    def on_error(self, exc: Exception, wait: float | None) -> None:
        self.told.append((str(exc), wait))

    async def run(self, policy: RetryPolicy, **kw: Any) -> str:
        kw.setdefault("retry_if", Down)
        return await retrying(policy, "result", self.call, on_retry=self.counted.append, on_error=self.on_error,
                              clock=self.clock, rng=lambda: 1.0, sleep=self.sleep, **kw)


async def test_retrying_waits_the_policys_growing_capped_waits_and_returns_the_answer():
    s = Script(Down(1), Down(2), Down(3), Down(4))
    assert await s.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None)) == "ok"
    assert s.slept == [1.0, 2.0, 4.0, 4.0]
    assert s.tries == [100.0, 101.0, 103.0, 107.0, 111.0]
    assert s.counted == ["result"] * 4  # node_agent_retries_total{operation="result"}, once per retry
    assert s.told == [("down #1", 1.0), ("down #2", 2.0), ("down #3", 4.0), ("down #4", 4.0)]


async def test_retrying_gives_up_at_the_total_with_the_last_error():
    s = Script(*(Down(n) for n in range(1, 10)))
    with pytest.raises(Down, match="down #4"):
        await s.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=10.0))
    # 1 + 2 + 4 = 7 s waited; the next 4 s would end past the 10 s total, so no fourth wait.
    assert s.slept == [1.0, 2.0, 4.0] and len(s.tries) == 4
    assert s.counted == ["result"] * 3  # the wait not taken is not counted
    assert s.told[-1] == ("down #4", None)  # told it is the last


async def test_retrying_honours_retry_after_as_a_floor_up_to_the_cap():
    s = Script(Down(1, retry_after=3.0), Down(2, retry_after=60.0), Down(3))
    low = RetryPolicy(initial_s=0.5, max_wait_s=8.0, max_total_s=None)
    assert await retrying(low, "result", s.call, retry_if=Down, clock=s.clock, rng=lambda: 0.0,
                          sleep=s.sleep) == "ok"
    # The jitter drew 0 each time: 3 s asked for, 60 s asked for but capped at 8, then none asked: the jittered 0.
    assert s.slept == [3.0, 8.0, 0.0]


async def test_retrying_lets_other_errors_surface_at_once():
    s = Script(Down(1), Refused("no"), Down(3))
    with pytest.raises(Refused):
        await s.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None))
    assert len(s.tries) == 2 and s.slept == [1.0] and s.counted == ["result"]
    assert s.told == [("down #1", 1.0)]  # the refusal is not a retry
    first = Script(Refused("no"))
    with pytest.raises(Refused):
        await first.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None))
    assert first.slept == [] and first.counted == [] and first.told == []


async def test_retrying_takes_a_test_of_the_error_and_a_fresh_sequence_starts_short():
    policy = RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None)
    s = Script(Down(1, retry_after=2.0))
    with pytest.raises(Down, match="down #1"):  # the test refuses it: no retry
        await s.run(policy, retry_if=lambda exc: isinstance(exc, Down) and exc.retry_after is None)
    assert s.slept == []
    s.errors = [Down(2), Down(3), Down(4)]
    assert await s.run(policy) == "ok" and s.slept == [1.0, 2.0, 4.0]
    s.errors = [Down(5)]
    assert await s.run(policy) == "ok"
    assert s.slept[-1] == 1.0  # a new call is a new sequence: the next outage begins with short waits again


async def test_retrying_after_an_earlier_failure_waits_before_its_first_try():
    s = Script(Down(2))
    assert await s.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None),
                       after=Down(1, retry_after=3.0)) == "ok"
    assert s.slept == [3.0, 2.0] and s.tries == [103.0, 105.0]
    assert s.told == [("down #2", 2.0)]  # the caller told of its own failure already
    spent = Script()
    with pytest.raises(Down, match="down #1"):  # no budget for even one wait: the earlier error surfaces
        await spent.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=0.5), after=Down(1))
    assert spent.tries == []


async def test_retrying_stops_at_a_deadline_read_before_each_try():
    s = Script(*(Down(n) for n in range(1, 10)))
    # The deadline moves (a lease renewal's fence moves while the scheduler's store is paused): 1 s per try here.
    with pytest.raises(Down, match="down #4"):
        await s.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None), deadline=lambda: 104.5 + len(s.tries))
    # After the third try the deadline is 107.5: one more try at 107; the next would be at 111, past 108.5.
    assert s.tries == [100.0, 101.0, 103.0, 107.0] and s.slept == [1.0, 2.0, 4.0, 4.0]
    late = Script()
    late.clock.now = 200.0
    with pytest.raises(TimeoutError):  # past it before any try
        await late.run(RetryPolicy(initial_s=1.0, max_wait_s=4.0, max_total_s=None), deadline=lambda: 150.0)
    assert late.tries == []


def test_invalid_policies_are_refused():
    with pytest.raises(ValueError):
        RetryPolicy(initial_s=2.0, max_wait_s=1.0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_s=0.0)


def test_every_operation_has_a_bounded_policy_and_a_series_from_the_start():
    policies = RetryPolicies()
    names = [f.name for f in dataclasses.fields(policies)]
    assert set(RETRY_OPERATIONS) == set(names) | {"lease_renew"}
    for name in names:
        policy = getattr(policies, name)
        # Only the loops that live as long as the agent may retry without a total.
        assert (policy.max_total_s is None) == (name in ("register", "poll")), name
        assert policy.max_wait_s <= 30.0, name
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    for operation in RETRY_OPERATIONS:
        assert registry.get_sample_value("node_agent_retries_total", {"operation": operation}) == 0.0
    metrics.count_retry("result")
    assert registry.get_sample_value("node_agent_retries_total", {"operation": "result"}) == 1.0
    with pytest.raises(ValueError, match="unknown retry operation"):
        metrics.count_retry("no_such_call")  # the label set stays bounded
