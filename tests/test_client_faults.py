"""Failure shapes a real scheduler rarely produces (aioresponses): 5xx, Retry-After, garbage, timeouts.

How the job runner rides them out (the result report retried, a rejection not) is in test_job_runner.py."""

from __future__ import annotations

import asyncio
import re

import pytest
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry

from conftest import make_settings
from node_agent.scheduler_client import (
    Gone,
    LeaseHeld,
    Rejected,
    SchedulerClient,
    SchedulerUnavailable,
    UnknownNode,
)
from node_agent.lease import LeaseKeeper
from node_agent.metrics import AgentMetrics
from node_agent.scheduler.schemas import DeviceSpec, Hardware, HeartbeatRequest, RegisterRequest, ResultReport

BASE = "http://scheduler.test"

GOOD = {
    "register": ("POST", f"{BASE}/v1/nodes", 201,
                 {"node_id": "n1", "heartbeat_interval_s": 5, "lease": {"min_ttl_s": 1, "max_ttl_s": 300}}),
    "heartbeat": ("PUT", f"{BASE}/v1/nodes/n1/heartbeat", 200, {"heartbeat_interval_s": 5}),
    "next_job": ("GET", re.compile(re.escape(f"{BASE}/v1/nodes/n1/jobs/next") + r".*"), 204, None),
    "audio": ("GET", f"{BASE}/v1/jobs/j1/audio", 200, None),
    "lease_acquire": ("POST", f"{BASE}/v1/leases", 201,
                      {"lease_id": "l1", "epoch": 3, "ttl_s": 15, "resource": "cpu"}),
    "lease_renew": ("POST", f"{BASE}/v1/leases/l1/renew", 200, {"lease_id": "l1", "epoch": 3, "ttl_s": 15}),
    "lease_release": ("DELETE", f"{BASE}/v1/leases/l1", 204, None),
    "events": ("POST", f"{BASE}/v1/jobs/j1/events", 202, None),
    "result": ("POST", f"{BASE}/v1/jobs/j1/result", 200, {"accepted": True}),
    "job_submit": ("POST", f"{BASE}/v1/jobs", 202, {"job_id": "j1", "state": "queued"}),
    "job_view": ("GET", re.compile(re.escape(f"{BASE}/v1/jobs/j1") + r"\?.*"), 200,
                 {"job_id": "j1", "state": "running", "attempt": 1, "node_id": "n1", "language": None,
                  "segments": [], "result": None, "error": None, "created_age_s": 0.5, "timings": {}}),
}


NODE = RegisterRequest(agent_version="test", hostname="h", hardware=Hardware(cpu_cores=2, memory_bytes=1 << 30),
                       devices=[DeviceSpec(resource="cpu", model="tiny.en", compute_type="int8")])
FAILED = ResultReport(node_id="n1", lease_id="l1", attempt=1, lease_epoch=3, outcome="failed")


def call(client: SchedulerClient, endpoint: str):
    return {
        "register": lambda: client.register(NODE),
        "heartbeat": lambda: client.heartbeat("n1", HeartbeatRequest(state="ready")),
        "next_job": lambda: client.next_job("n1", 0.1, "cpu"),
        "audio": lambda: client.fetch_audio("/v1/jobs/j1/audio"),
        "lease_acquire": lambda: client.acquire_lease("n1", "j1", "cpu", 15),
        "lease_renew": lambda: client.renew_lease("l1", 3, "n1"),
        "lease_release": lambda: client.release_lease("l1"),
        "events": lambda: client.post_events("j1", "n1", "l1", 1, 3, [{"id": 1, "start": 0, "end": 1, "text": "x"}]),
        "result": lambda: client.report_result("j1", FAILED),
        "job_submit": lambda: client.submit_job(b"\0\0", format="pcm_s16le", sample_rate=16000),
        "job_view": lambda: client.get_job("j1", 0.1, after_segment=0),
    }[endpoint]()


def add(m: aioresponses, endpoint: str, **kw) -> None:
    method, url, status, payload = GOOD[endpoint]
    kw.setdefault("status", status)
    if "body" not in kw and "exception" not in kw and payload is not None:
        kw["payload"] = payload
    m.add(url, method, **kw)


@pytest.mark.parametrize("endpoint", list(GOOD))
@pytest.mark.parametrize("shape", ["500", "503-retry-after", "garbage-json", "timeout", "truncated-json"])
async def test_every_call_maps_failures_to_retryable_errors(endpoint, shape):
    registry = CollectorRegistry()
    client = SchedulerClient(BASE, "tok", 2.0, AgentMetrics(registry))
    try:
        with aioresponses() as m:
            if shape == "500":
                add(m, endpoint, status=500, body="Internal Server Error")
            elif shape == "503-retry-after":
                add(m, endpoint, status=503, headers={"Retry-After": "7"}, body="")
            elif shape == "garbage-json":
                if endpoint in ("audio", "lease_release", "events") or GOOD[endpoint][2] == 204:
                    pytest.skip("this call expects no JSON body")
                add(m, endpoint, body="<html>definitely not json</html>")
            elif shape == "truncated-json":
                if GOOD[endpoint][3] is None:
                    pytest.skip("this call expects no JSON body")
                add(m, endpoint, body='{"node_id": "n1", "heartb')
            else:
                add(m, endpoint, exception=asyncio.TimeoutError())
            with pytest.raises(SchedulerUnavailable) as info:
                await call(client, endpoint)
            if shape == "503-retry-after":
                assert info.value.retry_after == 7.0
            # The good answer afterwards works on the same client: nothing is left broken.
            add(m, endpoint)
            await call(client, endpoint)
        code = {"500": "500", "503-retry-after": "503", "timeout": "error"}.get(shape)
        if code:
            assert registry.get_sample_value("node_agent_scheduler_requests_total",
                                             {"endpoint": endpoint, "code": code}) == 1
    finally:
        await client.close()


async def test_reply_missing_fields_is_a_protocol_error_naming_the_field():
    client = SchedulerClient(BASE, None, 2.0)
    try:
        with aioresponses() as m:
            m.post(f"{BASE}/v1/leases", status=201, payload={"lease_id": "l1", "ttl_s": 15, "resource": "cpu"})
            with pytest.raises(SchedulerUnavailable, match="epoch"):
                await client.acquire_lease("n1", "j1", "cpu", 15)
    finally:
        await client.close()


async def test_specific_4xx_answers_are_typed():
    client = SchedulerClient(BASE, None, 2.0)
    try:
        with aioresponses() as m:
            m.put(f"{BASE}/v1/nodes/n1/heartbeat", status=404,
                  payload={"error": {"code": "unknown_node", "message": "who?"}})
            with pytest.raises(UnknownNode):
                await client.heartbeat("n1", HeartbeatRequest(state="ready"))
            m.post(f"{BASE}/v1/leases", status=409, headers={"Retry-After": "2"},
                   payload={"error": {"code": "resource_held", "message": "held"}})
            with pytest.raises(LeaseHeld) as held:
                await client.acquire_lease("n1", "j1", "cpu", 15)
            assert held.value.retry_after == 2
            m.post(f"{BASE}/v1/leases/l1/renew", status=410,
                   payload={"error": {"code": "lease_expired", "message": "too late"}})
            with pytest.raises(Gone) as gone:
                await client.renew_lease("l1", 3, "n1")
            assert gone.value.code == "lease_expired"
            m.post(f"{BASE}/v1/jobs/j1/result", status=409,
                   payload={"error": {"code": "stale_epoch", "message": "old"}})
            with pytest.raises(Rejected):
                await client.report_result("j1", FAILED)
    finally:
        await client.close()


async def test_lease_acquire_waits_out_503_and_409_then_succeeds():
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    client = SchedulerClient(BASE, None, 2.0, metrics)
    keeper = LeaseKeeper(client, make_settings().lease, metrics, "cpu")
    try:
        with aioresponses() as m:
            m.post(f"{BASE}/v1/leases", status=503, headers={"Retry-After": "0.05"})
            m.post(f"{BASE}/v1/leases", status=409, headers={"Retry-After": "0.05"},
                   payload={"error": {"code": "resource_held", "message": "held"}})
            m.post(f"{BASE}/v1/leases", body="not json", status=201)
            add(m, "lease_acquire")
            lease = await keeper.acquire("n1", "j1")
        assert (lease.lease_id, lease.epoch) == ("l1", 3)
        assert registry.get_sample_value("node_agent_lease_acquire_duration_seconds_count", {"device": "cpu"}) == 1
        assert registry.get_sample_value("node_agent_leases_held", {"device": "cpu"}) == 1
    finally:
        await client.close()
