"""Clients ride through a scheduler restart: the job waiter (node_agent/job_waiter.py, behind ``node-agent submit``
and ``/utterance``) retries refused connections and 5xx by the job id until its deadline, against real schedulers
on loopback that stop and start again on the same port; ``/utterance`` waits out a 429 queue_full as ``submit``
does; and the agent's side keeps a job's result report alive through refused connections.

With the memory store a restarted scheduler no longer knows the job, so the waiter must say so in one line (lost,
not failed). The agents run the scripted stand-in plugin (tests/fake_plugin.py): decoding is not what is tested.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
from pathlib import Path

import aiohttp
import pytest
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry
from yarl import URL

from conftest import make_settings
from node_agent.scheduler_client import ConnectFailed, SchedulerClient, lost_job_line
from node_agent.config import SchedulerSettings
from node_agent.http_api import start_http
from node_agent.job_waiter import JobLost, JobUpdate, JobWaiter, Retrying
from node_agent.job_runner import Report
from node_agent.retry import RetryPolicy
from node_agent.scheduler.server import Running, start_scheduler
from procs import free_port
from test_failover import AUDIO, agent_on
from test_job_waiter import refused
from test_job_runner import ASSIGNMENT, BASE, FAST, RESULT, build, fake_worker, serve_job  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(60)


def memory_store() -> SchedulerSettings:
    """Scheduler settings whose state lives in memory (and so is lost by a restart)."""
    store = {"store": "memory"} if "store" in SchedulerSettings.model_fields else {}
    return make_settings(scheduler=store).scheduler


async def start_on(port: int, tmp_path: Path) -> Running:
    """A real scheduler (memory store) on 127.0.0.1:``port``; port 0 picks a free one."""
    extra = {"state_dir": tmp_path} if "state_dir" in inspect.signature(start_scheduler).parameters else {}
    return await start_scheduler(memory_store(), CollectorRegistry(), host="127.0.0.1", port=port, **extra)


def pcm_job() -> dict[str, object]:
    return {"format": "pcm_s16le", "sample_rate": 16000}


async def test_a_job_waited_on_streams_its_segments_and_ends_with_the_final_view(tmp_path) -> None:
    running = await start_on(0, tmp_path)
    loop = asyncio.get_running_loop()
    updates: list[JobUpdate] = []
    try:
        async with agent_on([running.url], tmp_path, {"segments": 4, "every_s": 0.3}):
            async with SchedulerClient(running.url, None, 5.0) as client:
                waiter = JobWaiter(client)
                job_id = await waiter.submit(AUDIO, until=loop.time() + 10, **pcm_job())
                view = await waiter.wait(job_id, loop.time() + 20, on_update=updates.append)
    finally:
        await running.stop()
    assert view.job_id == job_id and view.state == "succeeded", view
    assert view.result is not None and view.result["text"] == "segment 1. segment 2. segment 3. segment 4."
    # Segments came as they were decoded (over several answers), each once and in order.
    assert sum(1 for u in updates if u.new_segments) >= 2, [len(u.new_segments) for u in updates]
    assert [s["id"] for u in updates for s in u.new_segments] == [1, 2, 3, 4]
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])


async def test_a_waited_job_is_polled_by_id_through_a_restart_and_a_lost_one_is_said_once(tmp_path) -> None:
    port = free_port()
    first = await start_on(port, tmp_path)
    second: Running | None = None
    loop = asyncio.get_running_loop()
    retries: list[Retrying] = []
    try:
        async with SchedulerClient(first.url, None, 5.0) as client:
            waiter = JobWaiter(client)  # the production retry policy
            job_id = await waiter.submit(AUDIO, until=loop.time() + 10, **pcm_job())  # no node: it stays queued
            waiting = loop.create_task(waiter.wait(job_id, loop.time() + 30, on_retry=retries.append))
            await asyncio.sleep(0.3)  # its long poll is waiting on the scheduler
            await first.stop()
            await asyncio.sleep(1.5)
            # Down: every poll is refused and retried with backoff, by the job id; nothing given up.
            assert not waiting.done()
            assert any(isinstance(r.error, ConnectFailed) for r in retries), retries
            second = await start_on(port, tmp_path / "second")
            restarted = loop.time()
            with pytest.raises(JobLost) as lost:
                await asyncio.wait_for(waiting, 10)
            took = loop.time() - restarted
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
    # The new scheduler answered the poll by id: it does not know the job (memory store), which is one line.
    assert str(lost.value) == lost_job_line(job_id)
    assert took < 6.0, took  # the next retry after the restart, not the caller's deadline
    assert {(r.stage, r.job_id) for r in retries} == {("poll", job_id)}
    assert [r.first for r in retries].count(True) == 1  # one outage, told once to callers that log once


async def test_a_submit_waits_for_a_scheduler_that_comes_up(tmp_path) -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    retries: list[Retrying] = []
    running: Running | None = None
    try:
        async with SchedulerClient(f"http://127.0.0.1:{port}", None, 5.0) as client:
            # As the agent's /utterance: its scheduler has answered before, so a refusal is a restart.
            waiter = JobWaiter(client)
            submitting = loop.create_task(waiter.submit(AUDIO, until=loop.time() + 20, on_retry=retries.append,
                                                        **pcm_job()))
            await asyncio.sleep(1.5)
            assert not submitting.done() and retries
            assert all(isinstance(r.error, ConnectFailed) for r in retries), retries
            running = await start_on(port, tmp_path)
            job_id = await asyncio.wait_for(submitting, 10)
            view = await client.get_job(job_id)
    finally:
        if running is not None:
            await running.stop()
    assert view.state == "queued"


async def test_utterance_waits_out_a_queue_full_429_like_submit(tmp_path) -> None:
    running = await start_on(0, tmp_path)
    body = {"job_id": "u1", "trace_id": "t1", "src_lang": "en", "sample_rate": 16000,
            "audio": base64.b64encode(AUDIO).decode()}
    loop = asyncio.get_running_loop()
    try:
        async with agent_on([running.url], tmp_path, {"segments": 2}) as (agent, _):
            http = await start_http(agent.view, agent.client, agent.settings, port=0)
            try:
                with aioresponses(passthrough_unmatched=True) as mocked:
                    # Once: the scheduler's queue is full; everything else reaches the real scheduler.
                    mocked.post(f"{running.url}/v1/jobs", status=429, headers={"Retry-After": "1"},
                                payload={"error": {"code": "queue_full", "message": "queue full; retry later"}})
                    async with aiohttp.ClientSession() as session:
                        started = loop.time()
                        async with session.post(http.url + "/utterance", json=body) as resp:
                            reply = await resp.json()
                        took = loop.time() - started
                    submits = len(mocked.requests[("POST", URL(f"{running.url}/v1/jobs"))])
            finally:
                await http.stop()
    finally:
        await running.stop()
    assert resp.status == 200 and reply["text"] == "segment 1. segment 2.", reply
    assert submits == 2 and took >= 0.95, (submits, took)  # the 429's Retry-After waited out, then submitted


# ----- the agent's side: a job's calls ride through refused connections ------------------------------------------


async def test_the_result_report_rides_through_refused_connections(fake_worker) -> None:
    parts = build(await fake_worker(), BASE, "n1")
    try:
        with aioresponses() as m:
            serve_job(m)
            m.post(RESULT, exception=refused())
            m.post(RESULT, exception=refused())
            m.post(RESULT, status=200, payload={"accepted": True})
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            sent = len(m.requests[("POST", URL(RESULT))])
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == ("succeeded", Report.accepted)
    assert sent == 3 and parts.sample("node_agent_retries_total", operation="result") == 2


async def test_a_result_report_answered_410_is_not_retried(fake_worker) -> None:
    parts = build(await fake_worker(), BASE, "n1")
    try:
        with aioresponses() as m:
            serve_job(m)
            m.post(RESULT, status=410, payload={"error": {"code": "lease_expired", "message": "gone"}}, repeat=True)
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            sent = len(m.requests[("POST", URL(RESULT))])
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == ("succeeded", Report.rejected)
    assert sent == 1 and parts.sample("node_agent_retries_total", operation="result") == 0


async def test_audio_refused_is_retried_until_the_jobs_deadline_not_past_it(fake_worker) -> None:
    parts = build(await fake_worker(), BASE, "n1")
    # An audio budget far beyond the job's 1 s deadline: the deadline must be what ends the retries.
    parts.runner.policies = dataclasses.replace(FAST, audio=RetryPolicy(initial_s=0.01, max_wait_s=0.05,
                                                                        max_total_s=30.0))
    loop = asyncio.get_running_loop()
    try:
        with aioresponses() as m:
            m.post(f"{BASE}/v1/leases", status=201,
                   payload={"lease_id": "l1", "epoch": 3, "ttl_s": 15, "resource": "cpu"})
            m.delete(f"{BASE}/v1/leases/l1", status=204)
            m.get(f"{BASE}/v1/jobs/j1/audio", exception=refused(), repeat=True)
            started = loop.time()
            outcome = await parts.runner.run(ASSIGNMENT.model_copy(update={"deadline_s": 1.0}))
            took = loop.time() - started
            tries = len(m.requests[("GET", URL(f"{BASE}/v1/jobs/j1/audio"))])
            await parts.runner.settle(5.0)
            released = m.requests.get(("DELETE", URL(f"{BASE}/v1/leases/l1")), [])
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == (None, Report.not_sent)
    assert outcome.reason is not None and "connection refused" in outcome.reason, outcome.reason
    assert tries >= 3 and 0.9 <= took < 6.0, (tries, took)
    assert released  # (the audio is fetched under the job's lease, which goes back so the job is re-queued)
