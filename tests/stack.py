"""A real agent in the test process: registered with an embedded scheduler, both serving HTTP on loopback.

Shared by the metrics, status, Prometheus, compatibility and read-aloud tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from conftest import make_settings
from helpers import joined, pcm16
from node_agent.agent import Agent, probe_node
from node_agent.config import Settings
from node_agent.devices import SlotPlan
from node_agent.http_api import RunningHttp, start_http
from node_agent.metrics import AgentMetrics
from node_agent.scheduler.server import Running, start_scheduler

_FACTS: dict[str, Any] = {}


async def node_facts() -> dict[str, Any]:
    """``probe_node()`` once per test session (it starts a plugin process)."""
    if not _FACTS:
        _FACTS.update(await probe_node())
    return dict(_FACTS)


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() >= give_up:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class AgentStack:
    """An in-process agent registered with an embedded scheduler, both serving HTTP on loopback."""

    settings: Settings
    agent: Agent
    registry: CollectorRegistry
    metrics: AgentMetrics
    scheduler: Running
    scheduler_registry: CollectorRegistry
    http: RunningHttp
    session: aiohttp.ClientSession

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def submit_file(self, audio: bytes, filename: str = "clip.flac", **fields: str) -> str:
        """``POST /v1/jobs`` as multipart with a ``file`` part, the way a client uploads a file."""
        form = aiohttp.FormData()
        form.add_field("file", audio, filename=filename, content_type="application/octet-stream")
        for key, value in fields.items():
            form.add_field(key, value)
        async with self.session.post(self.scheduler.url + "/v1/jobs", data=form) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            return str(body["job_id"])

    async def submit_json(self, audio: bytes, **fields: Any) -> str:
        payload = {"audio_b64": base64.b64encode(audio).decode(), **fields}
        async with self.session.post(self.scheduler.url + "/v1/jobs", json=payload) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            return str(body["job_id"])

    async def wait_job(self, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
        """Long-poll ``GET /v1/jobs/{id}`` until the job is finished (succeeded or failed)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            left = give_up - loop.time()
            async with self.session.get(f"{self.scheduler.url}/v1/jobs/{job_id}",
                                        params={"wait_s": f"{max(0.0, min(left, 10.0)):.1f}"}) as resp:
                view = await resp.json()
                assert resp.status == 200, view
            if view["state"] in ("succeeded", "failed"):
                return view
            if left <= 0:
                raise AssertionError(f"job {job_id} is still {view['state']} after {timeout:g} s")

    async def wait_counted(self, outcome: str, count: int = 1, timeout: float = 10.0) -> None:
        """The agent counts a job after the scheduler acknowledged its report, then releases the lease:
        wait until that is done too."""
        await eventually(lambda: self.sample("node_agent_jobs_total", outcome=outcome) == count, timeout,
                         f"node_agent_jobs_total{{outcome={outcome!r}}} == {count}")
        await eventually(lambda: not self.agent.ledger.running and self.sample("node_agent_jobs_in_progress") == 0,
                         timeout, "the agent has no job in progress")


@contextlib.asynccontextmanager
async def agent_stack(tmp_path: Path, worker_command: list[str] | None = None, slots: SlotPlan | None = None,
                      **sections: dict[str, Any]) -> AsyncIterator[AgentStack]:
    """Start scheduler, agent and agent endpoints on free ports; yields once the agent has registered
    (its worker is then ready or fatal). Everything is stopped on the way out. ``worker_command``: a stand-in
    plugin (``fake_plugin.command(...)``) where the test is about the agent, not about decoding. ``slots``: a
    slot split of the test's own (default: the one this machine's cores and memory give)."""
    settings = make_settings(node={"state_dir": str(tmp_path / "state")}, **sections)
    registry, scheduler_registry = CollectorRegistry(), CollectorRegistry()
    metrics = AgentMetrics(registry=registry)
    scheduler = await start_scheduler(settings.scheduler, scheduler_registry, host="127.0.0.1", port=0,
                                      state_dir=settings.node.state_dir)
    agent: Agent | None = None
    http: RunningHttp | None = None
    session: aiohttp.ClientSession | None = None
    try:
        agent = Agent(settings, scheduler.url, metrics=metrics, facts=await node_facts(),
                      worker_command=worker_command, slots=slots)
        await agent.start()
        http = await start_http(agent.view, agent.client, settings, port=0)
        session = aiohttp.ClientSession()
        await asyncio.wait_for(agent.identity.registered_event.wait(), settings.worker.start_timeout_s + 30)
        yield AgentStack(settings, agent, registry, metrics, scheduler, scheduler_registry, http, session)
    finally:
        if session is not None:
            await session.close()
        if agent is not None:
            await agent.drain(0)
            await agent.stop()
        if http is not None:
            await http.stop()
        await scheduler.stop()


def long_audio(repeat: int = 6) -> bytes:
    """About 11 s x ``repeat`` of real speech as raw pcm_s16le: several seconds to decode on a CPU."""
    audio, _ = joined(["jfk.flac"] * repeat, pause_s=0.5)
    return pcm16(audio)
