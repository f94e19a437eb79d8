"""The agent's Prometheus metrics, from real events: a real job through a real in-process agent and embedded
scheduler, a real timeout, real lease losses against a real scheduler; and the names the rules and the
dashboard use exist.

Every test builds fresh ``CollectorRegistry`` objects and asserts with ``registry.get_sample_value``.
The in-process agent harness is tests/stack.py.
"""

from __future__ import annotations

import tempfile
import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from stack import agent_stack, eventually, long_audio
from helpers import clip
from node_agent.scheduler_client import SchedulerClient
from node_agent.config import LeaseSettings, SchedulerSettings
from node_agent.errors import LeaseLost
from node_agent.lease import Lease, LeaseKeeper
from node_agent.metrics import JOB_OUTCOMES, LEASE_LOST_REASONS, AgentMetrics
from node_agent.scheduler.metrics import SchedulerMetrics
from node_agent.scheduler.server import Running, start_scheduler
from node_agent.supervisor import RESTART_REASONS, WorkerState

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules" / "node-agent.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "node-agent.json"

pytestmark = pytest.mark.timeout(180)


# ----- a real job through the real agent ------------------------------------------------------------------------


async def test_a_real_job_is_counted_everywhere(tmp_path: Path) -> None:
    async with agent_stack(tmp_path) as s:
        worker = s.agent.workers["cpu/0"]
        assert worker.state is WorkerState.ready, worker.last_error
        asr = {"model": "tiny.en", "device": "cpu/0"}
        # Series known to exist are exported at 0 before anything happens.
        for outcome in JOB_OUTCOMES:
            assert s.sample("node_agent_jobs_total", outcome=outcome) == 0.0, outcome
        assert s.sample("node_agent_asr_audio_seconds_total", **asr) == 0.0
        assert s.sample("node_agent_registered") == 1.0

        job_id = await s.submit_file(clip("jfk.flac"), filename="jfk.flac")
        view = await s.wait_job(job_id)
        assert view["state"] == "succeeded", view
        await s.wait_counted("succeeded")

        assert s.sample("node_agent_asr_segment_conversion_seconds_count", **asr) == 1.0
        assert s.sample("node_agent_asr_segment_conversion_seconds_sum", **asr) > 0
        assert s.sample("node_agent_asr_transcribe_call_seconds_count", **asr) == 1.0
        assert s.sample("node_agent_asr_realtime_factor_count", **asr) == 1.0
        assert s.sample("node_agent_asr_realtime_factor_sum", **asr) > 0
        assert s.sample("node_agent_asr_audio_seconds_total", **asr) == pytest.approx(11.0, abs=0.1)
        segments = s.sample("node_agent_asr_segments_total", **asr)
        assert segments is not None and segments >= 1
        assert segments == len(view["segments"])
        assert s.sample("node_agent_asr_segment_decode_seconds_count", **asr) == segments
        for outcome in JOB_OUTCOMES:
            want = 1.0 if outcome == "succeeded" else 0.0
            assert s.sample("node_agent_jobs_total", outcome=outcome) == want, outcome
        assert s.sample("node_agent_job_duration_seconds_count") == 1.0
        assert s.sample("node_agent_job_queue_wait_seconds_count") == 1.0
        assert s.sample("node_agent_jobs_in_progress") == 0.0
        assert s.sample("node_agent_worker_up", device="cpu/0") == 1.0
        assert s.sample("node_agent_worker_state", device="cpu/0", state="ready") == 1.0
        assert s.sample("node_agent_worker_state", device="cpu/0", state="busy") == 0.0
        assert s.sample("node_agent_worker_model_load_seconds", device="cpu/0") > 0
        assert s.sample("node_agent_worker_jobs_served", device="cpu/0") == 1.0
        assert s.sample("node_agent_lease_acquire_duration_seconds_count", device="cpu/0") == 1.0
        assert s.sample("node_agent_leases_held", device="cpu/0") == 0.0
        for reason in RESTART_REASONS:
            assert s.sample("node_agent_worker_restarts_total", device="cpu/0", reason=reason) == 0.0, reason
        assert s.sample("node_agent_scheduler_requests_total", endpoint="result", code="200") == 1.0
        # The scheduler counted the same job on its own registry.
        assert s.scheduler_registry.get_sample_value("node_agent_scheduler_jobs_total",
                                                     {"outcome": "succeeded"}) == 1.0

        # The /metrics endpoint exposes the same values, with the scrape-time RSS filled in.
        async with s.session.get(s.http.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert re.search(r'^node_agent_asr_segment_conversion_seconds_count\{device="cpu/0",model="tiny.en"\} 1\.0$',
                         text, re.M), text[:2000]
        rss = re.search(r'^node_agent_worker_resident_memory_bytes\{device="cpu/0"\} (\S+)$', text, re.M)
        assert rss is not None and float(rss.group(1)) > 50 * 2**20


async def test_a_job_past_its_deadline_is_stopped_and_counted_as_a_timeout_not_a_restart(tmp_path: Path) -> None:
    # Stopped at the next segment boundary (one 30 s window at most): a 15 s grace holds that on a loaded machine.
    async with agent_stack(tmp_path, scheduler={"max_attempts": 1}, worker={"stop_grace_s": 15}) as s:
        worker = s.agent.workers["cpu/0"]
        old_pid = worker.pid
        # ~270 s of speech takes ~12 s here (a CPU several times faster would still need well over 1.5 s); the
        # job may take 1.5 s, so it is stopped either way and a longer clip costs nothing. Greedy at one
        # temperature: a window is one pass (no beam, no fallback), so the boundary after the deadline comes soon.
        job_id = await s.submit_json(long_audio(24), format="pcm_s16le", sample_rate=16000, deadline_s=1.5,
                                     options={"beam_size": 1, "temperature": 0.0})
        view = await s.wait_job(job_id)
        assert view["state"] == "failed" and view["error"]["code"] == "timeout", view
        await s.wait_counted("timeout")

        for reason in RESTART_REASONS:  # a job stopped at its deadline costs no restart
            assert s.sample("node_agent_worker_restarts_total", device="cpu/0", reason=reason) == 0.0, reason
        for outcome in JOB_OUTCOMES:
            want = 1.0 if outcome == "timeout" else 0.0
            assert s.sample("node_agent_jobs_total", outcome=outcome) == want, outcome
        # Nothing was transcribed to the end, so no conversion was observed (absent, or declared at 0).
        assert s.sample("node_agent_asr_segment_conversion_seconds_count", model="tiny.en", device="cpu/0") in (None, 0.0)
        assert s.sample("node_agent_asr_audio_seconds_total", model="tiny.en", device="cpu/0") == 0.0
        await eventually(lambda: worker.state is WorkerState.ready, 60, "the worker is ready again")
        assert worker.pid == old_pid
        assert s.sample("node_agent_worker_up", device="cpu/0") == 1.0
        status = s.agent.view.status()
        assert status["totals"]["timeout"] == 1
        assert status["recent_failures"][0]["code"] == "timeout"


# ----- lease losses against a real scheduler --------------------------------------------------------------------

CPU_DEVICE = {"resource": "cpu", "plugin": "asr", "model": "tiny.en", "compute_type": "int8", "languages": ["en"]}


@dataclass
class LeasedJob:
    """A node registered over HTTP, one job assigned to it, and its lease on ``cpu`` held by ``keeper``."""

    running: Running
    scheduler_registry: CollectorRegistry
    registry: CollectorRegistry
    keeper: LeaseKeeper
    lease: Lease
    settings: LeaseSettings
    stopped: bool = False

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"device": "cpu", **labels})

    async def stop_scheduler(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.running.stop()


@contextlib.asynccontextmanager
async def leased_job(ttl_s: float) -> AsyncIterator[LeasedJob]:
    registry, scheduler_registry = CollectorRegistry(), CollectorRegistry()
    metrics = AgentMetrics(registry=registry)
    metrics.declare_device("cpu", "tiny.en")
    running = await start_scheduler(SchedulerSettings(), scheduler_registry, host="127.0.0.1", port=0,
                                    state_dir=Path(tempfile.mkdtemp(prefix="scheduler-")))
    client = SchedulerClient(running.url, None, 2.0, metrics)
    case: LeasedJob | None = None
    try:
        reply = await client.register({"node_id": None, "agent_version": "test", "hostname": "lease-test",
                                       "hardware": {"cpu_cores": 2, "memory_bytes": 1 << 30, "gpus": []},
                                       "devices": [CPU_DEVICE]})
        async with aiohttp.ClientSession() as session:
            async with session.post(running.url + "/v1/jobs",
                                    json={"audio_b64": base64.b64encode(clip("jfk.flac")).decode()}) as resp:
                submitted = await resp.json()
                assert resp.status == 202, submitted
        assignment = await client.next_job(reply.node_id, 5.0, "cpu")
        assert assignment is not None and assignment.job_id == submitted["job_id"]
        settings = LeaseSettings(ttl_s=ttl_s)
        keeper = LeaseKeeper(client, settings, metrics, "cpu")
        lease = await keeper.acquire(reply.node_id, assignment.job_id)
        assert lease.ttl_s == pytest.approx(ttl_s)
        case = LeasedJob(running, scheduler_registry, registry, keeper, lease, settings)
        yield case
    finally:
        await client.close()
        if case is None or not case.stopped:
            await running.stop()


async def test_renewals_keep_the_lease_then_an_unreachable_scheduler_self_fences() -> None:
    loop = asyncio.get_running_loop()
    lost: list[tuple[float, LeaseLost]] = []
    async with leased_job(ttl_s=1.0) as c:
        async with c.keeper.hold(c.lease, on_lost=lambda e: lost.append((loop.time(), e))):
            # Three TTLs: without renewals the scheduler would have expired the lease twice over.
            await asyncio.sleep(3.0)
            assert not lost, lost
            server_lease = await c.running.store.lease_state(c.lease.lease_id)
            assert server_lease is not None and server_lease["state"] == "active"
            ok = c.sample("node_agent_lease_renewals_total", result="ok")
            assert ok is not None and ok >= 5, ok
            assert c.sample("node_agent_lease_margin_seconds_count") >= 1
            # The margin is the TTL left when a renewal came back: positive and below the TTL.
            margin_sum = c.sample("node_agent_lease_margin_seconds_sum")
            assert 0 < margin_sum / c.sample("node_agent_lease_margin_seconds_count") < 1.0
            assert c.sample("node_agent_lease_renewals_total", result="failed") == 0.0
            assert c.lease.renewals == ok
            renewed = c.scheduler_registry.get_sample_value("node_agent_scheduler_leases_renewed_total",
                                                            {"node_id": server_lease["node_id"]})
            assert renewed is not None and renewed >= ok

            await c.stop_scheduler()
            await eventually(lambda: lost, 3.0, "on_lost called after the scheduler went away")
            await asyncio.sleep(0.5)  # on_lost fires at most once
        assert len(lost) == 1
        at, error = lost[0]
        assert isinstance(error, LeaseLost) and error.reason == "self_fenced", error
        assert error.code == "lease_lost" and c.lease.lease_id in error.message
        # Fenced once the renew deadline passed, and before the scheduler's TTL would have run out.
        since = at - c.lease.renewed_at
        assert c.settings.timing(c.lease.ttl_s)[1] - 0.05 <= since < c.lease.ttl_s, since
        assert c.sample("node_agent_lease_lost_total", reason="self_fenced") == 1.0
        for reason in LEASE_LOST_REASONS:
            if reason != "self_fenced":
                assert c.sample("node_agent_lease_lost_total", reason=reason) == 0.0, reason
        assert c.sample("node_agent_lease_renewals_total", result="failed") >= 1
        assert c.sample("node_agent_lease_renewals_total", result="ok") == ok


@pytest.mark.parametrize("how, reason", [("released", "rejected"), ("expired", "expired")])
async def test_a_410_on_renewal_stops_the_job_with_the_reason(how: str, reason: str) -> None:
    lost: list[LeaseLost] = []
    async with leased_job(ttl_s=3.0) as c:
        async with c.keeper.hold(c.lease, on_lost=lost.append):
            if how == "released":
                # Someone else (an operator, a confused retry) gave the lease back.
                async with aiohttp.ClientSession() as session:
                    async with session.delete(f"{c.running.url}/v1/leases/{c.lease.lease_id}") as resp:
                        assert resp.status == 204
            else:
                # The scheduler's view: the lease ran out (a paused node, a clock step on the scheduler).
                store = c.running.store
                await store.engine.run(lambda tx: tx.execute(
                    "UPDATE leases SET expires_at = 0 WHERE lease_id = $1", c.lease.lease_id))
                await store.reap()
                server_lease = await store.lease_state(c.lease.lease_id)
                assert server_lease is not None and server_lease["state"] == "expired"
            await eventually(lambda: lost, c.settings.timing(c.lease.ttl_s)[0] + 2.0, "on_lost after a 410 renewal")
            await asyncio.sleep(0.3)
        assert len(lost) == 1
        assert lost[0].reason == reason, lost[0]
        assert f"lease_{how}" in lost[0].message
        assert c.sample("node_agent_lease_lost_total", reason=reason) == 1.0
        for other in LEASE_LOST_REASONS:
            if other != reason:
                assert c.sample("node_agent_lease_lost_total", reason=other) == 0.0, other
        assert c.sample("node_agent_lease_renewals_total", result="failed") == 1.0
        assert c.sample("node_agent_lease_renewals_total", result="ok") == 0.0


# ----- the names the rules and the dashboard use exist ----------------------------------------------------------


def exported_names() -> set[str]:
    """Every metric name the agent and the scheduler export (histograms by base name, counters with _total)."""
    agent = CollectorRegistry()
    AgentMetrics(registry=agent)
    scheduler = CollectorRegistry()
    SchedulerMetrics(scheduler, lambda: (0, {}))
    names: set[str] = set()
    for registry in (agent, scheduler):
        for family in registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# A whole identifier: not part of a recording rule name (level:metric:operations) or a longer word.
_OUR_NAME = re.compile(r"(?<![\w:])node_agent_\w+(?![\w:])")


def project_metric_names(expr: str) -> set[str]:
    """``node_agent_*`` metric names in a PromQL expression, histogram series by their base name."""
    names = set()
    for name in _OUR_NAME.findall(_QUOTED.sub('""', expr)):
        names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    return names


def test_project_metric_names_extraction() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(node_agent_asr_realtime_factor_bucket{job="node_agent_x"}[5m])))'
            " / instance:node_agent_jobs:rate5m + node_agent_jobs_total")
    assert project_metric_names(expr) == {"node_agent_asr_realtime_factor", "node_agent_jobs_total"}


def _rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [(rule.get("alert") or rule.get("record") or "?", str(rule["expr"]))
            for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            title = node.get("title", where)
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append((str(title), value))
                else:
                    walk(value, str(title))
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8")), "dashboard")
    return found


@pytest.mark.parametrize("path, exprs", [(RULES, _rule_exprs), (DASHBOARD, _dashboard_exprs)],
                         ids=["rules", "dashboard"])
def test_every_metric_used_by_rules_and_dashboard_is_exported(path: Path,
                                                              exprs: Callable[[], list[tuple[str, str]]]) -> None:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} does not exist yet")
    exported = exported_names()
    # The registries really were read: a sample of names from both sides.
    assert {"node_agent_jobs_total", "node_agent_asr_segment_conversion_seconds",
            "node_agent_scheduler_jobs_total", "node_agent_scheduler_queue_depth"} <= exported
    used: dict[str, list[str]] = {}
    for where, expr in exprs():
        for name in project_metric_names(expr):
            used.setdefault(name, []).append(where)
    assert used, f"{path.name}: no node_agent_* metric found in any expression"
    unknown = {name: places for name, places in used.items() if name not in exported}
    assert not unknown, f"{path.name} uses metrics nobody exports: {unknown}"
