"""The one retry policy: full jitter under a cap per wait, a total budget, Retry-After as a floor, a metric per
operation. Pure: a fake clock and a scripted random source."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from node_agent.metrics import RETRY_OPERATIONS, AgentMetrics
from node_agent.retry import RetryPolicies, RetryPolicy, jittered_delay


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
    assert seen == ["result"] * 4 and backoff.retries == 4
    low = RetryPolicy(initial_s=1.0, max_wait_s=4.0).start("audio", clock=clock, rng=lambda: 0.0)
    assert low.schedule(retry_after=1.5) == 1.5  # a server asking for a wait gets at least that


def test_lifetime_loops_have_no_total_and_start_over_after_a_success():
    clock = Clock()
    backoff = RetryPolicy(initial_s=0.5, max_wait_s=2.0, max_total_s=None).start("poll", clock=clock,
                                                                               rng=lambda: 1.0)
    delays = [backoff.schedule() for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]
    clock.now += 1e6
    assert backoff.remaining() is None and backoff.schedule() == 2.0
    backoff.reset()
    assert backoff.schedule() == 0.5


async def test_wait_sleeps_and_says_when_the_budget_is_spent():
    backoff = RetryPolicy(initial_s=0.01, max_wait_s=0.01, max_total_s=0.05).start("events", rng=lambda: 1.0)
    tries = 0
    while await backoff.wait():
        tries += 1
        assert tries < 50
    # 10 ms waits in a 50 ms budget: at most 4 fit (fewer when a loaded machine oversleeps), never one past it.
    assert 1 <= tries <= 4 and backoff.remaining() < 0.01


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
