"""The scheduler: its pure state machine under a fake clock, and its HTTP API over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from node_agent.config import SchedulerSettings
from node_agent.scheduler.formats import srt_timestamp, to_srt, to_vtt, vtt_timestamp
from node_agent.scheduler.schemas import (
    DeviceSpec,
    Hardware,
    HeartbeatRequest,
    JobAssignment,
    JobSpec,
    LeaseGrant,
    LeaseRequest,
    RegisterRequest,
    RenewRequest,
    ResultReport,
    TranscriptResult,
)
from node_agent.scheduler.errors import LeaseUnusable, NodeNotFound, ReportRejected
from node_agent.scheduler.server import sanitize_filename, serve, start_scheduler
from node_agent.scheduler.state import SchedulerState

pytestmark = pytest.mark.timeout(20)

CPU_EN = {"resource": "cpu", "plugin": "asr", "model": "tiny.en", "compute_type": "int8", "languages": ["en"]}
GPU_ANY = {"resource": "gpu:0", "plugin": "asr", "model": "base", "compute_type": "float16", "languages": None}
HARDWARE = {"cpu_cores": 4, "memory_bytes": 8 << 30, "gpus": []}
AUDIO = b"RIFF-not-really-a-wav-but-bytes"


# ------------------------------------------------------------------------------------------ helpers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_state(**overrides: Any) -> tuple[SchedulerState, FakeClock, CollectorRegistry]:
    clock = FakeClock()
    registry = CollectorRegistry()
    return SchedulerState(SchedulerSettings(**overrides), registry=registry, clock=clock), clock, registry


def register(state: SchedulerState, devices: list[dict[str, Any]] | None = None, node_id: str | None = None) -> str:
    req = RegisterRequest(
        node_id=node_id,
        agent_version="0.1.0",
        hostname="host-a",
        hardware=Hardware(**HARDWARE),
        devices=[DeviceSpec(**d) for d in (devices or [CPU_EN])],
    )
    return state.register(req).node_id


def take(
    state: SchedulerState, node_id: str, resource: str = "cpu", ttl_s: float = 10.0
) -> tuple[JobAssignment, LeaseGrant]:
    assignment = state.assign_next(node_id)
    assert assignment is not None
    grant = state.grant_lease(LeaseRequest(node_id=node_id, job_id=assignment.job_id, resource=resource, ttl_s=ttl_s))
    return assignment, grant


def report(node_id: str, attempt: int, epoch: int, outcome: str = "succeeded", code: str | None = None) -> ResultReport:
    if outcome == "succeeded":
        return ResultReport(
            node_id=node_id, attempt=attempt, lease_epoch=epoch, outcome="succeeded", result=TranscriptResult(text="hi")
        )
    return ResultReport.model_validate(
        {
            "node_id": node_id,
            "attempt": attempt,
            "lease_epoch": epoch,
            "outcome": "failed",
            "error": {"code": code, "message": "boom"},
        }
    )


class Harness:
    """A running scheduler plus an HTTP session that speaks to it."""

    def __init__(self, running: Any, session: aiohttp.ClientSession, registry: CollectorRegistry) -> None:
        self.running = running
        self.session = session
        self.registry = registry
        self.url = running.url

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.url + path, **kwargs) as resp:
            raw = await resp.read()
            body: Any = raw.decode()
            if resp.content_type == "application/json":
                body = json.loads(raw)
            return resp.status, body, resp.headers

    async def register(self, devices: list[dict[str, Any]] | None = None, node_id: str | None = None) -> str:
        body = {
            "node_id": node_id,
            "agent_version": "0.1.0",
            "hostname": "host-a",
            "hardware": HARDWARE,
            "devices": devices or [CPU_EN],
        }
        status, reply, _ = await self.call("POST", "/v1/nodes", json=body)
        assert status == 201, reply
        return reply["node_id"]

    async def submit(self, audio: bytes = AUDIO, **fields: Any) -> str:
        status, reply, _ = await self.call(
            "POST", "/v1/jobs", json={"audio_b64": base64.b64encode(audio).decode(), **fields}
        )
        assert status == 202, reply
        return reply["job_id"]

    async def poll(self, node_id: str, wait_s: float = 0, resource: str | None = None) -> tuple[int, Any]:
        params: dict[str, Any] = {"wait_s": wait_s}
        if resource:
            params["resource"] = resource
        status, body, _ = await self.call("GET", f"/v1/nodes/{node_id}/jobs/next", params=params)
        return status, body

    async def lease(self, node_id: str, job_id: str, resource: str = "cpu", ttl_s: float = 10) -> tuple[int, Any, Any]:
        return await self.call(
            "POST", "/v1/leases", json={"node_id": node_id, "job_id": job_id, "resource": resource, "ttl_s": ttl_s}
        )

    async def result(self, job_id: str, node_id: str, attempt: int, epoch: int, **fields: Any) -> tuple[int, Any]:
        body = {"node_id": node_id, "attempt": attempt, "lease_epoch": epoch, "outcome": "succeeded"}
        body.update(fields)
        if body["outcome"] == "succeeded":
            body.setdefault("result", {"text": "hello world", "language": "en", "duration_s": 2.0, "segments": []})
        status, reply, _ = await self.call("POST", f"/v1/jobs/{job_id}/result", json=body)
        return status, reply

    async def job(self, job_id: str, **params: Any) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"/v1/jobs/{job_id}", params=params)
        assert status == 200, body
        return body

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def scheduler(**overrides: Any) -> AsyncIterator[Harness]:
    settings = SchedulerSettings(**overrides)
    registry = CollectorRegistry()
    running = await start_scheduler(settings, registry, host="127.0.0.1", port=0)
    headers = {"Authorization": f"Bearer {settings.token.get_secret_value()}"} if settings.token else {}
    session = aiohttp.ClientSession(headers=headers)
    try:
        yield Harness(running, session, registry)
    finally:
        await session.close()
        await running.stop()


# ------------------------------------------------------------------------------------ state (pure)


def test_epochs_grow_per_resource_and_stale_reports_are_fenced() -> None:
    state, clock, registry = make_state()
    node = register(state)
    for _ in range(3):
        state.submit(JobSpec(), AUDIO)
    a1, first = take(state, node)
    assert first.epoch == 1
    state.report_result(a1.job_id, report(node, 1, 1))
    a2, second = take(state, node)
    assert second.epoch == 2
    # Asking again for the same job supersedes the older lease: only the newest epoch may report.
    third = state.grant_lease(LeaseRequest(node_id=node, job_id=a2.job_id, resource="cpu", ttl_s=10))
    assert third.epoch == 3
    with pytest.raises(LeaseUnusable) as exc:
        state.renew_lease(second.lease_id, RenewRequest(epoch=2))
    assert exc.value.code == "lease_superseded"
    with pytest.raises(ReportRejected) as rejected:
        state.report_result(a2.job_id, report(node, 1, 2))
    assert rejected.value.code == "stale_epoch"
    assert registry.get_sample_value("node_agent_scheduler_results_rejected_total", {"reason": "stale_epoch"}) == 1
    # A GPU on the same node has its own epoch sequence.
    gpu_node = register(state, [GPU_ANY])
    _, gpu = take(state, gpu_node, resource="gpu:0")
    assert gpu.epoch == 1


def test_expiry_requeues_until_max_attempts_then_fails_lease_expired(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    state, clock, registry = make_state(max_attempts=2, lease_min_ttl_s=1.0)
    node = register(state)
    job = state.submit(JobSpec(), AUDIO)
    a1, l1 = take(state, node, ttl_s=5)
    clock.advance(4)
    state.renew_lease(l1.lease_id, RenewRequest(epoch=l1.epoch))
    clock.advance(4.9)
    state.tick()
    assert state.view_job(job.job_id).state == "running"  # the renewal pushed expiry to now + ttl
    clock.advance(0.2)
    state.tick()
    view = state.view_job(job.job_id)
    assert (view.state, view.attempt, view.segments) == ("queued", 2, [])
    with pytest.raises(LeaseUnusable) as exc:
        state.renew_lease(l1.lease_id, RenewRequest(epoch=l1.epoch))
    assert exc.value.code == "lease_expired"
    a2, l2 = take(state, node, ttl_s=5)
    assert (a2.attempt, l2.epoch) == (2, 2)
    clock.advance(6)
    view = state.view_job(job.job_id)  # no tick: every call applies what fell due first
    assert view.state == "failed" and view.error is not None and view.error.code == "lease_expired"
    with pytest.raises(ReportRejected) as late:
        state.report_result(job.job_id, report(node, 2, 2))
    assert late.value.code == "already_completed"
    sample = registry.get_sample_value
    assert sample("node_agent_scheduler_leases_expired_total", {"node_id": node}) == 2
    assert sample("node_agent_scheduler_jobs_requeued_total", {"reason": "lease_expired"}) == 1
    assert sample("node_agent_scheduler_jobs_total", {"outcome": "lease_expired"}) == 1
    assert sample("node_agent_scheduler_leases_renewed_total", {"node_id": node}) == 1
    assert f"lease expired lease_id={l1.lease_id} node_id={node}" in caplog.text
    assert f"job requeued job_id={job.job_id} reason=lease_expired" in caplog.text
    assert f"job finished job_id={job.job_id} outcome=lease_expired attempt=2" in caplog.text


def test_node_gone_expires_its_leases_and_requeues_its_jobs() -> None:
    state, clock, registry = make_state(heartbeat_interval_s=5, node_gone_after_heartbeats=3)
    node = register(state)
    other = register(state)
    leased = state.submit(JobSpec(), AUDIO)
    assigned = state.submit(JobSpec(), AUDIO)
    _, grant = take(state, node, ttl_s=60)
    assert state.assign_next(node) is not None  # assigned, never leased
    clock.advance(10)
    state.heartbeat(other, HeartbeatRequest(state="ready"))
    clock.advance(5)
    state.tick()
    nodes = {n.node_id: n.state for n in state.list_nodes().nodes}
    assert nodes == {node: "gone", other: "ready"}
    assert state.view_job(leased.job_id).state == "queued"
    assert state.view_job(assigned.job_id).attempt == 2
    assert state.lease(grant.lease_id).state == "expired"  # type: ignore[union-attr]
    with pytest.raises(NodeNotFound):
        state.heartbeat(node, HeartbeatRequest(state="ready"))
    assert registry.get_sample_value("node_agent_scheduler_jobs_requeued_total", {"reason": "node_gone"}) == 2
    assert registry.get_sample_value("node_agent_scheduler_leases_expired_total", {"node_id": node}) == 1
    assert registry.get_sample_value("node_agent_scheduler_nodes", {"state": "gone"}) == 1
    assert registry.get_sample_value("node_agent_scheduler_queue_depth") == 2
    assert register(state, node_id=node) == node  # re-registering brings it back
    assert {n.node_id: n.state for n in state.list_nodes().nodes}[node] == "ready"


def test_release_requeues_deadline_fails_queued_job_and_retention_forgets() -> None:
    state, clock, registry = make_state(job_retention_s=60, max_attempts=3)
    node = register(state)
    job = state.submit(JobSpec(), AUDIO)
    _, grant = take(state, node)
    state.release_lease(grant.lease_id)
    state.release_lease(grant.lease_id)  # idempotent
    assert (state.view_job(job.job_id).state, state.view_job(job.job_id).attempt) == ("queued", 2)
    assert registry.get_sample_value("node_agent_scheduler_jobs_requeued_total", {"reason": "released"}) == 1
    late = state.submit(JobSpec(deadline_s=5), AUDIO)
    clock.advance(6)
    view = state.view_job(late.job_id)
    assert view.state == "failed" and view.error is not None and view.error.code == "timeout"
    clock.advance(60)
    state.tick()
    with pytest.raises(Exception, match="not known"):
        state.view_job(late.job_id)
    assert state.view_job(job.job_id).state == "queued"


def test_retryable_failure_at_max_attempts_is_terminal() -> None:
    state, _, registry = make_state(max_attempts=2)
    node = register(state)
    job = state.submit(JobSpec(), AUDIO)
    a1, l1 = take(state, node)
    assert state.report_result(job.job_id, report(node, 1, l1.epoch, "failed", "worker_crashed")).requeued
    a2, l2 = take(state, node)
    ack = state.report_result(job.job_id, report(node, 2, l2.epoch, "failed", "worker_crashed"))
    assert not ack.requeued
    view = state.view_job(job.job_id)
    assert view.state == "failed" and view.error is not None and view.error.code == "worker_crashed"
    # The first report, retried after the job moved on, still gets its original answer.
    again = state.report_result(job.job_id, report(node, 1, l1.epoch, "failed", "worker_crashed"))
    assert again.requeued and again.duplicate
    assert registry.get_sample_value("node_agent_scheduler_jobs_total", {"outcome": "worker_crashed"}) == 1


def test_upload_names_are_for_display_only() -> None:
    assert sanitize_filename("../../etc/\x00pass\nwd.wav") == "passwd.wav"
    assert sanitize_filename("C:\\Users\\me\\clip one.wav") == "clip one.wav"
    assert sanitize_filename("a" * 300) == "a" * 100
    assert sanitize_filename("/") is None


def test_subtitle_formats() -> None:
    assert srt_timestamp(1.5) == "00:00:01,500"
    assert vtt_timestamp(3661.0016) == "01:01:01.002"
    segments = [{"start": 0.0, "end": 1.5, "text": " Hello"}, {"start": 1.5, "end": 62.25, "text": " world.\n"}]
    assert to_srt(segments) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello\n\n2\n00:00:01,500 --> 00:01:02,250\nworld.\n"
    )
    assert to_vtt(segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello\n\n00:00:01.500 --> 00:01:02.250\nworld.\n"
    )


# ----------------------------------------------------------------------------------- HTTP (loopback)


@pytest.mark.asyncio
async def test_register_heartbeat_and_reregister_after_404(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    async with scheduler(heartbeat_interval_s=7) as h:
        status, reply, _ = await h.call(
            "POST",
            "/v1/nodes",
            json={"node_id": None, "agent_version": "0.1.0", "hostname": "a", "hardware": HARDWARE,
                  "devices": [CPU_EN], "future_field": 1},
        )
        assert status == 201
        node = reply["node_id"]
        assert re.fullmatch(r"node-[0-9a-f]{12}", node)
        assert reply["heartbeat_interval_s"] == 7 and reply["lease"] == {"min_ttl_s": 1.0, "max_ttl_s": 300.0}
        beat = {"state": "busy", "running_jobs": ["job-x"], "cpu_percent": 12.5,
                "memory_used_bytes": 1, "memory_total_bytes": 2}
        status, reply, _ = await h.call("PUT", f"/v1/nodes/{node}/heartbeat", json=beat)
        assert (status, reply) == (200, {"heartbeat_interval_s": 7.0})
        status, reply, _ = await h.call("GET", "/v1/nodes")
        [view] = reply["nodes"]
        assert (view["state"], view["running_jobs"], view["hostname"]) == ("busy", ["job-x"], "a")
        assert view["devices"][0]["languages"] == ["en"] and view["last_heartbeat_age_s"] < 1
        # A scheduler that forgot the node answers 404; the agent registers again with its persisted id.
        status, reply, _ = await h.call("PUT", "/v1/nodes/node-000000000000/heartbeat", json=beat)
        assert status == 404 and reply["error"]["code"] == "unknown_node"
        assert await h.register(node_id="node-000000000000") == "node-000000000000"
        status, _, _ = await h.call("PUT", "/v1/nodes/node-000000000000/heartbeat", json={**beat, "state": "ready"})
        assert status == 200
        status, reply, _ = await h.call("PUT", f"/v1/nodes/{node}/heartbeat", json={**beat, "cpu_percent": "lots"})
        assert status == 400 and "cpu_percent" in reply["error"]["message"]
        assert h.metric("node_agent_scheduler_nodes", state="busy") == 1
        assert h.metric("node_agent_scheduler_nodes", state="ready") == 1
        assert h.metric("node_agent_scheduler_nodes", state="draining") == 0
    assert f"node registered node_id={node} hostname=a devices=cpu" in caplog.text


@pytest.mark.asyncio
async def test_long_poll_204_then_200_when_a_job_arrives() -> None:
    async with scheduler() as h:
        node = await h.register()
        started = time.monotonic()
        status, _ = await h.poll(node, wait_s=0.2)
        assert status == 204 and 0.15 < time.monotonic() - started < 2
        status, reply = await h.poll("node-unknown", wait_s=0.2)
        assert status == 404 and reply["error"]["code"] == "unknown_node"
        waiter = asyncio.create_task(h.poll(node, wait_s=10))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        started = time.monotonic()
        job_id = await h.submit(options={"beam_size": 2}, language="en", deadline_s=60)
        status, assignment = await waiter
        assert time.monotonic() - started < 1  # woken by the submission, not by the timeout
        assert status == 200
        assert assignment["job_id"] == job_id and assignment["attempt"] == 1
        assert assignment["options"] == {"beam_size": 2} and assignment["language"] == "en"
        assert assignment["audio"] == {"format": "auto", "sample_rate": None, "bytes": len(AUDIO),
                                       "url": f"/v1/jobs/{job_id}/audio"}
        assert 59 < assignment["deadline_s"] <= 60 and assignment["queued_s"] >= 0
        status, audio, headers = await h.call("GET", assignment["audio"]["url"])
        assert status == 200 and audio == AUDIO.decode() and headers["Content-Type"] == "application/octet-stream"
        assert (await h.job(job_id))["state"] == "assigned"
        status, reply, _ = await h.call("GET", "/v1/jobs/job-nope/audio")
        assert status == 404 and reply["error"]["code"] == "unknown_job"


@pytest.mark.asyncio
async def test_jobs_go_only_to_devices_that_speak_their_language() -> None:
    async with scheduler() as h:
        en_only = await h.register([CPU_EN])
        both = await h.register([CPU_EN, GPU_ANY])
        zh = await h.submit(language="zh")
        assert (await h.poll(en_only))[0] == 204
        assert (await h.poll(both, resource="cpu"))[0] == 204
        status, assignment = await h.poll(both, resource="gpu:0")
        assert status == 200 and assignment["job_id"] == zh and assignment["resource"] == "gpu:0"
        auto = await h.submit(language="auto")
        status, assignment = await h.poll(en_only)
        assert status == 200 and assignment["job_id"] == auto and assignment["language"] is None
        status, reply = await h.poll(en_only, resource="gpu:0")
        assert status == 400 and reply["error"]["code"] == "invalid_request"


@pytest.mark.asyncio
async def test_lease_grant_epochs_and_resource_held(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    async with scheduler(lease_max_ttl_s=30) as h:
        node = await h.register()
        first, second = await h.submit(), await h.submit()
        await h.poll(node)
        status, grant, _ = await h.lease(node, first, ttl_s=600)
        assert status == 201 and grant["epoch"] == 1 and grant["ttl_s"] == 30 and grant["resource"] == "cpu"
        assert (await h.job(first))["state"] == "running"
        await h.poll(node)
        status, reply, headers = await h.lease(node, second)
        assert status == 409 and reply["error"]["code"] == "resource_held"
        assert int(headers["Retry-After"]) >= 1
        status, reply, _ = await h.lease(node, "job-never")
        assert status == 410 and reply["error"]["code"] == "job_not_assigned"
        status, reply, _ = await h.lease("node-nobody", second)
        assert status == 404 and reply["error"]["code"] == "unknown_node"
        status, _ = await h.result(first, node, 1, 1)
        assert status == 200
        status, grant2, _ = await h.lease(node, second)
        assert status == 201 and grant2["epoch"] == 2  # one sequence per (node, resource), never reset
        assert h.metric("node_agent_scheduler_leases_granted_total", node_id=node) == 2
    assert f"lease granted lease_id={grant['lease_id']} node_id={node} resource=cpu epoch=1" in caplog.text


@pytest.mark.asyncio
async def test_renew_extends_release_is_idempotent() -> None:
    async with scheduler(lease_min_ttl_s=0.1) as h:
        node = await h.register()
        job = await h.submit()
        await h.poll(node)
        _, grant, _ = await h.lease(node, job, ttl_s=0.6)
        lease_id, epoch = grant["lease_id"], grant["epoch"]
        for _ in range(4):  # 0.8 s in all: past one TTL, alive thanks to the renewals
            await asyncio.sleep(0.2)
            status, reply, _ = await h.call("POST", f"/v1/leases/{lease_id}/renew", json={"epoch": epoch})
            assert status == 200 and reply == {"lease_id": lease_id, "epoch": epoch, "ttl_s": 0.6}
        status, reply, _ = await h.call("POST", f"/v1/leases/{lease_id}/renew", json={"epoch": epoch + 1})
        assert status == 410 and reply["error"]["code"] == "stale_epoch"
        assert (await h.job(job))["state"] == "running"
        assert h.metric("node_agent_scheduler_leases_renewed_total", node_id=node) == 4
        status, _, _ = await h.call("DELETE", f"/v1/leases/{lease_id}")
        assert status == 204
        status, _, _ = await h.call("DELETE", f"/v1/leases/{lease_id}")
        assert status == 204
        status, reply, _ = await h.call("POST", f"/v1/leases/{lease_id}/renew", json={"epoch": epoch})
        assert status == 410 and reply["error"]["code"] == "lease_released"
        status, reply, _ = await h.call("POST", "/v1/leases/lease-nope/renew", json={"epoch": 1})
        assert status == 410 and reply["error"]["code"] == "unknown_lease"
        view = await h.job(job)
        assert (view["state"], view["attempt"]) == ("queued", 2)  # the holder gave up


@pytest.mark.asyncio
async def test_expired_lease_requeues_and_late_result_is_rejected() -> None:
    async with scheduler(lease_min_ttl_s=0.1) as h:
        node = await h.register()
        job = await h.submit()
        await h.poll(node)
        _, grant, _ = await h.lease(node, job, ttl_s=0.3)
        await asyncio.sleep(0.6)
        status, reply, _ = await h.call("POST", f"/v1/leases/{grant['lease_id']}/renew", json={"epoch": grant["epoch"]})
        assert status == 410 and reply["error"]["code"] == "lease_expired"
        view = await h.job(job)
        assert (view["state"], view["attempt"], view["node_id"]) == ("queued", 2, None)
        status, reply = await h.result(job, node, 1, grant["epoch"])
        assert status == 409 and reply["error"]["code"] == "stale_attempt"
        status, reply, _ = await h.call(
            "POST", f"/v1/jobs/{job}/events",
            json={"attempt": 1, "lease_epoch": grant["epoch"], "events": [{"id": 0, "start": 0, "end": 1, "text": ""}]},
        )
        assert status == 409 and reply["error"]["code"] == "stale_attempt"
        status, assignment = await h.poll(node)
        assert assignment["attempt"] == 2
        _, grant2, _ = await h.lease(node, job)
        assert grant2["epoch"] == grant["epoch"] + 1
        status, reply = await h.result(job, node, 2, grant["epoch"])
        assert status == 409 and reply["error"]["code"] == "stale_epoch"
        status, reply = await h.result(job, node, 2, grant2["epoch"])
        assert (status, reply["accepted"]) == (200, True)
        assert h.metric("node_agent_scheduler_leases_expired_total", node_id=node) == 1
        assert h.metric("node_agent_scheduler_jobs_requeued_total", reason="lease_expired") == 1
        assert h.metric("node_agent_scheduler_results_rejected_total", reason="stale_attempt") == 1
        assert h.metric("node_agent_scheduler_results_rejected_total", reason="stale_epoch") == 1


@pytest.mark.asyncio
async def test_exactly_one_result_and_duplicate_retry_is_idempotent() -> None:
    async with scheduler() as h:
        node = await h.register()
        job = await h.submit()
        await h.poll(node)
        _, grant, _ = await h.lease(node, job)
        segments = [{"id": 0, "start": 0.0, "end": 1.0, "text": " hello", "avg_logprob": -0.1}]
        status, reply, _ = await h.call(
            "POST", f"/v1/jobs/{job}/events", json={"attempt": 1, "lease_epoch": grant["epoch"], "events": segments}
        )
        assert status == 202
        assert (await h.job(job))["segments"] == segments
        status, reply = await h.result(job, node, 1, grant["epoch"], timings={"decode_s": 0.5})
        assert status == 200 and reply["accepted"] is True and reply["duplicate"] is False
        status, reply = await h.result(job, node, 1, grant["epoch"], timings={"decode_s": 0.5})
        assert status == 200 and reply["accepted"] is True and reply["duplicate"] is True
        status, reply = await h.result(job, node, 1, grant["epoch"] + 5)
        assert status == 409 and reply["error"]["code"] == "already_completed"
        view = await h.job(job)
        assert view["state"] == "succeeded" and view["result"]["text"] == "hello world"
        assert view["timings"]["node"] == {"decode_s": 0.5} and "total_s" in view["timings"]
        assert h.metric("node_agent_scheduler_jobs_total", outcome="succeeded") == 1
        assert h.metric("node_agent_scheduler_results_rejected_total", reason="already_completed") == 1
        # Accepting the result released the lease.
        status, reply, _ = await h.call("POST", f"/v1/leases/{grant['lease_id']}/renew", json={"epoch": grant["epoch"]})
        assert status == 410 and reply["error"]["code"] == "lease_released"


@pytest.mark.asyncio
async def test_retryable_failure_requeues_and_input_failure_is_terminal() -> None:
    async with scheduler() as h:
        node = await h.register()
        job = await h.submit()
        await h.poll(node)
        _, grant, _ = await h.lease(node, job)
        status, reply = await h.result(
            job, node, 1, grant["epoch"], outcome="failed", error={"code": "worker_crashed", "message": "signal 11"}
        )
        assert status == 200 and reply["requeued"] is True
        assert h.metric("node_agent_scheduler_jobs_requeued_total", reason="retryable_error") == 1
        status, assignment = await h.poll(node)
        assert assignment["attempt"] == 2
        _, grant, _ = await h.lease(node, job)
        status, reply = await h.result(
            job, node, 2, grant["epoch"], outcome="failed", error={"code": "bad_audio", "message": "not audio"}
        )
        assert status == 200 and reply["requeued"] is False
        view = await h.job(job)
        assert view["state"] == "failed" and view["error"] == {"code": "bad_audio", "message": "not audio"}
        assert h.metric("node_agent_scheduler_jobs_total", outcome="bad_audio") == 1


@pytest.mark.asyncio
async def test_assignment_without_lease_times_out_and_is_requeued() -> None:
    async with scheduler(assign_timeout_s=0.3) as h:
        node = await h.register()
        job = await h.submit()
        assert (await h.poll(node))[0] == 200
        await asyncio.sleep(0.6)
        view = await h.job(job)
        assert (view["state"], view["attempt"]) == ("queued", 2)
        status, reply, _ = await h.lease(node, job)
        assert status == 410 and reply["error"]["code"] == "job_not_assigned"
        assert h.metric("node_agent_scheduler_jobs_requeued_total", reason="assign_timeout") == 1


@pytest.mark.asyncio
async def test_gone_node_gets_404_and_its_lease_expires() -> None:
    async with scheduler(heartbeat_interval_s=0.25, node_gone_after_heartbeats=2) as h:
        node = await h.register()
        job = await h.submit()
        await h.poll(node)
        status, grant, _ = await h.lease(node, job, ttl_s=60)
        assert status == 201
        await asyncio.sleep(0.8)
        status, reply, _ = await h.call("GET", "/v1/nodes")
        assert reply["nodes"][0]["state"] == "gone"
        status, reply, _ = await h.call("PUT", f"/v1/nodes/{node}/heartbeat", json={"state": "ready"})
        assert status == 404 and reply["error"]["code"] == "unknown_node"
        status, reply, _ = await h.call("POST", f"/v1/leases/{grant['lease_id']}/renew", json={"epoch": grant["epoch"]})
        assert status == 410 and reply["error"]["code"] == "lease_expired"
        assert (await h.job(job))["state"] == "queued"
        assert await h.register(node_id=node) == node
        assert h.metric("node_agent_scheduler_jobs_requeued_total", reason="node_gone") == 1


@pytest.mark.asyncio
async def test_bearer_token_required_on_v1_and_never_echoed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = "s3cret-Token-9f8e7d"
    async with scheduler(token=token) as h:
        texts = []
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            async with aiohttp.ClientSession() as bare:
                async with bare.get(h.url + "/v1/nodes", headers=headers) as resp:
                    texts.append(await resp.text())
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "unauthorized"
            async with aiohttp.ClientSession() as bare:
                async with bare.post(h.url + "/v1/jobs", headers=headers, json={"audio_b64": "AAAA"}) as resp:
                    texts.append(await resp.text())
                    assert resp.status == 401
        async with aiohttp.ClientSession() as bare:
            for path in ("/healthz", "/metrics"):
                async with bare.get(h.url + path) as resp:
                    texts.append(await resp.text())
                    assert resp.status == 200
        node = await h.register()  # the harness session carries the right token
        status, reply, _ = await h.call("GET", "/v1/nodes")
        texts.append(json.dumps(reply))
        assert status == 200 and reply["nodes"][0]["node_id"] == node
        assert all(token not in text for text in texts)
    assert token not in caplog.text


@pytest.mark.asyncio
async def test_body_limits_and_validation_errors() -> None:
    async with scheduler(max_body_bytes=4096) as h:
        status, reply, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(bytes(8000)).decode()})
        assert status == 413 and reply["error"]["code"] == "too_large"
        form = aiohttp.FormData()
        form.add_field("file", bytes(8000), filename="big.wav")
        status, reply, _ = await h.call("POST", "/v1/jobs", data=form)
        assert status == 413 and reply["error"]["code"] == "too_large"
        status, reply, _ = await h.call(
            "POST", "/v1/nodes", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert status == 400 and reply["error"]["code"] == "invalid_request"
        assert "JSON" in reply["error"]["message"]
        bad: list[tuple[dict[str, Any], str]] = [
            ({"audio_b64": "AAAA", "options": {"beam_sise": 3}}, "options.beam_sise"),
            ({"audio_b64": "AAAA", "options": {"beam_size": 99}}, "options.beam_size"),
            ({"audio_b64": "AAAA", "options": {"vad_filter": "yes"}}, "options.vad_filter"),
            ({"audio_b64": "AAAA", "language": "English"}, "language"),
            ({"audio_b64": "AAAA", "language": "EN"}, "language"),
            ({"audio_b64": "not base64!"}, "audio_b64"),
            ({"audio_b64": ""}, "audio_b64"),
            ({"audio_b64": "AAAA", "format": "pcm_s16le"}, "sample_rate"),
            ({"audio_b64": "AAAA", "colour": "red"}, "colour"),
        ]
        for body, field in bad:
            status, reply, _ = await h.call("POST", "/v1/jobs", json=body)
            assert status == 400, body
            assert reply["error"]["code"] == "invalid_request"
            assert field in reply["error"]["message"], (body, reply)
        status, reply, _ = await h.call("POST", "/v1/leases", json={"node_id": "n", "job_id": "j", "resource": "tpu"})
        assert status == 400 and "resource" in reply["error"]["message"]
        status, reply, _ = await h.call("GET", "/v1/jobs/job-x", params={"wait_s": "soon"})
        assert status == 400 and "wait_s" in reply["error"]["message"]


@pytest.mark.asyncio
async def test_multipart_submission_and_job_long_poll_on_segments() -> None:
    async with scheduler() as h:
        node = await h.register([GPU_ANY])
        form = aiohttp.FormData()
        form.add_field("file", b"\x00\x01" * 100, filename="../../etc/passwd.raw")
        form.add_field("format", "pcm_s16le")
        form.add_field("sample_rate", "16000")
        form.add_field("language", "zh")
        form.add_field("options", json.dumps({"vad_filter": True}))
        status, reply, _ = await h.call("POST", "/v1/jobs", data=form)
        assert status == 202, reply
        job = reply["job_id"]
        assert re.fullmatch(r"job-[0-9a-f]{16}", job)
        status, assignment = await h.poll(node)
        assert assignment["audio"]["format"] == "pcm_s16le" and assignment["audio"]["sample_rate"] == 16000
        assert assignment["options"] == {"vad_filter": True}
        _, grant, _ = await h.lease(node, job, resource="gpu:0")

        def events(*segments: dict[str, Any]) -> dict[str, Any]:
            return {"attempt": 1, "lease_epoch": grant["epoch"], "events": list(segments)}

        watcher = asyncio.create_task(h.job(job, wait_s=10, after_segment=1))
        await asyncio.sleep(0.1)
        assert not watcher.done()
        event = {"id": 0, "start": 0.0, "end": 0.5, "text": "你好"}
        await h.call("POST", f"/v1/jobs/{job}/events", json=events(event))
        assert not watcher.done()  # one segment is not more than after_segment=1
        event2 = {"id": 1, "start": 0.5, "end": 1.0, "text": "世界"}
        await h.call("POST", f"/v1/jobs/{job}/events", json=events(event2))
        view = await asyncio.wait_for(watcher, 2)
        assert [s["text"] for s in view["segments"]] == ["你好", "世界"]
        assert view["filename"] == "passwd.raw" and view["state"] == "running"


async def _fake_node(h: Harness, node: str, outcome: dict[str, Any]) -> None:
    """The node side of one job, in plain HTTP calls: poll, lease, stream segments, report."""
    status, assignment = await h.poll(node, wait_s=10)
    assert status == 200
    job = assignment["job_id"]
    status, grant, _ = await h.lease(node, job, resource=assignment["resource"])
    assert status == 201, grant
    segments = outcome.get("result", {}).get("segments", [])
    if segments:
        status, _, _ = await h.call(
            "POST", f"/v1/jobs/{job}/events",
            json={"attempt": assignment["attempt"], "lease_epoch": grant["epoch"], "events": segments},
        )
        assert status == 202
    status, reply = await h.result(job, node, assignment["attempt"], grant["epoch"], **outcome)
    assert status == 200, reply


SUCCESS = {
    "result": {
        "text": "Hello there. General Kenobi.",
        "language": "en",
        "language_probability": 0.98,
        "duration_s": 3.25,
        # Numbered from 1, as faster-whisper (and so every node) numbers segments.
        "segments": [
            {"id": 1, "start": 0.0, "end": 1.5, "text": " Hello there.", "avg_logprob": -0.2,
             "compression_ratio": 1.1, "no_speech_prob": 0.01, "temperature": 0.0},
            {"id": 2, "start": 1.5, "end": 3.25, "text": " General Kenobi.", "avg_logprob": -0.3,
             "compression_ratio": 1.2, "no_speech_prob": 0.02, "temperature": 0.2},
        ],
    }
}


async def _transcribe_with_node(h: Harness, node: str, outcome: dict[str, Any], **fields: str) -> tuple[int, Any, Any]:
    """One OpenAI-style request, answered by a simulated node; a failing node fails the test at once."""
    request = asyncio.create_task(_transcribe(h, **fields))
    try:
        await _fake_node(h, node, outcome)
        return await asyncio.wait_for(request, 5)
    finally:
        request.cancel()


async def _transcribe(h: Harness, **fields: str) -> tuple[int, Any, Any]:
    form = aiohttp.FormData()
    form.add_field("file", AUDIO, filename="clip.wav", content_type="audio/wav")
    form.add_field("model", "whisper-1")
    for name, value in fields.items():
        form.add_field(name, value)
    return await h.call("POST", "/v1/audio/transcriptions", data=form)


@pytest.mark.asyncio
@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
async def test_openai_transcriptions_formats(response_format: str) -> None:
    async with scheduler() as h:
        node = await h.register([GPU_ANY])
        status, body, headers = await _transcribe_with_node(
            h, node, SUCCESS, response_format=response_format, language="en", prompt="Kenobi"
        )
        assert status == 200, body
        if response_format == "json":
            assert body == {"text": "Hello there. General Kenobi."}
        elif response_format == "text":
            assert headers["Content-Type"].startswith("text/plain") and body == "Hello there. General Kenobi."
        elif response_format == "srt":
            assert body == (
                "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                "2\n00:00:01,500 --> 00:00:03,250\nGeneral Kenobi.\n"
            )
        elif response_format == "vtt":
            assert body.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n")
            assert "00:00:01.500 --> 00:00:03.250\nGeneral Kenobi.\n" in body
        else:
            assert (body["task"], body["language"], body["duration"]) == ("transcribe", "en", 3.25)
            assert body["text"] == "Hello there. General Kenobi."
            assert [s["id"] for s in body["segments"]] == [0, 1]  # OpenAI numbers segments from 0
            second = body["segments"][1]
            assert second == {"id": 1, "seek": 0, "start": 1.5, "end": 3.25, "text": " General Kenobi.", "tokens": [],
                              "temperature": 0.2, "avg_logprob": -0.3, "compression_ratio": 1.2,
                              "no_speech_prob": 0.02}


@pytest.mark.asyncio
async def test_openai_errors() -> None:
    async with scheduler(max_attempts=1) as h:
        status, body, _ = await _transcribe(h, response_format="docx")
        assert status == 400
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "response_format"
        assert "json, text, srt, verbose_json, vtt" in body["error"]["message"]
        no_file = aiohttp.FormData({"model": "whisper-1"})
        status, body, _ = await h.call("POST", "/v1/audio/transcriptions", data=no_file)
        assert status == 400 and body["error"]["param"] == "file"
        node = await h.register([GPU_ANY])
        failure = {"outcome": "failed", "error": {"code": "bad_audio", "message": "cannot decode audio"}}
        status, body, _ = await _transcribe_with_node(h, node, failure)
        assert status == 400 and body["error"]["code"] == "bad_audio" and "decode" in body["error"]["message"]
        crash = {"outcome": "failed", "error": {"code": "worker_crashed", "message": "signal 11"}}
        status, body, _ = await _transcribe_with_node(h, node, crash)
        assert status == 500 and body["error"]["code"] == "worker_crashed"
        assert body["error"]["type"] == "server_error"


@pytest.mark.asyncio
async def test_stop_wakes_long_polls_at_once() -> None:
    settings = SchedulerSettings()
    running = await start_scheduler(settings, host="127.0.0.1", port=0)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            running.url + "/v1/nodes",
            json={"agent_version": "0.1.0", "hostname": "a", "hardware": HARDWARE, "devices": [CPU_EN]},
        ) as resp:
            node = (await resp.json())["node_id"]

        async def poll() -> int:
            async with session.get(running.url + f"/v1/nodes/{node}/jobs/next", params={"wait_s": 25}) as resp:
                return resp.status

        waiter = asyncio.create_task(poll())
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await running.stop()
        assert await asyncio.wait_for(waiter, 3) == 204
        assert time.monotonic() - started < 3


@pytest.mark.asyncio
async def test_serve_logs_its_url_and_stops_on_sigterm(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    server = asyncio.create_task(serve(SchedulerSettings(listen="127.0.0.1:0")))
    for _ in range(100):
        match = re.search(r"scheduler listening on (http://\S+)", caplog.text)
        if match:
            break
        await asyncio.sleep(0.02)
    assert match is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(match.group(1) + "/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"ok": True})
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 5)
    assert "scheduler stopped" in caplog.text


@pytest.mark.asyncio
async def test_json_answers_are_real_utf8() -> None:
    async with scheduler() as h:
        node = await h.register([GPU_ANY])
        job = await h.submit(language="zh")
        _, assignment = await h.poll(node)
        _, grant, _ = await h.lease(node, job, resource="gpu:0")
        segment = {"id": 1, "start": 0.0, "end": 1.0, "text": "广州市房地产"}
        await h.call("POST", f"/v1/jobs/{job}/events",
                     json={"attempt": assignment["attempt"], "lease_epoch": grant["epoch"], "events": [segment]})
        async with h.session.get(f"{h.url}/v1/jobs/{job}") as resp:
            raw = await resp.read()
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert "广州市房地产".encode() in raw and b"\\u" not in raw, raw
        assert json.loads(raw)["segments"][0]["text"] == "广州市房地产"
        # A lone surrogate (sent as an escape) cannot be UTF-8: the answer falls back to escapes, still JSON.
        odd = {"id": 2, "start": 1.0, "end": 2.0, "text": "a\ud800b"}
        await h.call("POST", f"/v1/jobs/{job}/events",
                     json={"attempt": assignment["attempt"], "lease_epoch": grant["epoch"], "events": [odd]})
        status, view, _ = await h.call("GET", f"/v1/jobs/{job}")
        assert status == 200 and view["segments"][1]["text"] == "a\ud800b"


@pytest.mark.asyncio
async def test_language_must_be_a_whisper_code_on_both_apis() -> None:
    async with scheduler() as h:
        for language in ("english", "xx"):
            status, reply, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": "AAAA", "language": language})
            assert status == 400 and reply["error"]["code"] == "invalid_request", reply
            assert reply["error"]["message"].startswith(f"language: {language!r} is not a language code; use a "
                                                        "code such as en, zh"), reply
            status, reply, _ = await _transcribe(h, language=language)
            assert status == 400, reply
            assert reply["error"]["param"] == "language" and reply["error"]["type"] == "invalid_request_error"
            assert "not a language code" in reply["error"]["message"]
        assert await h.submit(language="yue")  # Cantonese: a three-letter Whisper code


@pytest.mark.asyncio
async def test_port_in_use_is_one_line_naming_the_key() -> None:
    from node_agent.errors import ListenError

    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ListenError) as exc:
            await start_scheduler(SchedulerSettings(), host="127.0.0.1", port=port)
        assert str(exc.value) == f"cannot listen on 127.0.0.1:{port} (scheduler.listen): address already in use"
    finally:
        busy.close()
        await busy.wait_closed()
