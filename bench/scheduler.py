#!/usr/bin/env python3
"""Scheduler throughput per store: a real standalone scheduler, a cluster of fake nodes, submitters; jobs/s and queue time.

    .venv/bin/python bench/scheduler.py                         # every store (memory, sqlite, postgresql with one
                                                                # replica and with two), one after the other; per
                                                                # store 200 nodes, 2000 jobs as fast as possible,
                                                                # then 2000 at 200 jobs/s offered
    .venv/bin/python bench/scheduler.py --stores sqlite         # a subset
    .venv/bin/python bench/scheduler.py --markdown FILE         # also write the tables as markdown
    make bench SECTIONS=scheduler                               # the same, as a section of bench/run.py

Stores (``--stores``, comma-separated; each runs on a fresh scheduler, cluster and database):
- ``memory``: the SQL store on SQLite in memory (``scheduler.store: memory``: no file, nothing kept);
- ``sqlite``: the default store, ``scheduler.db`` in a temporary state directory;
- ``postgresql``, ``postgresql-N``: one or N replicas on one fresh database of a PostgreSQL server this driver starts
  and removes (tests/pg.py's ``PgServer``, with PostgreSQL's durability defaults restored: fsync on).

Three kinds of process per store, so that no side's CPU is another's:
- the scheduler: ``node-agent scheduler`` as a subprocess on a free loopback port (N of them for ``postgresql-N``;
  ``--scheduler-env KEY=VALUE`` adds to their environment, e.g. a log level);
- the cluster (``--cluster``, a process of its own): ``--nodes`` protocol-speaking fake nodes with one ``cpu``
  device each and no model, spread over the replicas. Each registers, heartbeats at the interval it is given,
  long-polls for a job asking for its lease with it (``lease_ttl_s``; ``POST /v1/leases`` when the assignment comes
  without one), fetches its audio, renews the lease every TTL/3 as the agent does, "decodes"
  ``--decode-s`` (50 ms), and posts the result, with the holder's fields (node_id, lease_id, attempt,
  lease_epoch). Its one segment comes at the end of the decode, so it rides with the result, as the agent's does
  (``EVENTS_LINGER_S`` in node_agent/job_runner.py); ``--stream-events`` posts it as an event first, as the agent
  does for a segment that comes earlier than that before the end (a long job's). Its messages are the wire models
  of ``node_agent/scheduler/schemas.py``, so a protocol change breaks this loudly;
- this driver: the submitters (multipart ``POST /v1/jobs``, one aiohttp session, many tasks, spread over the
  replicas) and the measuring.

Measured per load: jobs per second from the first submit to the last accepted result (the 200 a node gets for its
result), ``queued_s`` of every assignment (the field the scheduler puts in it), and each job's time from its
submit (for an offered load: its scheduled submit time) to its accepted result. Timestamps cross processes on the
system-wide monotonic clock. Afterwards every job is checked: exactly one accepted result, ``succeeded`` in its
view, and the scheduler's counters agree (results accepted = jobs, none rejected); any failure exits 1. A missed
target is reported, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from node_agent.scheduler.schemas import (  # noqa: E402
    DeviceSpec,
    EventsReport,
    Hardware,
    HeartbeatRequest,
    JobAssignment,
    LeaseGrant,
    LeaseRequest,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    ResultAck,
    ResultReport,
    Segment,
    TranscriptResult,
)

try:  # not a dependency: used only where already installed, and named in the report
    import uvloop
except ImportError:
    uvloop = None

TARGET_JOBS_PER_S = 300.0
TARGET_P99_QUEUED_S = 0.050
AUDIO = bytes(16_000)  # 0.5 s of pcm_s16le silence at 16 kHz: the scheduler never decodes it
LONG_POLL_S = 30.0
#: --decode-jitter, for the fake nodes (set once, from the command line).
DECODE_JITTER = [0.0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_loop(main: Any) -> Any:
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ stores

DEFAULT_STORES = "memory,sqlite,postgresql,postgresql-2"
STORE_VAR = "NODE_AGENT_SCHEDULER__STORE"


@dataclass(frozen=True)
class Store:
    """One configuration to measure: a store kind and how many scheduler processes share it."""

    name: str  # as given to --stores; the table's store column
    kind: str  # memory | sqlite | postgresql
    replicas: int


def parse_stores(text: str) -> list[Store]:
    """``memory,sqlite,postgresql,postgresql-2`` -> stores; ValueError names what is wrong."""
    stores = []
    for name in (n.strip() for n in text.split(",")):
        kind, _, count = name.partition("-")
        if kind not in ("memory", "sqlite", "postgresql") or (count and not count.isdigit()):
            raise ValueError(f"{name!r}: expected memory, sqlite, postgresql or postgresql-N")
        replicas = int(count) if count else 1
        if replicas < 1 or (replicas > 1 and kind != "postgresql"):
            raise ValueError(f"{name!r}: replicas need a shared store (postgresql-N, N >= 1)")
        stores.append(Store(name, kind, replicas))
    if len({s.name for s in stores}) != len(stores):
        raise ValueError(f"{text!r}: a store named twice")
    return stores


def pg_module() -> Any:
    """tests/pg.py (the tests' throwaway PostgreSQL server), imported from the tests directory."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)  # after everything else: tests/ must not shadow an installed module
    import pg

    return pg


class Postgres:
    """A PostgreSQL server for the run, started on first use, with a fresh database per store configuration."""

    def __init__(self) -> None:
        self.server: Any = None

    def database(self, name: str) -> str:
        if self.server is None:
            pg = pg_module()
            log("starting PostgreSQL (tests/pg.py)")
            self.server = pg.PgServer().start()
            # tests/pg.py trades durability for speed (fsync off); a benchmark measures what an operator runs.
            for setting in ("fsync", "full_page_writes"):
                self.server.psql(f"ALTER SYSTEM SET {setting} = on")
            self.server.psql("SELECT pg_reload_conf()")
        return self.server.create_database(name)

    def transactions(self, database: str) -> int:
        """Transactions committed or rolled back in `database` so far (a statement outside one counts as one)."""
        return int(self.server.psql(f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = "
                                    f"'{database}'"))

    def pid(self) -> int:
        """The postmaster's pid (the first line of postmaster.pid)."""
        return int((self.server.datadir / "postmaster.pid").read_text().split()[0])

    def settings(self) -> dict[str, str]:
        if self.server is None:
            return {}
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
                 "max_connections")
        values = self.server.psql("SELECT name || '=' || setting FROM pg_settings WHERE name IN ("
                                  + ",".join(f"'{n}'" for n in names) + ")")
        out = dict(line.split("=", 1) for line in values.splitlines() if "=" in line)
        out["server_version"] = self.server.psql("SHOW server_version").strip()
        return out

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def database_name(store: Store) -> str:
    return "bench_" + store.name.replace("-", "_")


def store_env(store: Store, postgres: Postgres) -> dict[str, str]:
    """The scheduler environment that selects `store` (a fresh database for PostgreSQL)."""
    if store.kind == "postgresql":
        return {STORE_VAR: postgres.database(database_name(store))}
    return {STORE_VAR: store.kind}


# ------------------------------------------------------------------------------------ the cluster process


@dataclass
class ClusterStats:
    registrations: int = 0
    heartbeats: int = 0
    polls: int = 0
    jobs: int = 0
    renewals: int = 0
    lease_requests: int = 0  # leases asked for apart from the assignment (the resource was held)
    errors: int = 0


class Emitter:
    """JSON lines to the driver on stdout, written in batches (timestamps travel inside, so delay costs nothing)."""

    def __init__(self) -> None:
        self._buf: list[str] = []

    def emit(self, **record: Any) -> None:
        self._buf.append(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._buf:
            sys.stdout.write("".join(self._buf))
            sys.stdout.flush()
            self._buf.clear()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.flush()


class FakeNode:
    """One node with one ``cpu`` device and no model, speaking protocol v1 as the agent does."""

    def __init__(self, index: int, url: str, session: aiohttp.ClientSession, out: Emitter, stats: ClusterStats,
                 decode_s: float, lease_ttl_s: float, renew_every_s: float | None, stream_events: bool) -> None:
        self.index, self.url, self.session, self.out, self.stats = index, url, session, out, stats
        self.decode_s, self.lease_ttl_s, self.renew_every_s = decode_s, lease_ttl_s, renew_every_s
        self.stream_events = stream_events
        self.node_id: str | None = None
        self.heartbeat_s = 5.0
        self.running: list[str] = []
        self.registered = asyncio.Event()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json" and raw:
                return resp.status, json.loads(raw)
            return resp.status, raw

    def error(self, where: str, status: int, body: Any, job_id: str | None = None) -> None:
        self.stats.errors += 1
        self.out.emit(e=where, status=status, body=str(body)[:300], job=job_id, node=self.node_id)

    async def register(self) -> None:
        req = RegisterRequest(
            node_id=self.node_id, agent_version="bench", hostname=f"fake-{self.index}",
            hardware=Hardware(cpu_cores=1, memory_bytes=1 << 30),
            devices=[DeviceSpec(resource="cpu", model="fake", compute_type="int8", languages=None)])
        while True:
            status, body = await self.call("POST", "/v1/nodes", req.model_dump(mode="json"))
            if status == 201:
                reply = RegisterResponse.model_validate(body)
                self.node_id, self.heartbeat_s = reply.node_id, reply.heartbeat_interval_s
                self.stats.registrations += 1
                self.registered.set()
                return
            self.error("register", status, body)
            await asyncio.sleep(1)

    async def heartbeats(self) -> None:
        await asyncio.sleep(random.uniform(0, self.heartbeat_s))  # spread 200 nodes over the interval
        while True:
            req = HeartbeatRequest(state="busy" if self.running else "ready", running_jobs=self.running)
            status, body = await self.call("PUT", f"/v1/nodes/{self.node_id}/heartbeat", req.model_dump(mode="json"))
            self.stats.heartbeats += 1
            if status == 404:  # forgotten or marked gone: register again with the same id, as the agent does
                self.error("heartbeat", status, body)
                await self.register()
            elif status == 200:
                self.heartbeat_s = float(body.get("heartbeat_interval_s", self.heartbeat_s))
            else:
                self.error("heartbeat", status, body)
            await asyncio.sleep(self.heartbeat_s)

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # tell the driver at once, not at the end: its load would wait for nothing
            self.error("crashed", 0, repr(exc))
            self.out.flush()
            raise

    async def _run(self) -> None:
        await self.register()
        beats = asyncio.create_task(self.heartbeats())
        try:
            while True:
                status, body = await self.call(
                    "GET", f"/v1/nodes/{self.node_id}/jobs/next?wait_s={LONG_POLL_S:g}&lease_ttl_s={self.lease_ttl_s:g}")
                self.stats.polls += 1
                if status == 200:
                    await self.job(JobAssignment.model_validate(body))
                elif status == 404:
                    self.error("poll", status, body)
                    await self.register()
                elif status != 204:
                    self.error("poll", status, body)
                    await asyncio.sleep(0.5)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats

    async def job(self, a: JobAssignment) -> None:
        self.out.emit(a=a.job_id, q=a.queued_s, n=a.attempt, t=time.monotonic())
        assert self.node_id is not None
        status, audio = await self.call("GET", a.audio.url)
        if status != 200 or len(audio) != a.audio.bytes:
            self.error("audio", status, f"{len(audio)} bytes, assignment says {a.audio.bytes}", a.job_id)
            return
        if a.lease is not None:  # granted with the assignment, as the agent asks
            lease = a.lease
        else:
            req = LeaseRequest(node_id=self.node_id, job_id=a.job_id, resource=a.resource or "cpu",
                               ttl_s=self.lease_ttl_s)
            status, body = await self.call("POST", "/v1/leases", req.model_dump(mode="json"))
            if status != 201:
                self.error("lease", status, body, a.job_id)
                return
            lease = LeaseGrant.model_validate(body)
            self.stats.lease_requests += 1
        self.running = [a.job_id]
        renewals = asyncio.create_task(self.renew(lease))
        try:
            # Decodes of one length free every node at once when they started together (after a burst of
            # submissions), which real audio of varying length does not: --decode-jitter spreads them.
            await asyncio.sleep(self.decode_s * random.uniform(1 - DECODE_JITTER[0], 1 + DECODE_JITTER[0]))
            seg = Segment(id=0, start=0.0, end=0.5, text=" bench")
            if self.stream_events:
                events = EventsReport(node_id=self.node_id, lease_id=lease.lease_id, attempt=a.attempt,
                                      lease_epoch=lease.epoch, events=[seg])
                status, body = await self.call("POST", f"/v1/jobs/{a.job_id}/events",
                                               events.model_dump(mode="json"))
                if status != 202:
                    self.error("events", status, body, a.job_id)
        finally:
            renewals.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewals
        report = ResultReport(
            node_id=self.node_id, lease_id=lease.lease_id, attempt=a.attempt, lease_epoch=lease.epoch,
            outcome="succeeded",
            result=TranscriptResult(text="bench", language="en", language_probability=1.0, duration_s=0.5,
                                    segments=[seg]),
            timings={"decode_s": self.decode_s, "audio_s": 0.5})
        status, body = await self.call("POST", f"/v1/jobs/{a.job_id}/result", report.model_dump(mode="json"))
        self.running = []
        if status != 200:
            self.error("result", status, body, a.job_id)
            return
        ack = ResultAck.model_validate(body)
        self.stats.jobs += 1
        self.out.emit(r=a.job_id, t=time.monotonic(), dup=ack.duplicate, rq=ack.requeued, ok=ack.accepted)

    async def renew(self, lease: LeaseGrant) -> None:
        every = self.renew_every_s if self.renew_every_s is not None else lease.ttl_s / 3
        body = RenewRequest(node_id=self.node_id or "", epoch=lease.epoch).model_dump(mode="json", exclude_none=True)
        while True:
            await asyncio.sleep(every)
            status, reply = await self.call("POST", f"/v1/leases/{lease.lease_id}/renew", body)
            if status == 200:
                self.stats.renewals += 1
            else:
                self.error("renew", status, reply, lease.lease_id)
                return


async def cluster_main(args: argparse.Namespace) -> int:
    urls = args.cluster.split(",")
    out, stats = Emitter(), ClusterStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # No per-host limit: every node holds a long poll, and a heartbeat or a job request may run beside it.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=LONG_POLL_S + 30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        nodes = [FakeNode(i, urls[i % len(urls)], session, out, stats, args.decode_s, args.lease_ttl_s,
                          args.renew_every_s, args.stream_events) for i in range(args.nodes)]
        tasks = [asyncio.create_task(n.run()) for n in nodes]
        flusher = asyncio.create_task(out.run())
        ready = asyncio.create_task(asyncio.wait([asyncio.create_task(n.registered.wait()) for n in nodes]))
        done, _ = await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            out.emit(ready=len(nodes), node_ids=[n.node_id for n in nodes])
            out.flush()
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t in tasks and not t.cancelled() and t.exception() is not None]
        for t in failed:
            out.emit(e="node crashed", status=0, body=repr(t.exception())[:300], job=None, node=None)
        for t in [*tasks, flusher]:
            t.cancel()
        await asyncio.gather(*tasks, flusher, return_exceptions=True)
    out.emit(stats=stats.__dict__)
    out.flush()
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------- the driver


@dataclass
class Phase:
    name: str
    jobs: int
    rate: float | None  # offered jobs/s; None: as fast as possible
    submit_t: dict[str, float] = field(default_factory=dict)  # job id -> submit time (scheduled, for a rate)
    first_submit: float = 0.0
    submit_errors: list[str] = field(default_factory=list)
    max_lag_s: float = 0.0  # how late the latest submit left against its schedule (offered load only)
    submit_end: float = 0.0
    priority: str = "batch"


class Procs:
    """CPU seconds of the scheduler(s), the database server, the cluster, this driver and everything else on the
    machine (all CPU time the machine counted, less ours: short-lived processes, such as other people's tests, count
    too)."""

    def __init__(self, scheduler_pids: list[int], cluster_pid: int, database_pid: int | None = None) -> None:
        self.groups = {"scheduler": [psutil.Process(p) for p in scheduler_pids],
                       "cluster": [psutil.Process(cluster_pid)], "driver": [psutil.Process()]}
        # The database server's processes come and go (a backend per connection): found at each snapshot.
        self.database = psutil.Process(database_pid) if database_pid is not None else None

    def snapshot(self) -> dict[str, float]:
        out = {}
        for name, group in self.groups.items():
            out[name] = sum(sum(p.cpu_times()[:2]) for p in group)
        # The kernel's share of the scheduler's CPU: loopback round trips (to PostgreSQL, to nodes) are spent there.
        out["_scheduler_system"] = sum(p.cpu_times().system for p in self.groups["scheduler"])
        database: dict[int, float] = {}
        if self.database is not None:
            procs = [self.database]
            with contextlib.suppress(psutil.Error):  # a backend may end while its siblings are listed
                procs += self.database.children(recursive=True)
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    database[proc.pid] = sum(proc.cpu_times()[:2])
        t = psutil.cpu_times()
        # Guest time is already in user time; steal is the hypervisor's, reported on its own.
        out["_steal"] = getattr(t, "steal", 0.0)
        out["_machine"] = sum(t) - t.idle - sum(getattr(t, k, 0.0) for k in ("iowait", "guest", "guest_nice", "steal"))
        out["_database"] = database  # type: ignore[assignment]
        return out

    def cores(self, before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, float]:
        out = {k: round((after[k] - before[k]) / wall, 2) for k in before if not k.startswith("_")}
        if self.database is not None:  # a backend that started meanwhile counts whole, one that ended not at all
            db = sum(v - before["_database"].get(pid, 0.0) for pid, v in after["_database"].items())
            out["database"] = round(db / wall, 2)
        ours = sum(out.values())
        out["other processes"] = round(max(0.0, (after["_machine"] - before["_machine"]) / wall - ours), 2)
        out["steal"] = round((after["_steal"] - before["_steal"]) / wall, 2)
        out["scheduler_system"] = round((after["_scheduler_system"] - before["_scheduler_system"]) / wall, 2)
        return out


class Driver:
    """One store configuration: its scheduler(s) and cluster, the loads, the checks."""

    def __init__(self, args: argparse.Namespace, store: Store, store_env: dict[str, str], tmp: Path,
                 database_pid: int | None = None, transactions: Callable[[], int] | None = None) -> None:
        self.args, self.store, self.store_env, self.database_pid = args, store, store_env, database_pid
        self.transactions = transactions
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.schedulers: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.where: list[str] = []
        self.cluster: asyncio.subprocess.Process | None = None
        self.assigned: dict[str, list[tuple[float, int, float]]] = {}  # job -> [(queued_s, attempt, t)]
        self.accepted: dict[str, list[tuple[float, bool]]] = {}  # job -> [(t, duplicate)]
        self.errors: list[dict[str, Any]] = []
        self.cluster_stats: dict[str, Any] = {}
        self.cluster_ready = asyncio.Event()
        self.progress = asyncio.Event()
        boundary = "bench-" + os.urandom(8).hex()
        # One body per priority (a submission without the field is batch, as POST /v1/jobs defaults).
        self.bodies: dict[str, bytes] = {}
        for priority in ("batch", "interactive"):
            body = (f'--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\npcm_s16le\r\n'
                    f'--{boundary}\r\nContent-Disposition: form-data; name="sample_rate"\r\n\r\n16000\r\n')
            if priority != "batch":
                body += f'--{boundary}\r\nContent-Disposition: form-data; name="priority"\r\n\r\n{priority}\r\n'
            body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="bench.pcm"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n")
            self.bodies[priority] = body.encode() + AUDIO + f"\r\n--{boundary}--\r\n".encode()
        self.content_type = f"multipart/form-data; boundary={boundary}"

    # ------------------------------------------------------------------ processes

    def start_schedulers(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
        env.update({"NODE_AGENT_NODE__STATE_DIR": str(self.tmp / "state"), "PYTHONUNBUFFERED": "1"})
        env.update(self.store_env)
        for item in self.args.scheduler_env:
            key, _, value = item.partition("=")
            env[key] = value
        for i in range(self.store.replicas):
            port = free_port()
            logf = (self.tmp / f"scheduler-{i}.log").open("ab")
            # cProfile writes its file when the scheduler returns from SIGTERM (it stops cleanly on it).
            prof = ["-m", "cProfile", "-o", str(self.tmp / f"scheduler-{i}.prof")] if self.args.profile else []
            self.schedulers.append(subprocess.Popen(
                [sys.executable, *prof, "-m", "node_agent", "scheduler", "--listen", f"127.0.0.1:{port}"],
                env=env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")

    async def wait_schedulers(self, session: aiohttp.ClientSession, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for i, (proc, url) in enumerate(zip(self.schedulers, self.urls)):
            while True:
                if proc.poll() is not None:
                    tail = (self.tmp / f"scheduler-{i}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"scheduler {i} exited with {proc.returncode}:\n{tail}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"scheduler {i} not up within {timeout} s; see {self.tmp}")
                await asyncio.sleep(0.05)
            self.where.append(await self.store_of(i, deadline))

    async def store_of(self, i: int, deadline: float) -> str:
        """The store scheduler i says it opened (its start-up line), so that no row is labelled by wish."""
        logfile = self.tmp / f"scheduler-{i}.log"
        while True:
            text = logfile.read_text(errors="replace")
            if "(store: " in text:
                where = text.split("(store: ", 1)[1].split(")\n", 1)[0]
                ok = (where == "memory" if self.store.kind == "memory" else where.endswith("scheduler.db")
                      if self.store.kind == "sqlite" else where.startswith("postgresql://"))
                if not ok:
                    raise RuntimeError(f"scheduler {i} opened store {where!r}, not {self.store.kind}")
                return where
            if time.monotonic() > deadline:
                raise RuntimeError(f"scheduler {i} never logged its store; see {logfile}")
            await asyncio.sleep(0.05)

    async def start_cluster(self) -> None:
        a = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cluster", ",".join(self.urls), "--nodes",
               str(a.nodes), "--decode-s", str(a.decode_s), "--decode-jitter", str(a.decode_jitter),
               "--lease-ttl-s", str(a.lease_ttl_s)]
        if a.renew_every_s is not None:
            cmd += ["--renew-every-s", str(a.renew_every_s)]
        if a.stream_events:
            cmd.append("--stream-events")
        self.cluster_log = (self.tmp / "cluster.log").open("ab")
        self.cluster = await asyncio.create_subprocess_exec(
            *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=self.cluster_log, limit=1 << 22)
        self.reader = asyncio.create_task(self.read_cluster())
        ready = asyncio.create_task(self.cluster_ready.wait())
        done, _ = await asyncio.wait([ready, self.reader], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            raise RuntimeError(f"the fake cluster did not come up ({len(self.errors)} errors: {self.errors[:3]}); "
                               f"see {self.tmp / 'cluster.log'}")

    async def read_cluster(self) -> None:
        assert self.cluster is not None and self.cluster.stdout is not None
        async for line in self.cluster.stdout:
            rec = json.loads(line)
            if "a" in rec:
                self.assigned.setdefault(rec["a"], []).append((rec["q"], rec["n"], rec["t"]))
            elif "r" in rec:
                self.accepted.setdefault(rec["r"], []).append((rec["t"], rec["dup"]))
                self.progress.set()
            elif "e" in rec:
                self.errors.append(rec)
                self.progress.set()
            elif "ready" in rec:
                self.cluster_ready.set()
            elif "stats" in rec:
                self.cluster_stats = rec["stats"]

    async def stop(self) -> None:
        if self.cluster is not None and self.cluster.returncode is None:
            self.cluster.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.cluster.wait(), 15)
            except TimeoutError:
                self.cluster.kill()
                await self.cluster.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reader, 5)
        for proc in self.schedulers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.schedulers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------------ load

    async def submit(self, session: aiohttp.ClientSession, phase: Phase, i: int, at: float | None) -> None:
        url = self.urls[i % len(self.urls)]
        t = time.monotonic()
        try:
            async with session.post(url + "/v1/jobs", data=self.bodies[phase.priority],
                                    headers={"Content-Type": self.content_type}) as resp:
                body = await resp.read()
                if resp.status != 202:
                    phase.submit_errors.append(f"{resp.status} {body[:200]!r}")
                    return
                phase.submit_t[json.loads(body)["job_id"]] = at if at is not None else t
        except (aiohttp.ClientError, OSError) as exc:
            phase.submit_errors.append(repr(exc))
        finally:
            phase.submit_end = max(phase.submit_end, time.monotonic())
            self.progress.set()

    async def run_phase(self, session: aiohttp.ClientSession, phase: Phase) -> dict[str, Any]:
        before_accepted = sum(len(v) for v in self.accepted.values())
        before_errors = len(self.errors)
        xacts0 = await asyncio.to_thread(self.transactions) if self.transactions else None
        cpu0 = self.procs.snapshot()
        load0 = os.getloadavg()
        phase.first_submit = t0 = time.monotonic()
        if phase.rate is None:
            counter = iter(range(phase.jobs))

            async def submitter() -> None:
                for i in counter:
                    await self.submit(session, phase, i, None)

            submitting = asyncio.gather(*(submitter() for _ in range(self.args.submitters)))
        else:
            async def paced() -> None:
                tasks = []
                for i in range(phase.jobs):
                    at = t0 + i / phase.rate
                    delay = at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    phase.max_lag_s = max(phase.max_lag_s, time.monotonic() - at)
                    tasks.append(asyncio.create_task(self.submit(session, phase, i, at)))
                await asyncio.gather(*tasks)

            submitting = asyncio.ensure_future(paced())
        deadline = t0 + self.args.phase_timeout_s
        # Done when every accepted submission has its accepted result. Counting distinct acks first keeps this
        # from scanning every job on every ack; the scan decides.
        done_before = len(self.accepted)
        while True:
            self.progress.clear()
            if (submitting.done() and len(self.accepted) - done_before >= len(phase.submit_t)
                    and all(j in self.accepted for j in phase.submit_t)):
                break
            if time.monotonic() > deadline or any(e["e"] == "crashed" for e in self.errors[before_errors:]):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), 0.25)
        await submitting
        wall_end = max((self.accepted[j][0][0] for j in phase.submit_t if j in self.accepted), default=time.monotonic())
        wall = max(wall_end - t0, 1e-9)
        cpu1 = self.procs.snapshot()
        xacts1 = await asyncio.to_thread(self.transactions) if self.transactions else None
        ids = list(phase.submit_t)
        queued = [q for j in ids for (q, _, _) in self.assigned.get(j, [])]
        e2e = [self.accepted[j][0][0] - phase.submit_t[j] for j in ids if j in self.accepted]
        # What the node side took (audio, lease, decode, events, result): round trips to the scheduler under load.
        service = [self.accepted[j][0][0] - self.assigned[j][-1][2] for j in ids
                   if j in self.accepted and j in self.assigned]
        done = sum(1 for j in ids if j in self.accepted)
        result = {
            "phase": phase.name, "offered_jobs_per_s": phase.rate, "jobs": phase.jobs, "submitted": len(ids),
            "finished": done, "wall_s": round(wall, 3), "jobs_per_s": round(done / wall, 1),
            "queued_p50_s": percentile(queued, 50), "queued_p99_s": percentile(queued, 99),
            "queued_max_s": max(queued, default=float("nan")),
            "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
            "node_p50_s": percentile(service, 50), "node_p99_s": percentile(service, 99),
            "submit_rate_per_s": round(len(ids) / max(phase.submit_end - t0, 1e-9), 1),
            "max_submit_lag_s": round(phase.max_lag_s, 4),
            "cores": self.procs.cores(cpu0, cpu1, wall),
            # Background work (long-poll re-checks, heartbeats, reaping) included: per job of this load.
            "db_transactions_per_job": round((xacts1 - xacts0) / max(done, 1), 1) if xacts0 is not None else None,
            "load_at_start": load0, "load_at_end": os.getloadavg(),
            "submit_errors": phase.submit_errors[:20], "n_submit_errors": len(phase.submit_errors),
            "acks_in_phase": sum(len(v) for v in self.accepted.values()) - before_accepted,
            "cluster_errors": self.errors[before_errors:][:20], "n_cluster_errors": len(self.errors) - before_errors,
        }
        if done < len(ids):
            result["missing"] = [j for j in ids if j not in self.accepted][:20]
        return result

    async def run_priority(self, session: aiohttp.ClientSession) -> tuple[dict[str, Any], list[Phase]]:
        """Interactive jobs' queued_s on an empty queue, then with at least ``--backlog`` batch jobs queued ahead of
        them (kept topped up while the interactive ones are submitted, ``--interactive-rate`` per second): issue
        23's target is the second's p99 within 1.5x of the first's."""
        a = self.args
        empty = Phase("interactive, empty queue", a.interactive_jobs, a.interactive_rate, priority="interactive")
        log(f"{self.store.name}, {empty.name}: {empty.jobs} jobs at {a.interactive_rate:g}/s")
        await self.run_phase(session, empty)
        backlog = Phase(f"batch, {a.backlog}+ queued", 0, None)
        loaded = Phase(f"interactive, {a.backlog}+ batch queued", a.interactive_jobs, a.interactive_rate,
                       priority="interactive")
        seq = iter(range(10**9))
        filling = True

        def queued_batch() -> int:  # submitted (202) and not yet assigned, on the cluster's and our clock
            return sum(1 for j in backlog.submit_t if j not in self.assigned)

        async def refill() -> None:
            # Topped up to the backlog as the nodes take jobs. A backlog builds only while every node is busy:
            # run this load with a decode far longer than the nodes' share of the scheduler's rate (--decode-s 2).
            while filling:
                short = a.backlog - queued_batch()
                if short > 0:
                    await asyncio.gather(*(self.submit(session, backlog, next(seq), None)
                                           for _ in range(min(short, a.submitters))))
                else:
                    await asyncio.sleep(0.005)

        backlog.first_submit = time.monotonic()
        refilling = asyncio.ensure_future(refill())
        filled_by = time.monotonic() + a.phase_timeout_s
        while queued_batch() < a.backlog * 0.9:
            if time.monotonic() > filled_by:
                # The nodes take jobs as fast as they come (a loaded machine submits slower than 200 nodes decode):
                # no backlog, so nothing to measure. Said, rather than waiting for ever.
                filling = False
                await refilling
                raise RuntimeError(f"the batch backlog reached only {queued_batch()} of {a.backlog} queued within "
                                   f"{a.phase_timeout_s:g} s (submits slower than the nodes take jobs: a longer "
                                   "--decode-s, or a less loaded machine)")
            await asyncio.sleep(0.01)
        # The interactive load, paced, while the backlog is kept; the phase ends when every job of both has ended.
        at_submit: list[int] = []
        t0 = time.monotonic()

        async def paced() -> None:
            tasks = []
            for i in range(loaded.jobs):
                delay = t0 + i / loaded.rate - time.monotonic()  # type: ignore[operator]
                if delay > 0:
                    await asyncio.sleep(delay)
                at_submit.append(queued_batch())
                tasks.append(asyncio.create_task(self.submit(session, loaded, i, None)))
            await asyncio.gather(*tasks)

        log(f"{self.store.name}, {loaded.name}: {loaded.jobs} jobs at {a.interactive_rate:g}/s")
        cpu0 = self.procs.snapshot()
        await paced()
        t1 = time.monotonic()
        cpu1 = self.procs.snapshot()
        filling = False
        await refilling
        backlog.jobs = len(backlog.submit_t)
        deadline = time.monotonic() + a.phase_timeout_s
        while not all(j in self.accepted for p in (backlog, loaded) for j in p.submit_t):
            if time.monotonic() > deadline or any(e["e"] == "crashed" for e in self.errors):
                break
            await asyncio.sleep(0.1)

        def queued(p: Phase) -> list[float]:
            return [self.assigned[j][0][0] for j in p.submit_t if j in self.assigned]

        # Batch work done while the backlog was kept (every slot it may use busy): what a headroom costs it.
        batch_done = sum(1 for j in backlog.submit_t if j in self.accepted and t0 <= self.accepted[j][0][0] <= t1)
        # What the scheduler spends while the backlog is kept (submits, claims, results, needless wake-ups): per job
        # it finished in that time, batch and interactive.
        cores = self.procs.cores(cpu0, cpu1, t1 - t0)
        done = batch_done + sum(1 for j in loaded.submit_t
                                if j in self.accepted and t0 <= self.accepted[j][0][0] <= t1)
        base, busy = queued(empty), queued(loaded)
        p99_base, p99_busy = percentile(base, 99), percentile(busy, 99)
        result = {
            "interactive_jobs": a.interactive_jobs, "interactive_rate": a.interactive_rate, "backlog": a.backlog,
            "batch_jobs": backlog.jobs,
            "empty_p50_s": percentile(base, 50), "empty_p99_s": p99_base,
            "loaded_p50_s": percentile(busy, 50), "loaded_p99_s": p99_busy,
            "ratio_p99": p99_busy / p99_base if p99_base > 0 else float("nan"),
            # Where the backlog's p99 comes from: its p90, and how many jobs waited longer than the empty queue's p99.
            "empty_p90_s": percentile(base, 90), "loaded_p90_s": percentile(busy, 90),
            "loaded_over_empty_p99": sum(1 for q in busy if q > p99_base),
            "batch_queued_at_submit_min": min(at_submit, default=0),
            "batch_queued_at_submit_p50": percentile([float(x) for x in at_submit], 50),
            "batch_queued_p50_s": percentile(queued(backlog), 50),
            "batch_jobs_per_s": batch_done / (t1 - t0) if t1 > t0 else float("nan"),
            "backlog_cores": cores,
            "backlog_scheduler_ms_per_job": cores["scheduler"] * (t1 - t0) * 1000 / done if done else float("nan"),
            "submit_errors": (empty.submit_errors + backlog.submit_errors + loaded.submit_errors)[:20],
        }
        log(f"{self.store.name}, priority: interactive queued_s p99 {ms(p99_base)} on an empty queue, "
            f"{ms(p99_busy)} with {result['batch_queued_at_submit_min']}+ batch jobs queued: "
            f"{result['ratio_p99']:.2f}x (p90 {ms(result['empty_p90_s'])} / {ms(result['loaded_p90_s'])}; "
            f"{result['loaded_over_empty_p99']} of {len(busy)} over the empty queue's p99; batch "
            f"{result['batch_jobs_per_s']:.1f} jobs/s; scheduler {cores['scheduler']:.2f} cores, "
            f"{result['backlog_scheduler_ms_per_job']:.2f} ms per job finished meanwhile)")
        return result, [empty, backlog, loaded]

    # ------------------------------------------------------------------ checks

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        wanted = {"node_agent_scheduler_results_accepted_total", "node_agent_scheduler_results_rejected_total",
                  "node_agent_scheduler_jobs_requeued_total", "node_agent_scheduler_jobs_submitted_total",
                  "node_agent_scheduler_jobs_refused_total"}
        totals: dict[str, float] = {}
        for url in self.urls:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in wanted:
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    async def check(self, session: aiohttp.ClientSession, phases: list[Phase]) -> dict[str, Any]:
        ids = [j for p in phases for j in p.submit_t]
        states: dict[str, str] = {}
        sem = asyncio.Semaphore(32)

        async def view(i: int, job_id: str) -> None:
            async with sem, session.get(f"{self.urls[i % len(self.urls)]}/v1/jobs/{job_id}") as resp:
                body = await resp.json() if resp.status == 200 else {}
                states[job_id] = body.get("state", f"http {resp.status}")

        await asyncio.gather(*(view(i, j) for i, j in enumerate(ids)))
        metrics = await self.metrics(session)
        problems = []
        for p in phases:
            if len(p.submit_t) != p.jobs:
                problems.append(f"{p.name}: {p.jobs - len(p.submit_t)} submissions failed: {p.submit_errors[:3]}")
        known = set(ids)
        for job_id in ids:
            acks = self.accepted.get(job_id, [])
            if len(acks) != 1 or acks[0][1]:
                problems.append(f"{job_id}: {len(acks)} accepted results (duplicate flags {[d for _, d in acks]})")
            if states[job_id] != "succeeded":
                problems.append(f"{job_id}: state {states[job_id]}")
        stray = [j for j in self.accepted if j not in known]
        if stray:
            problems.append(f"{len(stray)} results for jobs this driver did not submit: {stray[:3]}")
        if self.errors:
            problems.append(f"{len(self.errors)} unexpected answers to fake nodes, first: {self.errors[:3]}")
        accepted = metrics.get("node_agent_scheduler_results_accepted_total")
        if accepted != len(ids):
            problems.append(f"scheduler counted {accepted} accepted results for {len(ids)} jobs")
        if metrics.get("node_agent_scheduler_results_rejected_total", 0):
            problems.append(f"scheduler rejected {metrics['node_agent_scheduler_results_rejected_total']} results")
        return {"jobs": {j: {"acks": len(self.accepted.get(j, [])), "state": states[j],
                             "attempts": [n for _, n, _ in self.assigned.get(j, [])]} for j in ids},
                "metrics": metrics, "problems": problems[:50], "n_problems": len(problems)}

    # ------------------------------------------------------------------ main

    async def main(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"store": self.store.name, "kind": self.store.kind, "replicas": self.store.replicas,
                               "load_at_start": os.getloadavg()}
        self.start_schedulers()
        connector = aiohttp.TCPConnector(limit=max(64, a.submitters * 2))
        timeout = aiohttp.ClientTimeout(total=120)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await self.wait_schedulers(session)
                await self.start_cluster()
                assert self.cluster is not None
                self.procs = Procs([p.pid for p in self.schedulers], self.cluster.pid, self.database_pid)
                name = self.store.name
                log(f"{name}: {len(self.urls)} scheduler(s) at {', '.join(self.urls)} on {self.where[0]}; "
                    f"{a.nodes} fake nodes ready")
                phases = []
                if a.warmup:
                    warm = Phase("warm-up", a.warmup, None)
                    await self.run_phase(session, warm)
                    phases.append(warm)
                results = []
                for load in a.loads.split(","):
                    if load == "priority":  # after the others: it ends with the queue drained
                        continue
                    phase = Phase("as fast as possible", a.jobs, None) if load == "max" else Phase(
                        f"{a.rate:g} jobs/s offered", a.jobs, a.rate)
                    log(f"{name}, {phase.name}: {phase.jobs} jobs")
                    res = await self.run_phase(session, phase)
                    log(f"{name}, {phase.name}: {res['jobs_per_s']} jobs/s, queued_s p50 {res['queued_p50_s'] * 1000:.1f} ms "
                        f"p99 {res['queued_p99_s'] * 1000:.1f} ms; cores {res['cores']}")
                    results.append(res)
                    phases.append(phase)
                    await asyncio.sleep(0.5)
                out["phases"] = results
                if "priority" in a.loads.split(","):
                    out["priority"], more = await self.run_priority(session)
                    phases += more
                out["checks"] = await self.check(session, phases)
        finally:
            await self.stop()
        out["cluster_stats"] = self.cluster_stats
        out["where"] = self.where
        out["logs"] = str(self.tmp)
        out["load_at_end"] = os.getloadavg()
        return out


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": time.strftime("%a %b %d %H:%M:%S %Z %Y"), "cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__, "load_at_start": os.getloadavg()}


# ------------------------------------------------------------------------------------------- reporting


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:.1f} ms"


def markdown_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def measured(stores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in stores if "phases" in s]


def table(stores: list[dict[str, Any]]) -> str:
    """Every load of every store, with the CPU each process kept busy."""
    head = ("store", "load", "jobs", "wall", "jobs/s", "queued_s p50 / p99", "submit->result p50 / p99",
            "assigned->result p50 / p99", "cores: scheduler / database / cluster / driver / others")
    rows = []
    for s in measured(stores):
        for p in s["phases"]:
            c = p["cores"]
            db = f"{c['database']:.2f}" if "database" in c else "-"  # SQLite's work is in the scheduler's process
            rows.append((s["store"], p["phase"], f"{p['finished']}/{p['jobs']}", f"{p['wall_s']:.2f} s",
                         f"{p['jobs_per_s']:.0f}", f"{ms(p['queued_p50_s'])} / {ms(p['queued_p99_s'])}",
                         f"{ms(p['e2e_p50_s'])} / {ms(p['e2e_p99_s'])}",
                         f"{ms(p['node_p50_s'])} / {ms(p['node_p99_s'])}",
                         f"{c['scheduler']:.2f} / {db} / {c['cluster']:.2f} / {c['driver']:.2f} / "
                         f"{c['other processes']:.2f}"))
    return markdown_table(head, rows)


def phase_of(store: dict[str, Any], rate: float | None) -> dict[str, Any] | None:
    return next((p for p in store.get("phases", []) if p["offered_jobs_per_s"] == rate), None)


def summary(stores: list[dict[str, Any]], rate: float) -> str:
    """One row per store: jobs/s as fast as possible and queued_s at the offered rate, against the targets."""
    head = ("store", "replicas", f"jobs/s, as fast as possible (>= {TARGET_JOBS_PER_S:.0f})",
            f"queued_s p50 / p99 at {rate:g} jobs/s (p99 <= {TARGET_P99_QUEUED_S * 1000:.0f} ms)", "targets")
    rows = []
    for s in stores:
        if "error" in s:
            rows.append((s["store"], str(s["replicas"]), "failed", "failed", s["error"].splitlines()[0][:80]))
            continue
        fast, paced = phase_of(s, None), phase_of(s, rate)
        verdict = []
        if fast is not None:
            verdict.append("throughput " + ("met" if fast["jobs_per_s"] >= TARGET_JOBS_PER_S else "NOT met"))
        latency = "-"
        if paced is not None:
            latency = f"{ms(paced['queued_p50_s'])} / {ms(paced['queued_p99_s'])}"
            if paced["submit_rate_per_s"] < 0.95 * rate:
                # Submits queued up in front of the scheduler: the load its queue saw was lower than offered, and
                # the wait moved from queued_s into the submit (see submit->result).
                latency += f" (accepted only {paced['submit_rate_per_s']:.0f}/s)"
            if rate == 200:  # the latency target is stated at 200 jobs/s offered
                ok = paced["queued_p99_s"] <= TARGET_P99_QUEUED_S and paced["submit_rate_per_s"] >= 0.95 * rate
                verdict.append("latency " + ("met" if ok else "NOT met"))
        rows.append((s["store"], str(s["replicas"]), f"{fast['jobs_per_s']:.0f}" if fast else "-", latency,
                     ", ".join(verdict) or "-"))
    return markdown_table(head, rows)


#: Issue 23: interactive jobs' queued_s p99 behind a batch backlog, against an empty queue's.
TARGET_PRIORITY_RATIO = 1.5


def priority_table(stores: list[dict[str, Any]]) -> str:
    head = ("store", "interactive queued_s p50 / p99, empty queue",
            "interactive queued_s p50 / p99, batch backlog", "batch queued at each interactive submit (min / p50)",
            "batch jobs' queued_s p50 (a FIFO's wait)", "batch jobs/s during the backlog",
            "scheduler CPU per job during the backlog", f"p99 ratio (target <= {TARGET_PRIORITY_RATIO:g}x)")
    rows = []
    for s in stores:
        p = s.get("priority")
        if p is None:
            continue
        ok = p["ratio_p99"] <= TARGET_PRIORITY_RATIO
        rows.append((s["store"], f"{ms(p['empty_p50_s'])} / {ms(p['empty_p99_s'])}",
                     f"{ms(p['loaded_p50_s'])} / {ms(p['loaded_p99_s'])}",
                     f"{p['batch_queued_at_submit_min']} / {p['batch_queued_at_submit_p50']:.0f}",
                     ms(p["batch_queued_p50_s"]), f"{p.get('batch_jobs_per_s', float('nan')):.1f}",
                     f"{p.get('backlog_scheduler_ms_per_job', float('nan')):.2f} ms",
                     f"{p['ratio_p99']:.2f}x: {'met' if ok else 'NOT met'}"))
    return markdown_table(head, rows)


def verdicts(store: dict[str, Any]) -> list[str]:
    out = []
    for p in store["phases"]:
        if p["offered_jobs_per_s"] is None:
            ok = p["jobs_per_s"] >= TARGET_JOBS_PER_S
            out.append(f"throughput, as fast as possible: {p['jobs_per_s']:.0f} jobs/s (target >= "
                       f"{TARGET_JOBS_PER_S:.0f}): {'met' if ok else 'NOT met'}")
        elif p["offered_jobs_per_s"] == 200:
            ok = p["queued_p99_s"] <= TARGET_P99_QUEUED_S and p["submit_rate_per_s"] >= 0.95 * 200
            out.append(f"assignment latency at 200 jobs/s offered: queued_s p99 {ms(p['queued_p99_s'])} (target <= "
                       f"{TARGET_P99_QUEUED_S * 1000:.0f} ms, at the offered rate): {'met' if ok else 'NOT met'}; "
                       f"accepted at "
                       f"{p['submit_rate_per_s']:.0f}/s, latest submit {p['max_submit_lag_s'] * 1000:.0f} ms behind "
                       f"schedule")
    return out


def checked(checks: dict[str, Any]) -> str:
    requeued = checks["metrics"].get("node_agent_scheduler_jobs_requeued_total", 0)
    # A re-queue is not wrong in itself (the job still ends once), but with nodes that never fail it means a
    # lease lapsed or an assignment timed out under the load: worth seeing.
    also = f"; {requeued:.0f} re-queued" if requeued else "; none re-queued"
    if not checks["n_problems"]:
        return f"each of the {len(checks['jobs'])} jobs ended exactly once, with an accepted result{also}"
    return f"{checks['n_problems']} problems{also}: " + "; ".join(checks["problems"][:5])


def failed(store: dict[str, Any]) -> bool:
    return "error" in store or bool(store["checks"]["n_problems"])


def report(result: dict[str, Any], command: str) -> str:
    m, c = result["machine"], result["config"]
    load = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    pg = result.get("postgresql") or {}
    pg_line = (f" PostgreSQL {pg['server_version']} (started by the bench; fsync {pg.get('fsync')}, "
               f"synchronous_commit {pg.get('synchronous_commit')}, shared_buffers {pg.get('shared_buffers')} x 8 kB)."
               if pg else "")
    lines = [
        f"`{command}` on {m['date']}: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; Python "
        f"{m['python']}, aiohttp {m['aiohttp']}, event loop {c['event_loop']}; load (1/5/15 min) at start "
        f"{load(m['load_at_start'])}, at end {load(m['load_at_end'])}. Per store, one after the other: fresh "
        f"scheduler process(es), {c['nodes']} fake nodes (one process), decode {c['decode_s'] * 1000:.0f} ms, "
        f"its segment {'streamed as an event' if c.get('stream_events') else 'with the result'}, "
        f"{c['submitters']} submitters as fast as possible, {c['warmup']} warm-up jobs first.{pg_line}",
        "",
        summary(result["stores"], c["rate"]),
        "",
        table(result["stores"]),
        "",
    ]
    if any("priority" in s for s in result["stores"]):
        lines += [priority_table(result["stores"]), ""]
    for s in result["stores"]:
        if "error" in s:
            lines.append(f"- {s['store']}: FAILED: {s['error']}")
            continue
        lines.append(f"- {s['store']} ({s['replicas']} scheduler process(es), store {s['where'][0]}; load at start "
                     f"{load(s['load_at_start'])}):")
        lines += [f"  - {v}" for v in verdicts(s)]
        fast = phase_of(s, None)
        if fast is not None and fast["finished"]:
            per_job = lambda cores: cores * fast["wall_s"] / fast["finished"] * 1000  # noqa: E731  (ms per job)
            c = fast["cores"]
            db = f", the database server {per_job(c['database']):.1f} ms" if "database" in c else ""
            lines.append(f"  - CPU per job, as fast as possible: the scheduler(s) {per_job(c['scheduler']):.1f} ms (in "
                         f"the kernel {per_job(c.get('scheduler_system', 0.0)):.1f} ms){db}")
        xacts = [f"{p['db_transactions_per_job']:g} ({p['phase']})" for p in s["phases"]
                 if p.get("db_transactions_per_job") is not None]
        if xacts:  # PostgreSQL's own count (it may lag up to a second), background work included
            lines.append(f"  - database transactions per job: {', '.join(xacts)}")
        lines.append(f"  - checks: {checked(s['checks'])}")
    return "\n".join(lines) + "\n"


def run_stores(args: argparse.Namespace, stores: list[Store]) -> dict[str, Any]:
    """Each store on fresh processes (and a fresh database), one after the other; a store that fails to run is
    reported as such and the others still run."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="node-agent-bench-sched-", dir=args.workdir))
    result: dict[str, Any] = {"machine": machine(), "config": {
        "stores": [s.name for s in stores], "nodes": args.nodes, "jobs": args.jobs, "rate": args.rate,
        "loads": args.loads, "backlog": args.backlog, "interactive_jobs": args.interactive_jobs,
        "interactive_rate": args.interactive_rate, "decode_s": args.decode_s, "decode_jitter": args.decode_jitter, "stream_events": args.stream_events, "submitters": args.submitters, "warmup": args.warmup,
        "scheduler_env": args.scheduler_env, "lease_ttl_s": args.lease_ttl_s, "renew_every_s": args.renew_every_s,
        "profile": args.profile, "event_loop": "uvloop" if uvloop is not None else "asyncio"},
        "stores": [], "logs": str(top)}
    postgres = Postgres()
    try:
        for store in stores:
            try:
                env = store_env(store, postgres)
                pid, xacts = None, None
                if store.kind == "postgresql":
                    pid, xacts = postgres.pid(), functools.partial(postgres.transactions, database_name(store))
                result["stores"].append(run_loop(Driver(args, store, env, top / store.name, pid, xacts).main()))
            except Exception as exc:  # one store's failure must not hide the others' numbers
                log(f"{store.name}: FAILED: {exc}")
                result["stores"].append({"store": store.name, "kind": store.kind, "replicas": store.replicas,
                                         "error": f"{type(exc).__name__}: {exc}", "logs": str(top / store.name)})
        result["postgresql"] = postgres.settings()
    finally:
        postgres.close()
    result["machine"]["load_at_end"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default=DEFAULT_STORES,
                        help=f"which stores, in order (default {DEFAULT_STORES}): memory, sqlite, postgresql "
                             "(one replica), postgresql-N (N replicas on one database)")
    parser.add_argument("--nodes", type=int, default=200, help="fake nodes (default 200)")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per load (default 2000)")
    parser.add_argument("--rate", type=float, default=200.0, help="offered jobs/s of the paced load (default 200)")
    parser.add_argument("--loads", default="max,rate", help="which loads, in order: max (as fast as possible), "
                        "rate (--rate offered), priority (interactive jobs on an empty queue, then with --backlog "
                        "batch jobs queued; always last, and only with every node busy: --decode-s 2); default "
                        "max,rate")
    parser.add_argument("--backlog", type=int, default=1000,
                        help="batch jobs kept queued ahead of the priority load's interactive jobs (default 1000)")
    parser.add_argument("--interactive-jobs", type=int, default=200,
                        help="interactive jobs per half of the priority load (default 200)")
    parser.add_argument("--interactive-rate", type=float, default=20.0,
                        help="interactive jobs/s offered in the priority load (default 20)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed jobs first (default 100)")
    parser.add_argument("--submitters", type=int, default=32, help="concurrent submit tasks, as fast as possible")
    parser.add_argument("--decode-s", type=float, default=0.05, help="each fake decode (default 0.05 s)")
    parser.add_argument("--decode-jitter", type=float, default=0.0,
                        help="each decode lasts decode-s times 1 +/- up to this share, at random (default 0)")
    parser.add_argument("--lease-ttl-s", type=float, default=15.0, help="TTL the fake nodes ask for (default 15)")
    parser.add_argument("--renew-every-s", type=float, default=None,
                        help="renew this often instead of every TTL/3 (the agent's rate)")
    parser.add_argument("--stream-events", action="store_true",
                        help="post each job's segment as an event before its result (a long job's streaming) "
                             "instead of with the result (a short job's, as the agent does)")
    parser.add_argument("--scheduler-env", action="append", default=[], metavar="KEY=VALUE",
                        help="more environment for every scheduler, e.g. NODE_AGENT_LOGGING__LEVEL=WARNING; the "
                             f"caller's NODE_AGENT_* variables are not passed on, and {STORE_VAR} is --stores' job")
    parser.add_argument("--phase-timeout-s", type=float, default=300.0, help="give up on a load after this")
    parser.add_argument("--json", type=Path, help="write raw results (every job's outcome included) here")
    parser.add_argument("--workdir", type=Path, help="where the logs go (default: a temporary directory, removed "
                        "after a run whose checks pass)")
    parser.add_argument("--markdown", type=Path, help="write the tables and the verdicts as markdown here")
    parser.add_argument("--profile", action="store_true", help="run the scheduler(s) under cProfile and print "
                        "where their time went (slows them: numbers for finding costs, not for the docs)")
    parser.add_argument("--cluster", metavar="URLS", help=argparse.SUPPRESS)  # internal: be the fake cluster
    args = parser.parse_args(argv)
    DECODE_JITTER[0] = min(max(args.decode_jitter, 0.0), 1.0)
    if args.cluster:
        return run_loop(cluster_main(args))
    if args.loads and set(args.loads.split(",")) - {"max", "rate", "priority"}:
        parser.error(f"--loads: expected max, rate and/or priority, got {args.loads}")
    try:
        stores = parse_stores(args.stores)
    except ValueError as exc:
        parser.error(f"--stores: {exc}")
    if any(item.partition("=")[0] == STORE_VAR for item in args.scheduler_env):
        parser.error(f"--scheduler-env: {STORE_VAR} is chosen by --stores")
    if any(s.kind == "postgresql" for s in stores) and not pg_module().available():
        parser.error("--stores: PostgreSQL's server binaries (initdb, pg_ctl) are not installed; leave postgresql "
                     "out, or install them (Debian: postgresql)")
    result = run_stores(args, stores)
    command = " ".join(["bench/scheduler.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(result, command)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    bad = [s["store"] for s in result["stores"] if failed(s)]
    if bad:
        log(f"FAILED: {', '.join(bad)}; logs in {result['logs']}")
        return 1
    if args.profile:
        import pstats

        for prof in sorted(Path(result["logs"]).glob("*/scheduler-*.prof")):
            print(f"{prof}:")
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(30)
        log(f"profiles kept in {result['logs']}")
    elif args.workdir is None:
        shutil.rmtree(result["logs"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
