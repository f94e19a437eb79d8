"""Lease timing follows the lease the scheduler granted, not the agent's own ``lease.ttl_s``.

A scheduler may grant less than asked (its ``lease_max_ttl_s``); renewing on the request's schedule would then let
the lease expire between two renewals. These tests run a real agent against a real embedded scheduler.
"""

from __future__ import annotations

import logging

import pytest

from conftest import make_settings
from node_agent.lease import LeaseKeeper
from stack import agent_stack, long_audio


def test_timing_comes_from_the_granted_ttl():
    lease = make_settings(lease={"ttl_s": 9}).lease
    assert lease.timing(9) == pytest.approx((3, 6))
    assert lease.timing(2) == pytest.approx((2 / 3, 4 / 3))
    explicit = make_settings(lease={"ttl_s": 9, "renew_every_s": 2, "renew_deadline_s": 5}).lease
    assert explicit.timing(9) == pytest.approx((2, 5))
    # Explicit values that no longer fit a shorter grant give way to TTL/3 and 2/3 TTL.
    assert explicit.timing(3) == pytest.approx((1, 2))


def test_request_is_clamped_into_the_registration_bounds(caplog):
    keeper = LeaseKeeper(client=None, settings=make_settings(lease={"ttl_s": 600}).lease,  # type: ignore[arg-type]
                         metrics=None, device="cpu")
    assert keeper.requested_ttl() == 600  # bounds unknown until registration
    keeper.set_bounds(1.0, 300.0)
    with caplog.at_level(logging.WARNING, logger="node_agent.lease"):
        assert keeper.requested_ttl() == 300
        assert keeper.requested_ttl() == 300
    assert [r.getMessage() for r in caplog.records].count(
        "lease.ttl_s = 600 is outside the scheduler's range 1..300 s: asking for 300 s") == 1
    keeper.set_bounds(10.0, 300.0)
    keeper.settings = make_settings(lease={"ttl_s": 2}).lease
    assert keeper.requested_ttl() == 10


@pytest.mark.parametrize("scheduler_max_ttl_s", [2.0, 300.0], ids=["cap-below-request", "cap-above-request"])
async def test_a_long_healthy_job_keeps_its_lease(tmp_path, scheduler_max_ttl_s):
    # About 20 s of decoding on these machines: ~30 renewals of a 2 s lease.
    async with agent_stack(tmp_path, lease={"ttl_s": 9},
                           scheduler={"lease_min_ttl_s": 0.5, "lease_max_ttl_s": scheduler_max_ttl_s}) as stack:
        job_id = await stack.submit_json(long_audio(repeat=20), format="pcm_s16le", sample_rate=16000)
        view = await stack.wait_job(job_id, timeout=240)
        assert view["state"] == "succeeded", view.get("error")
        assert view["attempt"] == 1
        await stack.wait_counted("succeeded")
        lost = sum(stack.sample("node_agent_lease_lost_total", device="cpu", reason=r) or 0
                   for r in ("expired", "rejected", "self_fenced"))
        assert lost == 0
        renewals = stack.sample("node_agent_lease_renewals_total", device="cpu", result="ok") or 0
        if scheduler_max_ttl_s == 2.0:
            # Granted 2 s, renewed every 2/3 s: a job of several seconds needs many renewals.
            assert renewals >= 5, renewals
