"""The scheduler's store under crashes and large audio, with real processes (issue 14).

- ``kill -9`` of the embedded scheduler (SQLite) at three random moments of a 60-job run: the agent process that
  holds it is killed and started again on the same state directory and ports;
- ``kill -9`` of one of two ``node-agent scheduler`` replicas sharing one PostgreSQL database, mid-run;
- a 200 MB upload and its download through a standalone scheduler stay within a fixed memory bound, and a 200 MB
  JSON body is refused without being held.

The client is the project's own (``SchedulerClient`` + ``JobWaiter``): each submission carries one
``Idempotency-Key`` through its retries, and each job is followed by its id through refused connections and
restarts. After each run the store is read directly: every submitted job exactly once, one accepted result each.
The agents are real ``node-agent run`` processes; their plugin is the stand-in (``tests/fake_plugin.py`` through
``worker.command``: a real subprocess speaking the real protocol, "decoding" 0.15 s without a model), since what is
under test is the store, and 60 real decodes three restarts apart would cost the suite a minute. Real decoding
under kills is ``test_load.py``'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import psutil
import pytest

from helpers import SR, decode_clip, pcm16
from node_agent.scheduler_client import SchedulerClient
from node_agent.job_waiter import JobWaiter, Retrying
from node_agent.retry import RetryPolicy
from node_agent.scheduler.schemas import JobView
from procs import Proc, free_port, http_json, wait_for
from fake_plugin import command as fake_command
from test_cluster import ready, start_agent, start_agents, start_scheduler

pytestmark = pytest.mark.timeout(240)

JOBS = 60
#: The first 1.5 s of jfk.flac ("And so my fellow"): speech, so every result has text, and short, so the decode
#: (the encoder's fixed 30 s window dominates) is a fraction of a second.
AUDIO = pcm16(decode_clip("jfk.flac")[: int(1.5 * SR)])
FIELDS = {"format": "pcm_s16le", "sample_rate": SR, "language": "en"}
#: Submissions are spread over the first part of the run, so a kill can land on a submit as well as on a job.
SUBMIT_SPACING_S = 0.15
#: The client's retries: quick, since the test waits on them; no total (the run's deadline bounds them).
CLIENT_RETRY = RetryPolicy(initial_s=0.1, max_wait_s=1.0, max_total_s=None)
#: A killed holder's lease lapses after lease.ttl_s, an assignment it never leased after assign_timeout_s; both
#: short so that recovery is seconds. More attempts than kills, so the kills alone cannot fail a job.
RECOVERY_ENV = {
    # The stand-in plugin: three segments 0.05 s apart per job, then the result ("segment 1. segment 2. ...").
    "NODE_AGENT_WORKER__COMMAND": json.dumps(fake_command(job={"segments": 3, "every_s": 0.05})),
    "NODE_AGENT_LEASE__TTL_S": "2",
    "NODE_AGENT_LEASE__ACQUIRE_TIMEOUT_S": "2",
    "NODE_AGENT_SCHEDULER__ASSIGN_TIMEOUT_S": "3",
    "NODE_AGENT_SCHEDULER__MAX_ATTEMPTS": "6",
}
MiB = 1024 * 1024


@dataclass
class Run:
    """What the client saw: the job id of each submission (in order), each job's final view, and its retries."""

    ids: list[str] = field(default_factory=list)
    views: dict[str, JobView] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    #: The scheduler URL the client used last (it moves on when one fails).
    url: str = ""


async def run_jobs(urls: list[str], run: Run, until_s: float) -> None:
    """Submit ``JOBS`` jobs (spread over time) through one client and follow each to its end; fills ``run``.
    A job the scheduler lost (404) raises ``JobLost``; one not ended within ``until_s`` raises ``WaitExpired``."""
    loop = asyncio.get_running_loop()
    until = loop.time() + until_s

    def on_retry(r: Retrying) -> None:
        run.retries[r.stage] += 1

    async with SchedulerClient(urls, None, 5.0) as client:
        waiter = JobWaiter(client, CLIENT_RETRY, poll_slice_s=2.0)

        async def one(i: int) -> None:
            await asyncio.sleep(i * SUBMIT_SPACING_S)
            job_id = await waiter.submit(AUDIO, until=until, on_retry=on_retry, **FIELDS)
            run.ids.append(job_id)
            run.views[job_id] = await waiter.wait(job_id, until, stream=False, on_retry=on_retry)

        try:
            await asyncio.gather(*(one(i) for i in range(JOBS)))
        finally:
            run.url = client.base_url


async def finish(client: asyncio.Task[None], agent_urls: list[str]) -> None:
    """Wait for the client's run; if it fails, say what the agents were doing (a job stuck on one, say)."""
    try:
        await asyncio.wait_for(asyncio.shield(client), 180)
    except Exception as exc:
        client.cancel()
        states: list[object] = []
        for u in agent_urls:
            try:
                states.append(http_json("GET", f"{u}/status", timeout=5)[1])
            except OSError as why:
                states.append(f"{u}: {why}")
        raise AssertionError(f"{type(exc).__name__}: {exc}; agents: {json.dumps(states)[:6000]}") from exc


def check_client_saw(run: Run) -> None:
    assert len(run.ids) == JOBS and len(set(run.ids)) == JOBS, run.ids
    bad = {j: (v.state, v.error) for j, v in run.views.items() if v.state != "succeeded"}
    assert not bad, bad
    empty = [j for j, v in run.views.items() if not (v.result or {}).get("text", "").strip()]
    assert not empty, empty


def check_store_rows(jobs: list[tuple[str, str, int]], reports: list[tuple[str, int]], run: Run) -> None:
    """``jobs``: (job_id, state, attempt) of every job row; ``reports``: (job_id, rows) of the reports table."""
    assert sorted(j for j, _, _ in jobs) == sorted(run.ids), "the store's jobs are not the submitted ones"
    assert all(state == "succeeded" for _, state, _ in jobs), jobs
    per_job = dict(reports)
    assert per_job == {j: 1 for j in run.ids}, {j: n for j, n in per_job.items() if n != 1} or per_job


async def kill9(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
    await proc.proc.wait()


# --------------------------------------------------------------------------- kill -9 of the embedded scheduler


async def test_kill9_of_the_embedded_scheduler_loses_and_doubles_no_job(tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    # Three moments, one in each part of the run: the first while jobs are still being submitted (so submissions
    # meet the outage too), the others after a random number of finished jobs; each plus a random fraction of a
    # job's time, so a kill lands while a job decodes, while it is reported or while the next one is taken.
    moments = [("submitted", rng.randint(8, 30)), ("finished", rng.randint(24, 36)), ("finished", rng.randint(44, 54))]
    delays = [rng.uniform(0.0, 0.5) for _ in moments]
    what = f"seed {seed}, kills after {moments} jobs (+{[round(d, 2) for d in delays]} s)"
    started = time.monotonic()
    sched_port = free_port()
    scheduler = f"http://127.0.0.1:{sched_port}"
    agent, url = await start_agent(tmp_path, "agent", "embedded",
                                   NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{sched_port}", **RECOVERY_ENV)
    run = Run()
    restarts: list[float] = []
    try:
        client = asyncio.create_task(run_jobs([scheduler], run, until_s=180))
        finished_at_restart = 0
        for (kind, moment), delay in zip(moments, delays):
            # At least two jobs finished since the last restart: the agent is back at work when killed again.
            target = max(moment, finished_at_restart + 2) if kind == "finished" else moment
            count = (lambda: len(run.ids)) if kind == "submitted" else (lambda: len(run.views))
            await wait_for(lambda: client.done() or count() >= target, 180, f"{target} jobs {kind}")
            assert not client.done(), (what, client.exception() if client.done() else None)
            await asyncio.sleep(delay)
            await kill9(agent)
            # The same process again: same configuration, state directory (node id, scheduler.db) and ports.
            t = time.monotonic()
            await agent.start()
            await wait_for(lambda: ready(url) or agent.proc.returncode is not None, 60, "agent back")
            assert agent.proc.returncode is None, agent.log()[-5000:]
            restarts.append(round(time.monotonic() - t, 1))
            finished_at_restart = len(run.views)
        await finish(client, [url])
        check_client_saw(run)
        # The scheduler, asked by id after the run, knows every job as the client saw it end.
        for job_id in run.ids:
            code, view = http_json("GET", f"{scheduler}/v1/jobs/{job_id}")
            assert code == 200 and view["state"] == "succeeded", (job_id, code, view)
    finally:
        rc = await agent.stop()
    assert rc == 0, agent.log()[-5000:]
    with sqlite3.connect(tmp_path / "agent" / "scheduler.db") as db:
        jobs = db.execute("SELECT job_id, state, attempt FROM jobs").fetchall()
        reports = db.execute("SELECT job_id, COUNT(*) FROM reports GROUP BY job_id").fetchall()
        keys = db.execute("SELECT COUNT(DISTINCT idempotency_key) FROM jobs").fetchone()[0]
    check_store_rows(jobs, reports, run)
    assert keys == JOBS, (keys, what)
    # Submissions met the first outage and were retried with their keys (and still made one job each).
    assert run.retries["submit"] >= 1, (dict(run.retries), what)
    # The kills caught jobs between assignment and result: they ran again, and still ended once.
    again = sum(attempt - 1 for _, _, attempt in jobs)
    assert again >= 1, (jobs, what)
    print(f"{what}; restarts took {restarts} s; jobs run again: {again}; client retries: {dict(run.retries)}; "
          f"{time.monotonic() - started:.1f} s in all")


# ------------------------------------------------------------------- kill -9 of one PostgreSQL replica mid-run


async def test_kill9_of_one_postgresql_replica_mid_run_loses_and_doubles_no_job(tmp_path, pg_dsn):
    seed = int.from_bytes(os.urandom(4), "big")
    moment = random.Random(seed).randint(15, 40)  # submitted jobs: later submissions can only go to replica B
    started = time.monotonic()
    env = {"NODE_AGENT_SCHEDULER__STORE": pg_dsn, **RECOVERY_ENV}
    (a, a_url), (b, b_url) = await asyncio.gather(start_scheduler(tmp_path, free_port(), "replica-a", **env),
                                                  start_scheduler(tmp_path, free_port(), "replica-b", **env))
    procs = [a, b]
    run = Run()
    db = await asyncpg.connect(pg_dsn)
    try:
        # Started once both replicas answer, so both agents work through replica A until it dies. One thread
        # each: the two agents share the box's two cores.
        agents = await start_agents(tmp_path, ["agent-a", "agent-b"], f"{a_url},{b_url}",
                                    NODE_AGENT_ASR__CPU_THREADS="1", **RECOVERY_ENV)
        procs += [p for p, _ in agents]
        client = asyncio.create_task(run_jobs([a_url, b_url], run, until_s=180))
        await wait_for(lambda: client.done() or len(run.ids) >= moment, 180, f"{moment} jobs submitted")
        assert not client.done(), client.exception() if client.done() else None
        deadline = time.monotonic() + 30
        while not await db.fetchval("SELECT COUNT(*) FROM jobs WHERE state = 'running'"):
            assert time.monotonic() < deadline, "no job running"  # the kill must land while jobs run
            await asyncio.sleep(0.02)
        await kill9(a)  # the first URL of both agents and of the client
        finished_at_kill = len(run.views)
        await finish(client, [u for _, u in agents])
        check_client_saw(run)
        assert run.url == b_url, run.url  # the client failed over for its submissions and polls
        for job_id in run.ids:
            code, view = http_json("GET", f"{b_url}/v1/jobs/{job_id}")
            assert code == 200 and view["state"] == "succeeded", (job_id, code, view)
        jobs = [tuple(r) for r in await db.fetch("SELECT job_id, state, attempt FROM jobs")]
        reports = [tuple(r) for r in await db.fetch("SELECT job_id, COUNT(*) FROM reports GROUP BY job_id")]
        keys = await db.fetchval("SELECT COUNT(DISTINCT idempotency_key) FROM jobs")
        active = await db.fetchval("SELECT COUNT(*) FROM leases WHERE state = 'active'")
    finally:
        await db.close()
        for p in reversed(procs):
            await p.stop()
    check_store_rows(jobs, reports, run)
    assert keys == JOBS and active == 0, (keys, active)
    for p, _ in agents:  # both agents were on replica A and carried on with B
        assert f"switching to {b_url}" in p.log(), p.log()[-3000:]
    again = sum(attempt - 1 for _, _, attempt in jobs)
    print(f"seed {seed}: replica A killed after {moment} submitted, {finished_at_kill} finished jobs; jobs run "
          f"again: {again}; client retries: {dict(run.retries)}; {time.monotonic() - started:.1f} s in all")


# ------------------------------------------------------------------------------------- 200 MB and memory

UPLOAD_BYTES = 200_000_000  # under scheduler.max_body_bytes (200 MiB) with the multipart framing
PIECE = 1_000_000
RSS_BOUND = 64 * MiB


class PeakRss:
    """The peak RSS of a process, sampled every 20 ms in a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0

    @contextmanager
    def watch(self) -> Iterator["PeakRss"]:
        self.peak = self.process.memory_info().rss
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                self.peak = max(self.peak, self.process.memory_info().rss)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)


def pieces(total: int, digest: "hashlib._Hash") -> Iterator[bytes]:
    """``total`` pseudo-random bytes in ``PIECE``-sized pieces, each hashed into ``digest`` as it is made."""
    rng = random.Random(total)
    left = total
    while left:
        piece = rng.randbytes(min(PIECE, left))
        digest.update(piece)
        left -= len(piece)
        yield piece


def post_multipart(port: int, total: int, digest: "hashlib._Hash") -> tuple[int, dict]:
    """``POST /v1/jobs`` with a ``file`` part of ``total`` bytes streamed from a generator (Content-Length known,
    as curl sends it); the body is never whole in this process either."""
    boundary = "----node-agent-store-crash"
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in {"format": "pcm_s16le", "sample_rate": str(SR), "language": "en"}.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.pcm"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head.encode()
        yield from pieces(total, digest)
        yield tail

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/jobs", body=body(), headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head.encode()) + total + len(tail))})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def download(port: int, job_id: str) -> tuple[int, int, str]:
    """``GET /v1/jobs/{id}/audio`` read 1 MiB at a time: (status, bytes, sha256)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", f"/v1/jobs/{job_id}/audio")
        resp = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while chunk := resp.read(MiB):
            digest.update(chunk)
            size += len(chunk)
        return resp.status, size, digest.hexdigest()
    finally:
        conn.close()


async def post_json_body(url: str, total: int) -> tuple[int, dict, float]:
    """A JSON body of ``total`` bytes (an ``audio_b64`` string) streamed with its Content-Length; the answer may
    come before the body is all sent. Returns (status, answer, seconds)."""
    async def body() -> AsyncIterator[bytes]:
        yield b'{"audio_b64": "'
        left = total - len(b'{"audio_b64": "') - 2
        piece = b"A" * PIECE
        while left:
            yield piece[: min(PIECE, left)]
            left -= min(PIECE, left)
        yield b'"}'

    t = time.monotonic()
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(f"{url}/v1/jobs", data=body(), headers={
                    "Content-Type": "application/json", "Content-Length": str(total)},
                    timeout=aiohttp.ClientTimeout(total=60)) as resp:
                return resp.status, await resp.json(), time.monotonic() - t
        except aiohttp.ClientOSError as exc:  # the server answered and closed while the body was still going
            raise AssertionError(f"no answer read before the connection closed: {exc}") from None


async def test_a_200_mb_upload_and_download_stay_within_a_fixed_memory_bound(tmp_path):
    started = time.monotonic()
    port = free_port()
    sched, url = await start_scheduler(tmp_path, port, NODE_AGENT_NODE__STATE_DIR=str(tmp_path / "state"))
    try:
        rss = PeakRss(sched.pid)
        # Warm the paths measured (first multipart parse, first store writes and reads) with a small job.
        small = hashlib.sha256()
        code, warm = await asyncio.to_thread(post_multipart, port, 2 * MiB, small)
        assert code == 202, warm
        assert (await asyncio.to_thread(download, port, warm["job_id"]))[1] == 2 * MiB
        base = rss.process.memory_info().rss

        sent = hashlib.sha256()
        t = time.monotonic()
        with rss.watch():
            code, submitted = await asyncio.to_thread(post_multipart, port, UPLOAD_BYTES, sent)
        upload_s, upload_peak = time.monotonic() - t, rss.peak
        assert code == 202 and submitted["state"] == "queued", submitted
        assert upload_peak - base < RSS_BOUND, (upload_peak - base) / MiB

        t = time.monotonic()
        with rss.watch():
            code, size, sha = await asyncio.to_thread(download, port, submitted["job_id"])
        download_s, download_peak = time.monotonic() - t, rss.peak
        assert code == 200 and size == UPLOAD_BYTES and sha == sent.hexdigest(), (code, size)
        assert download_peak - base < RSS_BOUND, (download_peak - base) / MiB

        with rss.watch():
            code, refused, json_s = await post_json_body(url, UPLOAD_BYTES)
        json_peak = rss.peak
        assert code == 413 and "multipart" in refused["error"]["message"], (code, refused)
        assert json_s < 10, json_s
        assert json_peak - base < RSS_BOUND, (json_peak - base) / MiB  # refused on its Content-Length
        print(f"RSS base {base / MiB:.0f} MiB; peak increase: upload {(upload_peak - base) / MiB:.1f} MiB "
              f"({upload_s:.1f} s), download {(download_peak - base) / MiB:.1f} MiB ({download_s:.1f} s), "
              f"JSON refused {(json_peak - base) / MiB:.1f} MiB ({json_s:.2f} s); "
              f"{time.monotonic() - started:.1f} s in all")
    finally:
        await sched.stop()
