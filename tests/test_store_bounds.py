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


async def test_a_job_keeps_at_most_max_segments_and_still_completes():
    from node_agent.scheduler.schemas import MAX_SEGMENTS_PER_JOB
    from test_scheduler import scheduler

    def seg(i: int) -> dict:
        return {"id": i, "start": i * 2.0, "end": i * 2.0 + 2, "text": f"s{i}"}

    async with scheduler() as h:
        node = await h.register()
        job = await h.submit(language="en")
        status, assigned = await h.poll(node)
        assert status == 200 and assigned["job_id"] == job, assigned
        status, grant, _ = await h.lease(node, job)
        assert status == 201, grant
        assert (await h.events(job, node, 1, grant, *(seg(i) for i in range(5))))[0] == 202
        # Past the bound (ids are a job's keys, so 0..MAX-1 bound how many it keeps): refused, naming the bound.
        status, reply = await h.events(job, node, 1, grant, seg(5), seg(MAX_SEGMENTS_PER_JOB))
        assert status == 400 and "MAX_SEGMENTS_PER_JOB" in reply["error"]["message"], reply
        assert str(MAX_SEGMENTS_PER_JOB) in reply["error"]["message"], reply
        status, reply = await h.events(job, node, 1, grant, *(seg(i) for i in range(MAX_SEGMENTS_PER_JOB + 1)))
        assert status == 400, reply
        status, reply = await h.result(job, node, 1, grant, result={
            "text": "s0 s1", "language": "en", "duration_s": 4.0, "segments": [seg(0), seg(1)]})
        assert status == 200, reply
        view = await h.job(job)
        assert view["state"] == "succeeded" and view["result"]["text"] == "s0 s1", view
        assert [s["id"] for s in view["segments"]] == [0, 1], view["segments"]


@pytest.mark.parametrize("change, where", [
    ({"devices": [{**{"resource": "cpu", "model": "tiny.en", "compute_type": "int8"}}] * 65}, "devices"),
    ({"devices": [{"resource": "cpu", "model": "m" * 150_000, "compute_type": "int8"}]}, "model"),
    ({"devices": [{"resource": "cpu", "model": "tiny", "compute_type": "c" * 150_000}]}, "compute_type"),
    ({"devices": [{"resource": "cpu", "model": "tiny", "compute_type": "int8", "plugin": "p" * 300}]}, "plugin"),
    ({"devices": [{"resource": "cpu", "model": "tiny", "compute_type": "int8", "languages": ["en"] * 201}]},
     "languages"),
    ({"hardware": {"cpu_cores": 4, "memory_bytes": 1, "gpus": [
        {"index": 0, "name": "g" * 150_000, "memory_bytes": 1}]}}, "name"),
    ({"hardware": {"cpu_cores": 4, "memory_bytes": 1, "gpus": [
        {"index": i, "name": "g", "memory_bytes": 1} for i in range(65)]}}, "gpus"),
])
async def test_registering_too_many_devices_or_huge_strings_is_400(change, where):
    from test_scheduler import CPU_EN, HARDWARE, scheduler

    async with scheduler() as h:
        body = {"agent_version": "0.1.0", "hostname": "host-a", "hardware": HARDWARE, "devices": [CPU_EN], **change}
        status, reply, _ = await h.call("POST", "/v1/nodes", json=body)
        assert status == 400 and where in str(reply), (status, str(reply)[:300])
        status, nodes, _ = await h.call("GET", "/v1/nodes")
        assert status == 200 and not nodes["nodes"], nodes
