"""Section jobs on the scheduler (issue 24): a long recording's parent asks how many slots are free, makes its
sections as child jobs, and follows them; the parent's attempt ending without a result cancels them.

Every store (SQLite, PostgreSQL with and without its single statements) through a real scheduler on loopback, fake
nodes speaking the node protocol over HTTP and the agent's own client (``SchedulerClient``) for the section calls:
the decoding adds nothing to what the scheduler guarantees here. The agent's side (splitting, merging) is
tests/test_sections.py's.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from conftest import machine_slowdown
from node_agent.config import SchedulerSettings
from node_agent.scheduler.db import engine_for
from node_agent.scheduler.migrations import MIGRATIONS, _statements
from node_agent.scheduler.rules import CapacityFacts, section_capacity
from node_agent.scheduler.server import NOTIFIER_KEY, start_scheduler
from node_agent.scheduler_client import BadRequest, Rejected, SchedulerClient, UnknownJob
from test_roles import CLIENT_1, CLIENT_2, NODE_OLD, NODE_NEW, OPERATOR, TOKENS, Caller
from test_scheduler import HARDWARE, Harness
from test_store import close, segment, serve, store  # noqa: F401  (store: the fixture, one run per store)

pytestmark = pytest.mark.timeout(90)

#: Two slots of an English CPU node.
SLOTS = [{"resource": f"cpu/{i}", "plugin": "asr", "model": "tiny.en", "compute_type": "int8", "languages": ["en"]}
         for i in range(2)]
#: One second of 16 kHz pcm_s16le silence: a section's audio.
SECOND = b"\0\0" * 16000


async def register(h: Harness, node_id: str, labels: dict[str, str] | None = None,
                   devices: list[dict[str, Any]] | None = None) -> str:
    status, reply, _ = await h.call("POST", "/v1/nodes", json={
        "node_id": node_id, "agent_version": "0.1.0", "hostname": node_id, "hardware": HARDWARE,
        "devices": devices or SLOTS, "labels": labels or {}})
    assert status == 201, reply
    return node_id


async def take(h: Harness, node: str, resource: str, ttl_s: float = 60) -> tuple[str, dict[str, Any]]:
    """The next job for ``node``'s ``resource`` with its lease: (job id, assignment with ``lease``)."""
    status, body, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                   params={"wait_s": 0, "resource": resource, "lease_ttl_s": ttl_s})
    assert status == 200 and body["lease"] is not None, body
    return body["job_id"], body


def client_of(h: Harness) -> SchedulerClient:
    return SchedulerClient(h.url, None, 10.0)


async def make(client: SchedulerClient, parent: str, grant: dict[str, Any], index: int, seconds: int = 2,
               offset_s: float | None = None, language: str | None = None) -> str:
    return await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"], index=index,
                                       offset_s=offset_s if offset_s is not None else 10.0 * index,
                                       duration_s=float(seconds), audio=SECOND * seconds, language=language)


def test_section_capacity_as_a_table() -> None:
    """The rule: idle serving slots less the queued jobs ahead, the headroom kept for a batch parent, capped."""
    rows = [
        # slots, busy, idle serving, queued ahead, batch, headroom share, max sections -> free
        (4, 1, 3, 0, True, 0.0, 16, 3),
        (4, 1, 3, 1, True, 0.0, 16, 2),
        (4, 1, 3, 5, True, 0.0, 16, 0),  # never below 0
        (4, 1, 3, 0, True, 0.5, 16, 1),  # 2 slots kept idle: one more batch job may start
        (4, 1, 3, 0, False, 0.5, 16, 3),  # an interactive parent's sections use the headroom
        (4, 3, 1, 0, True, 0.5, 16, 0),
        (20, 1, 19, 0, True, 0.05, 16, 15),  # capped at max - 1 (the parent decodes section 0)
        (20, 1, 19, 0, False, 0.0, 1, 0),  # max 1: never split
        (8, 1, 2, 0, True, 0.05, 16, 2),  # idle slots that serve others do not count
    ]
    for slots, busy, idle, ahead, batch, share, max_sections, free in rows:
        facts = CapacityFacts(slots=slots, busy=busy, idle_serving=idle, queued_ahead=ahead)
        assert section_capacity(facts, batch=batch, headroom_fraction=share, max_sections=max_sections) == free, \
            (facts, batch, share, max_sections)


async def test_capacity_counts_idle_serving_slots_less_the_queue_ahead(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path, interactive_headroom=0.0)
    client = client_of(h)
    try:
        a = await register(h, "node-a", {"room": "a"})
        b = await register(h, "node-b", {"room": "a"})
        await register(h, "node-c", {"room": "b"})  # serves English too, but not the labels asked
        parent = await h.submit(SECOND, labels={"room": "a"})
        job_id, assignment = await take(h, a, "cpu/0")
        assert job_id == parent
        lease = assignment["lease"]["lease_id"]
        # a's other slot and b's two: the caller's other slots count.
        assert await client.job_capacity(parent, lease) == 3
        # A queued job those slots serve goes first; one they do not serve does not count.
        await h.submit(SECOND, labels={"room": "b"})
        queued = await h.submit(SECOND)
        assert await client.job_capacity(parent, lease) == 2
        # A cordoned node's slots are not free (a draining node's neither).
        status, _, _ = await h.call("POST", f"/v1/nodes/{b}/cordon")
        assert status == 200
        assert await client.job_capacity(parent, lease) == 0  # a's last idle slot, taken by the queued job first
        status, _, _ = await h.call("POST", f"/v1/nodes/{b}/uncordon")
        status, _, _ = await h.call("DELETE", f"/v1/jobs/{queued}")
        assert status == 200
        # A busy slot is not idle.
        other = await h.submit(SECOND, labels={"room": "a"})
        assert (await take(h, b, "cpu/1"))[0] == other
        assert await client.job_capacity(parent, lease) == 2
        # Only the holder of the job's live lease may ask; an unknown job is 404.
        with pytest.raises(Rejected) as lost:
            await client.job_capacity(parent, "lease-0000000000000000")
        assert lost.value.status == 409 and lost.value.code == "lease_lost", lost.value
        with pytest.raises(UnknownJob):
            await client.job_capacity("job-0000000000000000", lease)
    finally:
        await client.close()
        await close(h)


async def test_capacity_keeps_the_headroom_from_a_batch_parent_and_the_max(tmp_path: Path) -> None:
    h = await serve("sqlite", tmp_path, interactive_headroom=0.5, max_sections_per_job=3)
    client = client_of(h)
    try:
        a = await register(h, "node-a")
        await register(h, "node-b")
        batch = await h.submit(SECOND)
        interactive = await h.submit(SECOND, priority="interactive")
        assert (await take(h, a, "cpu/0"))[0] == interactive
        job_id, assignment = await take(h, a, "cpu/1")
        assert job_id == batch
        # 4 slots, 2 busy, 2 kept idle for interactive work: none for a batch parent's sections.
        assert await client.job_capacity(batch, assignment["lease"]["lease_id"]) == 0
        interactive_lease = await _lease_of(h, interactive)
        # The interactive parent may use both idle slots; max_sections_per_job 3 caps it at 2 all the same.
        assert await client.job_capacity(interactive, interactive_lease) == 2
    finally:
        await client.close()
        await close(h)


async def _count(h: Harness, table: str) -> int:
    return int(await h.running.store.engine.run(lambda tx: tx.fetchval(f"SELECT COUNT(*) FROM {table}")))


async def _lease_of(h: Harness, job_id: str) -> str:
    async def op(tx: Any) -> str:
        return await tx.fetchval("SELECT lease_id FROM jobs WHERE job_id = $1", job_id)

    return await h.running.store.engine.run(op)


async def test_sections_are_fenced_idempotent_bounded_and_run_like_any_job(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path)
    client = client_of(h)
    try:
        a = await register(h, "node-a", devices=SLOTS[:1])
        parent = await h.submit(SECOND, language="en", priority="interactive", labels={"device_class": "cpu"},
                                options={"beam_size": 2})
        _, assignment = await take(h, a, "cpu/0")
        grant = assignment["lease"]
        # Made once per (parent, attempt, index): a retry answers the same child, and its audio is the first's.
        child = await make(client, parent, grant, 1, seconds=3, offset_s=29.5)
        assert await make(client, parent, grant, 1, seconds=3, offset_s=29.5) == child
        assert h.metric("node_agent_scheduler_sections_total") == 1.0
        view = await h.job(child)
        assert view["state"] == "queued" and view["parent_id"] == parent and view["section"] == 1
        assert view["offset_s"] == 29.5 and view["priority"] == "interactive" and view["language"] == "en"
        assert view["labels"] == {"device_class": "cpu"} and view["sections"] == []
        # Bounded: index 1..max-1, an offset past 0, a duration that is the audio's; refused with 422 naming it.
        past = SchedulerSettings().max_sections_per_job  # the first index past the default bound
        for index, offset, seconds, duration, param in [(0, 5.0, 1, 1.0, "index"), (past, 5.0, 1, 1.0, "index"),
                                                        (2, 0.0, 1, 1.0, "offset_s"), (2, 5.0, 1, 9.0, "duration_s")]:
            with pytest.raises(BadRequest) as refused:
                await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"],
                                            index=index, offset_s=offset, duration_s=duration,
                                            audio=SECOND * seconds)
            assert refused.value.status == 422 and refused.value.code == "section_refused", refused.value
            assert refused.value.detail.startswith(f"{param}: ") and "\n" not in refused.value.detail
        # A refused section keeps none of its audio (this one is over a chunk: part of it was in the store).
        chunks = await _count(h, "audio_chunks")
        with pytest.raises(BadRequest):
            await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"], index=99,
                                        offset_s=5.0, duration_s=40.0, audio=SECOND * 40)
        assert await _count(h, "audio_chunks") == chunks
        # Bad audio is 400 as at any upload: none, or half a sample.
        for audio, code in [(b"", "invalid_request"), (b"\0\0\0", "bad_audio")]:
            with pytest.raises(BadRequest) as bad:
                await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"],
                                            index=2, offset_s=5.0, duration_s=0.0001, audio=audio)
            assert bad.value.status == 400 and bad.value.code == code and bad.value.detail.startswith("audio"), bad.value
        # Fenced: an epoch that is not the live lease's makes nothing (an old lease: the lapse test below).
        with pytest.raises(Rejected) as stale:
            await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"] + 1,
                                        index=2, offset_s=5.0, duration_s=1.0, audio=SECOND)
        assert stale.value.status == 409 and stale.value.code == "lease_lost"
        assert h.metric("node_agent_scheduler_sections_total") == 1.0

        # The child runs like any job: another node polls it (the parent's lease holds a's only slot), its holder
        # is lost, it is re-queued alone, and runs again.
        b = await register(h, "node-b", devices=SLOTS[:1])
        taken, first = await take(h, b, "cpu/0", ttl_s=1.0)
        assert taken == child and first["audio"]["bytes"] == 3 * len(SECOND)
        assert first["options"] == {"beam_size": 2} and first["language"] == "en"
        assert first["parent_id"] == parent and assignment["parent_id"] is None  # (its node never splits it)
        async with h.session.get(f"{h.url}{first['audio']['url']}") as resp:
            assert await resp.read() == SECOND * 3
        slow = machine_slowdown()
        deadline = time.monotonic() + 10 * slow
        while (await h.job(child))["state"] != "queued":  # its 1 s lease lapses unrenewed
            assert time.monotonic() < deadline, await h.job(child)
            await asyncio.sleep(0.1)
        assert (await h.job(parent))["state"] == "running"  # the parent is not touched
        assert (await h.job(parent))["attempt"] == 1

        # The parent's node follows: a long poll wakes on the child's result (the wake-up alone: no periodic
        # re-check, so a result that announced nothing would leave it waiting its 20 s).
        h.running.app[NOTIFIER_KEY].poll_s = None
        follow = asyncio.ensure_future(client.job_sections(parent, grant["lease_id"], from_index=1, wait_s=20))
        await asyncio.sleep(0.3)
        assert not follow.done()
        c = await register(h, "node-c", devices=SLOTS[:1])
        taken, second = await take(h, c, "cpu/0")
        assert taken == child and second["attempt"] == 2
        # A section is not split again: no capacity, and no section of its own.
        assert await client.job_capacity(child, second["lease"]["lease_id"]) == 0
        with pytest.raises(BadRequest) as nested:
            await make(client, child, second["lease"], 1, seconds=1)
        assert nested.value.status == 422 and "is itself section 1" in nested.value.detail
        started = time.monotonic()
        status, body = await h.result(child, c, 2, second["lease"], result={
            "text": " one two", "language": "en", "duration_s": 3.0,
            "segments": [segment(0, " one"), segment(1, " two")]})
        assert status == 200, body
        sections = await asyncio.wait_for(follow, 10 * slow)
        assert time.monotonic() - started < 2 * slow
        assert [(s.index, s.job_id, s.state, s.node_id, s.attempt) for s in sections] == \
            [(1, child, "succeeded", c, 2)]
        assert sections[0].result is not None and [s.text for s in sections[0].result.segments] == [" one", " two"]
        assert sections[0].offset_s == 29.5 and sections[0].duration_s == 3.0 and sections[0].error is None
        # Results only from ``from`` on (the follower has the ones before); a finished section answers at once.
        later = await client.job_sections(parent, grant["lease_id"], from_index=2)
        assert [(s.index, s.result) for s in later] == [(1, None)]
        started = time.monotonic()
        again = await client.job_sections(parent, grant["lease_id"], from_index=1, wait_s=20)
        assert again[0].result is not None and time.monotonic() - started < 2 * slow

        # The views: the parent lists its sections, the child names its parent; the listing too.
        view = await h.job(parent)
        assert view["sections"] == [{"index": 1, "job_id": child, "state": "succeeded", "node_id": c,
                                     "offset_s": 29.5, "duration_s": 3.0}]
        assert view["parent_id"] is None and view["section"] is None
        status, listing, _ = await h.call("GET", "/v1/jobs")
        assert status == 200
        by_id = {j["job_id"]: j for j in listing["jobs"]}
        assert by_id[parent]["sections"] == view["sections"]
        assert (by_id[child]["parent_id"], by_id[child]["section"], by_id[child]["offset_s"]) == (parent, 1, 29.5)
        # Read without a lease: the parent's client (here: any caller, a scheduler without tokens).
        status, body, _ = await h.call("GET", f"/v1/jobs/{parent}/sections")
        assert status == 200 and [s["job_id"] for s in body["sections"]] == [child], body

        # The parent succeeds: its section is left as it was.
        status, body = await h.result(parent, a, 1, grant)
        assert status == 200, body
        assert (await h.job(child))["state"] == "succeeded"
    finally:
        await client.close()
        await close(h)


#: Slots of a multilingual CPU node that takes Mandarin and English only.
ZH_EN = [{"resource": f"cpu/{i}", "plugin": "asr", "model": "base", "compute_type": "int8",
          "languages": ["en", "zh"]} for i in range(2)]


async def test_a_section_of_a_job_without_a_language_decodes_in_the_one_its_parent_found(store: str,
                                                                                         tmp_path: Path) -> None:
    """A parent that named no language posts its sections with section 0's (``language``): the child is queued,
    shown and dispatched in it. A bad code is refused as at submission; one no live node serves is refused as a
    submission's (the parent's node decodes that section itself); a parent's own language cannot be changed."""
    h = await serve(store, tmp_path)
    client = client_of(h)
    try:
        a = await register(h, "node-a", devices=ZH_EN[:1])
        parent = await h.submit(SECOND)  # auto
        _, assignment = await take(h, a, "cpu/0")
        grant = assignment["lease"]
        child = await make(client, parent, grant, 1, language="zh")
        view = await h.job(child)
        assert view["language"] == "zh" and view["parent_id"] == parent, view
        assert (await h.job(parent))["language"] is None
        # Bad codes: 400 naming language, as a submission's; nothing made.
        for bad in ("klingon", "ZH", "xx"):
            with pytest.raises(BadRequest) as refused:
                await make(client, parent, grant, 2, language=bad)
            assert refused.value.status == 400 and refused.value.code == "invalid_request", refused.value
            assert refused.value.detail.startswith("language"), refused.value.detail
        # A Whisper language no live node serves: 422 no_capable_node, as a submission would be answered.
        with pytest.raises(BadRequest) as unserved:
            await make(client, parent, grant, 2, language="ja")
        assert unserved.value.status == 422 and unserved.value.code == "no_capable_node", unserved.value
        assert "section 2 of job" in unserved.value.detail and "'ja'" in unserved.value.detail
        assert h.metric("node_agent_scheduler_sections_total") == 1.0
        # Dispatched in it: the child's assignment says zh.
        b = await register(h, "node-b", devices=ZH_EN)
        taken, got = await take(h, b, "cpu/0")
        assert taken == child and got["language"] == "zh" and got["parent_id"] == parent

        # A parent with a language of its own: the same code is accepted (nothing changes), another is refused.
        own = await h.submit(SECOND, language="en")
        taken, assigned = await take(h, b, "cpu/1")
        assert taken == own
        same = await make(client, own, assigned["lease"], 1, language="en")
        assert (await h.job(same))["language"] == "en"
        with pytest.raises(BadRequest) as other:
            await make(client, own, assigned["lease"], 2, language="zh")
        assert other.value.status == 422 and other.value.code == "section_refused", other.value
        assert other.value.detail.startswith("language: 'zh' is not job"), other.value.detail
        assert h.metric("node_agent_scheduler_sections_total") == 2.0
    finally:
        await client.close()
        await close(h)


async def _until(h: Harness, job_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10 * machine_slowdown()
    while (view := await h.job(job_id))["state"] != state:
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.1)
    return view


async def test_a_parent_ending_without_a_result_cancels_its_sections(store: str, tmp_path: Path) -> None:
    """Cancelled (DELETE), its lease lapsed (re-queued: the next attempt splits afresh), failed: the open sections
    end with it; a parent that succeeds leaves them (the fenced test above)."""
    h = await serve(store, tmp_path)
    client = client_of(h)
    try:
        a = await register(h, "node-a", devices=SLOTS[:1])
        b = await register(h, "node-b")

        # Cancelled: a running section and a queued one end with it, by the same canceller; the section's
        # holder is told at its next renewal, and the parent's holder at its next follow.
        parent = await h.submit(SECOND)
        _, assignment = await take(h, a, "cpu/0")
        grant = assignment["lease"]
        running = await make(client, parent, grant, 1)
        queued = await make(client, parent, grant, 2)
        taken, child = await take(h, b, "cpu/0")
        assert taken == running
        status, _, _ = await h.call("POST", f"/v1/nodes/{b}/cordon")  # (so the second stays queued)
        status, view, _ = await h.call("DELETE", f"/v1/jobs/{parent}")
        assert status == 200 and view["state"] == "cancelled", view
        assert [(s["index"], s["state"]) for s in view["sections"]] == [(1, "cancelled"), (2, "cancelled")]
        for section_id in (running, queued):
            section = await h.job(section_id)
            assert section["error"]["code"] == "cancelled", section
            assert section["error"]["message"] == f"cancelled by client with its parent job {parent}"
        status, body = await h.renew(child["lease"]["lease_id"], b, child["lease"]["epoch"])
        assert status == 410 and body["error"]["code"] == "job_cancelled", body
        with pytest.raises(Rejected) as stopped:
            await client.job_sections(parent, grant["lease_id"], from_index=1)
        assert stopped.value.code == "job_cancelled"
        assert h.metric("node_agent_scheduler_jobs_cancelled_total", state="running") == 2.0
        assert h.metric("node_agent_scheduler_jobs_cancelled_total", state="queued") == 1.0
        status, _, _ = await h.call("POST", f"/v1/nodes/{b}/uncordon")

        # Its lease lapsed: the parent is re-queued, its sections cancelled; the old lease makes nothing more, and
        # the next attempt starts with none and makes its own.
        parent = await h.submit(SECOND)
        _, assignment = await take(h, a, "cpu/0", ttl_s=1.0)
        old = assignment["lease"]
        first = await make(client, parent, old, 1)
        await _until(h, parent, "queued")
        section = await h.job(first)
        assert section["state"] == "cancelled" and section["error"]["message"].startswith(
            f"parent_requeued: its parent job {parent}'s attempt 1 was re-queued (lease_expired)"), section
        with pytest.raises(Rejected) as stale:
            await make(client, parent, old, 2)
        assert stale.value.status == 409 and stale.value.code == "lease_lost"
        _, assignment = await take(h, a, "cpu/0")
        grant = assignment["lease"]
        assert assignment["attempt"] == 2 and await client.job_sections(parent, grant["lease_id"]) == []
        second = await make(client, parent, grant, 1)
        assert second != first
        assert [s["job_id"] for s in (await h.job(parent))["sections"]] == [second]
        status, rows, _ = await h.call("GET", f"/v1/jobs/{parent}/sections")
        assert [s["job_id"] for s in rows["sections"]] == [second]

        # Failed for good: its sections are cancelled as parent_failed.
        status, body = await h.result(parent, a, 2, grant, outcome="failed",
                                      error={"code": "bad_audio", "message": "not audio"})
        assert status == 200 and not body["requeued"], body
        section = await h.job(second)
        assert section["state"] == "cancelled" and section["error"]["message"].startswith("parent_failed: "), section
        assert h.metric("node_agent_scheduler_sections_total") == 4.0
    finally:
        await client.close()
        await close(h)


async def test_only_the_holder_makes_sections_and_only_the_owner_reads_them(store: str, tmp_path: Path) -> None:
    """With tokens: another node with the parent's lease id is refused (403, its secret is not the holder's);
    a client reads its own parent's sections, not another client's; a node must name the lease."""
    settings = SchedulerSettings(store=store, heartbeat_interval_s=120.0, tokens=TOKENS)
    running = await start_scheduler(settings, CollectorRegistry(), host="127.0.0.1", port=0, state_dir=tmp_path)
    session = aiohttp.ClientSession()
    holder, impostor = SchedulerClient(running.url, NODE_OLD, 10.0), SchedulerClient(running.url, NODE_NEW, 10.0)
    try:
        rack, rack_next = Caller(session, running.url, NODE_OLD), Caller(session, running.url, NODE_NEW)
        app1, app2 = Caller(session, running.url, CLIENT_1), Caller(session, running.url, CLIENT_2)
        ops = Caller(session, running.url, OPERATOR)
        status, a = await rack.register("node-a")
        assert status == 201
        status, b = await rack_next.register("node-b")
        assert status == 201
        holder.node_secret, impostor.node_secret = a["node_secret"], b["node_secret"]
        status, job = await app1("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(SECOND).decode()})
        assert status == 202, job
        parent = job["job_id"]
        status, assignment = await rack.as_node(a["node_secret"])(
            "GET", "/v1/nodes/node-a/jobs/next", params={"lease_ttl_s": 60})
        assert status == 200 and assignment["job_id"] == parent, assignment
        grant = assignment["lease"]
        child = await make(holder, parent, grant, 1)
        assert await holder.job_capacity(parent, grant["lease_id"]) == 0  # node-a's one slot is the parent's
        for call in (lambda: impostor.job_capacity(parent, grant["lease_id"]),
                     lambda: make(impostor, parent, grant, 2),
                     lambda: impostor.job_sections(parent, grant["lease_id"])):
            with pytest.raises(BadRequest) as refused:
                await call()
            assert refused.value.status == 403 and "node node-a has a node secret" in refused.value.detail
        status, body = await app1("GET", f"/v1/jobs/{parent}/capacity", params={"lease_id": grant["lease_id"]})
        assert status == 403 and "needs a node token" in body["error"]["message"], body
        status, body = await app1("GET", f"/v1/jobs/{parent}/sections")
        assert status == 200 and [s["job_id"] for s in body["sections"]] == [child], body
        assert (await ops("GET", f"/v1/jobs/{parent}/sections"))[0] == 200
        status, body = await app2("GET", f"/v1/jobs/{parent}/sections")
        assert status == 404 and body["error"]["code"] == "unknown_job", body
        status, body = await rack.as_node(a["node_secret"])("GET", f"/v1/jobs/{parent}/sections")
        assert status == 400 and body["error"]["message"].startswith("lease_id: "), body
        status, body = await app1("GET", f"/v1/jobs/{child}")
        assert status == 200 and body["parent_id"] == parent  # the section is the client's job too
    finally:
        for c in (holder, impostor):
            await c.close()
        await session.close()
        await running.stop()


async def test_a_version_2_store_upgrades_in_place(store: str, tmp_path: Path) -> None:
    """A store written by the previous version (schema 2) is migrated to sections on start; its jobs are kept."""
    url = store
    engine = engine_for(url, tmp_path)
    await engine.open(lambda topic: None)
    if url.startswith("postgresql"):  # a fresh database per test, as on SQLite
        conn = await asyncpg.connect(url)
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.close()

    async def version_2(tx: Any) -> None:
        await tx.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)")
        for version, _what, sql in MIGRATIONS[:2]:
            for statement in _statements(sql[tx.dialect.name]):
                await tx.execute(statement)
            await tx.execute("INSERT INTO schema_version (version, applied_at) VALUES ($1, 'then')", version)
        await tx.execute(
            "INSERT INTO jobs (job_id, seq, spec, audio_bytes, created_at, queued_at, state, priority, labels) "
            "VALUES ('job-from-v2', 1, '{}', 2, 1.0, 1.0, 'succeeded', 'batch', '{}')")

    try:
        await engine.run(version_2)
    finally:
        await engine.close()
    h = await serve(store, tmp_path)
    try:
        view = await h.job("job-from-v2")
        assert view["state"] == "succeeded" and view["sections"] == [] and view["parent_id"] is None
        assert await h.running.store.engine.run(
            lambda tx: tx.fetchval("SELECT MAX(version) FROM schema_version")) == MIGRATIONS[-1][0]
        # The new columns work: a section of a job leased on the upgraded store.
        client = client_of(h)
        try:
            a = await register(h, "node-a")
            parent = await h.submit(SECOND)
            _, assignment = await take(h, a, "cpu/0")
            child = await make(client, parent, assignment["lease"], 1)
            assert (await h.job(child))["parent_id"] == parent
        finally:
            await client.close()
    finally:
        await close(h)


async def test_a_job_never_split_pays_nothing_for_the_cascade(tmp_path: Path) -> None:
    """Re-queued, failed, cancelled and viewed, a job that made no section never reads a child: the write that
    ends it says it has none (SQLite's statement trace)."""
    h = await serve("sqlite", tmp_path)
    statements: list[str] = []
    h.running.store.engine._conn.set_trace_callback(statements.append)
    try:
        a = await register(h, "node-a", devices=SLOTS[:1])
        job_id = await h.submit(SECOND)
        _, assignment = await take(h, a, "cpu/0")
        status, body = await h.result(job_id, a, 1, assignment["lease"], outcome="failed",
                                      error={"code": "worker_crashed", "message": "killed"})
        assert status == 200 and body["requeued"], body
        _, assignment = await take(h, a, "cpu/0")
        status, body = await h.result(job_id, a, 2, assignment["lease"], outcome="failed",
                                      error={"code": "bad_audio", "message": "not audio"})
        assert status == 200 and not body["requeued"], body
        cancelled = await h.submit(SECOND)
        assert (await h.call("DELETE", f"/v1/jobs/{cancelled}"))[0] == 200
        assert (await h.job(job_id))["sections"] == []
        assert (await h.call("GET", "/v1/jobs"))[0] == 200
        assert any("RETURNING sections_made" in s for s in statements)  # (the trace saw the ends)
        assert not [s for s in statements if "parent_id =" in s or "parent_id IN" in s], statements
    finally:
        h.running.store.engine._conn.set_trace_callback(None)
        await close(h)
