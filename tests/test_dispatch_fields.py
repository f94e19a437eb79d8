"""Dispatch by what a job asks (issue 23): its model and node labels route it, its priority orders the queue, and
admission refuses at once what no live node serves, with a cap per priority class.

The capability rule is tested as a table (rules.serves), and its SQL form (pgfast.ask_served_sql) against the same
table on SQLite; the store tests run on sqlite, postgresql (single statements) and postgresql-general."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import test_store
from conftest import make_settings
from prometheus_client import CollectorRegistry
from test_scheduler import AUDIO, CPU_EN, GPU_ANY, HARDWARE, clocked, register
from test_store import close, serve

from node_agent.config import Settings
from node_agent.errors import UsageError
from node_agent.metrics import AgentMetrics
from node_agent.registration import NodeIdentity, Registration
from node_agent.scheduler.errors import QueueFull, Unservable
from node_agent.scheduler.pgfast import BUSY_SLOTS, ask_served_sql
from node_agent.scheduler.rules import Ask, Offer, Served, automatic_labels, batch_allowed, headroom_slots, serves
from node_agent.scheduler.schemas import DeviceSpec, JobSpec, RegisterRequest
from node_agent.scheduler.server import NOTIFIER_KEY, Notifier
from node_agent.scheduler.topics import QUEUE_TOPIC
from node_agent.scheduler_client import SchedulerClient
from node_agent.submit import job_asks, submit_files

store = test_store.store  # the fixture: sqlite, postgresql, postgresql-general

CPU = DeviceSpec(**CPU_EN)
GPU = DeviceSpec(**GPU_ANY)
LARGE = DeviceSpec(resource="gpu:1", model="/models/large-v3", compute_type="float16")
RACK1 = {"rack": "r1"}

#: (device, node labels, ask, served?): the one capability rule.
CASES: list[tuple[DeviceSpec, dict[str, str], Ask, bool]] = [
    (CPU, {}, Ask(), True),
    (CPU, {}, Ask("en"), True),
    (CPU, {}, Ask("de"), False),
    (GPU, {}, Ask("de"), True),
    (CPU, {}, Ask(model="tiny.en"), True),
    (CPU, {}, Ask(model="base"), False),
    (GPU, {}, Ask("de", "base"), True),
    (LARGE, {}, Ask(model="/models/large-v3"), True),
    (LARGE, {}, Ask(model="large-v3"), False),  # the model as the node registers it
    (CPU, RACK1, Ask.of(None, None, {"rack": "r1"}), True),
    (CPU, RACK1, Ask.of(None, None, {"rack": "r2"}), False),
    (CPU, {}, Ask.of(None, None, {"rack": "r1"}), False),
    (CPU, {}, Ask.of(None, None, {"device_class": "cpu"}), True),
    (CPU, {}, Ask.of(None, None, {"device_class": "gpu"}), False),
    (GPU, RACK1, Ask.of("fr", "base", {"device_class": "gpu", "rack": "r1", "compute_type": "float16"}), True),
    (LARGE, {}, Ask.of(None, None, {"model": "large-v3"}), True),  # a path's last part is its model label
    (CPU, {}, Ask.of(None, None, {"model": "tiny.en", "compute_type": "int8"}), True),
    (CPU, {"device_class": "gpu"}, Ask.of(None, None, {"device_class": "gpu"}), False),  # automatic ones win
    (DeviceSpec(resource="cpu", plugin="vad", model="x", compute_type="int8"), {}, Ask(), False),
]


@pytest.mark.parametrize(("device", "node_labels", "ask", "expected"), CASES)
def test_the_capability_rule_and_its_summary_and_sql_forms_agree(device: DeviceSpec, node_labels: dict[str, str],
                                                                  ask: Ask, expected: bool) -> None:
    assert serves(device, node_labels, ask) is expected
    assert Served.of([([device], node_labels)]).serves(ask) is expected
    # The SQL form (SQLite's; PostgreSQL's runs in every store test below) on a jobs row asking the same.
    with sqlite3.connect(":memory:") as db:
        db.execute("CREATE TABLE jobs (language TEXT, model TEXT, labels TEXT)")
        db.execute("INSERT INTO jobs VALUES (?, ?, ?)", (ask.language, ask.model, json.dumps(dict(ask.labels))))
        offers = Served.of([([device], node_labels)]).offers_json()
        (found,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {ask_served_sql('sqlite', '?')}",
                              (offers,)).fetchone()
    assert bool(found) is expected


def test_automatic_labels_come_from_the_device() -> None:
    assert automatic_labels(CPU) == {"device_class": "cpu", "compute_type": "int8", "model": "tiny.en"}
    assert automatic_labels(LARGE) == {"device_class": "gpu", "compute_type": "float16", "model": "large-v3"}
    assert Offer.of(GPU, RACK1).describe(with_labels=True) == \
        "any language with base [compute_type=float16, device_class=gpu, model=base, rack=r1]"


async def _register(h: Any, devices: list[dict[str, Any]], labels: dict[str, str]) -> str:
    body = {"agent_version": "0.1.0", "hostname": "host-a", "hardware": HARDWARE, "devices": devices,
            "labels": labels}
    status, reply, _ = await h.call("POST", "/v1/nodes", json=body)
    assert status == 201, reply
    return str(reply["node_id"])


async def _next(h: Any, node_id: str) -> str | None:
    status, body = await h.poll(node_id)
    if status == 204:
        return None
    assert status == 200, body
    return str(body["job_id"])


async def test_jobs_go_only_to_nodes_whose_model_and_labels_they_ask(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path)
    try:
        cpu = await _register(h, [CPU_EN], {"rack": "r1"})
        gpu = await _register(h, [GPU_ANY], {"rack": "r2"})
        by_model = await h.submit(model="base")
        assert await _next(h, cpu) is None
        assert await _next(h, gpu) == by_model
        by_class = await h.submit(labels={"device_class": "gpu"})
        by_rack = await h.submit(labels={"rack": "r1", "model": "tiny.en"})
        assert await _next(h, gpu) == by_class  # by_rack is older in nothing, but the gpu node cannot take it
        assert await _next(h, gpu) is None
        assert await _next(h, cpu) == by_rack
        status, view, _ = await h.call("GET", f"/v1/jobs/{by_rack}")
        assert (view["model"], view["labels"], view["priority"]) == (None, {"model": "tiny.en", "rack": "r1"},
                                                                    "batch")
        status, nodes, _ = await h.call("GET", "/v1/nodes")
        assert {n["node_id"]: n["labels"] for n in nodes["nodes"]} == {cpu: {"rack": "r1"}, gpu: {"rack": "r2"}}
    finally:
        await close(h)


async def test_a_job_no_live_node_serves_is_refused_naming_what_was_asked(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path)
    try:
        await _register(h, [CPU_EN], {"rack": "r1"})
        body = {"audio_b64": "AAAA"}
        status, reply, _ = await h.call("POST", "/v1/jobs", json={**body, "model": "large-v3"})
        assert status == 422 and reply["error"]["code"] == "no_capable_node", reply
        assert reply["error"]["message"] == ("no live node serves model 'large-v3' (nodes serve: en with tiny.en); "
                                             "run a node with asr.model: large-v3, or ask for a model a live node "
                                             "has")
        status, reply, _ = await h.call("POST", "/v1/jobs", json={**body, "labels": {"zone": "eu"}})
        assert status == 422, reply
        assert reply["error"]["message"].startswith(
            "no live node serves labels zone=eu (nodes serve: en with tiny.en [compute_type=int8, "
            "device_class=cpu, model=tiny.en, rack=r1]); set those labels on a node"), reply
    finally:
        await close(h)


async def _cordon(store: str, tmp_path: Path, node_id: str, cordoned: int) -> None:
    """Set the column as the operators' cordon does (their command is another part of issue 23)."""
    if store.startswith("sqlite"):
        with sqlite3.connect(tmp_path / "scheduler.db") as db:
            db.execute("UPDATE nodes SET cordoned = ? WHERE node_id = ?", (cordoned, node_id))
        return
    conn = await asyncpg.connect(store)
    try:
        await conn.execute("UPDATE nodes SET cordoned = $1 WHERE node_id = $2", cordoned, node_id)
    finally:
        await conn.close()


async def test_interactive_jobs_go_first_and_a_cordoned_node_gets_nothing(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path)
    try:
        node = await _register(h, [CPU_EN], {})
        batch = [await h.submit() for _ in range(2)]
        live = await h.submit(priority="interactive")
        await _cordon(store, tmp_path, node, 1)
        assert await _next(h, node) is None
        await _cordon(store, tmp_path, node, 0)
        assert [await _next(h, node) for _ in range(4)] == [live, *batch, None]
    finally:
        await close(h)


async def test_each_priority_class_has_its_own_cap(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path, max_queued_jobs=2, max_queued_interactive_jobs=1)
    try:
        await _register(h, [CPU_EN], {})
        await h.submit()
        await h.submit()
        status, reply, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": "AAAA"})
        assert status == 429 and "scheduler.max_queued_jobs (2)" in reply["error"]["message"], reply
        await h.submit(priority="interactive")  # a full batch queue never refuses a live utterance
        status, reply, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": "AAAA", "priority": "interactive"})
        assert status == 429 and "scheduler.max_queued_interactive_jobs (1)" in reply["error"]["message"], reply
    finally:
        await close(h)


async def test_multipart_fields_and_the_openai_model(tmp_path: Path) -> None:
    h = await serve(f"sqlite:///{tmp_path / 'scheduler.db'}", tmp_path)
    try:
        await _register(h, [CPU_EN, GPU_ANY], {"rack": "r1"})
        form = aiohttp.FormData()
        for name, value in (("model", "base"), ("labels", '{"rack": "r1"}'), ("priority", "interactive")):
            form.add_field(name, value)
        form.add_field("file", AUDIO, filename="a.wav")
        status, reply, _ = await h.call("POST", "/v1/jobs", data=form)
        assert status == 202, reply
        status, view, _ = await h.call("GET", f"/v1/jobs/{reply['job_id']}")
        assert (view["model"], view["labels"], view["priority"]) == ("base", {"rack": "r1"}, "interactive")
        form = aiohttp.FormData()
        form.add_field("labels", "rack=r1")
        form.add_field("file", AUDIO, filename="a.wav")
        status, reply, _ = await h.call("POST", "/v1/jobs", data=form)
        assert status == 400 and reply["error"]["message"].startswith("labels"), reply
        form = aiohttp.FormData()
        form.add_field("model", "large-v3")
        form.add_field("file", AUDIO, filename="a.wav")
        status, reply, _ = await h.call("POST", "/v1/audio/transcriptions", data=form)
        assert status == 422 and "model 'large-v3'" in reply["error"]["message"], reply
        assert reply["error"]["param"] == "model"  # (the OpenAI shape names the field)
    finally:
        await close(h)


async def test_a_batch_job_past_batch_max_wait_counts_as_interactive() -> None:
    for wait_s, aged in ((30.0, False), (61.0, True)):
        async with clocked(batch_max_wait_s=60.0, heartbeat_interval_s=120.0) as (state, _clock, _registry):
            node = await register(state)
            old = await state.submit(JobSpec())
            await state.advance(wait_s)
            live = await state.submit(JobSpec(priority="interactive"))
            newer = await state.submit(JobSpec())
            order = [await state.assign_next(node) for _ in range(4)]
            # Aged, ``old`` counts as interactive and is older than ``live``; ``newer`` is batch either way.
            expected = [old, live, newer] if aged else [live, old, newer]
            assert [a.job_id if a is not None else None for a in order] == [j.job_id for j in expected] + [None]


@pytest.mark.parametrize(("slots", "busy", "fraction", "allowed"), [
    (19, 0, 0.05, True),  # under 20 slots, 5 % keeps none: as before
    (19, 18, 0.05, True),  # the last slot too
    (20, 18, 0.05, True),  # 20 slots keep 1: after this job 1 stays idle
    (20, 19, 0.05, False),  # ... and the last one is kept
    (200, 189, 0.05, True),  # 200 keep 10
    (200, 190, 0.05, False),
    (4, 2, 0.25, True),
    (4, 3, 0.25, False),
    (4, 3, 0.0, True),  # no headroom: the last slot goes to batch work as ever
    (4, 4, 0.25, False),  # (busy over the slots, e.g. a node just gone: nothing)
    (30, 26, 0.1, True),  # 0.1 * 30 is a hair over 3: 3 kept
    (100, 70, 0.29, True),  # 0.29 * 100 is a hair under 29: still 29 kept, not 28
    (100, 71, 0.29, False),
])
def test_a_batch_job_leaves_the_interactive_headroom_idle(slots: int, busy: int, fraction: float,
                                                          allowed: bool) -> None:
    assert batch_allowed(slots, busy, headroom_slots(slots, fraction)) is allowed


def _waits(h: Any, priority: str, model: str = "") -> float:
    value = h.registry.get_sample_value("node_agent_scheduler_queue_wait_seconds_count",
                                        {"priority": priority, "model": model})
    return value or 0.0


@pytest.mark.parametrize("headroom", [0.25, 0.0])
async def test_batch_work_leaves_the_headroom_to_interactive_jobs(store: str, tmp_path: Path,
                                                                  headroom: float) -> None:
    h = await serve(store, tmp_path, interactive_headroom=headroom)
    try:
        nodes = [await _register(h, [CPU_EN], {}) for _ in range(5)]
        # A cordoned node's slot is not one that takes jobs: 4 slots, of which 0.25 keeps 1.
        await _cordon(store, tmp_path, nodes[4], 1)
        for node in nodes[:4]:  # each node polled once: on PostgreSQL the next polls are single statements
            assert await _next(h, node) is None
        batch = [await h.submit(model="tiny.en")] + [await h.submit() for _ in range(3)]
        assert [await _next(h, n) for n in nodes[:3]] == batch[:3]
        if headroom:
            assert await _next(h, nodes[3]) is None  # the last idle slot is kept ...
            live = await h.submit(priority="interactive")
            assert await _next(h, nodes[3]) == live  # ... for the live job
        else:
            assert await _next(h, nodes[3]) == batch[3]  # as before there was a headroom
            live = await h.submit(priority="interactive")
        assert (_waits(h, "batch", "tiny.en"), _waits(h, "batch"), _waits(h, "interactive")) == \
            (1, 2 + (not headroom), bool(headroom))
        assert h.registry.get_sample_value("node_agent_scheduler_queue_wait_seconds_bucket",
                                           {"priority": "interactive", "model": "", "le": "+Inf"}) == bool(headroom)
    finally:
        await close(h)


def _count_claims(h: Any) -> dict[str, int]:
    """Count the store's claims per node from now on (each is a transaction: what a needless wake-up costs)."""
    claims: dict[str, int] = {}
    assign_next = h.running.store.assign_next

    async def counted(node_id: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await assign_next(node_id, *args, **kwargs)
        finally:
            claims[node_id] = claims.get(node_id, 0) + 1

    h.running.store.assign_next = counted
    return claims


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_batch_submission_does_not_wake_a_node_the_headroom_holds_back(store: str, tmp_path: Path) -> None:
    """Behind a batch backlog every batch submit woke idle nodes whose claims the headroom then refused (issue 23's
    benchmark); an interactive submit still wakes them at once. On PostgreSQL the jobs come through another
    replica, so the topics cross LISTEN/NOTIFY."""
    h = await serve(store, tmp_path, interactive_headroom=0.5)
    other = await serve(store, tmp_path / "b", interactive_headroom=0.5) if not store.startswith("sqlite") else h
    poll: asyncio.Task[Any] | None = None
    try:
        h.running.app[NOTIFIER_KEY].poll_s = None  # only wake-ups re-check here
        busy, idle = [await _register(h, [CPU_EN], {}) for _ in range(2)]
        for node in (busy, idle):  # each node polled once: on PostgreSQL the next polls are single statements
            assert await _next(h, node) is None
        first = await other.submit()
        await other.submit()  # queued: the one job the idle node could take
        assert await _next(h, busy) == first  # 2 slots keep 1 idle: the last one is for interactive work
        claims = _count_claims(h)
        poll = asyncio.create_task(h.poll(idle, wait_s=20))
        await _until(lambda: claims.get(idle) == 1)  # refused that job: held back
        await other.submit()
        await asyncio.sleep(0.3)  # what a wake-up would take (milliseconds), many times over
        assert claims[idle] == 1 and not poll.done()
        started = asyncio.get_running_loop().time()
        live = await other.submit(priority="interactive")
        status, body = await asyncio.wait_for(poll, 10)
        assert status == 200 and body["job_id"] == live, body
        assert asyncio.get_running_loop().time() - started < 5  # woken, not the 20 s poll's end
        assert claims[idle] == 2
    finally:
        if poll is not None:
            poll.cancel()
        await close(*([h] if other is h else [h, other]))


async def test_a_node_held_back_takes_batch_work_once_a_slot_frees(store: str, tmp_path: Path) -> None:
    """Nothing is stranded: a slot that frees wakes nobody (its own node polls again and takes the next batch job),
    so a node held back re-checks every poll_s and takes the batch work the headroom now allows."""
    h = await serve(store, tmp_path, interactive_headroom=0.5)
    poll: asyncio.Task[Any] | None = None
    try:
        h.running.app[NOTIFIER_KEY].poll_s = 0.2
        busy, idle = [await _register(h, [CPU_EN], {}) for _ in range(2)]
        for node in (busy, idle):
            assert await _next(h, node) is None
        first, second = await h.submit(), await h.submit()
        assert await _next(h, busy) == first
        claims = _count_claims(h)
        poll = asyncio.create_task(h.poll(idle, wait_s=20))
        await _until(lambda: claims.get(idle, 0) >= 1)
        status, grant, _ = await h.lease(busy, first)
        assert status == 201, grant
        status, ack = await h.result(first, busy, 1, grant)
        assert status == 200, ack
        status, body = await asyncio.wait_for(poll, 10)
        assert status == 200 and body["job_id"] == second, body
    finally:
        if poll is not None:
            poll.cancel()
        await close(h)


async def test_a_wake_up_that_meets_a_leaving_poll_goes_to_the_next_one() -> None:
    """A queue wake-up goes to a few waiters; one that got a job meanwhile (its check was under way) hands it on,
    or a job queued just then waits for the periodic re-check."""
    notifier = Notifier(queue_wake=1)
    in_check, go = asyncio.Event(), asyncio.Event()

    async def busy_check() -> str:
        in_check.set()
        await go.wait()
        return "its own job"

    calls = 0

    async def idle_check() -> str | None:
        nonlocal calls
        calls += 1
        return "the new job" if calls > 1 else None

    first = asyncio.create_task(notifier.wait_for(QUEUE_TOPIC, busy_check, 10))
    await in_check.wait()
    second = asyncio.create_task(notifier.wait_for(QUEUE_TOPIC, idle_check, 10))
    await _until(lambda: calls == 1)
    notifier.notify(QUEUE_TOPIC)  # the first listed (mid-check) takes it
    go.set()
    assert await asyncio.wait_for(first, 5) == "its own job"
    assert await asyncio.wait_for(second, 5) == "the new job"


async def test_the_busy_count_reads_only_the_open_jobs_on_sqlite(tmp_path: Path) -> None:
    """Every batch dispatch counts the busy slots: a scan of every job kept would cost it milliseconds."""
    h = await serve(f"sqlite:///{tmp_path / 'scheduler.db'}", tmp_path)
    try:
        with sqlite3.connect(tmp_path / "scheduler.db") as db:
            plan = " ".join(str(row) for row in db.execute("EXPLAIN QUERY PLAN " + BUSY_SLOTS))
        assert "USING INDEX jobs_open" in plan and "SCAN b" not in plan, plan
    finally:
        await close(h)


async def test_a_batch_job_past_batch_max_wait_may_take_the_headroom() -> None:
    async with clocked(batch_max_wait_s=60.0, heartbeat_interval_s=120.0, assign_timeout_s=600.0,
                       interactive_headroom=0.5) \
            as (state, _clock, registry):
        first, second = await register(state), await register(state)
        jobs = [await state.submit(JobSpec()) for _ in range(2)]
        taken = await state.assign_next(first)
        assert taken is not None and taken.job_id == jobs[0].job_id
        assert await state.assign_next(second) is None  # 2 slots keep 1
        await state.advance(61)
        assigned = await state.assign_next(second)  # aged, it counts as interactive: batch work never starves
        assert assigned is not None and assigned.job_id == jobs[1].job_id and assigned.queued_s >= 61
        assert registry.get_sample_value("node_agent_scheduler_queue_wait_seconds_bucket",
                                         {"priority": "batch", "model": "", "le": "60.0"}) == 1
        assert registry.get_sample_value("node_agent_scheduler_queue_wait_seconds_count",
                                         {"priority": "batch", "model": ""}) == 2


async def test_the_reaper_fails_a_queued_job_asking_for_a_model_no_live_node_has() -> None:
    async with clocked(unservable_after_s=30.0, heartbeat_interval_s=120.0) as (state, _clock, _registry):
        job = await state.submit(JobSpec(model="large-v3"))  # no node yet: not refused, it waits
        await register(state)
        with pytest.raises(Unservable):
            await state.submit(JobSpec(model="large-v3"))
        await state.advance(31)
        view = await state.view_job(job.job_id)
        assert view.state == "failed" and view.error is not None and view.error.code == "no_capable_node"
        assert "model 'large-v3'" in view.error.message
        served = await state.submit(JobSpec(model="tiny.en", labels={"device_class": "cpu"}))
        await state.advance(31)
        assert (await state.view_job(served.job_id)).state == "queued"
        with pytest.raises(QueueFull):  # (the caps hold in the clocked store too)
            async with clocked(max_queued_interactive_jobs=1) as (small, _c, _r):
                await register(small)
                await small.submit(JobSpec(priority="interactive"))
                await small.submit(JobSpec(priority="interactive"))


def _args(**over: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"scheduler": None, "audio": [], "language": None, "allow_truncated": False,
                                 "json": False, "timeout": 30.0, "model": None, "label": [], "priority": "batch",
                                 **over})


def test_submit_flags_are_checked_as_the_scheduler_checks_them() -> None:
    assert job_asks(_args(model="base", label=["rack=r1", "device_class=gpu"], priority="interactive")) == \
        {"model": "base", "labels": {"rack": "r1", "device_class": "gpu"}, "priority": "interactive"}
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        job_asks(_args(label=["rack"]))
    with pytest.raises(UsageError, match="--label"):
        job_asks(_args(label=["bad key=1"]))


async def test_submit_sends_model_labels_and_priority(tmp_path: Path) -> None:
    h = await serve(f"sqlite:///{tmp_path / 'scheduler.db'}", tmp_path)
    try:
        node = await _register(h, [GPU_ANY], {"rack": "r1"})
        audio = tmp_path / "a.wav"
        audio.write_bytes(AUDIO)
        args = _args(scheduler=h.url, audio=[str(audio)], model="base", label=["rack=r1"], priority="interactive")
        command = asyncio.create_task(submit_files(args, Settings()))
        body = None
        for _ in range(100):
            status, body = await h.poll(node, wait_s=0.1)
            if status == 200:
                break
        assert body is not None and status == 200, body
        _, view, _ = await h.call("GET", f"/v1/jobs/{body['job_id']}")
        assert (view["model"], view["labels"], view["priority"]) == ("base", {"rack": "r1"}, "interactive")
        status, grant, _ = await h.lease(node, body["job_id"], resource="gpu:0")
        assert status in (200, 201), grant
        status, _ = await h.result(body["job_id"], node, body["attempt"], grant)
        assert status == 200
        assert await asyncio.wait_for(command, 30) == 0
    finally:
        await close(h)


async def test_the_agent_registers_its_node_labels() -> None:
    settings = make_settings(node={"labels": {"zone": "eu-1"}})
    async with SchedulerClient("http://127.0.0.1:9", None, 1.0) as client:
        registration = Registration(
            client, NodeIdentity(), workers={}, asr=settings.asr, facts={"gpus": []}, hostname="h",
            metrics=AgentMetrics(CollectorRegistry()), heartbeat_state=lambda: {}, labels=settings.node.labels)
        assert RegisterRequest.model_validate(registration.body()).labels == {"zone": "eu-1"}
