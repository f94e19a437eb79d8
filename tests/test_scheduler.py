"""The scheduler: its SQL store under a fake clock (SQLite in memory, reaped as the server does), and its HTTP API over
real loopback sockets on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

import aiohttp
import asyncpg
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
    EventsReport,
    RenewRequest,
    ResultReport,
)
from node_agent.scheduler.errors import (
    LeaseUnusable,
    NodeNotFound,
    QueueFull,
    ReportRejected,
    TooLarge,
    UnknownJob,
    Unservable,
)
from node_agent.scheduler.bodies import sanitize_filename
from node_agent.scheduler.server import serve, start_scheduler
from node_agent.scheduler.rules import QUEUE_FULL_RETRY_S
from node_agent.scheduler.sqlstore import SqlStore
from node_agent.scheduler.store import open_store

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


#: Fake time passes in steps of at most this, each followed by a reaping pass (as the server reaps every 0.25 s):
#: a longer gap between passes is a store outage, whose time the store gives back to the live leases.
REAP_STEP_S = 0.5


class Clocked:
    """The SQL store on SQLite in memory (``scheduler.store: memory``, the store production runs on a file) under
    a fake clock, reaped as the server does: the timing tests drive the store the scheduler runs."""

    def __init__(self, store: SqlStore, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.settings = store.settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def submit(self, spec: JobSpec, audio: bytes = AUDIO, idempotency_key: str | None = None) -> Any:
        """Submit, then reap at once (the server's next pass comes within 0.25 s): the job's id as ``.job_id``."""
        upload = await self.store.begin_upload()
        await upload.write(audio)
        job_id, state, _ = await self.store.submit(spec, upload, idempotency_key=idempotency_key)
        await self.store.reap()
        return SimpleNamespace(job_id=job_id, state=state)

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of fake time pass, reaping as the server does."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + REAP_STEP_S)
            await self.store.reap()

    async def lease_is(self, lease_id: str) -> str:
        row = await self.store.lease_state(lease_id)
        assert row is not None
        return str(row["state"])

    async def audio(self, job_id: str) -> bytes:
        _, chunks = await self.store.job_audio(job_id)
        return b"".join([chunk async for chunk in chunks])


@contextlib.asynccontextmanager
async def clocked(**overrides: Any) -> AsyncIterator[tuple[Clocked, FakeClock, CollectorRegistry]]:
    clock = FakeClock()
    registry = CollectorRegistry()
    store = await open_store(SchedulerSettings(**{"store": "memory", **overrides}), registry, None,
                             lambda topic: None, clock=clock)
    try:
        yield Clocked(store, clock), clock, registry
    finally:
        await store.close()


async def register(state: Clocked, devices: list[dict[str, Any]] | None = None, node_id: str | None = None) -> str:
    req = RegisterRequest(
        node_id=node_id,
        agent_version="0.1.0",
        hostname="host-a",
        hardware=Hardware(**HARDWARE),
        devices=[DeviceSpec(**d) for d in (devices or [CPU_EN])],
    )
    return (await state.register(req)).node_id


async def take(
    state: Clocked, node_id: str, resource: str = "cpu", ttl_s: float = 10.0
) -> tuple[JobAssignment, LeaseGrant]:
    assignment = await state.assign_next(node_id)
    assert assignment is not None
    grant = await state.grant_lease(LeaseRequest(node_id=node_id, job_id=assignment.job_id, resource=resource,
                                                 ttl_s=ttl_s))
    return assignment, grant


def report(
    node_id: str, attempt: int, grant: LeaseGrant, outcome: str = "succeeded", code: str | None = None
) -> ResultReport:
    """A result as the holder of ``grant`` sends it (its lease id and epoch)."""
    holder = {"node_id": node_id, "lease_id": grant.lease_id, "attempt": attempt, "lease_epoch": grant.epoch}
    if outcome == "succeeded":
        return ResultReport.model_validate({**holder, "outcome": "succeeded", "result": {"text": "hi"}})
    return ResultReport.model_validate({**holder, "outcome": "failed", "error": {"code": code, "message": "boom"}})


def events(node_id: str, attempt: int, grant: LeaseGrant, *segments: dict[str, Any]) -> EventsReport:
    return EventsReport.model_validate(
        {
            "node_id": node_id,
            "lease_id": grant.lease_id,
            "attempt": attempt,
            "lease_epoch": grant.epoch,
            "events": list(segments),
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

    async def result(
        self, job_id: str, node_id: str, attempt: int, grant: dict[str, Any], **fields: Any
    ) -> tuple[int, Any]:
        """Report as the holder of ``grant`` (its lease id and epoch); ``fields`` override any of the body."""
        body = {
            "node_id": node_id,
            "lease_id": grant["lease_id"],
            "attempt": attempt,
            "lease_epoch": grant["epoch"],
            "outcome": "succeeded",
        }
        body.update(fields)
        if body["outcome"] == "succeeded":
            body.setdefault("result", {"text": "hello world", "language": "en", "duration_s": 2.0, "segments": []})
        status, reply, _ = await self.call("POST", f"/v1/jobs/{job_id}/result", json=body)
        return status, reply

    async def events(
        self, job_id: str, node_id: str, attempt: int, grant: dict[str, Any], *segments: dict[str, Any]
    ) -> tuple[int, Any]:
        body = {
            "node_id": node_id,
            "lease_id": grant["lease_id"],
            "attempt": attempt,
            "lease_epoch": grant["epoch"],
            "events": list(segments),
        }
        status, reply, _ = await self.call("POST", f"/v1/jobs/{job_id}/events", json=body)
        return status, reply

    async def renew(self, lease_id: str, node_id: str, epoch: int) -> tuple[int, Any]:
        status, reply, _ = await self.call(
            "POST", f"/v1/leases/{lease_id}/renew", json={"node_id": node_id, "epoch": epoch}
        )
        return status, reply

    async def job(self, job_id: str, **params: Any) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"/v1/jobs/{job_id}", params=params)
        assert status == 200, body
        return body

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


#: The store the HTTP tests' schedulers use; every such test runs on SQLite (the default) and on PostgreSQL, there
#: with the single-statement forms of the hot operations (production's way) and without (the general path alone).
_STORE: dict[str, Any] = {"url": "sqlite", "single_statements": True}
STORE_KINDS = ["sqlite", "postgresql", "postgresql-general"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scheduler(" in inspect.getsource(metafunc.function):
        metafunc.parametrize("store_kind", STORE_KINDS, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(autouse=True)
def store_url(request: pytest.FixtureRequest, store_kind: str) -> Iterator[str]:
    kind = store_kind
    _STORE["url"] = request.getfixturevalue("pg_dsn") if kind.startswith("postgresql") else "sqlite"
    _STORE["single_statements"] = kind != "postgresql-general"
    yield _STORE["url"]
    _STORE.update(url="sqlite", single_statements=True)


@contextlib.asynccontextmanager
async def scheduler(**overrides: Any) -> AsyncIterator[Harness]:
    settings = SchedulerSettings(**{"store": _STORE["url"], **overrides})
    if _STORE["url"].startswith("postgresql"):  # each harness starts from an empty store, as on SQLite
        conn = await asyncpg.connect(_STORE["url"])
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.close()
    registry = CollectorRegistry()
    state_dir = Path(tempfile.mkdtemp(prefix="scheduler-"))  # the default store: scheduler.db there
    running = await start_scheduler(settings, registry, host="127.0.0.1", port=0, state_dir=state_dir,
                                    single_statements=_STORE["single_statements"])
    headers = {"Authorization": f"Bearer {settings.token.get_secret_value()}"} if settings.token else {}
    session = aiohttp.ClientSession(headers=headers)
    try:
        yield Harness(running, session, registry)
    finally:
        await session.close()
        await running.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ state (pure)


async def test_epochs_grow_and_stale_reports_are_fenced() -> None:
    async with clocked() as (state, clock, registry):
        node = await register(state)
        for _ in range(3):
            await state.submit(JobSpec(), AUDIO)
        a1, first = await take(state, node)
        assert first.epoch == 1
        await state.report_result(a1.job_id, report(node, 1, first))
        a2, second = await take(state, node)
        assert second.epoch == 2
        # Asking again for the same job supersedes the older lease: only the newest epoch may report.
        third = await state.grant_lease(LeaseRequest(node_id=node, job_id=a2.job_id, resource="cpu", ttl_s=10))
        assert third.epoch == 3
        with pytest.raises(LeaseUnusable) as exc:
            await state.renew_lease(second.lease_id, RenewRequest(node_id=node, epoch=2))
        assert exc.value.code == "lease_superseded"
        with pytest.raises(ReportRejected) as rejected:
            await state.report_result(a2.job_id, report(node, 1, second))
        assert rejected.value.code == "stale_epoch"
        assert registry.get_sample_value("node_agent_scheduler_results_rejected_total", {"reason": "stale_epoch"}) == 1
        # Another node's first lease continues the one sequence.
        gpu_node = await register(state, [GPU_ANY])
        _, gpu = await take(state, gpu_node, resource="gpu:0")
        assert gpu.epoch == 4


async def test_epochs_strictly_increase_across_nodes_and_resources() -> None:
    """One sequence for the whole scheduler: an epoch is never granted twice, whatever the node or resource."""
    async with clocked() as (state, _, _):
        nodes = [await register(state, [CPU_EN, GPU_ANY]), await register(state, [CPU_EN, GPU_ANY])]
        for _ in range(8):
            await state.submit(JobSpec(), AUDIO)
        epochs: list[int] = []
        for _round in range(2):
            grants: list[tuple[str, JobAssignment, LeaseGrant]] = []
            for resource in ("gpu:0", "cpu"):
                for node in reversed(nodes) if resource == "cpu" else nodes:
                    assignment = await state.assign_next(node, resource)
                    assert assignment is not None and assignment.resource == resource
                    req = LeaseRequest(node_id=node, job_id=assignment.job_id, resource=resource, ttl_s=10)
                    grant = await state.grant_lease(req)
                    epochs.append(grant.epoch)
                    grants.append((node, assignment, grant))
            for node, assignment, grant in grants:
                await state.report_result(assignment.job_id, report(node, assignment.attempt, grant))
        assert len(epochs) == 8
        assert all(a < b for a, b in zip(epochs, epochs[1:])), epochs


async def test_a_superseded_lease_on_another_resource_cannot_report() -> None:
    """Gap (a): the job leased on cpu, then leased again on gpu:0. The cpu lease's (attempt, epoch) used to be
    accepted, because gpu:0 counted its own epochs from 1 and results named no lease."""
    async with clocked() as (state, clock, registry):
        node = await register(state, [CPU_EN, GPU_ANY])
        job = await state.submit(JobSpec(), AUDIO)
        assignment = await state.assign_next(node, "cpu")
        assert assignment is not None
        old = await state.grant_lease(LeaseRequest(node_id=node, job_id=job.job_id, resource="cpu", ttl_s=10))
        new = await state.grant_lease(LeaseRequest(node_id=node, job_id=job.job_id, resource="gpu:0", ttl_s=10))
        assert new.epoch > old.epoch and await state.lease_is(old.lease_id) == "superseded"  # type: ignore[union-attr]
        with pytest.raises(ReportRejected) as rejected:
            await state.report_result(job.job_id, report(node, 1, old))
        assert rejected.value.code == "stale_epoch" and f"lease_id {old.lease_id}" in rejected.value.message
        # Even the old epoch under the new lease's id is refused: every field must match.
        mixed = LeaseGrant(lease_id=new.lease_id, epoch=old.epoch, ttl_s=10, resource="gpu:0")
        with pytest.raises(ReportRejected, match=f"lease_epoch {old.epoch} "):
            await state.report_result(job.job_id, report(node, 1, mixed))
        with pytest.raises(ReportRejected):
            await state.post_events(job.job_id, events(node, 1, old, {"id": 1, "start": 0.0, "end": 1.0, "text": " old"}))
        with pytest.raises(LeaseUnusable) as renewal:
            await state.renew_lease(old.lease_id, RenewRequest(node_id=node, epoch=old.epoch))
        assert renewal.value.code == "lease_superseded"
        assert (await state.view_job(job.job_id)).state == "running" and (await state.view_job(job.job_id)).segments == []
        assert registry.get_sample_value("node_agent_scheduler_results_rejected_total", {"reason": "stale_epoch"}) == 2
        # The old lease's TTL passing changes nothing; the live lease still reports.
        await state.advance(5)
        assert not (await state.report_result(job.job_id, report(node, 1, new))).duplicate
        assert (await state.view_job(job.job_id)).state == "succeeded"
        # The old lease's report after the job finished is still not a "duplicate" of the accepted one.
        with pytest.raises(ReportRejected) as late:
            await state.report_result(job.job_id, report(node, 1, old))
        assert late.value.code == "already_completed"


async def test_events_and_results_from_another_node_are_refused_and_leave_nothing() -> None:
    """Gap (b): events from a node other than the holder, with the holder's attempt, lease and epoch."""
    async with clocked() as (state, _, registry):
        holder, other = await register(state), await register(state)
        job = await state.submit(JobSpec(), AUDIO)
        assignment, grant = await take(state, holder)
        with pytest.raises(ReportRejected) as rejected:
            await state.post_events(job.job_id, events(other, 1, grant, {"id": 1, "start": 0.0, "end": 1.0, "text": " fake"}))
        assert rejected.value.code == "stale_epoch" and f"node_id {other}" in rejected.value.message
        assert (await state.view_job(job.job_id)).segments == []
        with pytest.raises(ReportRejected, match=f"node_id {other}"):
            await state.report_result(job.job_id, report(other, 1, grant))
        real = {"id": 1, "start": 0.0, "end": 1.0, "text": " real"}
        await state.post_events(job.job_id, events(holder, 1, grant, real))
        # The holder's result carries no segments, so the streamed ones are the job's: only the holder's.
        await state.report_result(job.job_id, report(holder, 1, grant))
        view = (await state.view_job(job.job_id))
        assert (view.state, view.node_id, view.segments) == ("succeeded", holder, [real])
        # And the holder's accepted report, repeated by the other node, is no duplicate of it.
        with pytest.raises(ReportRejected) as late:
            await state.report_result(job.job_id, report(other, 1, grant))
        assert late.value.code == "already_completed"
        assert registry.get_sample_value("node_agent_scheduler_results_rejected_total", {"reason": "stale_epoch"}) == 1


async def test_a_renewal_from_another_node_is_refused_and_does_not_extend_the_lease() -> None:
    """Gap (c): the holder's lease id and epoch, renewed in another node's name."""
    async with clocked(lease_min_ttl_s=1.0) as (state, clock, registry):
        holder, other = await register(state), await register(state)
        job = await state.submit(JobSpec(), AUDIO)
        _, grant = await take(state, holder, ttl_s=5)
        await state.advance(4)
        with pytest.raises(LeaseUnusable) as refused:
            await state.renew_lease(grant.lease_id, RenewRequest(node_id=other, epoch=grant.epoch))
        assert refused.value.code == "stale_epoch" and f"node_id {other}" in refused.value.message
        assert not registry.get_sample_value("node_agent_scheduler_leases_renewed_total", {"node_id": holder})
        await state.advance(1.1)  # past the TTL counted from the grant: the refused renewal did not extend it
        await state.reap()
        assert await state.lease_is(grant.lease_id) == "expired"  # type: ignore[union-attr]
        assert ((await state.view_job(job.job_id)).state, (await state.view_job(job.job_id)).attempt) == ("queued", 2)


async def test_expiry_requeues_until_max_attempts_then_fails_lease_expired(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    async with clocked(max_attempts=2, lease_min_ttl_s=1.0) as (state, clock, registry):
        node = await register(state)
        job = await state.submit(JobSpec(), AUDIO)
        a1, l1 = await take(state, node, ttl_s=5)
        await state.advance(4)
        await state.renew_lease(l1.lease_id, RenewRequest(node_id=node, epoch=l1.epoch))
        await state.advance(4.9)
        await state.reap()
        assert (await state.view_job(job.job_id)).state == "running"  # the renewal pushed expiry to now + ttl
        await state.advance(0.2)
        await state.reap()
        view = (await state.view_job(job.job_id))
        assert (view.state, view.attempt, view.segments) == ("queued", 2, [])
        with pytest.raises(LeaseUnusable) as exc:
            await state.renew_lease(l1.lease_id, RenewRequest(node_id=node, epoch=l1.epoch))
        assert exc.value.code == "lease_expired"
        a2, l2 = await take(state, node, ttl_s=5)
        assert (a2.attempt, l2.epoch) == (2, 2)
        await state.advance(6)
        view = (await state.view_job(job.job_id))  # no tick: every call applies what fell due first
        assert view.state == "failed" and view.error is not None and view.error.code == "lease_expired"
        with pytest.raises(ReportRejected) as late:
            await state.report_result(job.job_id, report(node, 2, l2))
        assert late.value.code == "already_completed"
        sample = registry.get_sample_value
        assert sample("node_agent_scheduler_leases_expired_total", {"node_id": node}) == 2
        assert sample("node_agent_scheduler_jobs_requeued_total", {"reason": "lease_expired"}) == 1
        assert sample("node_agent_scheduler_jobs_total", {"outcome": "lease_expired"}) == 1
        assert sample("node_agent_scheduler_leases_renewed_total", {"node_id": node}) == 1
        assert f"lease expired lease_id={l1.lease_id} node_id={node}" in caplog.text
        assert f"job requeued job_id={job.job_id} reason=lease_expired" in caplog.text
        assert f"job finished job_id={job.job_id} outcome=lease_expired attempt=2" in caplog.text


async def test_node_gone_expires_its_leases_and_requeues_its_jobs() -> None:
    async with clocked(heartbeat_interval_s=5, node_gone_after_heartbeats=3) as (state, clock, registry):
        node = await register(state)
        other = await register(state)
        leased = await state.submit(JobSpec(), AUDIO)
        assigned = await state.submit(JobSpec(), AUDIO)
        _, grant = await take(state, node, ttl_s=60)
        assert await state.assign_next(node) is not None  # assigned, never leased
        await state.advance(10)
        await state.heartbeat(other, HeartbeatRequest(state="ready"))
        await state.advance(5)
        await state.reap()
        nodes = {n.node_id: n.state for n in (await state.list_nodes()).nodes}
        assert nodes == {node: "gone", other: "ready"}
        assert (await state.view_job(leased.job_id)).state == "queued"
        assert (await state.view_job(assigned.job_id)).attempt == 2
        assert await state.lease_is(grant.lease_id) == "expired"  # type: ignore[union-attr]
        with pytest.raises(NodeNotFound):
            await state.heartbeat(node, HeartbeatRequest(state="ready"))
        assert registry.get_sample_value("node_agent_scheduler_jobs_requeued_total", {"reason": "node_gone"}) == 2
        assert registry.get_sample_value("node_agent_scheduler_leases_expired_total", {"node_id": node}) == 1
        assert registry.get_sample_value("node_agent_scheduler_nodes", {"state": "gone"}) == 1
        assert registry.get_sample_value("node_agent_scheduler_queue_depth") == 2
        assert await register(state, node_id=node) == node  # re-registering brings it back
        assert {n.node_id: n.state for n in (await state.list_nodes()).nodes}[node] == "ready"


async def test_a_store_pause_is_given_back_to_leases_and_to_heartbeats() -> None:
    """No reaping pass for a while means no scheduler reached the store: no holder could renew, no node could send
    a heartbeat. The first pass after it gives that time back to both, so neither is lost for it (a scheduler
    restarted mid-job, a PostgreSQL outage); then time counts again."""
    async with clocked(heartbeat_interval_s=5, node_gone_after_heartbeats=3) as (state, clock, _):
        node = await register(state)
        job = await state.submit(JobSpec(), AUDIO)
        _, grant = await take(state, node, ttl_s=10)
        await state.advance(4)
        clock.now += 30  # the pause: no pass, no renewal, no heartbeat for 30 s
        await state.reap()
        assert await state.lease_is(grant.lease_id) == "active"
        assert {n.node_id: n.state for n in (await state.list_nodes()).nodes}[node] == "ready"
        await state.post_events(job.job_id, events(node, 1, grant, {"id": 0, "start": 0.0, "end": 1.0, "text": " on"}))
        await state.advance(6.5)  # 10.5 s of the lease's live time since its grant, 10.5 s since the registration
        assert await state.lease_is(grant.lease_id) == "expired"
        await state.advance(5)  # 15.5 s without a heartbeat outside the pause
        assert {n.node_id: n.state for n in (await state.list_nodes()).nodes}[node] == "gone"


async def test_release_requeues_deadline_fails_queued_job_and_retention_forgets() -> None:
    async with clocked(job_retention_s=60, max_attempts=3) as (state, clock, registry):
        node = await register(state)
        job = await state.submit(JobSpec(), AUDIO)
        _, grant = await take(state, node)
        await state.release_lease(grant.lease_id)
        await state.release_lease(grant.lease_id)  # idempotent
        assert ((await state.view_job(job.job_id)).state, (await state.view_job(job.job_id)).attempt) == ("queued", 2)
        assert registry.get_sample_value("node_agent_scheduler_jobs_requeued_total", {"reason": "released"}) == 1
        late = await state.submit(JobSpec(deadline_s=5), AUDIO)
        await state.advance(6)
        view = (await state.view_job(late.job_id))
        assert view.state == "failed" and view.error is not None and view.error.code == "timeout"
        await state.advance(60)
        await state.reap()
        with pytest.raises(Exception, match="not known"):
            (await state.view_job(late.job_id))
        assert (await state.view_job(job.job_id)).state == "queued"


async def test_retryable_failure_at_max_attempts_is_terminal() -> None:
    async with clocked(max_attempts=2) as (state, _, registry):
        node = await register(state)
        job = await state.submit(JobSpec(), AUDIO)
        a1, l1 = await take(state, node)
        assert (await state.report_result(job.job_id, report(node, 1, l1, "failed", "worker_crashed"))).requeued
        a2, l2 = await take(state, node)
        ack = await state.report_result(job.job_id, report(node, 2, l2, "failed", "worker_crashed"))
        assert not ack.requeued
        view = (await state.view_job(job.job_id))
        assert view.state == "failed" and view.error is not None and view.error.code == "worker_crashed"
        # The first report, retried after the job moved on, still gets its original answer.
        again = await state.report_result(job.job_id, report(node, 1, l1, "failed", "worker_crashed"))
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
        await h.running.store.refresh_gauges()  # what a /metrics scrape does first
        assert h.metric("node_agent_scheduler_nodes", state="busy") == 1
        assert h.metric("node_agent_scheduler_nodes", state="ready") == 1
        assert h.metric("node_agent_scheduler_nodes", state="draining") == 0
    assert f"node registered node_id={node} hostname=a devices=cpu" in caplog.text


@pytest.mark.asyncio
async def test_node_listing_is_paged_in_node_id_order() -> None:
    async with scheduler() as h:
        ids = sorted([await h.register(node_id=f"n-{i:02d}") for i in range(7)])
        seen, after, pages = [], None, 0
        while True:
            params = {"limit": "3", **({"after": after} if after else {})}
            status, page, _ = await h.call("GET", "/v1/nodes", params=params)
            assert status == 200 and len(page["nodes"]) <= 3, page
            seen += [n["node_id"] for n in page["nodes"]]
            pages += 1
            after = page["next_after"]
            if after is None:
                break
        assert (seen, pages) == (ids, 3)
        status, whole, _ = await h.call("GET", "/v1/nodes")  # the default page holds them all
        assert [n["node_id"] for n in whole["nodes"]] == ids and whole["next_after"] is None
        for bad in ({"limit": "x"}, {"after": "a\x00b"}):
            status, reply, _ = await h.call("GET", "/v1/nodes", params=bad)
            assert status == 400 and reply["error"]["message"].startswith(next(iter(bad))), reply


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
        status, _ = await h.result(first, node, 1, grant)
        assert status == 200
        status, grant2, _ = await h.lease(node, second)
        assert status == 201 and grant2["epoch"] == 2  # one sequence for the whole scheduler, never reset
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
            status, reply = await h.renew(lease_id, node, epoch)
            assert status == 200 and reply == {"lease_id": lease_id, "epoch": epoch, "ttl_s": 0.6}
        status, reply = await h.renew(lease_id, node, epoch + 1)
        assert status == 410 and reply["error"]["code"] == "stale_epoch"
        assert (await h.job(job))["state"] == "running"
        assert h.metric("node_agent_scheduler_leases_renewed_total", node_id=node) == 4
        status, _, _ = await h.call("DELETE", f"/v1/leases/{lease_id}")
        assert status == 204
        status, _, _ = await h.call("DELETE", f"/v1/leases/{lease_id}")
        assert status == 204
        status, reply = await h.renew(lease_id, node, epoch)
        assert status == 410 and reply["error"]["code"] == "lease_released"
        status, reply = await h.renew("lease-nope", node, 1)
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
        status, reply = await h.renew(grant["lease_id"], node, grant["epoch"])
        assert status == 410 and reply["error"]["code"] == "lease_expired"
        view = await h.job(job)
        assert (view["state"], view["attempt"], view["node_id"]) == ("queued", 2, None)
        status, reply = await h.result(job, node, 1, grant)
        assert status == 409 and reply["error"]["code"] == "stale_attempt"
        status, reply = await h.events(job, node, 1, grant, {"id": 0, "start": 0, "end": 1, "text": ""})
        assert status == 409 and reply["error"]["code"] == "stale_attempt"
        status, assignment = await h.poll(node)
        assert assignment["attempt"] == 2
        _, grant2, _ = await h.lease(node, job)
        assert grant2["epoch"] == grant["epoch"] + 1
        status, reply = await h.result(job, node, 2, grant)
        assert status == 409 and reply["error"]["code"] == "stale_epoch"
        status, reply = await h.result(job, node, 2, grant2)
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
        status, reply = await h.events(job, node, 1, grant, *segments)
        assert status == 202
        assert (await h.job(job))["segments"] == segments
        status, reply = await h.result(job, node, 1, grant, timings={"decode_s": 0.5})
        assert status == 200 and reply["accepted"] is True and reply["duplicate"] is False
        status, reply = await h.result(job, node, 1, grant, timings={"decode_s": 0.5})
        assert status == 200 and reply["accepted"] is True and reply["duplicate"] is True
        status, reply = await h.result(job, node, 1, grant, lease_epoch=grant["epoch"] + 5)
        assert status == 409 and reply["error"]["code"] == "already_completed"
        view = await h.job(job)
        assert view["state"] == "succeeded" and view["result"]["text"] == "hello world"
        assert view["timings"]["node"] == {"decode_s": 0.5} and "total_s" in view["timings"]
        assert h.metric("node_agent_scheduler_jobs_total", outcome="succeeded") == 1
        assert h.metric("node_agent_scheduler_results_rejected_total", reason="already_completed") == 1
        # Accepting the result released the lease.
        status, reply = await h.renew(grant["lease_id"], node, grant["epoch"])
        assert status == 410 and reply["error"]["code"] == "lease_released"


@pytest.mark.asyncio
async def test_retryable_failure_requeues_and_input_failure_is_terminal() -> None:
    async with scheduler() as h:
        node = await h.register()
        job = await h.submit()
        await h.poll(node)
        _, grant, _ = await h.lease(node, job)
        status, reply = await h.result(
            job, node, 1, grant, outcome="failed", error={"code": "worker_crashed", "message": "signal 11"}
        )
        assert status == 200 and reply["requeued"] is True
        assert h.metric("node_agent_scheduler_jobs_requeued_total", reason="retryable_error") == 1
        status, assignment = await h.poll(node)
        assert assignment["attempt"] == 2
        _, grant, _ = await h.lease(node, job)
        status, reply = await h.result(
            job, node, 2, grant, outcome="failed", error={"code": "bad_audio", "message": "not audio"}
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
        status, reply = await h.renew(grant["lease_id"], node, grant["epoch"])
        assert status == 410 and reply["error"]["code"] == "lease_expired"
        assert (await h.job(job))["state"] == "queued"
        assert await h.register(node_id=node) == node
        assert h.metric("node_agent_scheduler_jobs_requeued_total", reason="node_gone") == 1


@pytest.mark.asyncio
async def test_http_epochs_strictly_increase_across_nodes_and_resources() -> None:
    async with scheduler() as h:
        nodes = [await h.register([CPU_EN, GPU_ANY]), await h.register([CPU_EN, GPU_ANY])]
        for _ in range(4):
            await h.submit()
        epochs = []
        for node, resource in [(nodes[0], "cpu"), (nodes[1], "gpu:0"), (nodes[1], "cpu"), (nodes[0], "gpu:0")]:
            status, assignment = await h.poll(node, resource=resource)
            assert status == 200, assignment
            status, grant, _ = await h.lease(node, assignment["job_id"], resource=resource)
            assert status == 201, grant
            epochs.append(grant["epoch"])
        assert epochs == sorted(set(epochs)) and len(epochs) == 4, epochs


@pytest.mark.asyncio
async def test_http_superseded_lease_on_another_resource_cannot_report() -> None:
    """Gap (a) over HTTP: after the job is leased again on gpu:0, the cpu lease's report is refused."""
    async with scheduler() as h:
        node = await h.register([CPU_EN, GPU_ANY])
        job = await h.submit()
        assert (await h.poll(node, resource="cpu"))[0] == 200
        _, old, _ = await h.lease(node, job, resource="cpu")
        status, new, _ = await h.lease(node, job, resource="gpu:0")
        assert status == 201 and new["epoch"] > old["epoch"]
        status, reply = await h.result(job, node, 1, old)
        assert status == 409 and reply["error"]["code"] == "stale_epoch"
        assert f"lease_id {old['lease_id']}" in reply["error"]["message"]
        status, reply = await h.events(job, node, 1, old, {"id": 1, "start": 0.0, "end": 1.0, "text": " old"})
        assert status == 409 and reply["error"]["code"] == "stale_epoch"
        status, reply = await h.renew(old["lease_id"], node, old["epoch"])
        assert status == 410 and reply["error"]["code"] == "lease_superseded"
        assert (await h.job(job))["segments"] == []
        status, reply = await h.result(job, node, 1, new)
        assert status == 200 and reply["duplicate"] is False
        view = await h.job(job)
        assert view["state"] == "succeeded" and view["segments"] == []
        assert h.metric("node_agent_scheduler_results_rejected_total", reason="stale_epoch") == 1


@pytest.mark.asyncio
async def test_http_events_and_results_from_another_node_are_refused() -> None:
    """Gap (b) over HTTP: another node with the holder's attempt, lease and epoch gets 409 and leaves nothing."""
    async with scheduler() as h:
        holder, other = await h.register(), await h.register()
        job = await h.submit()
        assert (await h.poll(holder))[0] == 200
        _, grant, _ = await h.lease(holder, job)
        fake = {"id": 1, "start": 0.0, "end": 1.0, "text": " fake"}
        status, reply = await h.events(job, other, 1, grant, fake)
        assert status == 409 and reply["error"]["code"] == "stale_epoch"
        assert f"node_id {other}" in reply["error"]["message"]
        status, reply = await h.result(job, other, 1, grant)
        assert status == 409 and f"node_id {other}" in reply["error"]["message"]
        status, reply = await h.result(job, holder, 1, grant, result={"text": "real", "segments": []})
        assert status == 200 and reply["duplicate"] is False
        view = await h.job(job)
        assert (view["state"], view["node_id"], view["segments"]) == ("succeeded", holder, [])
        assert view["result"]["text"] == "real"
        # The holder's body, resent in the other node's name, is no duplicate of the accepted report.
        status, reply = await h.result(job, other, 1, grant, result={"text": "real", "segments": []})
        assert status == 409 and reply["error"]["code"] == "already_completed"


@pytest.mark.asyncio
async def test_http_renewal_from_another_node_is_refused() -> None:
    """Gap (c) over HTTP: the holder's lease id and epoch, renewed in another node's name, answer 410."""
    async with scheduler() as h:
        holder, other = await h.register(), await h.register()
        job = await h.submit()
        assert (await h.poll(holder))[0] == 200
        _, grant, _ = await h.lease(holder, job)
        status, reply = await h.renew(grant["lease_id"], other, grant["epoch"])
        assert status == 410 and reply["error"]["code"] == "stale_epoch"
        assert f"node_id {other}" in reply["error"]["message"]
        assert not h.metric("node_agent_scheduler_leases_renewed_total", node_id=holder)
        status, reply, _ = await h.call("POST", f"/v1/leases/{grant['lease_id']}/renew", json={"epoch": grant["epoch"]})
        assert status == 400 and "node_id" in reply["error"]["message"]  # required: protocol 1 has no anonymous renewal
        status, reply = await h.renew(grant["lease_id"], holder, grant["epoch"])
        assert status == 200 and h.metric("node_agent_scheduler_leases_renewed_total", node_id=holder) == 1


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

        watcher = asyncio.create_task(h.job(job, wait_s=10, after_segment=1))
        await asyncio.sleep(0.1)
        assert not watcher.done()
        event = {"id": 0, "start": 0.0, "end": 0.5, "text": "你好"}
        await h.events(job, node, 1, grant, event)
        assert not watcher.done()  # one segment is not more than after_segment=1
        event2 = {"id": 1, "start": 0.5, "end": 1.0, "text": "世界"}
        await h.events(job, node, 1, grant, event2)
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
        status, _ = await h.events(job, node, assignment["attempt"], grant, *segments)
        assert status == 202
    status, reply = await h.result(job, node, assignment["attempt"], grant, **outcome)
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
async def test_stop_wakes_long_polls_at_once(tmp_path: Path) -> None:
    settings = SchedulerSettings()
    running = await start_scheduler(settings, host="127.0.0.1", port=0, state_dir=tmp_path)
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
async def test_serve_logs_its_url_and_stops_on_sigterm(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.scheduler")
    server = asyncio.create_task(serve(SchedulerSettings(listen="127.0.0.1:0"), tmp_path))
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
        await h.events(job, node, assignment["attempt"], grant, segment)
        async with h.session.get(f"{h.url}/v1/jobs/{job}") as resp:
            raw = await resp.read()
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert "广州市房地产".encode() in raw and b"\\u" not in raw, raw
        assert json.loads(raw)["segments"][0]["text"] == "广州市房地产"
        # A lone surrogate (sent as an escape) cannot be UTF-8: the answer falls back to escapes, still JSON.
        odd = {"id": 2, "start": 1.0, "end": 2.0, "text": "a\ud800b"}
        await h.events(job, node, assignment["attempt"], grant, odd)
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
async def test_port_in_use_is_one_line_naming_the_key(tmp_path: Path) -> None:
    from node_agent.errors import ListenError

    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ListenError) as exc:
            await start_scheduler(SchedulerSettings(), host="127.0.0.1", port=port, state_dir=tmp_path)
        assert str(exc.value) == f"cannot listen on 127.0.0.1:{port} (scheduler.listen): address already in use"
    finally:
        busy.close()
        await busy.wait_closed()


# ------------------------------------------------------------------ bounded, and fails fast (issue 14)

ZH_ONLY = {"resource": "gpu:0", "plugin": "asr", "model": "base", "compute_type": "float16", "languages": ["zh"]}
ZH_REFUSAL = "no live node serves language 'zh' (nodes serve: en with tiny.en); run a node with asr.model: base"


async def test_queue_bounds_refuse_past_either_cap_and_a_finished_job_frees_its_place() -> None:
    async with clocked(max_queued_jobs=2, max_queued_bytes=4096) as (state, _, registry):
        node = await register(state)
        first = await state.submit(JobSpec(), bytes(1000))
        await state.submit(JobSpec(), bytes(1000))
        with pytest.raises(QueueFull) as exc:
            await state.submit(JobSpec(), bytes(10))
        assert exc.value.code == "queue_full" and exc.value.retry_after_s == QUEUE_FULL_RETRY_S
        assert exc.value.message == "queue full: 2 unfinished jobs reach scheduler.max_queued_jobs (2); retry later"
        # Running jobs still hold their audio, so they count until they finish.
        assignment, grant = await take(state, node)
        assert assignment.job_id == first.job_id
        with pytest.raises(QueueFull):
            await state.submit(JobSpec(), bytes(10))
        await state.report_result(first.job_id, report(node, 1, grant))
        third = await state.submit(JobSpec(), bytes(2000))
        with pytest.raises(QueueFull):
            await state.submit(JobSpec(), bytes(1))  # 2 unfinished again
        state.settings.max_queued_jobs = 10
        with pytest.raises(QueueFull) as exc:
            await state.submit(JobSpec(), bytes(1100))
        assert exc.value.message == (
            "queue full: 3000 bytes of unfinished jobs' audio and this job's 1100 would pass "
            "scheduler.max_queued_bytes (4096); retry later"
        )
        assert (await state.submit(JobSpec(), bytes(1096))).job_id  # exactly at the cap fits
        with pytest.raises(TooLarge, match=r"audio of 5000 bytes is over scheduler.max_queued_bytes \(4096\)"):
            await state.submit(JobSpec(), bytes(5000))  # could never fit: 413, not a retry
        assert registry.get_sample_value("node_agent_scheduler_jobs_refused_total", {"reason": "queue_full"}) == 4
        assert registry.get_sample_value("node_agent_scheduler_unfinished_jobs") == 3
        assert registry.get_sample_value("node_agent_scheduler_unfinished_audio_bytes") == 1000 + 2000 + 1096
        assert (await state.view_job(third.job_id)).state == "queued"


async def test_finished_audio_is_dropped_unless_keep_audio_and_jobs_get_the_default_deadline() -> None:
    for keep in (False, True):
        # The node sends no heartbeats: with this interval it stays live (and the job servable) the whole test.
        async with clocked(keep_audio=keep, default_deadline_s=100, heartbeat_interval_s=120) as (state, clock, _):
            node = await register(state)
            job = await state.submit(JobSpec(), AUDIO)
            await state.advance(4)
            assignment, grant = await take(state, node)
            assert assignment.deadline_s == 96  # no deadline given: scheduler.default_deadline_s from submission
            assert await state.audio(job.job_id) == AUDIO
            await state.report_result(job.job_id, report(node, 1, grant))
            if keep:
                assert await state.audio(job.job_id) == AUDIO
            else:
                with pytest.raises(UnknownJob, match="audio was dropped"):
                    await state.job_audio(job.job_id)
            # A queued job without a deadline times out after the default, and reports its real time in the queue.
            waiting = await state.submit(JobSpec(language="en"), AUDIO)
            await state.advance(100)
            view = (await state.view_job(waiting.job_id))
            assert view.state == "failed" and view.error is not None and view.error.code == "timeout"
            assert view.timings["queued_s"] == 100.0


async def test_a_job_no_live_node_serves_is_refused_at_submit_with_what_to_change() -> None:
    async with clocked() as (state, _, registry):
        # No node yet (the embedded scheduler starts before its agent registers): queued, not refused.
        early = await state.submit(JobSpec(language="zh"), AUDIO)
        assert (await state.view_job(early.job_id)).state == "queued"
        await register(state, [CPU_EN])
        with pytest.raises(Unservable) as exc:
            await state.submit(JobSpec(language="zh"), AUDIO)
        assert (exc.value.code, exc.value.message, exc.value.param) == ("no_capable_node", ZH_REFUSAL, "language")
        assert await state.submit(JobSpec(language="en"), AUDIO) and await state.submit(JobSpec(), AUDIO)  # en, and detect
        await register(state, [CPU_EN, GPU_ANY])  # a multilingual device serves every language
        assert await state.submit(JobSpec(language="zh"), AUDIO)
        assert registry.get_sample_value("node_agent_scheduler_jobs_refused_total", {"reason": "no_capable_node"}) == 1
        assert registry.get_sample_value("node_agent_scheduler_jobs_refused_total", {"reason": "queue_full"}) == 0


async def test_a_queued_job_whose_last_capable_node_went_fails_after_unservable_after_s() -> None:
    # Nodes are gone 15 s after their last heartbeat (5 s x 3).
    async with clocked(unservable_after_s=60, heartbeat_interval_s=5, node_gone_after_heartbeats=3) as (state, clock, registry):
        start = clock.now
        ja = await state.submit(JobSpec(language="ja"), AUDIO)  # no node now, and none that comes serves it
        zh = await state.submit(JobSpec(language="zh"), AUDIO)
        await state.advance(50)
        en_node = await register(state, [CPU_EN])
        await register(state, [ZH_ONLY])  # serves zh in time; never heartbeats, so it is gone at 65 s
        await state.advance(5)
        await state.heartbeat(en_node, HeartbeatRequest(state="ready"))
        await state.advance(5)  # 60 s
        view = (await state.view_job(ja.job_id))
        assert view.state == "failed" and view.error is not None and view.error.code == "no_capable_node", view
        assert view.error.message == (
            "queued 60 s without a capable node (scheduler.unservable_after_s: 60): no live node serves language 'ja' "
            "(nodes serve: en with tiny.en, zh with base); run a node with asr.model: base"
        )
        assert view.timings["queued_s"] == 60.0
        await state.advance(5)  # 65 s: the zh node is found gone; its job has no capable node from now on
        assert (await state.view_job(zh.job_id)).state == "queued"
        await state.advance(59)
        assert (await state.view_job(zh.job_id)).state == "queued"
        await state.advance(1)
        view = (await state.view_job(zh.job_id))
        assert view.state == "failed" and view.error is not None and view.error.code == "no_capable_node", view
        # The en node went too (no heartbeat since 55 s): no node is live at all now.
        assert view.error.message == (
            "queued 60 s without a capable node (scheduler.unservable_after_s: 60): no live node serves language 'zh' "
            "(no node is live); run a node with asr.model: base"
        )
        assert view.timings["queued_s"] == clock.now - start
        assert registry.get_sample_value("node_agent_scheduler_jobs_total", {"outcome": "no_capable_node"}) == 2


async def test_a_running_job_whose_node_went_is_requeued_then_fails_unservable_and_servable_jobs_wait() -> None:
    async with clocked(unservable_after_s=60, heartbeat_interval_s=5, node_gone_after_heartbeats=3) as (state, clock, _):
        zh_node = await register(state, [ZH_ONLY])
        en_node = await register(state, [CPU_EN])
        zh = await state.submit(JobSpec(language="zh"), AUDIO)
        await take(state, zh_node, resource="gpu:0")
        en = await state.submit(JobSpec(language="en"), AUDIO)  # servable the whole time: it waits, however long
        for _ in range(20):  # 100 s; only the en node heartbeats
            await state.advance(5)
            await state.heartbeat(en_node, HeartbeatRequest(state="busy"))
        zh_view = (await state.view_job(zh.job_id))
        assert zh_view.state == "failed" and zh_view.error is not None and zh_view.error.code == "no_capable_node"
        assert "(nodes serve: en with tiny.en)" in zh_view.error.message and zh_view.attempt == 2
        assert (await state.view_job(en.job_id)).state == "queued"


@pytest.mark.asyncio
async def test_http_queue_full_is_429_with_retry_after_on_both_apis() -> None:
    async with scheduler(max_queued_jobs=1, max_queued_interactive_jobs=1, max_queued_bytes=4096) as h:
        await h.submit(bytes(3000))
        status, reply, headers = await h.call("POST", "/v1/jobs", json={"audio_b64": "AAAA"})
        assert status == 429 and reply["error"]["code"] == "queue_full", reply
        assert reply["error"]["message"] == "queue full: 1 unfinished jobs reach scheduler.max_queued_jobs (1); " \
                                            "retry later"
        assert headers["Retry-After"] == str(QUEUE_FULL_RETRY_S)
        # The OpenAI endpoint's jobs are interactive, with a cap of their own (issue 23): fill that one too.
        await h.submit(priority="interactive")
        status, reply, headers = await asyncio.wait_for(_transcribe(h), 2)  # refused at once, not waited on
        assert status == 429 and reply["error"]["code"] == "queue_full" and headers["Retry-After"]
        assert reply["error"]["type"] == "invalid_request_error"
    async with scheduler(max_queued_bytes=4096) as h:
        await h.submit(bytes(3000))
        form = aiohttp.FormData()
        form.add_field("file", bytes(2000), filename="a.wav")
        status, reply, headers = await h.call("POST", "/v1/jobs", data=form)
        assert status == 429 and "scheduler.max_queued_bytes (4096)" in reply["error"]["message"], reply
        assert headers["Retry-After"] == str(QUEUE_FULL_RETRY_S)
        status, reply, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(bytes(5000)).decode()})
        assert status == 413 and reply["error"]["code"] == "too_large", reply
        assert reply["error"]["message"] == "audio of 5000 bytes is over scheduler.max_queued_bytes (4096)"
        assert h.metric("node_agent_scheduler_jobs_refused_total", reason="queue_full") == 1
        async with h.session.get(h.url + "/metrics") as resp:
            text = await resp.text()
        assert "node_agent_scheduler_unfinished_audio_bytes 3000.0" in text
        assert "node_agent_scheduler_unfinished_jobs 1.0" in text


@pytest.mark.asyncio
async def test_http_no_capable_node_is_422_at_once_on_both_apis() -> None:
    async with scheduler() as h:
        queued = await h.submit(language="zh")  # no node registered yet: queued as before
        assert (await h.job(queued))["state"] == "queued"
        await h.register([CPU_EN])
        status, reply, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": "AAAA", "language": "zh"})
        assert status == 422 and reply["error"] == {"code": "no_capable_node", "message": ZH_REFUSAL}, reply
        started = time.monotonic()
        status, reply, _ = await asyncio.wait_for(_transcribe(h, language="zh"), 2)
        assert time.monotonic() - started < 2
        assert status == 422 and reply["error"]["code"] == "no_capable_node", reply
        assert reply["error"]["message"] == ZH_REFUSAL and reply["error"]["param"] == "language"
        assert reply["error"]["type"] == "invalid_request_error"
        assert h.metric("node_agent_scheduler_jobs_refused_total", reason="no_capable_node") == 2


def _nested(levels: int) -> dict[str, Any]:
    """A JSON object nesting ``levels`` containers deep (the object itself is the first)."""
    value: Any = 0
    for _ in range(levels - 1):
        value = [value]
    return {"deep": value}


@pytest.mark.asyncio
async def test_nested_json_past_the_limit_is_400_on_every_json_endpoint() -> None:
    from node_agent.scheduler.bodies import MAX_JSON_DEPTH

    endpoints = [
        ("POST", "/v1/nodes"),
        ("PUT", "/v1/nodes/node-x/heartbeat"),
        ("POST", "/v1/leases"),
        ("POST", "/v1/leases/lease-x/renew"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/jobs/job-x/events"),
        ("POST", "/v1/jobs/job-x/result"),
    ]
    too_deep = [b"[" * 100_000, json.dumps(_nested(MAX_JSON_DEPTH + 1)).encode()]
    async with scheduler() as h:
        for method, path in endpoints:
            for body in too_deep:
                status, reply, _ = await h.call(method, path, data=body, headers={"Content-Type": "application/json"})
                assert status == 400 and reply["error"]["code"] == "invalid_request", (path, reply)
                assert reply["error"]["message"] == f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
            # At the limit the depth is fine: the body is refused (or not) for what it holds.
            status, reply, _ = await h.call(method, path, json=_nested(MAX_JSON_DEPTH))
            assert status != 500 and "nested deeper" not in json.dumps(reply), (path, reply)
        form = aiohttp.FormData()
        form.add_field("file", AUDIO, filename="a.wav")
        form.add_field("options", "[" * 100_000)
        status, reply, _ = await h.call("POST", "/v1/jobs", data=form)
        assert status == 400 and reply["error"]["code"] == "invalid_request", reply
        assert reply["error"]["message"] == f"options is nested deeper than {MAX_JSON_DEPTH} levels"


@pytest.mark.asyncio
async def test_non_finite_segment_times_are_refused_where_they_arrive() -> None:
    async with scheduler() as h:
        node = await h.register([GPU_ANY])
        job = await h.submit()
        _, assignment = await h.poll(node)
        _, grant, _ = await h.lease(node, job, resource="gpu:0")
        attempt = assignment["attempt"]
        good = {"id": 1, "start": 0.0, "end": 1.0, "text": " fine"}
        for bad in ({**good, "start": float("nan")}, {**good, "end": float("inf")}, {**good, "start": -float("inf")}):
            status, reply = await h.events(job, node, attempt, grant, bad)
            assert status == 400 and reply["error"]["code"] == "invalid_request", reply
            assert "finite" in reply["error"]["message"], reply
            result = {"text": "x", "segments": [bad]}
            status, reply = await h.result(job, node, attempt, grant, result=result)
            assert status == 400 and "finite" in reply["error"]["message"], reply
        status, reply = await h.result(job, node, attempt, grant, result={"text": "x", "duration_s": float("nan")})
        assert status == 400 and "duration_s" in reply["error"]["message"], reply
        assert (await h.events(job, node, attempt, grant, good))[0] == 202
        status, reply = await h.result(job, node, attempt, grant, result={"text": " fine", "segments": [good]})
        assert status == 200, reply
        assert (await h.job(job))["segments"] == [good]


def test_subtitle_formats_never_fail_on_odd_times() -> None:
    odd = [
        {"id": 1, "start": float("nan"), "end": float("inf"), "text": "a"},
        {"id": 2, "start": -3.0, "end": 1e308, "text": "b"},
        {"id": 3, "text": "c"},  # no times at all
        {"id": 4, "start": "1.5", "end": None, "text": "d"},
    ]
    srt = to_srt(odd)
    assert "1\n00:00:00,000 --> 00:00:00,000\na\n" in srt
    assert "2\n00:00:00,000 --> 99:59:59,999\nb\n" in srt
    assert to_vtt(odd).count("00:00:00.000 --> ") == 4
    from node_agent.scheduler.formats import to_verbose_json

    assert json.dumps(to_verbose_json({"text": "abcd"}, odd), allow_nan=False)  # every time finite


def test_memoized_content_disposition_parser_answers_as_aiohttps_own() -> None:
    """The scheduler swaps aiohttp's per-part Content-Disposition parser for a memoized one (a CPU cost per job):
    same answers, including for malformed headers, and callers never share a params dict."""
    import warnings

    import aiohttp.multipart

    from node_agent.scheduler import bodies

    installed = aiohttp.multipart.parse_content_disposition  # memoized already if a scheduler ran in this process
    original = bodies.parse_content_disposition  # aiohttp's own, as imported before any swap
    headers = ['form-data; name="file"; filename="a b.wav"', 'form-data; name="format"', None, "",
               "attachment; filename*=UTF-8''%E2%82%AC.wav", 'form-data; name="x"; name="y"', "garbage;;;"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = [original(h) for h in headers]
            bodies.memoize_multipart_dispositions()
            bodies.memoize_multipart_dispositions()  # idempotent
            memoized = aiohttp.multipart.parse_content_disposition
            assert memoized is bodies._reader_parse_disposition
            for header, want in zip(headers, expected):
                first, again = memoized(header), memoized(header)
                assert first == again == want, header
                first[1]["mutated"] = "1"
                assert "mutated" not in memoized(header)[1]
    finally:
        aiohttp.multipart.parse_content_disposition = installed
