"""The store unreachable while agents decode: PostgreSQL stopped for 10 s mid-job, and lease time standing still.

A real agent (stand-in plugin: the test is about leases and reports, not decoding) against a real scheduler on a
real PostgreSQL. While the store is down the scheduler answers 503 ``store_unavailable`` with Retry-After; the
agent keeps decoding (its renew deadline does not run while the scheduler says its store is paused, and the
scheduler gives the leases that time back), carries its events forward and retries its result; when PostgreSQL is
back the same attempt finishes and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from aioresponses import aioresponses

import pg
from conftest import make_settings
from fake_plugin import command as fake_command
from node_agent.scheduler_client import SchedulerClient
from node_agent.errors import LeaseLost
from node_agent.lease import LeaseKeeper
from stack import agent_stack

#: About 14 s of "decoding": a segment every 0.2 s (the stand-in plugin spends no CPU on it).
JOB_14_S = {"job": {"segments": 70, "every_s": 0.2, "duration_s": 600.0}}


async def test_postgresql_stopped_10_s_mid_job_costs_nothing(tmp_path, pg_private: pg.PgServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    async with agent_stack(tmp_path, worker_command=fake_command(**JOB_14_S), lease={"ttl_s": 6},
                           scheduler={"store": pg_private.dsn()}) as stack:
        running = await stack.submit_json(b"\0\0" * 16000, format="pcm_s16le", sample_rate=16000)
        async with stack.session.get(f"{stack.scheduler.url}/v1/jobs/{running}", params={"wait_s": "10",
                                                                                      "after_segment": "3"}) as r:
            assert (await r.json())["state"] == "running"
        outage_started = time.monotonic()
        await pg_private.astop()
        try:
            async with stack.session.get(f"{stack.scheduler.url}/v1/jobs/{running}") as resp:
                body = await resp.json()
                assert resp.status == 503 and body["error"]["code"] == "store_unavailable", body
                assert int(resp.headers["Retry-After"]) >= 1
            form = aiohttp.FormData()
            form.add_field("file", b"\0\0" * 100, filename="a.raw")
            form.add_field("format", "pcm_s16le")
            form.add_field("sample_rate", "16000")
            async with stack.session.post(f"{stack.scheduler.url}/v1/jobs", data=form) as resp:
                assert resp.status == 503 and "Retry-After" in resp.headers
            # Longer than the lease's renew deadline (4 s) and its TTL (6 s): only the pause rule keeps it.
            await asyncio.sleep(10 - (time.monotonic() - outage_started))
        finally:
            await pg_private.astart()
        view = await stack.wait_job(running, timeout=60)
        assert view["state"] == "succeeded" and view["attempt"] == 1, view
        ids = [s["id"] for s in view["segments"]]
        assert len(ids) == 70 and ids == sorted(set(ids)), ids
        assert stack.sample("node_agent_lease_lost_total", device="cpu/0", reason="self_fenced") == 0
        assert stack.sample("node_agent_lease_lost_total", device="cpu/0", reason="expired") == 0
        assert (stack.sample("node_agent_lease_renewals_total", device="cpu/0", result="failed") or 0) >= 2
    reaper = [r.getMessage() for r in caplog.records if "reaping" in r.getMessage()]
    assert len(reaper) == 2 and "paused" in reaper[0] and "resumed" in reaper[1], reaper  # once each way


@pytest.mark.parametrize("code, lost", [("store_unavailable", False), ("internal", True)])
async def test_the_renew_deadline_stands_still_only_while_the_store_is_paused(code: str, lost: bool) -> None:
    """Renewals answered 503 for 3 s against a 1.5 s TTL (self-fence after 1 s): a paused store keeps the
    lease; any other 503 fences it, as before."""
    url = "http://scheduler.test"
    settings = make_settings(lease={"ttl_s": 1.5}).lease
    client = SchedulerClient(url, None, request_timeout_s=2)
    keeper = LeaseKeeper(client, settings, metrics=None, device="cpu/0")
    losses: list[LeaseLost] = []
    body = {"error": {"code": code, "message": "the store is down" if code != "internal" else "boom"}}
    renew = f"{url}/v1/leases/lease-1/renew"
    try:
        with aioresponses() as mocked:
            grant = {"lease_id": "lease-1", "epoch": 7, "ttl_s": 1.5, "resource": "cpu"}
            mocked.post(f"{url}/v1/leases", status=201, payload=grant)
            lease = await keeper.acquire("node-1", "job-1")
            for _ in range(40):
                mocked.post(renew, status=503, payload=body, headers={"Retry-After": "1"})
            async with keeper.hold(lease, on_lost=losses.append):
                await asyncio.sleep(3.0)
                if not lost:
                    assert not losses, losses
                    mocked.clear()
                    mocked.post(renew, status=200, payload={"lease_id": "lease-1", "epoch": 7, "ttl_s": 1.5},
                                repeat=True)
                    await asyncio.sleep(1.5)
    finally:
        await client.close()
    if lost:
        assert [loss.reason for loss in losses] == ["self_fenced"], losses
    else:
        assert not losses, losses
        assert lease.renewals >= 1
