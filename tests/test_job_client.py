"""The scheduler client's job API (submit, long poll) against a real scheduler on loopback, and ``node-agent
submit``'s polling: failed polls retried with jittered, capped waits, never past ``--timeout``."""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import time

import pytest
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry

from conftest import make_settings
from helpers import DATA
from node_agent.client import BadRequest, ConnectFailed, NotFound, SchedulerClient, SchedulerUnavailable
from node_agent.metrics import AgentMetrics
from node_agent.scheduler.server import start_scheduler
from node_agent.submit import submit_files

pytestmark = pytest.mark.timeout(60)

NODE = {"agent_version": "0.1.0", "hostname": "host-a", "hardware": {"cpu_cores": 2, "memory_bytes": 2**30},
        "devices": [{"resource": "cpu", "model": "tiny.en", "compute_type": "int8", "languages": ["en"]}]}


async def test_a_job_submitted_and_followed_through_the_client(tmp_path) -> None:
    settings = make_settings(scheduler={"token": "s3cret-token"})
    scheduler = await start_scheduler(settings.scheduler, CollectorRegistry(), host="127.0.0.1", port=0)
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
        node_id = (await client.register(NODE)).node_id
        assignment = await client.next_job(node_id, 1.0, "cpu")
        assert assignment is not None and assignment.job_id == submitted.job_id
        assert assignment.options == {"beam_size": 2} and assignment.language == "en"
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
    return argparse.Namespace(scheduler=SCHEDULER, audio=[str(DATA / "jfk.flac")], language=None, json=False,
                              timeout=timeout, allow_truncated=False)


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
