"""The scheduler client's job API (submit, long poll) against a real scheduler on loopback; the job waiter
(node_agent/job_waiter.py) through the failure shapes a real scheduler rarely produces (aioresponses): refused
connections, 503 and 429 with Retry-After, a 404 for the job after a restart; and ``node-agent submit``'s
polling: failed polls retried with jittered, capped waits, never past ``--timeout``.

The waiter against real schedulers that stop and start again is in test_ride_through.py."""

from __future__ import annotations

import argparse
import asyncio
import errno
import re
import socket
import time

import aiohttp
import pytest
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry
from yarl import URL

from conftest import machine_slowdown, make_settings
from helpers import DATA
from node_agent.scheduler_client import (
    BadRequest,
    ConnectFailed,
    NotFound,
    SchedulerClient,
    SchedulerUnavailable,
    lost_job_line,
)
from node_agent.job_waiter import JobLost, JobUpdate, JobWaiter, Retrying, WaitExpired
from node_agent.retry import RetryPolicy
from node_agent.metrics import AgentMetrics
from node_agent.scheduler.server import start_scheduler
from node_agent.submit import submit_files
from node_agent.cli import build_parser

pytestmark = pytest.mark.timeout(60)

NODE = {"agent_version": "0.1.0", "hostname": "host-a", "hardware": {"cpu_cores": 2, "memory_bytes": 2**30},
        "devices": [{"resource": "cpu", "model": "tiny.en", "compute_type": "int8", "languages": ["en"]}]}


async def test_a_job_submitted_and_followed_through_the_client(tmp_path) -> None:
    settings = make_settings(scheduler={"token": "s3cret-token"})
    scheduler = await start_scheduler(settings.scheduler, CollectorRegistry(), host="127.0.0.1", port=0,
                                      state_dir=tmp_path)
    registry = CollectorRegistry()
    client = SchedulerClient(scheduler.url, "s3cret-token", 5.0, AgentMetrics(registry))
    try:
        audio = bytes(range(256)) * 64
        submitted = await client.submit_job(audio, filename="a.pcm", format="pcm_s16le", sample_rate=16000,
                                            language="en", options={"beam_size": 2}, deadline_s=30)
        assert submitted.state == "queued"
        view = await client.get_job(submitted.job_id)
        assert (view.job_id, view.state, view.language, view.filename) == (submitted.job_id, "queued", "en", "a.pcm")

        # A long poll on a job nobody takes answers when its wait is over, not before.
        started = time.monotonic()
        view = await client.get_job(submitted.job_id, wait_s=0.5, after_segment=0)
        assert view.state == "queued" and time.monotonic() - started >= 0.45

        # A node (the same client, now with an identity) gets exactly what was submitted.
        node_id = (await client.register(NODE)).node_id  # the client keeps the node secret it was given
        assignment = await client.next_job(node_id, 1.0, "cpu")
        assert assignment is not None and assignment.job_id == submitted.job_id
        assert assignment.options.wire() == {"beam_size": 2} and assignment.language == "en"
        assert assignment.deadline_s is not None and 25 < assignment.deadline_s <= 30
        assert await client.fetch_audio(assignment.audio.url) == audio

        with pytest.raises(NotFound) as missing:
            await client.get_job("job-does-not-exist")
        assert missing.value.code == "unknown_job"
        with pytest.raises(BadRequest) as bad:
            await client.submit_job(audio, format="pcm_s16le")  # no sample rate
        assert bad.value.status == 400 and bad.value.code == "invalid_request" and "sample_rate" in bad.value.detail

        counted = {(endpoint, code): registry.get_sample_value(
            "node_agent_scheduler_requests_total", {"endpoint": endpoint, "code": code})
            for endpoint, code in (("job_submit", "202"), ("job_submit", "400"), ("job_view", "200"),
                                   ("job_view", "404"))}
        assert counted == {("job_submit", "202"): 1, ("job_submit", "400"): 1, ("job_view", "200"): 2,
                           ("job_view", "404"): 1}

        async with SchedulerClient(scheduler.url, None, 5.0) as anonymous:
            with pytest.raises(BadRequest) as refused:
                await anonymous.get_job(submitted.job_id)
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    finally:
        await client.close()
        await scheduler.stop()


SCHEDULER = "http://scheduler.test"
POLL = re.compile(re.escape(f"{SCHEDULER}/v1/jobs/j1") + r"\?.*")


def submit_args(timeout: float) -> argparse.Namespace:
    # Parsed by the command's own parser, so the arguments are every one `node-agent submit` has.
    return build_parser().parse_args(["submit", "--scheduler", SCHEDULER, "--timeout", str(timeout),
                                      str(DATA / "jfk.flac")])


def job_view(state: str, **fields: object) -> dict[str, object]:
    return {"job_id": "j1", "state": state, "attempt": 1, "node_id": "n1", "language": "en", "segments": [],
            "result": None, "error": None, "created_age_s": 1.0, "timings": {}, **fields}


async def test_submit_retries_failed_polls_then_prints_the_transcript(capsys: pytest.CaptureFixture[str]) -> None:
    segment = {"id": 0, "start": 0.0, "end": 2.5, "text": " And so my fellow Americans"}
    with aioresponses() as m:
        m.post(f"{SCHEDULER}/v1/jobs", status=202, payload={"job_id": "j1", "state": "queued"})
        m.get(POLL, status=503, headers={"Retry-After": "0"})
        m.get(POLL, exception=asyncio.TimeoutError())
        m.get(POLL, status=200, payload=job_view("succeeded", segments=[segment],
                                                 result={"text": " And so my fellow Americans"}))
        code = await submit_files(submit_args(30), make_settings())
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "jfk.flac [0.00 -> 2.50] And so my fellow Americans\njfk.flac: And so my fellow Americans\n"
    assert err.count("jfk.flac: polling failed") == 2 and err.count("\n") == 2, err


async def test_submit_gives_up_polling_at_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    timeout = 2.0
    loop = asyncio.get_running_loop()
    with aioresponses() as m:
        m.post(f"{SCHEDULER}/v1/jobs", status=202, payload={"job_id": "j1", "state": "queued"})
        m.get(POLL, status=503, repeat=True)
        started = loop.time()
        code = await submit_files(submit_args(timeout), make_settings())
        elapsed = loop.time() - started
        polls = sum(len(calls) for (method, url), calls in m.requests.items() if method == "GET")
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert elapsed <= timeout + 1.5, elapsed  # the retry waits fit the deadline; nothing runs past it
    # Backoff, not a tight loop: waits grow from 0.5 s (full jitter), so a few polls, not hundreds.
    assert 1 <= polls <= 30, polls
    lines = err.splitlines()
    assert lines[-1].startswith(f"node-agent: {DATA / 'jfk.flac'}: job j1 failed: timeout: no result within 2 s"), err
    assert all("polling failed" in line for line in lines[:-1]) and len(lines) == polls + 1, err


async def test_a_closed_port_is_connect_failed_with_the_os_reason():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    registry = CollectorRegistry()
    client = SchedulerClient(url, None, 2.0, AgentMetrics(registry))
    try:
        with pytest.raises(ConnectFailed) as failed:
            await client.submit_job(b"\0\0")
        assert failed.value.reason == "connection refused" and failed.value.status is None
        assert isinstance(failed.value, SchedulerUnavailable)  # callers that retry treat it like any outage
        assert registry.get_sample_value("node_agent_scheduler_requests_total",
                                         {"endpoint": "job_submit", "code": "error"}) == 1
    finally:
        await client.close()


# ----- the job waiter through failure shapes (aioresponses) ------------------------------------------------------

#: Quick retries, so the shapes take milliseconds; a Retry-After still sets the least wait (up to max_wait_s).
FAST = RetryPolicy(initial_s=0.01, max_wait_s=2.0, max_total_s=None)
JOBS = f"{SCHEDULER}/v1/jobs"


def refused() -> aiohttp.ClientConnectorError:
    """What aiohttp raises when nothing listens at the scheduler's port."""
    return aiohttp.ClientConnectorError(None, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))


def keys_sent(m: aioresponses) -> list[str]:
    return [call.kwargs["headers"]["Idempotency-Key"] for call in m.requests[("POST", URL(JOBS))]]


async def test_a_submit_rides_through_refused_connections_with_one_idempotency_key() -> None:
    retries: list[Retrying] = []
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        waiter = JobWaiter(client, FAST)
        with aioresponses() as m:
            m.post(JOBS, exception=refused())
            m.post(JOBS, exception=refused())
            m.post(JOBS, status=202, payload={"job_id": "j1", "state": "queued"})
            job_id = await waiter.submit(b"\0\0", until=loop.time() + 10, on_retry=retries.append,
                                         format="pcm_s16le", sample_rate=16000)
            keys = keys_sent(m)
    assert job_id == "j1"
    assert len(keys) == 3 and len(set(keys)) == 1, keys  # every try is the same submission
    assert [(r.stage, r.first, type(r.error)) for r in retries] == [("submit", True, ConnectFailed),
                                                                     ("submit", False, ConnectFailed)]
    assert retries[0].error.reason == "connection refused"


async def test_a_refused_submit_before_any_scheduler_answered_is_raised_at_once() -> None:
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        waiter = JobWaiter(client, FAST, reached=False)
        with aioresponses() as m:
            m.post(JOBS, exception=refused(), repeat=True)
            with pytest.raises(ConnectFailed):
                await waiter.submit(b"\0\0", until=loop.time() + 10, format="pcm_s16le", sample_rate=16000)
            assert len(keys_sent(m)) == 1
        # Once something answered (here a 503), a refusal is a scheduler restarting: retried.
        with aioresponses() as m:
            m.post(JOBS, status=503)
            m.post(JOBS, exception=refused())
            m.post(JOBS, status=202, payload={"job_id": "j2", "state": "queued"})
            assert await waiter.submit(b"\0\0", until=loop.time() + 10, format="pcm_s16le",
                                       sample_rate=16000) == "j2"
            assert waiter.reached and len(keys_sent(m)) == 3


@pytest.mark.parametrize("status, code", [(503, "shutting_down"), (429, "queue_full")])
async def test_a_submit_waits_out_retry_after_then_succeeds(status: int, code: str) -> None:
    retries: list[Retrying] = []
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        waiter = JobWaiter(client, FAST)
        with aioresponses() as m:
            m.post(JOBS, status=status, headers={"Retry-After": "1"},
                   payload={"error": {"code": code, "message": "come back later"}})
            m.post(JOBS, status=202, payload={"job_id": "j1", "state": "queued"})
            started = loop.time()
            job_id = await waiter.submit(b"\0\0", until=started + 10, on_retry=retries.append,
                                         format="pcm_s16le", sample_rate=16000)
            took = loop.time() - started
            keys = keys_sent(m)
    assert job_id == "j1" and len(keys) == 2 and keys[0] == keys[1]
    # The scheduler's Retry-After is the least wait (full jitter alone would retry within 10 ms).
    assert took >= 0.95, took
    assert [(r.error.status, r.error.retry_after) for r in retries] == [(status, 1.0)]


async def test_a_submit_refused_for_good_is_not_retried() -> None:
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        with aioresponses() as m:
            m.post(JOBS, status=422, payload={"error": {"code": "no_capable_node", "message": "no node serves zh"}})
            with pytest.raises(BadRequest) as refusal:
                await JobWaiter(client, FAST).submit(b"\0\0", until=loop.time() + 10, language="zh")
            assert len(keys_sent(m)) == 1
    assert (refusal.value.status, refusal.value.code) == (422, "no_capable_node")


async def test_follow_streams_new_segments_and_rides_through_failed_polls_by_the_job_id() -> None:
    one = {"id": 1, "start": 0.0, "end": 1.0, "text": " one"}
    two = {"id": 2, "start": 1.0, "end": 2.0, "text": " two"}
    retries: list[Retrying] = []
    updates: list[JobUpdate] = []
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        with aioresponses() as m:
            m.get(POLL, status=200, payload=job_view("running", segments=[one]))
            m.get(POLL, exception=refused())
            m.get(POLL, status=502)
            m.get(POLL, status=200, payload=job_view("succeeded", segments=[one, two], result={"text": "one two"}))
            view = await JobWaiter(client, FAST).wait("j1", loop.time() + 10, on_update=updates.append,
                                                        on_retry=retries.append)
            polls = [call.kwargs["params"] for (method, _), calls in m.requests.items() if method == "GET"
                     for call in calls]
    assert view.state == "succeeded" and view.result == {"text": "one two"}
    assert [[s["id"] for s in u.new_segments] for u in updates] == [[1], [2]]
    assert [u.finished for u in updates] == [False, True]
    # Each poll asks for what comes after the segments already seen, the retried ones included.
    assert [p["after_segment"] for p in polls] == ["0", "1", "1", "1"], polls
    assert [(r.stage, r.job_id, r.first) for r in retries] == [("poll", "j1", True), ("poll", "j1", False)]


async def test_a_404_for_the_job_after_the_scheduler_came_back_is_lost_not_failed() -> None:
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        with aioresponses() as m:
            m.get(POLL, status=200, payload=job_view("queued"))
            m.get(POLL, exception=refused())  # the scheduler restarting
            m.get(POLL, status=503)
            m.get(POLL, status=404, payload={"error": {"code": "unknown_job", "message": "no job j1"}})
            m.get(POLL, status=200, payload=job_view("succeeded"), repeat=True)  # never asked for
            with pytest.raises(JobLost) as lost:
                await JobWaiter(client, FAST).wait("j1", loop.time() + 10)
            polls = sum(len(calls) for (method, _), calls in m.requests.items() if method == "GET")
    assert str(lost.value) == lost_job_line("j1") and lost.value.job_id == "j1"
    assert polls == 4


async def test_follow_gives_up_at_the_callers_deadline_with_the_last_failure() -> None:
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        with aioresponses() as m:
            m.get(POLL, status=503, repeat=True)
            started = loop.time()
            with pytest.raises(WaitExpired) as expired:
                await JobWaiter(client, RetryPolicy(initial_s=0.05, max_wait_s=0.5, max_total_s=None)).wait(
                    "j1", started + 1.5)
            took = loop.time() - started
    assert isinstance(expired.value.last_error, SchedulerUnavailable) and expired.value.last_error.status == 503
    # No wait is begun that would end past the deadline; the 1 s of slack is the machine's (event-loop and thread
    # latency), stretched by how loaded it is now (make test runs two test workers on two cores).
    assert took <= 1.5 + 1.0 * machine_slowdown(), took


async def test_a_poll_answered_with_something_not_the_protocol_is_not_waited_on() -> None:
    # A broken peer, not an outage: retrying until the deadline would only delay the same error.
    loop = asyncio.get_running_loop()
    async with SchedulerClient(SCHEDULER, None, 2.0) as client:
        with aioresponses() as m:
            m.get(POLL, status=200, body="<html>a proxy's page</html>", repeat=True)
            with pytest.raises(SchedulerUnavailable) as garbled:
                await JobWaiter(client, FAST).wait("j1", loop.time() + 10)
            polls = sum(len(calls) for (method, _), calls in m.requests.items() if method == "GET")
    assert garbled.value.status == 200 and "not JSON" in str(garbled.value) and polls == 1
