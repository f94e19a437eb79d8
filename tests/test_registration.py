"""Registration and heartbeats as a part of their own: retried registration, the lease bounds handed on, a heartbeat
retried through a blip, and a scheduler that forgot the node (aioresponses: the shapes a real one rarely gives)."""

from __future__ import annotations

import asyncio
import logging

from aioresponses import aioresponses
from prometheus_client import CollectorRegistry
from yarl import URL

from conftest import make_settings
from node_agent.scheduler_client import SchedulerClient
from node_agent.metrics import AgentMetrics
from node_agent.registration import NodeIdentity, Registration
from node_agent.retry import RetryPolicies, RetryPolicy
from node_agent.statedir import StateDir

BASE = "http://scheduler.test"
FAST = RetryPolicy(initial_s=0.01, max_wait_s=0.05, max_total_s=None)
REGISTERED = {"node_id": "n1", "heartbeat_interval_s": 0.2, "lease": {"min_ttl_s": 1, "max_ttl_s": 30}}


async def test_registers_through_failures_hands_on_the_lease_bounds_and_registers_again_when_forgotten(
        tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="node_agent.registration")
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    client = SchedulerClient(BASE, None, 1.0, metrics)
    identity = NodeIdentity()
    bounds: list[tuple[float, float]] = []
    state = StateDir(tmp_path / "state")
    registration = Registration(
        client, identity, workers={}, asr=make_settings().asr, facts={"gpus": []}, hostname="h", metrics=metrics,
        heartbeat_state=lambda: {"state": "ready", "running_jobs": []}, state=state,
        policies=RetryPolicies(register=FAST, heartbeat=RetryPolicy(0.01, 0.05, 1.0)),
        on_lease_bounds=lambda low, high: bounds.append((low, high)))
    tasks: list[asyncio.Task[None]] = []
    try:
        with aioresponses() as m:
            m.post(f"{BASE}/v1/nodes", status=503, headers={"Retry-After": "0"})
            m.post(f"{BASE}/v1/nodes", status=503, headers={"Retry-After": "0"})
            m.post(f"{BASE}/v1/nodes", status=201, payload=REGISTERED)
            beat = f"{BASE}/v1/nodes/n1/heartbeat"
            m.put(beat, status=500)  # a blip: retried within the interval
            m.put(beat, status=200, payload={"heartbeat_interval_s": 0.2})
            m.put(beat, status=404, payload={"error": {"code": "unknown_node", "message": "who?"}})
            m.post(f"{BASE}/v1/nodes", status=201, payload=REGISTERED)
            m.put(beat, status=200, payload={"heartbeat_interval_s": 0.2}, repeat=True)
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(registration.run()), loop.create_task(registration.run_heartbeats())]
            await asyncio.wait_for(identity.registered_event.wait(), 5)
            assert identity.node_id == "n1" and identity.registered and bounds == [(1, 30)]
            assert state.load_node_id() == "n1"
            assert registry.get_sample_value("node_agent_registered") == 1
            # ... the heartbeat blip, then the scheduler forgets the node: registered again.
            for _ in range(200):
                if len(bounds) == 2 and identity.registered:
                    break
                await asyncio.sleep(0.02)
            assert bounds == [(1, 30), (1, 30)] and identity.registered
            assert len(m.requests[("POST", URL(f"{BASE}/v1/nodes"))]) == 4
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    messages = [r.getMessage() for r in caplog.records]
    # One line per distinct failure, not one per retry.
    assert sum("registration failed" in line for line in messages) == 1, messages
    assert any("heartbeat failed" in line for line in messages) and any("heartbeat works again" in line
                                                                        for line in messages)
    assert any("does not know node n1" in line for line in messages)
    assert registry.get_sample_value("node_agent_retries_total", {"operation": "register"}) == 2
    assert registry.get_sample_value("node_agent_retries_total", {"operation": "heartbeat"}) == 1
