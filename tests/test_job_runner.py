"""The job runner, one job at a time: its outcomes against a real scheduler on loopback, and against the failure
shapes a real one rarely produces (aioresponses). The worker is the scripted stand-in plugin process
(tests/fake_plugin.py, through the supervisor's ``command=`` seam): fast, and no timing depends on decoding."""

from __future__ import annotations

from pathlib import Path
import tempfile
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry
from yarl import URL

from conftest import make_settings
from fake_plugin import command as fake_command
from stack import eventually
from node_agent.scheduler_client import SchedulerClient
from node_agent.config import SchedulerSettings
from node_agent.errors import LeaseLost
from node_agent.job_runner import EVENTS_LINGER_S, JobRunner, Report
from node_agent.lease import LeaseKeeper
from node_agent.metrics import AgentMetrics
from node_agent.registration import NodeIdentity
from node_agent.retry import RetryPolicies, RetryPolicy
from node_agent.scheduler.schemas import JobAssignment, LeaseGrant
from node_agent.scheduler.server import Running, start_scheduler
from node_agent.supervisor import Worker, WorkerState, worker_spec

BASE = "http://scheduler.test"
AUDIO = b"\x00\x01" * 8000  # what the fake plugin is handed; it does not look
#: Fast retries, so the failure shapes take milliseconds; the production values are tested in test_retry.
FAST = RetryPolicies(**{name: RetryPolicy(initial_s=0.01, max_wait_s=0.05, max_total_s=total) for name, total in
                        {"register": None, "heartbeat": 2.0, "poll": None, "audio": 2.0, "lease_acquire": 2.0,
                         "lease_release": 1.0, "events": 1.0, "result": 5.0}.items()})


@pytest.fixture
async def fake_worker() -> AsyncIterator[Callable[..., Any]]:
    workers: list[Worker] = []

    async def make(**job: Any) -> Worker:
        """A ready worker running the stand-in plugin; ``job`` is the script every job follows."""
        s = make_settings()
        spec = worker_spec(s.asr, "cpu", 0, log_level="WARNING")
        worker = Worker("cpu", spec, s.worker, s.asr.timeout, command=fake_command(job=job))
        workers.append(worker)
        await worker.start()
        assert await worker.wait_ready(30) is WorkerState.ready, worker.last_error
        return worker

    yield make
    for worker in workers:
        await worker.stop()


@dataclass
class Parts:
    """A runner and what it was built from."""

    runner: JobRunner
    client: SchedulerClient
    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def build(worker: Worker, url: str, node_id: str, lease: dict[str, Any] | None = None) -> Parts:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    metrics.declare_device("cpu", "tiny.en")
    client = SchedulerClient(url, None, 2.0, metrics)
    keeper = LeaseKeeper(client, make_settings(lease=lease or {}).lease, metrics, "cpu", FAST)
    runner = JobRunner(client, keeper, worker, NodeIdentity(node_id=node_id), metrics=metrics, policies=FAST)
    return Parts(runner, client, registry)


# ----- against a real scheduler ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def assigned_job(**scheduler: Any) -> AsyncIterator[tuple[Running, str, JobAssignment]]:
    """A real scheduler on loopback, a node registered with it, and one job assigned to that node."""
    store = Path(tempfile.mkdtemp(prefix="scheduler-"))
    running = await start_scheduler(SchedulerSettings(**scheduler), CollectorRegistry(), host="127.0.0.1", port=0,
                                    state_dir=store)
    client = SchedulerClient(running.url, None, 2.0)
    try:
        reply = await client.register({
            "node_id": None, "agent_version": "test", "hostname": "runner-test",
            "hardware": {"cpu_cores": 2, "memory_bytes": 1 << 30, "gpus": []},
            "devices": [{"resource": "cpu", "plugin": "asr", "model": "tiny.en", "compute_type": "int8",
                         "languages": ["en"]}]})
        form = aiohttp.FormData()
        form.add_field("file", AUDIO, filename="clip.pcm", content_type="application/octet-stream")
        form.add_field("format", "pcm_s16le")
        form.add_field("sample_rate", "16000")
        async with aiohttp.ClientSession() as session:
            async with session.post(running.url + "/v1/jobs", data=form) as resp:
                assert resp.status == 202, await resp.text()
        assignment = await client.next_job(reply.node_id, 5.0, "cpu")
        assert assignment is not None
        yield running, reply.node_id, assignment
    finally:
        await client.close()
        await running.stop()


async def job_view(url: str, job_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/jobs/{job_id}") as resp:
            return await resp.json()


async def test_a_job_succeeds_is_reported_once_and_its_lease_released(fake_worker):
    worker = await fake_worker(segments=4)
    async with assigned_job() as (running, node_id, assignment):
        parts = build(worker, running.url, node_id)
        try:
            outcome = await parts.runner.run(assignment)
            await parts.runner.settle(5.0)
        finally:
            await parts.client.close()
        assert (outcome.job_id, outcome.outcome, outcome.report, outcome.error) == (
            assignment.job_id, "succeeded", Report.accepted, None)
        view = await job_view(running.url, assignment.job_id)
        assert view["state"] == "succeeded" and view["result"]["text"] == "segment 1. segment 2. segment 3. segment 4."
        assert [s["id"] for s in view["result"]["segments"]] == [1, 2, 3, 4]
    assert parts.runner.ledger.totals == {"succeeded": 1} and not parts.runner.ledger.running
    assert parts.sample("node_agent_jobs_total", outcome="succeeded") == 1
    assert parts.sample("node_agent_jobs_in_progress") == 0
    assert parts.sample("node_agent_leases_held", device="cpu") == 0
    # Accepting the result released the lease on the scheduler: no release request, and it is not held here.
    assert parts.sample("node_agent_scheduler_requests_total", endpoint="lease_release", code="204") is None
    assert parts.sample("node_agent_scheduler_requests_total", endpoint="result", code="200") == 1
    assert all(parts.sample("node_agent_retries_total", operation=op) == 0 for op in ("audio", "result", "events"))


async def test_an_option_this_node_does_not_know_fails_the_job_as_invalid_request_without_a_decode(fake_worker):
    """A newer scheduler's option this node cannot apply (the assignment is read all the same): the job fails at
    once with invalid_request naming it, reported under its lease, and the worker never sees it."""
    worker = await fake_worker(segments=1)
    async with assigned_job() as (running, node_id, assignment):
        newer = JobAssignment.model_validate({**assignment.model_dump(mode="json"), "options": {"vad_pad_ms": 3}})
        parts = build(worker, running.url, node_id)
        try:
            outcome = await parts.runner.run(newer)
            await parts.runner.settle(5.0)
        finally:
            await parts.client.close()
        assert (outcome.outcome, outcome.report) == ("invalid_request", Report.accepted), outcome
        view = await job_view(running.url, assignment.job_id)
        assert view["state"] == "failed" and view["error"]["code"] == "invalid_request", view
        assert "vad_pad_ms" in view["error"]["message"]
    assert worker.jobs_served_total == 0


async def test_a_lease_lost_mid_job_stops_it_and_the_stale_report_is_rejected(fake_worker):
    # Slow segments: the job is still decoding when its lease goes.
    worker = await fake_worker(segments=40, every_s=0.1)
    async with assigned_job(lease_min_ttl_s=0.5) as (running, node_id, assignment):
        parts = build(worker, running.url, node_id, lease={"ttl_s": 1.5})
        try:
            task = asyncio.get_running_loop().create_task(parts.runner.run(assignment))
            await eventually(lambda: parts.runner.keeper.current and (worker.current_job or {}).get("segments"),
                             10, "the job is decoding under its lease")
            lease_id = parts.runner.keeper.current.lease_id
            # Someone else gave the lease back: the next renewal gets 410 and the job must stop.
            async with aiohttp.ClientSession() as session:
                async with session.delete(f"{running.url}/v1/leases/{lease_id}") as resp:
                    assert resp.status == 204
            outcome = await asyncio.wait_for(task, 10)
            await parts.runner.settle(5.0)
        finally:
            await parts.client.close()
    assert outcome.outcome == "lease_lost" and isinstance(outcome.error, LeaseLost), outcome
    assert outcome.error.reason == "rejected"
    assert outcome.report is Report.rejected  # the scheduler re-queued the job when the lease went
    assert len(parts.runner.ledger.lease_losses) == 1
    assert parts.runner.ledger.recent_failures[0]["code"] == "lease_lost"
    assert parts.sample("node_agent_jobs_total", outcome="lease_lost") == 1
    assert parts.sample("node_agent_lease_lost_total", device="cpu", reason="rejected") == 1
    assert await worker.wait_ready(30) is WorkerState.ready  # replaced, ready for the next job


class RenewalAnswered(SchedulerClient):
    """The real client, which also says when a renewal's answer is in, so that a test can end a job in that very
    turn of the event loop (the moment a decode that finishes as a renewal answers ends its job)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answered = asyncio.Event()

    async def renew_lease(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().renew_lease(*args, **kwargs)
        self.answered.set()
        return reply


async def test_a_job_ending_as_a_renewal_answers_stops_renewing_its_lease():
    # The hang seen under the PostgreSQL crash test: the job's end cancelled the renewals in the turn their
    # request's answer came in; Python 3.11's wait_for swallowed that cancel, the lease was renewed for ever and
    # the job never got past the end of its decode, with nothing in the log.
    async with assigned_job(lease_min_ttl_s=0.5) as (running, node_id, assignment):
        client = RenewalAnswered(running.url, None, 2.0)
        keeper = LeaseKeeper(client, make_settings(lease={"ttl_s": 0.6}).lease, None, "cpu", FAST)
        lost: list[LeaseLost] = []
        try:
            lease = await keeper.acquire(node_id, assignment.job_id)

            async def job() -> None:
                async with keeper.hold(lease, lost.append):
                    await client.answered.wait()

            ended = asyncio.get_running_loop().create_task(job())
            done, _ = await asyncio.wait({ended}, timeout=5.0)
            if not done:
                ended.cancel()
            assert done, f"the job did not end; its lease renewed {lease.renewals} times meanwhile"
            ended.result()
            renewals = lease.renewals
            await asyncio.sleep(1.0)  # five renewal intervals
            assert lease.renewals == renewals and not lost
        finally:
            await client.close()


# ----- failure shapes (aioresponses) -----------------------------------------------------------------------------

ASSIGNMENT = JobAssignment.model_validate({
    "job_id": "j1", "attempt": 1, "language": None, "options": {}, "deadline_s": None, "queued_s": 0.1,
    "audio": {"format": "pcm_s16le", "sample_rate": 16000, "bytes": len(AUDIO), "url": "/v1/jobs/j1/audio"}})
RESULT = f"{BASE}/v1/jobs/j1/result"


def serve_job(m: aioresponses) -> None:
    """Everything a job needs but its result answer."""
    m.get(f"{BASE}/v1/jobs/j1/audio", status=200, body=AUDIO)
    m.post(f"{BASE}/v1/leases", status=201, payload={"lease_id": "l1", "epoch": 3, "ttl_s": 15, "resource": "cpu"})
    m.post(f"{BASE}/v1/jobs/j1/events", status=202, repeat=True)
    m.delete(f"{BASE}/v1/leases/l1", status=204)


async def test_the_report_is_retried_through_failures_until_accepted_and_counted_once(fake_worker):
    # Segments further apart than EVENTS_LINGER_S: the first two are streamed, the last goes with the result.
    worker = await fake_worker(segments=3, every_s=3 * EVENTS_LINGER_S / 2)
    parts = build(worker, BASE, "n1")
    try:
        with aioresponses() as m:
            serve_job(m)
            m.post(RESULT, status=500)
            m.post(RESULT, status=503, headers={"Retry-After": "0"})
            m.post(RESULT, exception=asyncio.TimeoutError())
            m.post(RESULT, status=200, body="{{garbage")
            m.post(RESULT, status=200, payload={"accepted": True})
            m.post(RESULT, status=200, payload={"accepted": True, "duplicate": True})  # must never be used
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            sent = m.requests[("POST", URL(RESULT))]
            events_sent = m.requests[("POST", URL(f"{BASE}/v1/jobs/j1/events"))]
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == ("succeeded", Report.accepted)
    assert len(sent) == 5
    bodies = [r.kwargs["json"] for r in sent]
    assert all(b == bodies[0] for b in bodies)  # idempotent: the same report every time
    assert bodies[0]["lease_epoch"] == 3 and bodies[0]["attempt"] == 1 and bodies[0]["node_id"] == "n1"
    # Events and the result name the lease's holder in full: the scheduler fences on all four.
    assert bodies[0]["lease_id"] == "l1"
    holder = {"node_id": "n1", "lease_id": "l1", "attempt": 1, "lease_epoch": 3}
    assert events_sent and all(r.kwargs["json"].items() >= holder.items() for r in events_sent)
    assert bodies[0]["result"]["text"] == "segment 1. segment 2. segment 3."
    assert len(bodies[0]["result"]["segments"]) == 3
    assert parts.runner.ledger.totals["succeeded"] == 1
    assert parts.sample("node_agent_jobs_total", outcome="succeeded") == 1
    assert parts.sample("node_agent_retries_total", operation="result") == 4


@pytest.mark.parametrize("error, outcome_label, posted", [(None, "succeeded", []), ("failed", "failed", [1, 2, 3])])
async def test_segments_that_come_with_the_end_of_the_decode_ride_with_the_result(fake_worker, error, outcome_label,
                                                                                 posted):
    # A short clip's segments come together, with its end (3 within 60 ms): no events post, one request less;
    # the result carries them all. A failed decode has no result to carry them: they are posted before its report.
    worker = await fake_worker(segments=3, every_s=0.02, **({"error": error} if error else {}))
    parts = build(worker, BASE, "n1")
    try:
        with aioresponses() as m:
            serve_job(m)
            m.post(RESULT, status=200, payload={"accepted": True})
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            events_sent = m.requests.get(("POST", URL(f"{BASE}/v1/jobs/j1/events")), [])
            (result,) = m.requests[("POST", URL(RESULT))]
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == (outcome_label, Report.accepted)
    assert [seg["id"] for r in events_sent for seg in r.kwargs["json"]["events"]] == posted
    if error is None:
        assert [seg["id"] for seg in result.kwargs["json"]["result"]["segments"]] == [1, 2, 3]


async def test_a_failed_decodes_pending_segments_are_retried_through_a_blip_before_its_report(fake_worker):
    # The scheduler fails the posts as the decode fails: its partial transcript is retried (bounded by the events
    # policy), not dropped with one try, and reaches the scheduler before the failure report.
    worker = await fake_worker(segments=2, every_s=0.02, error="failed")
    parts = build(worker, BASE, "n1")
    order: list[str] = []
    try:
        with aioresponses() as m:
            m.get(f"{BASE}/v1/jobs/j1/audio", status=200, body=AUDIO)
            m.post(f"{BASE}/v1/leases", status=201,
                   payload={"lease_id": "l1", "epoch": 3, "ttl_s": 15, "resource": "cpu"})
            events = f"{BASE}/v1/jobs/j1/events"
            m.post(events, status=500, callback=lambda *_, **__: order.append("events 500"))
            m.post(events, status=503, callback=lambda *_, **__: order.append("events 503"))
            m.post(events, status=202, callback=lambda *_, **__: order.append("events 202"))
            m.post(RESULT, status=200, payload={"accepted": True}, callback=lambda *_, **__: order.append("result"))
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            delivered = m.requests[("POST", URL(events))][-1].kwargs["json"]["events"]
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == ("failed", Report.accepted)
    assert order == ["events 500", "events 503", "events 202", "result"]
    assert [seg["id"] for seg in delivered] == [1, 2]
    assert parts.sample("node_agent_retries_total", operation="events") == 2


async def test_segment_events_hold_back_for_the_schedulers_retry_after(fake_worker):
    # 12 segments over ~1.2 s; the first post is answered 503 with Retry-After: 1. The segments that follow pile
    # up instead of being posted one by one into a scheduler that asked for a second's rest.
    worker = await fake_worker(segments=12, every_s=0.1)
    parts = build(worker, BASE, "n1")
    loop = asyncio.get_running_loop()
    posted: list[tuple[float, int]] = []

    def record(url: Any, **kwargs: Any) -> None:
        posted.append((loop.time(), [e["id"] for e in kwargs["json"]["events"]]))

    try:
        with aioresponses() as m:
            m.get(f"{BASE}/v1/jobs/j1/audio", status=200, body=AUDIO)
            m.post(f"{BASE}/v1/leases", status=201,
                   payload={"lease_id": "l1", "epoch": 3, "ttl_s": 15, "resource": "cpu"})
            m.post(f"{BASE}/v1/jobs/j1/events", status=503, headers={"Retry-After": "1"}, callback=record)
            m.post(f"{BASE}/v1/jobs/j1/events", status=202, repeat=True, callback=record)
            m.delete(f"{BASE}/v1/leases/l1", status=204)
            m.post(RESULT, status=200, payload={"accepted": True})
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            (result,) = m.requests[("POST", URL(RESULT))]
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == ("succeeded", Report.accepted)
    refused_at, refused = posted[0]
    # Nothing was posted within the second the scheduler asked for.
    during = [t for t, _ in posted[1:] if t - refused_at < 0.95]
    assert not during, posted
    # The refused segments were carried forward: into the next post, or (the job ended first) the result.
    if posted[1:]:
        assert posted[1][1][:len(refused)] == refused, posted
    assert [seg["id"] for seg in result.kwargs["json"]["result"]["segments"]] == list(range(1, 13))


async def test_a_rejected_report_is_not_retried(fake_worker):
    worker = await fake_worker(error="bad_audio")
    parts = build(worker, BASE, "n1")
    try:
        with aioresponses() as m:
            serve_job(m)
            m.post(RESULT, status=409, payload={"error": {"code": "stale_attempt", "message": "late"}})
            outcome = await parts.runner.run(ASSIGNMENT)
            await parts.runner.settle(5.0)
            assert len(m.requests[("POST", URL(RESULT))]) == 1
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report, outcome.error.code) == ("bad_audio", Report.rejected, "bad_audio")
    assert parts.runner.ledger.totals["bad_audio"] == 1
    assert parts.runner.ledger.recent_failures[0]["accepted"] is False
    assert parts.sample("node_agent_retries_total", operation="result") == 0


async def test_no_lease_within_the_acquire_timeout_the_job_never_runs(fake_worker):
    worker = await fake_worker()
    parts = build(worker, BASE, "n1", lease={"acquire_timeout_s": 0.5})
    loop = asyncio.get_running_loop()
    try:
        with aioresponses() as m:  # (no audio served: the lease comes first, and none is had)
            m.post(f"{BASE}/v1/leases", status=409, headers={"Retry-After": "0.05"}, repeat=True,
                   payload={"error": {"code": "resource_held", "message": "held"}})
            started = loop.time()
            outcome = await parts.runner.run(ASSIGNMENT)
            took = loop.time() - started
            tries = len(m.requests[("POST", URL(f"{BASE}/v1/leases"))])
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == (None, Report.not_sent)
    assert "lease.acquire_timeout_s" in outcome.reason and "held" in outcome.reason
    assert took < 0.5 + 2.0  # the total cap holds (the slack is for a loaded machine)
    assert tries >= 2 and parts.sample("node_agent_retries_total", operation="lease_acquire") == tries - 1
    assert worker.snapshot()["jobs_served"] == 0 and not parts.runner.ledger.totals
    assert parts.sample("node_agent_jobs_total", outcome="failed") == 0


# ----- a lease granted with the assignment -----------------------------------------------------------------------

LEASED = ASSIGNMENT.model_copy(update={
    "lease": LeaseGrant(lease_id="l1", epoch=3, ttl_s=15, resource="cpu"), "poll_held_s": 0.25})


async def test_a_lease_that_comes_with_the_assignment_is_used_without_asking(fake_worker):
    worker = await fake_worker()
    parts = build(worker, BASE, "n1")
    polled_at = asyncio.get_running_loop().time() - 1.0  # the poll was sent a second ago, held 0.25 s of it
    keeper, adopted = parts.runner.keeper, []
    adopt = keeper.adopt
    keeper.adopt = lambda *args: adopted.append(adopt(*args)) or adopted[-1]  # type: ignore[method-assign]
    try:
        with aioresponses() as m:
            serve_job(m)
            m.post(RESULT, status=200, payload={"accepted": True})
            outcome = await parts.runner.run(LEASED, polled_at)
            await parts.runner.settle(5.0)
            asked = m.requests.get(("POST", URL(f"{BASE}/v1/leases")), [])
            (result,) = m.requests[("POST", URL(RESULT))]
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == ("succeeded", Report.accepted)
    assert not asked
    body = result.kwargs["json"]
    assert (body["lease_id"], body["lease_epoch"], body["node_id"]) == ("l1", 3, "n1")
    # Its expiry is reckoned from no later than the grant: the poll's sending plus the time the scheduler held it.
    (lease,) = adopted
    assert lease.renewed_at == pytest.approx(polled_at + 0.25)
    assert parts.sample("node_agent_leases_held", device="cpu") == 0


@pytest.mark.parametrize("leased", [False, True], ids=["lease asked for", "lease with the assignment"])
@pytest.mark.parametrize("audio", [{"status": 200, "body": b"<html>bad gateway</html>"}, {"status": 503}],
                         ids=["a proxy's error page", "503"])
async def test_audio_that_cannot_be_had_gives_the_job_back(fake_worker, leased, audio):
    # The lease is taken first and the audio fetched under it; audio that never arrives whole (an error page has
    # the wrong length, so it never reaches the decoder) gives the lease back, so the job is queued again at once.
    worker = await fake_worker()
    parts = build(worker, BASE, "n1")
    try:
        with aioresponses() as m:
            m.get(f"{BASE}/v1/jobs/j1/audio", repeat=True, **audio)
            m.post(f"{BASE}/v1/leases", status=201,
                   payload={"lease_id": "l1", "epoch": 3, "ttl_s": 15, "resource": "cpu"})
            m.delete(f"{BASE}/v1/leases/l1", status=204)
            outcome = await parts.runner.run(LEASED if leased else ASSIGNMENT)
            await parts.runner.settle(5.0)
            asked = m.requests.get(("POST", URL(f"{BASE}/v1/leases")), [])
            released = m.requests.get(("DELETE", URL(f"{BASE}/v1/leases/l1")), [])
    finally:
        await parts.client.close()
    assert (outcome.outcome, outcome.report) == (None, Report.not_sent)
    assert outcome.reason is not None and outcome.reason.startswith("audio:")
    if audio["status"] == 200:
        assert "announced" in outcome.reason
    assert parts.sample("node_agent_retries_total", operation="audio") >= 1
    assert len(asked) == (0 if leased else 1)
    assert released, "the lease must be given back so the job is queued again at once"
    assert parts.sample("node_agent_leases_held", device="cpu") == 0
    assert worker.snapshot()["jobs_served"] == 0
