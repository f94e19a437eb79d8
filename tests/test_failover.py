"""Clients ride through a scheduler that fails: an agent given several scheduler URLs fails over between them (two
real schedulers, the first stopped mid-run; two "replicas" of one scheduler, one cut mid-job), ``node-agent
submit`` and ``/utterance`` retry through 503s and lost answers without creating a second job (the
``Idempotency-Key``), a job a restarted scheduler lost is one line, and ``scheduler.url`` takes a list.

Real schedulers and a real agent on loopback; the worker is the scripted stand-in plugin (tests/fake_plugin.py),
since decoding is not what is tested here. The chaos proxy (tests/chaos_proxy.py) makes the 503s and lost answers.
"""

from __future__ import annotations

import tempfile
import argparse
import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry

from chaos_proxy import ChaosProxy
from conftest import make_settings
from fake_plugin import command as fake_command
from node_agent.agent import Agent
from node_agent.scheduler_client import SchedulerClient
from node_agent.config import SchedulerSettings, load_settings
from node_agent.errors import ConfigError, SchedulerUnreachable
from node_agent.http_api import start_http
from node_agent.metrics import AgentMetrics
from node_agent.retry import RetryPolicies, RetryPolicy
from node_agent.scheduler.schemas import JobSpec
from node_agent.scheduler.server import Running, start_scheduler
from node_agent.submit import submit_files
from node_agent.cli import build_parser
from stack import agent_stack, eventually
from test_scheduler import clocked
from procs import free_port

pytestmark = pytest.mark.timeout(120)

#: Quick retries (the production values are tested in test_retry); totals as in production where they matter.
FAST = RetryPolicies(**{name: RetryPolicy(initial_s=0.05, max_wait_s=0.3, max_total_s=total) for name, total in
                        {"register": None, "heartbeat": 2.0, "poll": None, "audio": 5.0, "lease_acquire": 5.0,
                         "lease_release": 1.0, "events": 2.0, "result": 30.0}.items()})
FACTS: dict[str, Any] = {"cuda_device_count": 0, "gpus": [], "compute_types": {}}
AUDIO = b"\x00\x01" * 8000  # the stand-in plugin does not look at it



async def scheduler() -> Running:
    return await start_scheduler(make_settings().scheduler, CollectorRegistry(), host="127.0.0.1", port=0,
                                 state_dir=Path(tempfile.mkdtemp(prefix="scheduler-")))


@contextlib.asynccontextmanager
async def agent_on(urls: list[str], tmp_path: Path, job: dict[str, Any],
                   **sections: dict[str, Any]) -> AsyncIterator[tuple[Agent, CollectorRegistry]]:
    """A real agent (stand-in plugin following ``job``) given ``urls`` as its ``scheduler.url``; yields once it
    has registered."""
    settings = make_settings(node={"state_dir": str(tmp_path / "state")}, scheduler={"url": ",".join(urls)},
                             **sections)
    registry = CollectorRegistry()
    agent = Agent(settings, metrics=AgentMetrics(registry), facts=dict(FACTS), policies=FAST,
                  worker_command=fake_command(job=job))
    try:
        await agent.start()
        await asyncio.wait_for(agent.identity.registered_event.wait(), 60)
        yield agent, registry
    finally:
        await agent.drain(0)
        await agent.stop()


async def submit(url: str) -> str:
    async with SchedulerClient(url, None, 5.0) as client:
        return (await client.submit_job(AUDIO, format="pcm_s16le", sample_rate=16000)).job_id


async def finished(url: str, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    async with SchedulerClient(url, None, 5.0) as client:
        while True:
            view = await client.get_job(job_id, wait_s=min(5.0, max(0.0, give_up - loop.time())))
            if view.state in ("succeeded", "failed") or loop.time() >= give_up:
                return view.model_dump()


# ----- an agent with several scheduler URLs -----------------------------------------------------------------------


async def test_an_agent_fails_over_to_the_second_scheduler_when_the_first_stops(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    first, second = await scheduler(), await scheduler()
    try:
        async with agent_on([first.url, second.url], tmp_path, {"segments": 2}) as (agent, registry):
            node_id = agent.identity.node_id
            assert agent.client.base_url == first.url
            assert [n.node_id for n in (await first.store.list_nodes()).nodes] == [node_id]
            view = await finished(first.url, await submit(first.url))
            assert view["state"] == "succeeded" and view["node_id"] == node_id, view

            await first.stop()
            # The agent's next call is refused there and goes to the second scheduler, which does not know the
            # node: it registers there, under its persisted id, and takes that scheduler's jobs.
            job_id = await submit(second.url)
            view = await finished(second.url, job_id)
            assert view["state"] == "succeeded" and view["node_id"] == node_id, view
            assert view["result"]["text"] == "segment 1. segment 2."
            assert agent.client.base_url == second.url
            assert registry.get_sample_value("node_agent_scheduler_url_index") == 1
            assert registry.get_sample_value("node_agent_jobs_total", {"outcome": "succeeded"}) == 2
    finally:
        await first.stop()
        await second.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "node_agent.scheduler_client"]
    assert sum(f"switching to {second.url}" in m for m in messages) == 1, messages


async def test_a_running_job_keeps_its_lease_across_a_failover_between_replicas(tmp_path) -> None:
    # Two "replicas" of one scheduler (one state, as replicas on one store share it): a proxy each. The first is
    # cut while a job runs; renewals, events and the result go to the second, and the job finishes as attempt 1.
    running = await scheduler()
    first = await ChaosProxy(running.url).start(free_port())
    second = await ChaosProxy(running.url).start(free_port())
    try:
        job = {"segments": 16, "every_s": 0.25}  # about 4 s: several renewals on either side of the cut
        async with agent_on([first.url, second.url], tmp_path, job, lease={"ttl_s": 3}) as (agent, registry):
            job_id = await submit(running.url)
            async with SchedulerClient(running.url, None, 5.0) as client:
                view = await client.get_job(job_id, wait_s=20, after_segment=0)
            assert view.state == "running" and view.segments, view
            await first.stop()
            view_doc = await finished(running.url, job_id)
            assert view_doc["state"] == "succeeded" and view_doc["attempt"] == 1, view_doc
            assert len(view_doc["result"]["segments"]) == 16
            assert second.forwarded["lease_renew"] >= 1 and second.forwarded["result"] == 1, second.forwarded
            for reason in ("expired", "rejected", "self_fenced"):
                lost = registry.get_sample_value("node_agent_lease_lost_total", {"device": "cpu/0", "reason": reason})
                assert lost in (None, 0.0), reason
            await eventually(lambda: registry.get_sample_value("node_agent_jobs_total", {"outcome": "succeeded"}),
                             10, "the job counted")
            assert agent.client.base_url == second.url
    finally:
        await first.stop()
        await second.stop()
        await running.stop()


# ----- node-agent submit rides through --------------------------------------------------------------------------


def submit_args(scheduler_url: str, path: Path, timeout: float = 60.0) -> argparse.Namespace:
    # Parsed by the command's own parser, so the arguments are every one `node-agent submit` has.
    return build_parser().parse_args(["submit", "--scheduler", scheduler_url, "--timeout", str(timeout), str(path)])


async def test_submit_retries_through_503s_and_a_lost_answer_without_a_second_job(tmp_path, capsys) -> None:
    scheduler_registry = CollectorRegistry()
    running = await start_scheduler(make_settings().scheduler, scheduler_registry, host="127.0.0.1", port=0,
                                    state_dir=tmp_path)
    proxy = await ChaosProxy(running.url).start(free_port())
    clip = tmp_path / "clip.pcm"
    clip.write_bytes(AUDIO)
    try:
        async with agent_on([running.url], tmp_path, {"segments": 2}):
            # 503, then an answer lost after the scheduler created the job, then 503 again; then polls fail twice.
            proxy.inject("job_submit", "503", "garbage", "503")
            proxy.inject("job_view", "503", "500")
            code = await submit_files(submit_args(proxy.url, clip), make_settings())
    finally:
        await proxy.stop()
        await running.stop()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[-1] == "clip.pcm: segment 1. segment 2.", out
    assert err.count("clip.pcm: submitting failed") == 3 and err.count("clip.pcm: polling failed") == 2, err
    # The POST reached the scheduler twice (the lost answer and the last try): one job, the same id both times.
    assert proxy.forwarded["job_submit"] == 2
    assert scheduler_registry.get_sample_value("node_agent_scheduler_jobs_submitted_total") == 1


async def test_a_job_lost_by_a_restarted_scheduler_is_one_line(tmp_path, capsys) -> None:
    port = free_port()
    # The in-memory store: what a restart loses (the default store keeps the job; test_store.py shows that).
    settings = make_settings(scheduler={"store": "memory"}).scheduler
    first = await start_scheduler(settings, CollectorRegistry(), host="127.0.0.1", port=port)
    clip = tmp_path / "clip.pcm"
    clip.write_bytes(AUDIO)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = loop.create_task(submit_files(submit_args(first.url, clip), make_settings()))
    second: Running | None = None
    try:
        await eventually(lambda: first.store.replica.queue_depth_seen == 1, 10, "the job queued")  # no node takes it
        await first.stop()
        await asyncio.sleep(0.3)  # the client's polls are refused meanwhile, and retried
        second = await start_scheduler(settings, CollectorRegistry(), host="127.0.0.1", port=port)
        code = await asyncio.wait_for(task, 30)
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    last = err.splitlines()[-1]
    assert last.startswith(f"node-agent: {clip}: job job-") and last.endswith(
        " is unknown to the scheduler (it restarted and lost it?)"), err
    assert loop.time() - started < 30  # said at once, not after --timeout


async def test_submit_with_no_scheduler_at_any_url_still_fails_at_once(tmp_path, capsys) -> None:
    clip = tmp_path / "clip.pcm"
    clip.write_bytes(AUDIO)
    urls = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SchedulerUnreachable) as failed:
        await submit_files(submit_args(urls, clip), make_settings())
    assert loop.time() - started < 5
    message = str(failed.value)
    assert message.startswith("cannot reach the scheduler at http://127.0.0.1:") and "connection refused" in message
    assert all(f"http://{url}" in message for url in urls.split(",")) and "\n" not in message


# ----- the scheduler's side: Idempotency-Key ------------------------------------------------------------------


async def test_a_retried_post_with_the_same_idempotency_key_returns_the_same_job() -> None:
    running = await scheduler()
    body = {"audio_b64": base64.b64encode(AUDIO).decode(), "format": "pcm_s16le", "sample_rate": 16000}
    try:
        async with aiohttp.ClientSession() as session:
            async def post(payload: dict[str, Any], key: str | None) -> tuple[int, Any, Any]:
                headers = {"Idempotency-Key": key} if key is not None else {}
                async with session.post(running.url + "/v1/jobs", json=payload, headers=headers) as resp:
                    return resp.status, await resp.json(), resp.headers

            status, first, headers = await post(body, "key-1")
            assert status == 202 and "Idempotent-Replayed" not in headers
            status, again, headers = await post(body, "key-1")
            assert status == 202 and again == first and headers["Idempotent-Replayed"] == "true"
            status, other, _ = await post(body, "key-2")
            assert status == 202 and other["job_id"] != first["job_id"]
            status, plain, _ = await post(body, None)  # no key: a new job every time, as before
            assert status == 202 and plain["job_id"] not in (first["job_id"], other["job_id"])
            assert await running.store.queue_depth() == 3

            status, reused, _ = await post({**body, "sample_rate": 8000}, "key-1")
            assert status == 400 and reused["error"]["code"] == "idempotency_key_reused", reused
            assert first["job_id"] in reused["error"]["message"]
            status, bad, _ = await post(body, "x" * 256)
            assert status == 400 and bad["error"]["code"] == "invalid_request", bad
            assert "Idempotency-Key" in bad["error"]["message"]
            assert await running.store.queue_depth() == 3
    finally:
        await running.stop()


async def test_an_idempotency_key_is_remembered_until_its_job_is_forgotten() -> None:
    """A key answers its job for as long as the store keeps the job: scheduler.job_retention_s after it ended."""
    async with clocked(job_retention_s=60) as (state, _, _):
        spec = JobSpec(format="pcm_s16le", sample_rate=16000, deadline_s=1)
        job = await state.submit(spec, AUDIO, idempotency_key="k")
        await state.advance(1)  # no node: the deadline passes while queued, and the job ends
        assert (await state.view_job(job.job_id)).state == "failed"
        await state.advance(59)
        assert (await state.submit(spec, AUDIO, idempotency_key="k")).job_id == job.job_id
        await state.advance(1)
        assert (await state.submit(spec, AUDIO, idempotency_key="k")).job_id != job.job_id


# ----- /utterance rides through -------------------------------------------------------------------------------


async def test_utterance_retries_a_failed_submit_and_says_when_its_job_was_lost(tmp_path) -> None:
    async with agent_stack(tmp_path, worker_command=fake_command(job={"segments": 2})) as s:
        body = {"job_id": "u1", "trace_id": "t1", "src_lang": "en", "sample_rate": 16000,
                "audio": base64.b64encode(AUDIO).decode()}
        # The node's /utterance, its scheduler calls through the chaos proxy: a 503, then an answer lost after the
        # scheduler created the job, then a poll that fails. One job, one transcript.
        proxy = await ChaosProxy(s.scheduler.url).start(free_port())
        client = SchedulerClient(proxy.url, None, 5.0)
        http = await start_http(s.agent.view, client, s.settings, port=0)
        try:
            proxy.inject("job_submit", "503", "garbage")
            proxy.inject("job_view", "500")
            async with s.session.post(http.url + "/utterance", json=body) as resp:
                reply = await resp.json()
            assert resp.status == 200 and reply["text"] == "segment 1. segment 2.", reply
            assert proxy.forwarded["job_submit"] == 2 and proxy.injected[("job_view", "500")] == 1
            assert s.scheduler_registry.get_sample_value("node_agent_scheduler_jobs_submitted_total") == 1
        finally:
            await http.stop()
            await client.close()
            await proxy.stop()

        polls = re.compile(re.escape(f"{s.scheduler.url}/v1/jobs/") + r"[^/?]+(\?.*)?$")
        with aioresponses(passthrough_unmatched=True) as mocked:
            mocked.get(polls, status=404, payload={"error": {"code": "unknown_job", "message": "not known"}})
            async with s.session.post(s.http.url + "/utterance", json=body) as resp:
                reply = await resp.json()
        assert resp.status == 503 and resp.headers["Retry-After"] == "1", reply
        assert reply["error"]["code"] == "unavailable"
        assert reply["error"]["message"].endswith("is unknown to the scheduler (it restarted and lost it?)")


# ----- scheduler.url ------------------------------------------------------------------------------------------


def test_scheduler_url_takes_a_comma_list_or_a_yaml_list_and_refuses_a_bad_url_in_one_line(tmp_path) -> None:
    env = {"NODE_AGENT_SCHEDULER__URL": "http://a:8470/, https://b.example:8470"}
    assert load_settings(None, env).scheduler.url == "http://a:8470,https://b.example:8470"
    config = tmp_path / "node-agent.yaml"
    config.write_text("scheduler:\n  url:\n    - http://a:8470\n    - http://b:8470/\n")
    assert load_settings(config, {}).scheduler.url == "http://a:8470,http://b:8470"
    for bad, why in (("http://a:8470,b:8470", "'b:8470' is not an http(s)://HOST[:PORT] URL"),
                     ("http://a:8470,,http://b:8470", "an empty URL in the list"),
                     ("http://a:8470,http://a:8470", "'http://a:8470' is listed twice"),
                     ("http://a:99999", "is not an http(s)://HOST[:PORT] URL")):
        with pytest.raises(ConfigError) as info:
            load_settings(None, {"NODE_AGENT_SCHEDULER__URL": bad})
        message = str(info.value)
        assert message.startswith("environment NODE_AGENT_SCHEDULER__URL: scheduler.url = ") and why in message
        assert "\n" not in message
    config.write_text("scheduler:\n  url: [http://a:8470, ftp://b]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, {})
    assert str(info.value).startswith(f"{config}: scheduler.url") and "'ftp://b'" in str(info.value)
