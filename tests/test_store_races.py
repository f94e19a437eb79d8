"""Races between concurrent submissions on the SQL store (issue 22, #5 and #9) and the idempotency fingerprint's
audio digest: on SQLite and a real PostgreSQL, with one replica and with two."""

from __future__ import annotations

import asyncio
import base64
import collections
from pathlib import Path
from typing import Any

import pytest
import test_store
from test_store import close, serve, submit_keyed

store = test_store.store  # the fixture: sqlite, postgresql, postgresql-general

pytestmark = pytest.mark.timeout(120)


async def submit(h: Any, audio: bytes) -> int:
    status, _, _ = await h.call("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(audio).decode()})
    return status


async def test_concurrent_submits_with_one_key_all_replay_the_one_job(store: str, tmp_path: Path) -> None:
    """20 concurrent submits per Idempotency-Key, 10 keys, spread over two replicas on PostgreSQL: one job per key
    and every answer a 202 naming it (the loser of the race on the key's unique index replays the winner's job)."""
    replicas = [await serve(store, tmp_path)]
    if store.startswith("postgresql"):
        replicas.append(await serve(store, tmp_path))
    try:
        calls = [(key, replicas[i % len(replicas)]) for key in range(10) for i in range(20)]
        answers = await asyncio.gather(*(submit_keyed(h, f"audio of {key}".encode(), f"key-{key}")
                                         for key, h in calls))
        jobs: dict[int, set[str]] = collections.defaultdict(set)
        for (key, _), (status, reply, headers) in zip(calls, answers):
            assert status == 202, reply
            jobs[key].add(reply["job_id"])
        assert all(len(ids) == 1 for ids in jobs.values()), jobs
        assert len({i for ids in jobs.values() for i in ids}) == 10
        replayed = sum(headers.get("Idempotent-Replayed") == "true" for _, _, headers in answers)
        assert replayed == 190
    finally:
        await close(*replicas)


async def test_the_queue_cap_holds_under_concurrent_submits(store: str, tmp_path: Path) -> None:
    """max_queued_jobs 50, 100 concurrent submits to one replica: exactly 50 accepted, the rest 429."""
    h = await serve(store, tmp_path, max_queued_jobs=50)
    try:
        statuses = await asyncio.gather(*(submit(h, b"audio %d" % i) for i in range(100)))
        assert collections.Counter(statuses) == {202: 50, 429: 50}
        assert await h.running.store.queue_depth() == 50
    finally:
        await close(h)


async def test_the_queue_cap_holds_across_two_postgresql_replicas(pg_dsn: str, tmp_path: Path) -> None:
    """Near the cap every submission counts the unfinished jobs under one lock, so two replicas admitting at once
    stop at the cap exactly: 45 queued (90 %), then 100 concurrent submits over both, 5 accepted."""
    a = await serve(pg_dsn, tmp_path, max_queued_jobs=50)
    b = await serve(pg_dsn, tmp_path, max_queued_jobs=50)
    try:
        for i in range(45):
            assert await submit(a, b"first %d" % i) == 202
        await asyncio.sleep(0.6)  # both replicas' reaping passes have counted the 45
        statuses = await asyncio.gather(*(submit((a, b)[i % 2], b"audio %d" % i) for i in range(100)))
        assert collections.Counter(statuses) == {202: 5, 429: 95}
        assert await a.running.store.queue_depth() == 50
    finally:
        await close(a, b)


async def test_a_key_reused_with_other_audio_of_the_same_length_is_refused(store: str, tmp_path: Path) -> None:
    """The fingerprint covers the audio's bytes: the same key with other audio of the same length is
    400 idempotency_key_reused, and with the same audio a replay; small and multi-chunk uploads alike."""
    h = await serve(store, tmp_path)
    try:
        for n, size in enumerate((16, 1536 * 1024)):
            first, other = bytes(size), b"\x01" + bytes(size - 1)
            status, reply, _ = await submit_keyed(h, first, f"key-{n}")
            assert status == 202, reply
            job_id = reply["job_id"]
            status, reply, headers = await submit_keyed(h, first, f"key-{n}")
            assert (status, reply["job_id"], headers.get("Idempotent-Replayed")) == (202, job_id, "true")
            status, reply, _ = await submit_keyed(h, other, f"key-{n}")
            assert status == 400 and reply["error"]["code"] == "idempotency_key_reused", reply
    finally:
        await close(h)
