"""The scheduler's store (issue 14) on real engines: SQLite, and a real PostgreSQL shared by replicas.

In-process schedulers on a store, and fake nodes speaking the node protocol over HTTP (test_scheduler.Harness):
the decoding itself adds nothing to what the store guarantees. Two tests run ``node-agent scheduler`` processes
where a process is the point (the CLI's messages, two replica processes racing for jobs).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import random
import re
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import asyncpg
import pg
import pytest
from prometheus_client import CollectorRegistry

from node_agent.config import SchedulerSettings, redact_dsn
from node_agent.scheduler.errors import StoreError
from node_agent.scheduler.server import NOTIFIER_KEY, start_scheduler
from procs import free_port
from test_cluster import start_scheduler as start_scheduler_process
from test_scheduler import CPU_EN, GPU_ANY, Harness

pytestmark = pytest.mark.timeout(60)

#: Fake nodes send no heartbeats: with this interval none of them is declared gone during a test.
QUIET_NODES = {"heartbeat_interval_s": 120.0}
#: A line of the log (at DEBUG level, asyncio's own lines among them), not a message to the user.
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")


#: Whether ``serve`` turns on PostgreSQL's single-statement forms of the hot operations (set by ``store``).
_SINGLE_STATEMENTS = {"on": True}


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-general"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL: a SQLite file in the test's directory, or a fresh database on the session's PostgreSQL, used
    with the single-statement forms (production's way) and without them (the general path alone)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'scheduler.db'}"
        return
    _SINGLE_STATEMENTS["on"] = request.param == "postgresql"
    yield request.getfixturevalue("pg_dsn")
    _SINGLE_STATEMENTS["on"] = True


@dataclass
class Remote:
    """A scheduler in another process, for Harness (which needs only its URL)."""

    url: str


async def serve(store: str, tmp_path: Path, port: int = 0, **overrides: Any) -> Harness:
    settings = SchedulerSettings(**{"store": store, **QUIET_NODES, **overrides})
    registry = CollectorRegistry()
    running = await start_scheduler(settings, registry, host="127.0.0.1", port=port, state_dir=tmp_path,
                                    single_statements=_SINGLE_STATEMENTS["on"])
    return Harness(running, aiohttp.ClientSession(), registry)


async def close(*harnesses: Harness) -> None:
    for h in harnesses:
        await h.session.close()
        await h.running.stop()


async def audio_of(h: Harness, job_id: str) -> bytes:
    async with h.session.get(f"{h.url}/v1/jobs/{job_id}/audio") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def submit_keyed(h: Harness, audio: bytes, key: str) -> tuple[int, Any, Any]:
    return await h.call("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(audio).decode()},
                        headers={"Idempotency-Key": key})


def segment(seg_id: int, text: str) -> dict[str, Any]:
    return {"id": seg_id, "start": float(seg_id), "end": seg_id + 1.0, "text": text}


def result_of(text: str, *segments: dict[str, Any]) -> dict[str, Any]:
    return {"text": text, "language": "en", "duration_s": 2.0, "segments": list(segments)}


async def lease_row(h: Harness, lease_id: str) -> dict[str, Any]:
    row = await h.running.store.lease_state(lease_id)
    assert row is not None
    return row


# ------------------------------------------------------------------------------------- 1. restarts


async def test_a_restart_loses_nothing(store: str, tmp_path: Path) -> None:
    """Queued jobs stay queued (and go in submission order), a leased job stays running and its holder carries on,
    a finished job keeps its result and segments, and epochs keep growing."""
    # Job 2's audio spans two of the store's 1 MiB chunks.
    audios = [b"first job audio", b"second job audio", bytes(random.getrandbits(8) for _ in range(1536 * 1024)),
              b"fourth job audio"]
    h = await serve(store, tmp_path)
    try:
        holder = await h.register(node_id="holder")
        finisher = await h.register(node_id="finisher")
        jobs = [await h.submit(a) for a in audios]
        status, assignment = await h.poll(holder)
        assert status == 200 and assignment["job_id"] == jobs[0]
        status, held, _ = await h.lease(holder, jobs[0], ttl_s=60)
        assert status == 201, held
        early = segment(0, " before the restart")
        assert (await h.events(jobs[0], holder, 1, held, early))[0] == 202
        status, assignment = await h.poll(finisher)
        assert status == 200 and assignment["job_id"] == jobs[1]
        _, done, _ = await h.lease(finisher, jobs[1], ttl_s=60)
        finished = result_of("finished before", segment(0, " finished"), segment(1, " before"))
        status, ack = await h.result(jobs[1], finisher, 1, done, result=finished)
        assert status == 200 and ack["duplicate"] is False
        before = await h.job(jobs[1])
    finally:
        await close(h)

    h = await serve(store, tmp_path)
    try:
        views = [await h.job(j) for j in jobs]
        assert [v["state"] for v in views] == ["running", "succeeded", "queued", "queued"], views
        assert views[0]["node_id"] == holder and views[0]["segments"] == [early]
        assert (views[1]["result"], views[1]["segments"]) == (before["result"], before["segments"])
        assert views[1]["result"]["text"] == "finished before" and len(views[1]["segments"]) == 2
        # The holder carries on where it was: renew, stream, report.
        status, renewed = await h.renew(held["lease_id"], holder, held["epoch"])
        assert status == 200 and renewed["epoch"] == held["epoch"], renewed
        late = segment(1, " after the restart")
        assert (await h.events(jobs[0], holder, 1, held, late))[0] == 202
        assert (await h.job(jobs[0]))["segments"] == [early, late]
        status, ack = await h.result(jobs[0], holder, 1, held, result=result_of("held across", early, late))
        assert status == 200 and ack["duplicate"] is False, ack
        # The queued ones go in the order they were submitted, audio intact, under larger epochs.
        epochs = []
        for job_id, audio in zip(jobs[2:], audios[2:]):
            status, assignment = await h.poll(finisher)
            assert status == 200 and assignment["job_id"] == job_id
            assert await audio_of(h, job_id) == audio
            status, grant, _ = await h.lease(finisher, job_id, ttl_s=60)
            assert status == 201, grant
            epochs.append(grant["epoch"])
            assert (await h.result(job_id, finisher, 1, grant))[0] == 200
        assert min(epochs) > max(held["epoch"], done["epoch"]) and epochs == sorted(set(epochs)), epochs
        assert [(await h.job(j))["state"] for j in jobs] == ["succeeded"] * 4
    finally:
        await close(h)


# -------------------------------------------------------------------------- 2. replicas on one database


async def test_two_replicas_answer_any_request(pg_dsn: str, tmp_path: Path) -> None:
    # Started together: their migrations race, under the advisory lock.
    a, b = await asyncio.gather(serve(pg_dsn, tmp_path / "a"), serve(pg_dsn, tmp_path / "b"))
    try:
        # Long polls wake only on a notification: a periodic re-check must not pass for LISTEN/NOTIFY.
        for h in (a, b):
            h.running.app[NOTIFIER_KEY].poll_s = None
        audio = bytes(random.getrandbits(8) for _ in range(1200 * 1024))
        job = await a.submit(audio)
        node = await b.register(node_id="node-1")
        # A long poll: a reaper pass on either replica may hold the job's row (clearing its "no live node serves
        # it" mark) just as the claim runs, which then passes it by (SKIP LOCKED) and waits for the reaper's
        # notification.
        status, assignment = await a.poll(node, wait_s=10)
        assert status == 200 and assignment["job_id"] == job
        assert await audio_of(b, job) == audio
        status, grant, _ = await b.lease(node, job, ttl_s=30)
        assert status == 201, grant
        status, renewed = await a.renew(grant["lease_id"], node, grant["epoch"])
        assert status == 200 and renewed["epoch"] == grant["epoch"]
        first = segment(0, " streamed through b")
        assert (await b.events(job, node, 1, grant, first))[0] == 202
        status, ack = await a.result(job, node, 1, grant, result=result_of("reported to a", first))
        assert status == 200 and ack["duplicate"] is False
        view = await b.job(job)
        assert (view["state"], view["node_id"], view["segments"]) == ("succeeded", node, [first])
        assert view["result"]["text"] == "reported to a"

        # A long poll for work on A is woken by a submission on B.
        poll = asyncio.create_task(a.poll(node, wait_s=10))
        await asyncio.sleep(0.5)
        assert not poll.done()
        second = await b.submit(b"second")
        submitted = time.monotonic()
        status, assignment = await poll
        woke_after = time.monotonic() - submitted
        assert status == 200 and assignment["job_id"] == second
        assert woke_after < 1.0, f"the poll on A answered {woke_after:.2f} s after the submission on B"

        # A client waiting for its job on B hears of the result posted on A.
        _, grant, _ = await a.lease(node, second, ttl_s=30)
        waiting = asyncio.create_task(b.job(second, wait_s=10))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert (await a.result(second, node, 1, grant))[0] == 200
        reported = time.monotonic()
        view = await waiting
        answered_after = time.monotonic() - reported
        assert view["state"] == "succeeded"
        assert answered_after < 1.0, f"the job wait on B answered {answered_after:.2f} s after the result on A"

        # The same Idempotency-Key on both replicas is one job.
        status, first_try, _ = await submit_keyed(a, b"keyed", "key-1")
        assert status == 202, first_try
        status, replay, headers = await submit_keyed(b, b"keyed", "key-1")
        assert status == 202 and replay["job_id"] == first_try["job_id"], replay
        assert headers.get("Idempotent-Replayed") == "true"
    finally:
        await close(a, b)


# ------------------------------------------------------------------------------------------ 3. fencing


async def test_a_lease_superseded_on_another_resource_cannot_report(store: str, tmp_path: Path) -> None:
    """Gap (a): the job leased on cpu, then again on gpu:0 of the same node; the cpu lease's report is refused."""
    h = await serve(store, tmp_path)
    try:
        node = await h.register([CPU_EN, GPU_ANY], node_id="two-devices")
        job = await h.submit()
        assert (await h.poll(node, resource="cpu"))[0] == 200
        _, old, _ = await h.lease(node, job, resource="cpu")
        status, new, _ = await h.lease(node, job, resource="gpu:0")
        assert status == 201 and new["epoch"] > old["epoch"], new
        assert (await lease_row(h, old["lease_id"]))["state"] == "superseded"
        status, reply = await h.result(job, node, 1, old, result=result_of("from the superseded lease"))
        assert status == 409 and reply["error"]["code"] == "stale_epoch", reply
        assert (await h.job(job))["state"] == "running"
        status, reply = await h.result(job, node, 1, new, result=result_of("from the live lease"))
        assert status == 200 and reply["duplicate"] is False
        view = await h.job(job)
        assert view["state"] == "succeeded" and view["result"]["text"] == "from the live lease"
    finally:
        await close(h)


async def test_events_from_another_node_are_refused_and_leave_nothing(store: str, tmp_path: Path) -> None:
    """Gap (b): another node repeating the holder's attempt, lease id and epoch."""
    h = await serve(store, tmp_path)
    try:
        holder, other = await h.register(node_id="holder"), await h.register(node_id="other")
        job = await h.submit()
        assert (await h.poll(holder))[0] == 200
        _, grant, _ = await h.lease(holder, job)
        status, reply = await h.events(job, other, 1, grant, segment(0, " forged"))
        assert status == 409 and reply["error"]["code"] == "stale_epoch", reply
        assert (await h.job(job))["segments"] == []
        real = segment(0, " real")
        assert (await h.events(job, holder, 1, grant, real))[0] == 202
        # Neither a new segment nor one replacing the holder's.
        for forged in (segment(0, " forged over"), segment(1, " forged next")):
            status, _ = await h.events(job, other, 1, grant, forged)
            assert status == 409
        assert (await h.job(job))["segments"] == [real]
        status, _ = await h.result(job, holder, 1, grant, result=result_of("real", real))
        assert status == 200
        status, reply = await h.events(job, other, 1, grant, segment(1, " forged late"))
        assert status == 409, reply
        view = await h.job(job)
        assert (view["state"], view["segments"], view["result"]["text"]) == ("succeeded", [real], "real")
    finally:
        await close(h)


async def test_a_renewal_from_another_node_is_refused(store: str, tmp_path: Path) -> None:
    """Gap (c): the holder's lease id and epoch in another node's name; the lease is not extended by it."""
    h = await serve(store, tmp_path)
    try:
        holder, other = await h.register(node_id="holder"), await h.register(node_id="other")
        job = await h.submit()
        assert (await h.poll(holder))[0] == 200
        _, grant, _ = await h.lease(holder, job, ttl_s=10)
        granted = (await lease_row(h, grant["lease_id"]))["expires_at"]
        status, reply = await h.renew(grant["lease_id"], other, grant["epoch"])
        assert status == 410 and reply["error"]["code"] == "stale_epoch", reply
        assert (await lease_row(h, grant["lease_id"]))["expires_at"] == granted
        status, reply = await h.renew(grant["lease_id"], holder, grant["epoch"])
        assert status == 200 and reply["epoch"] == grant["epoch"], reply
        assert (await lease_row(h, grant["lease_id"]))["expires_at"] > granted
    finally:
        await close(h)


async def test_a_poll_takes_the_jobs_lease_with_it_when_its_resource_is_free(store: str, tmp_path: Path) -> None:
    """``lease_ttl_s`` on a poll: the assignment carries the job's lease (one round trip less per job); it is the
    holder's as one from ``POST /v1/leases`` is. With the resource still held by another job's lease the assignment
    comes without one, and ``POST /v1/leases`` says who holds it."""
    h = await serve(store, tmp_path)
    try:
        node = await h.register()
        first = await h.submit()
        status, body, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                       params={"wait_s": 0, "resource": "cpu", "lease_ttl_s": 10})
        assert status == 200 and body["job_id"] == first, body
        grant = body["lease"]
        assert grant is not None and grant["resource"] == "cpu" and grant["ttl_s"] == 10, body
        assert 0 <= body["poll_held_s"] < 5
        row = await lease_row(h, grant["lease_id"])
        assert (row["state"], row["job_id"], row["epoch"]) == ("active", first, grant["epoch"])
        assert (await h.job(first))["state"] == "running"
        status, reply = await h.renew(grant["lease_id"], node, grant["epoch"])
        assert status == 200, reply
        # Another node cannot use it, as for any lease.
        other = await h.register(node_id="other")
        status, reply = await h.result(first, other, 1, grant, result=result_of("forged"))
        assert status == 409 and reply["error"]["code"] == "stale_epoch", reply

        # A second job while the first one's lease still holds cpu: assigned, but without a lease.
        second = await h.submit()
        status, body, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                       params={"wait_s": 0, "resource": "cpu", "lease_ttl_s": 10})
        assert status == 200 and body["job_id"] == second and body["lease"] is None, body
        status, reply, _ = await h.lease(node, second)
        assert status == 409 and reply["error"]["code"] == "resource_held", reply

        status, reply = await h.result(first, node, 1, grant, result=result_of("first", segment(0, " first")))
        assert status == 200 and reply["accepted"], reply
        assert (await h.job(first))["state"] == "succeeded"
        status, later, _ = await h.lease(node, second)
        assert status == 201 and later["epoch"] > grant["epoch"], later

        # Nonsense is refused, naming the parameter.
        for bad in ("0", "-3", "soon", "nan"):
            status, reply, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                            params={"wait_s": 0, "lease_ttl_s": bad})
            assert status == 400 and "lease_ttl_s" in reply["error"]["message"], (bad, reply)
    finally:
        await close(h)


async def test_an_assignment_lost_with_its_lease_runs_again_after_the_ttl(store: str, tmp_path: Path) -> None:
    """The poll's answer never reaches the node (a proxy's error page): the lease granted with it is not renewed,
    so the job is re-queued when it expires (not after assign_timeout_s), as the next attempt, and the lost
    holder's late report is refused."""
    h = await serve(store, tmp_path, lease_min_ttl_s=0.5, assign_timeout_s=60)
    try:
        node = await h.register()
        job = await h.submit()
        status, lost, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                       params={"wait_s": 0, "lease_ttl_s": 1})
        assert status == 200 and lost["lease"] is not None, lost
        deadline = time.monotonic() + 15
        while (view := await h.job(job))["state"] != "queued":
            assert time.monotonic() < deadline, f"not re-queued after the lease's TTL: {view}"
            await asyncio.sleep(0.1)
        assert view["attempt"] == 2, view
        status, again, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                        params={"wait_s": 0, "lease_ttl_s": 10})
        assert status == 200 and again["attempt"] == 2 and again["lease"]["epoch"] > lost["lease"]["epoch"], again
        status, reply = await h.result(job, node, 1, lost["lease"], result=result_of("late"))
        assert status == 409, reply
        status, reply = await h.result(job, node, 2, again["lease"], result=result_of("on time"))
        assert status == 200 and reply["accepted"], reply
    finally:
        await close(h)


# ------------------------------------------------------------------------------------- 4. newer schema


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_a_store_with_a_newer_schema_is_refused_in_one_line(store: str, tmp_path: Path) -> None:
    await close(await serve(store, tmp_path))  # the schema as this version makes it
    if store.startswith("sqlite"):
        with sqlite3.connect(tmp_path / "scheduler.db") as conn:
            conn.execute("INSERT INTO schema_version VALUES (999, 'x')")
        conn.close()
    else:
        conn = await asyncpg.connect(store)
        await conn.execute("INSERT INTO schema_version VALUES (999, 'x')")
        await conn.close()

    port = free_port()
    with pytest.raises(StoreError) as refused:
        await serve(store, tmp_path, port=port)
    message = str(refused.value)
    assert "\n" not in message and "schema version 999" in message, message
    assert pg.PASSWORD not in message
    assert _port_free(port), "the refused scheduler still holds its port"

    env = {"NODE_AGENT_SCHEDULER__STORE": store, "NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{port}",
           "NODE_AGENT_NODE__STATE_DIR": str(tmp_path)}
    rc, _, err = await cli(tmp_path, ["scheduler"], env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and "schema version 999" in lines[0] and pg.PASSWORD not in err, err


async def cli(tmp_path: Path, args: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    """``node-agent ARGS`` in a subprocess: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node_agent", *args, cwd=tmp_path,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg"), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"node-agent {' '.join(args)} still running after {timeout:g} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# --------------------------------------------------------------------------------------- 5. the password


async def test_the_store_password_never_shows(pg_dsn: str, tmp_path: Path) -> None:
    """Not in a standalone scheduler's DEBUG log, its /metrics, check-config, nor a failure to connect."""
    assert pg.PASSWORD in pg_dsn
    shown = redact_dsn(pg_dsn)
    env = {"NODE_AGENT_SCHEDULER__STORE": pg_dsn, "NODE_AGENT_LOG__LEVEL": "DEBUG",
           "NODE_AGENT_NODE__STATE_DIR": str(tmp_path / "state")}
    proc, url = await start_scheduler_process(tmp_path, free_port(), "scheduler", **env)
    try:
        # Some traffic, refusals included, so the log has something to say.
        session = aiohttp.ClientSession()
        h = Harness(Remote(url), session, CollectorRegistry())
        try:
            node = await h.register(node_id="node-1")
            job = await h.submit()
            assert (await h.poll(node))[0] == 200
            _, grant, _ = await h.lease(node, job)
            assert (await h.renew(grant["lease_id"], "someone-else", grant["epoch"]))[0] == 410
            assert (await h.result(job, node, 1, grant))[0] == 200
            assert (await h.call("POST", "/v1/jobs", json={"audio_b64": "not base64!"}))[0] == 400
            status, metrics, _ = await h.call("GET", "/metrics")
        finally:
            await session.close()
        assert status == 200 and "node_agent_scheduler_" in metrics
        assert pg.PASSWORD not in metrics
    finally:
        rc = await proc.stop()
    log = proc.log()
    assert rc == 0, log
    assert shown in log and "DEBUG" in log, log  # it did name its store, at DEBUG level
    assert pg.PASSWORD not in log, log

    rc, out, err = await cli(tmp_path, ["check-config"], env)
    assert rc == 0 and shown in out, out + err
    assert pg.PASSWORD not in out + err

    parts = urllib.parse.urlsplit(pg_dsn)  # the same DSN, password and all, on a port nothing listens on
    unreachable = parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{free_port()}")).geturl()
    assert unreachable != pg_dsn and pg.PASSWORD in unreachable
    rc, out, err = await cli(tmp_path, ["scheduler"], {**env, "NODE_AGENT_SCHEDULER__STORE": unreachable,
                                                      "NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{free_port()}"})
    errors = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert rc != 0 and "Traceback" not in err, err
    assert len(errors) == 1 and redact_dsn(unreachable) in errors[0], err
    assert pg.PASSWORD not in out + err


# ------------------------------------------------------------------------------------------ 6. the race


@pytest.mark.timeout(180)
async def test_two_replica_processes_never_give_a_job_to_two_nodes(pg_dsn: str, tmp_path: Path) -> None:
    """40 fake nodes on two `node-agent scheduler` processes sharing one database claim 500 jobs as fast as they
    can; the store shows every job leased by one node at a time, under unique growing epochs, reported once."""
    jobs_total, per_replica = 500, 20
    env = {"NODE_AGENT_SCHEDULER__STORE": pg_dsn, "NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S": "120",
           "NODE_AGENT_LOG__LEVEL": "WARNING"}
    started = await asyncio.gather(*(start_scheduler_process(tmp_path, free_port(), f"replica-{i}", **env)
                                     for i in range(2)), return_exceptions=True)
    procs = [s[0] for s in started if not isinstance(s, BaseException)]
    try:
        for s in started:
            if isinstance(s, BaseException):
                raise s
        urls = [s[1] for s in started]  # type: ignore[index]
        sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for _ in urls]
        replicas = [Harness(Remote(u), s, CollectorRegistry()) for u, s in zip(urls, sessions)]
        try:
            await race(replicas, jobs_total, per_replica, pg_dsn)
        finally:
            for s in sessions:
                await s.close()
    finally:
        for p in procs:
            await p.stop()
    for p in procs:
        assert "Traceback" not in p.log() and "ERROR" not in p.log(), p.log()


async def race(replicas: list[Harness], jobs_total: int, per_replica: int, dsn: str) -> None:
    nodes = [(h, await h.register(node_id=f"r{i}-n{n}")) for i, h in enumerate(replicas) for n in range(per_replica)]
    accepted: dict[str, str] = {}  # job id -> the node whose result was accepted
    problems: list[str] = []
    claimed = collections.Counter[int]()
    all_done = asyncio.Event()

    async def claimer(h: Harness, node: str, replica: int) -> None:
        while not all_done.is_set():
            status, assignment = await h.poll(node, wait_s=2)
            if status == 204:
                continue
            assert status == 200, assignment
            job_id = assignment["job_id"]
            claimed[replica] += 1
            status, grant, _ = await h.lease(node, job_id, ttl_s=60)
            if status != 201:
                problems.append(f"{node}: lease of {job_id} refused {status} {grant}")
                continue
            await asyncio.sleep(random.uniform(0, 0.005))
            status, ack = await h.result(job_id, node, assignment["attempt"], grant)
            if status != 200 or ack["duplicate"]:
                problems.append(f"{node}: result of {job_id} answered {status} {ack}")
                continue
            if job_id in accepted:
                problems.append(f"{job_id}: results accepted from {accepted[job_id]} and {node}")
            accepted[job_id] = node
            if len(accepted) == jobs_total:
                all_done.set()

    submitted: list[str] = []

    async def submitter(k: int) -> None:
        for n in range(k, jobs_total, 10):
            submitted.append(await replicas[n % 2].submit(f"job {n}".encode()))

    started = time.monotonic()
    claimers = [asyncio.create_task(claimer(h, node, replicas.index(h))) for h, node in nodes]
    try:
        await asyncio.gather(*(submitter(k) for k in range(10)))
        await asyncio.wait_for(all_done.wait(), 120)
    finally:
        all_done.set()
        results = await asyncio.gather(*claimers, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[0]
    elapsed = time.monotonic() - started
    assert not problems, problems[:5]
    assert sorted(accepted) == sorted(submitted) and len(set(submitted)) == jobs_total
    assert claimed[0] > 0 and claimed[1] > 0, claimed  # both replicas' nodes took part

    conn = await asyncpg.connect(dsn)
    try:
        states = await conn.fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        reports = await conn.fetch("SELECT job_id, node_id FROM reports")
        leases = await conn.fetch("SELECT job_id, node_id, epoch, granted_at, ended_at FROM leases "
                                  "ORDER BY job_id, granted_at, epoch")
    finally:
        await conn.close()
    assert {r["state"]: r["n"] for r in states} == {"succeeded": jobs_total}
    assert len(reports) == jobs_total and {r["job_id"]: r["node_id"] for r in reports} == accepted
    epochs = [r["epoch"] for r in leases]
    assert len(epochs) == len(set(epochs)), "an epoch was granted twice"
    by_job: dict[str, list[Any]] = collections.defaultdict(list)
    for lease in leases:
        by_job[lease["job_id"]].append(lease)
    assert set(by_job) == set(accepted)
    for job_id, held in by_job.items():
        assert all(lease["ended_at"] is not None for lease in held), held
        for earlier, later in zip(held, held[1:]):
            assert earlier["ended_at"] <= later["granted_at"], f"{job_id} held twice at once: {held}"
            assert earlier["epoch"] < later["epoch"], f"{job_id}: epochs not growing in grant order: {held}"
        assert held[-1]["node_id"] == accepted[job_id]
    logging.getLogger(__name__).info("race: %d jobs in %.1f s, claims per replica %s", jobs_total, elapsed,
                                     dict(claimed))


async def test_sqlite_close_with_an_operation_queued_ends_the_writer(tmp_path: Path) -> None:
    """close() while the writer is busy and another operation waits behind it: that operation is still answered
    and the writer thread ends (it once cleared its wake-up after taking the last batch, missing the close, and
    close's join waited for ever: a test teardown hung on it)."""
    from node_agent.scheduler.db import SqliteEngine

    engine = SqliteEngine(tmp_path / "s.db")
    await engine.open(lambda topic: None)
    busy = threading.Event()

    async def slow(tx: Any) -> int:
        busy.set()
        time.sleep(0.5)  # holds the writer thread, as a long transaction does
        return 1

    async def quick(tx: Any) -> int:
        return int(await tx.fetchval("SELECT 2"))

    first = asyncio.create_task(engine.run(slow))
    await asyncio.to_thread(busy.wait, 5)
    second = asyncio.create_task(engine.run(quick))
    await asyncio.sleep(0)  # queued behind the slow one
    closing = asyncio.create_task(engine.close())
    done, _ = await asyncio.wait({closing}, timeout=10)
    if not done:
        engine._wake.set()  # release the stuck writer so this test can end, then fail it
        await closing
        pytest.fail("SqliteEngine.close() did not return with an operation queued behind a busy writer")
    assert await first == 1 and await second == 2
