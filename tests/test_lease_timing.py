"""Lease timing follows the lease the scheduler granted, not the agent's own ``lease.ttl_s``.

A scheduler may grant less than asked (its ``lease_max_ttl_s``); renewing on the request's schedule would then let
the lease expire between two renewals. The job tests run a real agent against a real embedded scheduler.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from conftest import make_settings
from fake_plugin import command as fake_command
from node_agent.lease import LeaseKeeper
from stack import agent_stack


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
                         metrics=None, device="cpu/0")
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


#: A healthy job of about 14 s (seven times the lower cap, half as long again as the requested TTL): segments every
#: 0.2 s from the stand-in plugin (tests/fake_plugin.py), which spends no CPU on it, so the test is about the lease,
#: not about how fast this machine decodes. The reported audio length keeps the per-audio deadline (asr.timeout)
#: far away.
HEALTHY_14_S = {"job": {"segments": 70, "every_s": 0.2, "duration_s": 600.0}}


async def test_a_long_healthy_job_keeps_its_lease_with_the_cap_below_and_above_the_request(tmp_path):
    """The agent asks for 9 s. One scheduler caps leases at 2 s (renewing on the request's 3 s schedule would
    lose the lease within 2 s), the other at 300 s; both run concurrently, a 14 s job each."""

    async def run(name: str, scheduler_max_ttl_s: float) -> tuple[float, float]:
        async with agent_stack(tmp_path / name, worker_command=fake_command(**HEALTHY_14_S), lease={"ttl_s": 9},
                               scheduler={"lease_min_ttl_s": 0.5,
                                          "lease_max_ttl_s": scheduler_max_ttl_s}) as stack:
            loop = asyncio.get_running_loop()
            started = loop.time()
            job_id = await stack.submit_json(b"\x00\x00" * 16000, format="pcm_s16le", sample_rate=16000)
            view = await stack.wait_job(job_id, timeout=120)
            took = loop.time() - started
            assert view["state"] == "succeeded", (name, view.get("error"))
            assert view["attempt"] == 1, name
            assert len(view["result"]["segments"]) == 70, name
            await stack.wait_counted("succeeded")
            lost = {r: stack.sample("node_agent_lease_lost_total", device="cpu/0", reason=r) or 0
                    for r in ("expired", "rejected", "self_fenced")}
            assert not any(lost.values()), (name, lost)
            renewals = stack.sample("node_agent_lease_renewals_total", device="cpu/0", result="ok") or 0
            return took, renewals

    (took_below, renewals_below), (took_above, renewals_above) = await asyncio.gather(
        run("cap-below-request", 2.0), run("cap-above-request", 300.0))
    assert took_below >= 14 and took_above >= 14, (took_below, took_above)
    # Granted 2 s, renewed every 2/3 s: about 21 renewals in 14 s (a renewal late by more than 4/3 s fences).
    assert renewals_below >= 10, renewals_below
    # Granted the 9 s asked for, renewed every 3 s (not at a shorter grant's pace): one per 3 s of the job.
    assert 3 <= renewals_above <= took_above / 3 + 1, (renewals_above, took_above)
