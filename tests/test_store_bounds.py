"""Bounds on what the store keeps and what deleting it costs (issue 22, rows 2 and 13): dropping and reaping big
audio costs the scheduler no memory (real processes, peak RSS), and a job's segments, a node's devices and a
device's strings are bounded at the door (400 naming the bound)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time

import pytest

from procs import free_port, http_json, wait_for
from test_cluster import start_scheduler
from test_store_crash import MiB, RSS_BOUND, PeakRss, post_multipart

pytestmark = pytest.mark.timeout(120)

#: Big enough that a store holding the deleted pages in memory shows it far past RSS_BOUND (64 MiB).
BIG = 150_000_000


def _job(url: str, job_id: str) -> tuple[int, dict]:
    return http_json("GET", f"{url}/v1/jobs/{job_id}")


async def test_finishing_a_job_drops_its_150_mb_audio_within_a_fixed_memory_bound(tmp_path):
    # No node serves it: the job times out two seconds after it is queued, and its audio is dropped then.
    port = free_port()
    sched, url = await start_scheduler(tmp_path, port, NODE_AGENT_NODE__STATE_DIR=str(tmp_path / "state"),
                                       NODE_AGENT_SCHEDULER__DEFAULT_DEADLINE_S="2")
    try:
        rss = PeakRss(sched.pid)
        code, warm = await asyncio.to_thread(post_multipart, port, 2 * MiB, hashlib.sha256())
        assert code == 202, warm
        await wait_for(lambda: _job(url, warm["job_id"])[1]["state"] == "failed", 10, "warm job timed out")
        code, big = await asyncio.to_thread(post_multipart, port, BIG, hashlib.sha256())
        assert code == 202, big
        base = rss.process.memory_info().rss
        with rss.watch():
            await wait_for(lambda: _job(url, big["job_id"])[1]["state"] == "failed", 20, "big job timed out")
            await asyncio.sleep(1.0)  # the pass that dropped it has committed; what it cost is still held
        assert http_json("GET", f"{url}/v1/jobs/{big['job_id']}/audio")[0] in (404, 410)
        assert rss.peak - base < RSS_BOUND, (rss.peak - base) / MiB
    finally:
        await sched.stop()


async def test_retention_reaping_4_jobs_of_100_mb_stays_within_a_fixed_memory_bound(tmp_path):
    # keep_audio: finished jobs keep their audio until retention reaps them, all due in one pass.
    state = tmp_path / "state"
    env = {"NODE_AGENT_NODE__STATE_DIR": str(state), "NODE_AGENT_SCHEDULER__KEEP_AUDIO": "true",
           "NODE_AGENT_SCHEDULER__JOB_RETENTION_S": "3"}
    port = free_port()
    sched, url = await start_scheduler(tmp_path, port, **env)
    ids = []
    try:
        for _ in range(4):
            code, job = await asyncio.to_thread(post_multipart, port, 100_000_000, hashlib.sha256())
            assert code == 202, job
            ids.append(job["job_id"])
    finally:
        await sched.stop()
    # Every deadline passed at once: the first pass finishes all four, and one pass later they are all due.
    with sqlite3.connect(state / "scheduler.db") as db:
        db.execute("UPDATE jobs SET deadline_at = 0")
    port = free_port()
    sched, url = await start_scheduler(tmp_path, port, name="scheduler-again", **env)
    try:
        rss = PeakRss(sched.pid)
        base = rss.process.memory_info().rss
        started = time.monotonic()
        with rss.watch():
            await wait_for(lambda: all(_job(url, i)[0] == 404 for i in ids), 60, "all four reaped")
            await asyncio.sleep(1.0)
        assert rss.peak - base < RSS_BOUND, (rss.peak - base) / MiB
        print(f"reaped in {time.monotonic() - started:.1f} s; peak increase {(rss.peak - base) / MiB:.1f} MiB")
    finally:
        await sched.stop()
