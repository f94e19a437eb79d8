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
from node_agent.scheduler import auth
from node_agent.scheduler.db import engine_for
from node_agent.scheduler.migrations import MIGRATIONS, _statements
from node_agent.scheduler.rules import CapacityFacts, section_capacity
from node_agent.scheduler.server import start_scheduler
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
               offset_s: float | None = None) -> str:
    return await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"], index=index,
                                       offset_s=offset_s if offset_s is not None else 10.0 * index,
                                       duration_s=float(seconds), audio=SECOND * seconds)


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
        for index, offset, seconds, duration, param in [(0, 5.0, 1, 1.0, "index"), (16, 5.0, 1, 1.0, "index"),
                                                        (2, 0.0, 1, 1.0, "offset_s"), (2, 5.0, 1, 9.0, "duration_s")]:
            with pytest.raises(BadRequest) as refused:
                await client.create_section(parent, lease_id=grant["lease_id"], lease_epoch=grant["epoch"],
                                            index=index, offset_s=offset, duration_s=duration,
                                            audio=SECOND * seconds)
            assert refused.value.status == 422 and refused.value.code == "section_refused", refused.value
            assert refused.value.detail.startswith(f"{param}: ") and "\n" not in refused.value.detail
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
        async with h.session.get(f"{h.url}{first['audio']['url']}") as resp:
            assert await resp.read() == SECOND * 3
        slow = machine_slowdown()
        deadline = time.monotonic() + 10 * slow
        while (await h.job(child))["state"] != "queued":  # its 1 s lease lapses unrenewed
            assert time.monotonic() < deadline, await h.job(child)
            await asyncio.sleep(0.1)
        assert (await h.job(parent))["state"] == "running"  # the parent is not touched
        assert (await h.job(parent))["attempt"] == 1

        # The parent's node follows: a long poll wakes on the child's result.
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
        later = await client.job_sections(parent, grant["lease_id"], from_index=2, wait_s=5)
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
