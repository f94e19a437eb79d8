"""Bounds soak (`make soak-bounds`, not in CI): issue 22's hostile cases looped against real processes, per store.

For each store (``--stores``: sqlite, postgresql, memory; default sqlite,postgresql) this starts, on loopback:
- ``scheduler``: a standalone ``node-agent scheduler`` (token set, ``body_timeout_s`` 10 s, ``max_queued_jobs``
  ``--cap``, ``job_retention_s`` 60 s), the one the cases measure;
- ``scheduler-keep``: a second one on its own store (a second database on PostgreSQL) with ``keep_audio: true``
  and ``job_retention_s`` 10 s, where big uploads are kept after they finish and then reaped by retention;
- ``agent``: ``node-agent run`` registered with ``scheduler-keep``, its worker the stand-in plugin
  (``tests/fake_plugin.py``: no model), ``http.max_body_bytes`` 8 MiB and one queued utterance per worker,
  for the agent-side row (3);
- PostgreSQL (tests/pg.py) for the postgresql store;
- in this driver process: fake nodes speaking protocol v1 over HTTP (as bench/scheduler.py's cluster: register,
  heartbeat, long-poll with ``lease_ttl_s``, fetch the audio, post the result) that serve the jobs.

Then, for ``--minutes``, it runs rounds of the cases below one after another (each case checks every answer):

- stalled_json: 4 sockets send 1 MiB of an 8 MiB JSON ``POST /v1/jobs`` and stall: 408 ``timeout``, closed (row 4)
- stalled_multipart: a multipart upload stalls half way: 408 ``timeout``, closed (row 4)
- upload_dropped: a ``--big-mb`` MB multipart upload, served by a fake node: 202, succeeded, audio then 404/410
- upload_kept: the same on scheduler-keep: succeeded, audio 200 with every byte, then the job reaped (404) once
  retention passes (row 2)
- same_key: 20 concurrent submits x 5 fresh Idempotency-Keys: every answer 202 naming the key's one job; the same
  key with other audio of the same length: 400 ``idempotency_key_reused`` (row 5)
- hostile_input: NUL, lone surrogates, 5000-char ids and integers past int32/int64 in bodies and paths: 400 (row 10)
- raw_bearer: bearer tokens of raw non-UTF-8 bytes, and none: 401 (row 11)
- gzip: ``Content-Encoding: gzip`` (a 16 MiB bomb included) on JSON and multipart ``/v1/jobs`` and on the agent's
  ``/utterance``: 400 (row 12)
- segments: one job's events up to ``MAX_SEGMENTS_PER_JOB`` (202), one past it (400), its view (200, all of them),
  the result (200) (row 13)
- many_nodes: ``--many-nodes`` nodes x 64 devices registered (201; same ids every round), 65 devices and a 150 KB
  model string (400), then ``GET /v1/nodes`` paged to the end (pages of at most 500, ids increasing, no repeats),
  ``/healthz`` timed meanwhile (row 13)
- queue_cap: with no unfinished job, 100 concurrent submits: exactly ``--cap`` 202, the rest 429 (row 9)
- utterance: 8 concurrent 7.5 MB ``/utterance`` bodies on the agent (budget 16 MiB): each 200 or 503 ``busy``
  (the bound's answer, the only 5xx counted as expected), never anything else (row 3)
- cluster: every call of the fake nodes (register 201, poll 200/204, audio 200 with every byte, lease 201, result
  200 accepted)

Any other answer, any 5xx (but the agent's 503 busy), a case that hangs (120 s) or a process that exits counts as
a failure. RSS of every process (schedulers, PostgreSQL's postmaster and backends summed, agent, agent's worker,
this driver) is sampled every second; per process it prints start, RSS after the first minute, peak and end.

Growth rule: a run of at least 3 minutes fails when a process's end RSS is above 1.5x its RSS after the first
minute (the first sample at or past 60 s) and at least 16 MiB above it. For PostgreSQL the rule reads PSS
summed over its processes, since each backend's RSS counts the shared buffers it has touched again.

Exit 0 only when every answer was the expected one and no process grew past the rule.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

from node_agent.scheduler.schemas import MAX_SEGMENTS_PER_JOB, NODES_PAGE_MAX  # noqa: E402

MiB = 2**20
TOKEN = "soak-Tok-22"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUNDARY = "bounds-soak-boundary"
#: scheduler.body_timeout_s of the main scheduler: what a stalled body waits for its 408. Not lower: on a busy
#: 2-core machine a 50 MB upload once took over 2 s to arrive, and got the 408 it should.
BODY_TIMEOUT_S = 10.0
#: scheduler-keep's, which no stalled body is sent to: its uploads are never cut short by a busy machine.
KEEP_BODY_TIMEOUT_S = 120.0
KEEP_RETENTION_S = 10.0
CASE_TIMEOUT_S = 120.0
AGENT_MAX_BODY = 8 * MiB
INT32_PAST = 2**31
INT64_PAST = 2**63
GROWTH_FACTOR = 1.5
GROWTH_FLOOR = 16 * MiB
GROWTH_MIN_MINUTES = 3.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- outcomes


class Tally:
    """Answers per case: expected or not; the first few unexpected ones kept to print."""

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.server_errors: Counter[str] = Counter()
        self.rounds: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def check(self, case: str, ok: bool, what: str = "", status: int | None = None) -> bool:
        if status is not None and status >= 500 and not ok:
            self.server_errors[case] += 1
        if ok:
            self.ok[case] += 1
        else:
            self.bad[case] += 1
            if len(self.examples[case]) < 5:
                self.examples[case].append(what[:400])
                log(f"UNEXPECTED {case}: {what[:400]}")
        return ok

    def failures(self) -> int:
        return sum(self.bad.values())


# ------------------------------------------------------------------------------------------ raw HTTP


class Raw:
    """A hand-spoken HTTP/1.1 connection: headers and bytes a client library would refuse or buffer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> "Raw":
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """False when the server closed first (it may have answered already)."""
        try:
            self.writer.write(data)
            await self.writer.drain()
            return True
        except (ConnectionError, OSError):
            return False

    async def answer(self, timeout: float) -> tuple[int, dict[str, str], Any]:
        async def read() -> tuple[int, dict[str, str], Any]:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = b""
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            try:
                return status, headers, json.loads(body) if body else None
            except ValueError:
                return status, headers, body[:300]
        return await asyncio.wait_for(read(), timeout)

    async def closed(self, timeout: float) -> bool:
        async def drain() -> None:
            while await self.reader.read(65536):
                pass
        try:
            await asyncio.wait_for(drain(), timeout)
        except (asyncio.TimeoutError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()


def post_head(path: str, length: int | None, content_type: str, extra: str = "", auth: bool = True) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    token = f"Authorization: Bearer {TOKEN}\r\n" if auth else ""
    return (f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: {content_type}\r\n{framing}\r\n{token}{extra}"
            "\r\n").encode()


def form_head(fields: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.pcm"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return bytes(out)


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
ZEROS = bytes(MiB)


async def upload(url: str, size: int, fields: dict[str, str]) -> tuple[int, Any]:
    """A multipart ``POST /v1/jobs`` of ``size`` bytes of audio, streamed from one 1 MiB buffer."""
    head = form_head(fields)
    conn = await Raw.open(url)
    try:
        await conn.send(post_head("/v1/jobs", len(head) + size + len(FORM_TAIL), FORM_TYPE) + head)
        left = size
        while left > 0:
            n = min(left, MiB)
            if not await conn.send(ZEROS[:n] if n < MiB else ZEROS):
                break
            left -= n
        await conn.send(FORM_TAIL)
        status, _, reply = await conn.answer(120)
        return status, reply
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ processes


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], tmp: Path) -> None:
        self.name, self.log_path = name, tmp / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
        self.env = {**base, "XDG_STATE_HOME": str(tmp / "xdg-state"), "PYTHONUNBUFFERED": "1", **env}
        self.argv = [sys.executable, "-m", "node_agent", *argv]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def wait_up(session: aiohttp.ClientSession, url: str, proc: Proc, what: str, path: str = "/healthz",
                  timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{what} exited: {proc.log_path.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url + path, headers=AUTH) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up within {timeout:g} s; see {proc.log_path}")
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------------------------ RSS


@dataclass
class Series:
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    pss: list[tuple[float, int]] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)  # the case running at each RSS sample

    def after_first_minute(self, which: str = "rss") -> int | None:
        series = self.samples if which == "rss" else self.pss
        return next((v for t, v in series if t >= 60.0), None)


class Sampler:
    """RSS of every process once a second. A group's processes are found anew at each sample (PostgreSQL's
    backends, the agent's worker come and go)."""

    def __init__(self) -> None:
        self.groups: dict[str, Callable[[], list[psutil.Process]]] = {}
        self.pss_groups: set[str] = set()
        self.series: dict[str, Series] = {}
        self.t0 = time.monotonic()
        self.current = "start"

    def add(self, name: str, procs: Callable[[], list[psutil.Process]], pss: bool = False) -> None:
        self.groups[name] = procs
        self.series[name] = Series()
        if pss:
            self.pss_groups.add(name)

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        for name, find in self.groups.items():
            rss = pss = 0
            try:
                procs = find()
            except psutil.Error:
                procs = []
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    if name in self.pss_groups:
                        info = p.memory_full_info()
                        rss += info.rss
                        pss += info.pss
                    else:
                        rss += p.memory_info().rss
            if procs:
                self.series[name].samples.append((t, rss))
                self.series[name].cases.append(self.current)
                if name in self.pss_groups:
                    self.series[name].pss.append((t, pss))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def one(pid: int) -> Callable[[], list[psutil.Process]]:
    proc = psutil.Process(pid)
    return lambda: [proc] if proc.is_running() else []


def children_of(pid: int) -> Callable[[], list[psutil.Process]]:
    proc = psutil.Process(pid)
    return lambda: proc.children(recursive=True)


def with_children(pid: int) -> Callable[[], list[psutil.Process]]:
    proc = psutil.Process(pid)
    return lambda: [proc, *proc.children(recursive=True)]


# ----------------------------------------------------------------------------------------- fake nodes


def register_body(node_id: str | None, languages: list[str] | None, devices: int = 1, model: str = "fake",
                  hostname: str = "soak") -> dict[str, Any]:
    devs = [{"resource": "cpu" if i == 0 else f"gpu:{i - 1}", "model": model, "compute_type": "int8",
             "languages": languages} for i in range(devices)]
    body: dict[str, Any] = {"agent_version": "soak", "hostname": hostname,
                            "hardware": {"cpu_cores": 1, "memory_bytes": 1 << 30}, "devices": devs}
    if node_id is not None:
        body["node_id"] = node_id
    return body


class FakeNode:
    """One node with one ``cpu`` device and no model, speaking protocol v1 as the agent does (bench/scheduler.py's
    cluster, smaller): it serves whatever it is given in ``languages``; ``serve=False``: it only heartbeats."""

    def __init__(self, name: str, url: str, session: aiohttp.ClientSession, tally: Tally, languages: list[str],
                 serve: bool = True) -> None:
        self.name, self.url, self.session, self.tally = name, url, session, tally
        self.languages, self.serve = languages, serve
        self.node_id: str | None = None
        self.secret: str | None = None
        self.heartbeat_s = 5.0
        self.running: list[str] = []
        self.registered = asyncio.Event()
        self.jobs = 0

    def headers(self) -> dict[str, str]:
        """The token, and this node's secret once registration gave it (X-Node-Secret on every node call)."""
        return {**AUTH, "X-Node-Secret": self.secret} if self.secret else AUTH

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body, headers=self.headers()) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, raw[:300]

    async def register(self) -> None:
        while True:
            status, body = await self.call("POST", "/v1/nodes", register_body(self.node_id, self.languages,
                                                                            hostname=self.name))
            if self.tally.check("cluster", status == 201, f"register {status} {body}", status):
                self.node_id, self.heartbeat_s = body["node_id"], float(body["heartbeat_interval_s"])
                self.secret = body.get("node_secret") or self.secret
                self.registered.set()
                return
            await asyncio.sleep(1)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            body = {"state": "busy" if self.running else "ready", "running_jobs": self.running}
            status, reply = await self.call("PUT", f"/v1/nodes/{self.node_id}/heartbeat", body)
            self.tally.check("cluster", status == 200, f"heartbeat {status} {reply}", status)
            if status == 404:
                await self.register()

    async def run(self) -> None:
        await self.register()
        beats = asyncio.create_task(self.heartbeats())
        try:
            while self.serve:
                try:
                    status, body = await self.call(
                        "GET", f"/v1/nodes/{self.node_id}/jobs/next?wait_s=5&lease_ttl_s=60")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    self.tally.check("cluster", False, f"poll: {exc!r}")
                    await asyncio.sleep(1)
                    continue
                if status == 200:
                    try:
                        await self.job(body)
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        self.tally.check("cluster", False, f"job {body.get('job_id')}: {exc!r}")
                    continue
                self.tally.check("cluster", status == 204, f"poll {status} {body}", status)
                if status == 404:
                    await self.register()
                elif status != 204:
                    await asyncio.sleep(1)
            await asyncio.Event().wait()
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats

    async def job(self, a: dict[str, Any]) -> None:
        job_id = a["job_id"]
        self.running = [job_id]
        try:
            got = 0
            async with self.session.get(self.url + a["audio"]["url"], headers=self.headers()) as resp:
                status = resp.status
                async for chunk in resp.content.iter_chunked(MiB):
                    got += len(chunk)
            if not self.tally.check("cluster", status == 200 and got == a["audio"]["bytes"],
                                    f"audio of {job_id}: {status}, {got} of {a['audio']['bytes']} bytes", status):
                return
            lease = a.get("lease")
            if lease is None:
                status, lease = await self.call("POST", "/v1/leases", {
                    "node_id": self.node_id, "job_id": job_id, "resource": a.get("resource") or "cpu", "ttl_s": 60})
                if not self.tally.check("cluster", status == 201, f"lease {status} {lease}", status):
                    return
            seg = {"id": 0, "start": 0.0, "end": 0.5, "text": " soak"}
            status, ack = await self.call("POST", f"/v1/jobs/{job_id}/result", {
                "node_id": self.node_id, "lease_id": lease["lease_id"], "attempt": a["attempt"],
                "lease_epoch": lease["epoch"], "outcome": "succeeded",
                "result": {"text": "soak", "language": "en", "language_probability": 1.0, "duration_s": 0.5,
                           "segments": [seg]}})
            self.tally.check("cluster", status == 200 and ack.get("accepted") is True, f"result {status} {ack}",
                             status)
            self.jobs += 1
        finally:
            self.running = []


# ------------------------------------------------------------------------------------------- the cases


class Soak:
    """One store: its processes, its fake nodes, the cases."""

    def __init__(self, args: argparse.Namespace, store: str, tmp: Path, pg_server: Any) -> None:
        self.args, self.store, self.tmp, self.pg = args, store, tmp, pg_server
        self.tally = Tally()
        self.sampler = Sampler()
        self.procs: list[Proc] = []
        self.pending: list[str] = []  # jobs on the main scheduler that fake nodes must finish
        self.kept: list[tuple[str, float]] = []  # (job on scheduler-keep, when its audio was read back)
        self.seg_node: FakeNode | None = None
        self.info: dict[str, Any] = defaultdict(float)
        self.last_job: str | None = None
        self.many_secrets: dict[str, str] = {}
        pcm = bytes((AGENT_MAX_BODY * 94 // 100) * 3 // 4 // 2 * 2)
        body = json.dumps({"job_id": "big", "trace_id": "t", "src_lang": "en",
                           "audio": base64.b64encode(pcm).decode()}).encode()
        self.utterance_body = body + b" " * (AGENT_MAX_BODY * 94 // 100 - len(body))

    def store_env(self, which: str) -> dict[str, str]:
        if self.store == "postgresql":
            return {"NODE_AGENT_SCHEDULER__STORE": self.pg.create_database(f"soak_{which}_{int(time.time())}")}
        return {"NODE_AGENT_SCHEDULER__STORE": self.store}

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        common = {"NODE_AGENT_SCHEDULER__TOKEN": TOKEN,
                  "NODE_AGENT_SCHEDULER__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                  "NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S": "5"}
        port, keep_port, agent_port = free_port(), free_port(), free_port()
        self.url, self.keep_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{keep_port}"
        self.agent_url = f"http://127.0.0.1:{agent_port}"
        main = Proc("scheduler", ["scheduler", "--listen", f"127.0.0.1:{port}"], {
            **common, **self.store_env("main"), "NODE_AGENT_NODE__STATE_DIR": str(self.tmp / "main"),
            "NODE_AGENT_SCHEDULER__MAX_QUEUED_JOBS": str(self.args.cap),
            "NODE_AGENT_SCHEDULER__JOB_RETENTION_S": "60"}, self.tmp).start()
        # No token on scheduler-keep: with tokens, a finished job's audio is no one's to read (the node fence), and
        # this case reads the kept audio back.
        keep = Proc("scheduler-keep", ["scheduler", "--listen", f"127.0.0.1:{keep_port}"], {
            "NODE_AGENT_SCHEDULER__BODY_TIMEOUT_S": str(KEEP_BODY_TIMEOUT_S),
            "NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S": "5", **self.store_env("keep"),
            "NODE_AGENT_NODE__STATE_DIR": str(self.tmp / "keep"),
            "NODE_AGENT_SCHEDULER__KEEP_AUDIO": "true",
            "NODE_AGENT_SCHEDULER__JOB_RETENTION_S": str(KEEP_RETENTION_S)}, self.tmp).start()
        self.procs += [main, keep]
        await wait_up(session, self.url, main, "scheduler")
        await wait_up(session, self.keep_url, keep, "scheduler-keep")
        self.main_proc = main
        if not self.args.no_agent:
            agent = Proc("agent", ["run"], {
                "NODE_AGENT_SCHEDULER__URL": self.keep_url,
                "NODE_AGENT_NODE__STATE_DIR": str(self.tmp / "agent"),
                "NODE_AGENT_HTTP__LISTEN": f"127.0.0.1:{agent_port}", "NODE_AGENT_ASR__DEVICE": "cpu",
                "NODE_AGENT_ASR__WORKERS_PER_DEVICE": "1", "NODE_AGENT_ASR__CPU_THREADS": "1",
                "NODE_AGENT_WORKER__COMMAND": json.dumps([sys.executable, str(ROOT / "tests" / "fake_plugin.py")]),
                "NODE_AGENT_HTTP__MAX_BODY_BYTES": str(AGENT_MAX_BODY),
                "NODE_AGENT_COMPAT__QUEUE_PER_WORKER": "1", "NODE_AGENT_COMPAT__BODY_TIMEOUT_S": "30"},
                self.tmp).start()
            self.procs.append(agent)
            await wait_up(session, self.agent_url, agent, "agent", "/readyz", 120)
        # Fake nodes: 'en' jobs go to the cluster, 'fr' to the segments case's node, 'es' (queue_cap's) to a node
        # that never polls, 'de' (scheduler-keep's) to the keep node. The agent serves 'en' on scheduler-keep,
        # where no job asks for 'en'.
        self.nodes = [FakeNode(f"cluster-{i}", self.url, session, self.tally, ["en"]) for i in range(4)]
        self.nodes.append(FakeNode("keep-node", self.keep_url, session, self.tally, ["de"]))
        self.nodes.append(FakeNode("cap-node", self.url, session, self.tally, ["es"], serve=False))
        self.seg_node = FakeNode("seg-node", self.url, session, self.tally, ["fr"], serve=False)
        self.nodes.append(self.seg_node)
        self.node_tasks = [asyncio.create_task(n.run()) for n in self.nodes]
        await asyncio.wait_for(asyncio.gather(*(n.registered.wait() for n in self.nodes)), 60)
        # RSS groups
        self.sampler.add("scheduler", one(main.pid))
        self.sampler.add("scheduler-keep", one(keep.pid))
        if self.store == "postgresql":
            postmaster = int((self.pg.datadir / "postmaster.pid").read_text().split()[0])
            self.sampler.add("postgresql (all)", with_children(postmaster), pss=True)
        if not self.args.no_agent:
            self.sampler.add("agent", one(self.procs[-1].pid))
            self.sampler.add("agent's worker", children_of(self.procs[-1].pid))
        self.sampler.add("driver", one(os.getpid()))

    async def stop(self) -> None:
        for t in self.node_tasks:
            t.cancel()
        await asyncio.gather(*self.node_tasks, return_exceptions=True)
        for p in reversed(self.procs):
            rc = await asyncio.to_thread(p.stop)
            self.tally.check("processes", rc == 0, f"{p.name} exited {rc} at the end; see {p.log_path}")

    # -------------------------------------------------------------- helpers

    async def call(self, method: str, url: str, body: Any = None, data: Any = None,
                   headers: dict[str, str] | None = None, timeout: float = 60,
                   secret: str | None = None) -> tuple[int, Any, Any]:
        hdrs = {**AUTH, **(headers or {}), **({"X-Node-Secret": secret} if secret else {})}
        async with self.session.request(method, url, json=body, data=data, headers=hdrs,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None, resp.headers
            except ValueError:
                return resp.status, raw[:300], resp.headers

    async def submit(self, language: str = "en", audio: bytes = bytes(3200), key: str | None = None,
                     url: str | None = None, **fields: Any) -> tuple[int, Any, Any]:
        body = {"audio_b64": base64.b64encode(audio).decode(), "format": "pcm_s16le", "sample_rate": 16000,
                "language": language, **fields}
        return await self.call("POST", (url or self.url) + "/v1/jobs", body,
                               headers={"Idempotency-Key": key} if key else None)

    async def terminal(self, job_id: str, url: str | None = None, timeout: float = 90) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, view, _ = await self.call("GET", f"{url or self.url}/v1/jobs/{job_id}?wait_s=5")
            if status != 200:
                return {"state": f"HTTP {status}", "reply": view}
            if view["state"] in ("succeeded", "failed", "cancelled"):
                return view
        return None

    async def finish_pending(self) -> None:
        """Every job fake nodes were to serve has succeeded (they are checked, then forgotten)."""
        jobs, self.pending = self.pending, []
        views = await asyncio.gather(*(self.terminal(j) for j in jobs))
        for job_id, view in zip(jobs, views):
            self.tally.check("jobs served", view is not None and view["state"] == "succeeded",
                             f"{job_id}: {view and {k: view.get(k) for k in ('state', 'error', 'reply')}}")
            self.last_job = job_id

    # -------------------------------------------------------------- cases

    async def stalled_json(self) -> None:
        conns = [await Raw.open(self.url) for _ in range(4)]
        try:
            for c in conns:
                await c.send(post_head("/v1/jobs", 8 * MiB, "application/json") + b'{"audio_b64": "'
                             + b"A" * MiB)
            for c in conns:
                status, headers, reply = await c.answer(BODY_TIMEOUT_S + 20)
                ok = (status == 408 and reply["error"]["code"] == "timeout"
                      and headers.get("connection") == "close" and await c.closed(20))
                self.tally.check("stalled_json", ok, f"{status} {headers.get('connection')} {reply}", status)
        finally:
            for c in conns:
                c.close()

    async def stalled_multipart(self) -> None:
        head = form_head({"format": "pcm_s16le", "sample_rate": "16000", "language": "en"})
        c = await Raw.open(self.url)
        try:
            await c.send(post_head("/v1/jobs", len(head) + 4 * MiB + len(FORM_TAIL), FORM_TYPE) + head
                         + bytes(2 * MiB))
            status, headers, reply = await c.answer(BODY_TIMEOUT_S + 20)
            ok = status == 408 and reply["error"]["code"] == "timeout" and await c.closed(20)
            self.tally.check("stalled_multipart", ok, f"{status} {reply}", status)
        finally:
            c.close()

    async def upload_dropped(self) -> None:
        size = self.args.big_mb * 1_000_000
        status, reply = await upload(self.url, size, {"format": "pcm_s16le", "sample_rate": "16000",
                                                      "language": "en"})
        if not self.tally.check("upload_dropped", status == 202, f"upload {status} {reply}", status):
            return
        view = await self.terminal(reply["job_id"])
        if not self.tally.check("upload_dropped", view is not None and view["state"] == "succeeded",
                                f"big job: {view}"):
            return
        status, audio, _ = await self.call("GET", f"{self.url}/v1/jobs/{reply['job_id']}/audio")
        # Gone (404/410), or 403 where the node fence (tokens set) answers first: a finished job has no holder.
        self.tally.check("upload_dropped", status in (403, 404, 410), f"audio after the job: {status}", status)
        self.info["uploaded MB"] += size / 1e6

    async def upload_kept(self) -> None:
        size = self.args.big_mb * 1_000_000
        status, reply = await upload(self.keep_url, size, {"format": "pcm_s16le", "sample_rate": "16000",
                                                           "language": "de"})
        if not self.tally.check("upload_kept", status == 202, f"upload {status} {reply}", status):
            return
        job_id = reply["job_id"]
        view = await self.terminal(job_id, self.keep_url)
        if not self.tally.check("upload_kept", view is not None and view["state"] == "succeeded",
                                f"big kept job: {view}"):
            return
        got = 0
        async with self.session.get(f"{self.keep_url}/v1/jobs/{job_id}/audio", headers=AUTH) as resp:
            status = resp.status
            async for chunk in resp.content.iter_chunked(MiB):
                got += len(chunk)
        self.tally.check("upload_kept", status == 200 and got == size, f"kept audio: {status}, {got} bytes", status)
        self.kept.append((job_id, time.monotonic()))
        self.info["uploaded MB"] += size / 1e6

    async def reaped(self, wait: bool = False) -> None:
        """Kept jobs finished more than retention + 10 s ago are forgotten (404)."""
        if wait and self.kept:
            await asyncio.sleep(max(0.0, self.kept[-1][1] + KEEP_RETENTION_S + 10 - time.monotonic()))
        due = [(j, t) for j, t in self.kept if time.monotonic() - t > KEEP_RETENTION_S + 10]
        for job_id, t in due:
            status, reply, _ = await self.call("GET", f"{self.keep_url}/v1/jobs/{job_id}")
            self.tally.check("upload_kept", status == 404, f"kept job {job_id} {time.monotonic() - t:.0f} s after: "
                             f"{status} {reply}", status)
            self.kept.remove((job_id, t))

    async def same_key(self) -> None:
        keys = [f"soak-{uuid.uuid4().hex}" for _ in range(5)]
        calls = [(k, b"audio of %s" % k.encode()) for k in keys for _ in range(20)]
        answers = await asyncio.gather(*(self.submit(audio=a, key=k) for k, a in calls))
        jobs: dict[str, set[str]] = defaultdict(set)
        for (key, _), (status, reply, _) in zip(calls, answers):
            if self.tally.check("same_key", status == 202, f"{status} {reply}", status):
                jobs[key].add(reply["job_id"])
        self.tally.check("same_key", all(len(v) == 1 for v in jobs.values()), f"jobs per key: {dict(jobs)}")
        self.pending += [i for v in jobs.values() for i in v]
        # The same key with other audio of the same length: refused (the fingerprint holds the audio's digest).
        key, audio = calls[0]
        status, reply, _ = await self.submit(audio=bytes(len(audio)), key=key)
        self.tally.check("same_key", status == 400 and reply["error"]["code"] == "idempotency_key_reused",
                         f"other audio under a used key: {status} {reply}", status)

    async def hostile_input(self) -> None:
        node = self.seg_node.node_id if self.seg_node else "node-x"
        secret = self.seg_node.secret if self.seg_node else None
        job = self.last_job or "job-x"
        fence = {"node_id": node, "lease_id": "lease-x", "attempt": 1, "lease_epoch": 1}
        events = {**fence, "events": [{"id": 0, "start": 0.0, "end": 1.0, "text": "hi"}]}
        result = {**fence, "outcome": "succeeded", "result": {"text": "hi", "segments": []}}
        register = register_body("node-h", ["en"], hostname="host-h")
        lease = {"node_id": node, "job_id": job, "resource": "cpu", "ttl_s": 10}

        def seg(i: int) -> list[dict[str, Any]]:
            return [{"id": i, "start": 0.0, "end": 1.0, "text": "hi"}]

        bodies: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/v1/nodes", {**register, "hostname": "host\x00b"}),
            ("POST", "/v1/nodes", {**register, "hostname": "host-\ud800"}),
            ("POST", "/v1/nodes", {**register, "node_id": "n\x00"}),
            ("POST", "/v1/nodes", {**register, "hardware": {"cpu_cores": 1, "memory_bytes": INT64_PAST}}),
            ("PUT", f"/v1/nodes/{node}/heartbeat", {"state": "ready", "memory_used_bytes": INT64_PAST}),
            ("PUT", f"/v1/nodes/{node}/heartbeat", {"state": "ready", "running_jobs": ["j\x00"]}),
            ("POST", "/v1/leases", {**lease, "node_id": "node\x00"}),
            ("POST", "/v1/leases", {**lease, "job_id": "job-\udfff"}),
            ("POST", "/v1/leases/lease-x/renew", {"node_id": node, "epoch": INT64_PAST}),
            ("POST", "/v1/leases/lease-x/renew", {"node_id": node, "epoch": -INT64_PAST - 1}),
            ("POST", f"/v1/jobs/{job}/events", {**events, "attempt": INT32_PAST}),
            ("POST", f"/v1/jobs/{job}/events", {**events, "lease_epoch": INT64_PAST}),
            ("POST", f"/v1/jobs/{job}/events", {**events, "events": seg(INT32_PAST)}),
            ("POST", f"/v1/jobs/{job}/events", {**events, "node_id": "x" * 5000}),
            ("POST", f"/v1/jobs/{job}/result", {**result, "lease_id": "l\x00"}),
            ("POST", f"/v1/jobs/{job}/result", {**result, "attempt": INT32_PAST}),
            ("POST", f"/v1/jobs/{job}/result", {**result, "result": {"text": "hi", "segments": seg(INT32_PAST)}}),
        ]
        for method, path, body in bodies:
            status, reply, _ = await self.call(method, self.url + path, data=json.dumps(body),
                                               headers={"Content-Type": "application/json"}, secret=secret)
            self.tally.check("hostile_input", status == 400, f"{method} {path[:60]}: {status} {str(reply)[:200]}",
                             status)
        for bad in ("bad\x00id", "x" * 5000, "bad\ud800id"):
            q = urllib.parse.quote(bad.encode("utf-8", "surrogatepass"), safe="")
            for method, path, body in [
                ("PUT", f"/v1/nodes/{q}/heartbeat", {"state": "ready"}),
                ("GET", f"/v1/nodes/{q}/jobs/next", None),
                ("POST", f"/v1/leases/{q}/renew", {"node_id": node, "epoch": 1}),
                ("DELETE", f"/v1/leases/{q}", None),
                ("GET", f"/v1/jobs/{q}?wait_s=0.1", None),
                ("GET", f"/v1/jobs/{q}/audio", None),
                ("POST", f"/v1/jobs/{q}/events", {**fence, "events": []}),
                ("POST", f"/v1/jobs/{q}/result", {**fence, "outcome": "failed"}),
            ]:
                status, reply, _ = await self.call(method, self.url + path, body, secret=secret)
                self.tally.check("hostile_input", status == 400, f"{method} {path[:60]}: {status} {str(reply)[:200]}",
                                 status)
        if self.last_job:
            status, reply, _ = await self.call("GET", f"{self.url}/v1/jobs/{job}?after_segment={INT64_PAST}")
            self.tally.check("hostile_input", status in (200, 400, 404), f"after_segment past int64: {status}", status)

    async def raw_bearer(self) -> None:
        for token in (b"\xc3\xa9\xff", b"\xff", b"\x80abc", b"\xed\xb3\xbf", None):
            auth = b"" if token is None else b"Authorization: Bearer " + token + b"\r\n"
            c = await Raw.open(self.url)
            try:
                await c.send(b"GET /v1/nodes?limit=1 HTTP/1.1\r\nHost: soak\r\n" + auth + b"\r\n")
                status, _, reply = await c.answer(20)
            finally:
                c.close()
            self.tally.check("raw_bearer", status == 401, f"{token!r}: {status} {reply}", status)

    async def gzip_case(self) -> None:
        form = form_head({"format": "pcm_s16le", "sample_rate": "16000", "language": "en"}) + bytes(3200) + FORM_TAIL
        json_body = json.dumps({"audio_b64": base64.b64encode(bytes(3200)).decode(), "format": "pcm_s16le",
                                "sample_rate": 16000, "language": "en"}).encode()
        bomb = self.bomb
        cases = [(self.url, "/v1/jobs", FORM_TYPE, gzip.compress(form), True),
                 (self.url, "/v1/jobs", FORM_TYPE, bomb, True),
                 (self.url, "/v1/jobs", "application/json", gzip.compress(json_body), True),
                 (self.url, "/v1/jobs", "application/json", bomb, True)]
        if not self.args.no_agent:
            utt = json.dumps({"audio": base64.b64encode(bytes(32000)).decode(), "sample_rate": 16000,
                              "src_lang": "en"}).encode()
            cases += [(self.agent_url, "/utterance", "application/json", gzip.compress(utt), False),
                      (self.agent_url, "/utterance", "application/json", bomb, False)]
        for url, path, ctype, body, auth in cases:
            c = await Raw.open(url)
            try:
                await c.send(post_head(path, len(body), ctype, "Content-Encoding: gzip\r\n", auth) + body)
                status, _, reply = await c.answer(20)
            finally:
                c.close()
            ok = status == 400 and "Content-Encoding" in str(reply)
            self.tally.check("gzip", ok, f"{url} {path} {ctype}: {status} {reply}", status)

    async def segments(self) -> None:
        assert self.seg_node is not None and self.seg_node.node_id is not None
        node = self.seg_node.node_id
        status, reply, _ = await self.submit(language="fr")
        if not self.tally.check("segments", status == 202, f"submit {status} {reply}", status):
            return
        job = reply["job_id"]
        self.seg_node.running = [job]  # its heartbeats name the job it holds, as the agent's do
        try:
            await self._segments(node, job)
        finally:
            self.seg_node.running = []

    async def _segments(self, node: str, job: str) -> None:
        status, a, _ = await self.call("GET", f"{self.url}/v1/nodes/{node}/jobs/next?wait_s=10&lease_ttl_s=300",
                                  secret=self.seg_node.secret)
        if not self.tally.check("segments", status == 200 and a["job_id"] == job and a.get("lease"),
                                f"poll {status} {a}", status):
            return
        fence = {"node_id": node, "lease_id": a["lease"]["lease_id"], "attempt": a["attempt"],
                 "lease_epoch": a["lease"]["epoch"]}

        def segs(lo: int, hi: int) -> list[dict[str, Any]]:
            return [{"id": i, "start": i * 0.1, "end": i * 0.1 + 0.1, "text": "s"} for i in range(lo, hi)]

        n, batch = self.args.segments, 10_000
        for lo in range(0, n, batch):
            status, reply, _ = await self.call("POST", f"{self.url}/v1/jobs/{job}/events",
                                               {**fence, "events": segs(lo, min(n, lo + batch))}, timeout=120,
                                               secret=self.seg_node.secret)
            self.tally.check("segments", status == 202, f"events {lo}: {status} {str(reply)[:200]}", status)
        status, reply, _ = await self.call("POST", f"{self.url}/v1/jobs/{job}/events",
                                           {**fence, "events": segs(MAX_SEGMENTS_PER_JOB, MAX_SEGMENTS_PER_JOB + 1)},
                                           secret=self.seg_node.secret)
        self.tally.check("segments", status == 400 and "MAX_SEGMENTS_PER_JOB" in str(reply),
                         f"past the bound: {status} {str(reply)[:200]}", status)
        started = time.monotonic()
        status, view, _ = await self.call("GET", f"{self.url}/v1/jobs/{job}", timeout=120)
        took = time.monotonic() - started
        self.info["segments view max s"] = max(self.info["segments view max s"], took)
        self.tally.check("segments", status == 200 and len(view["segments"]) == n,
                         f"view: {status} {len(view['segments']) if status == 200 else view}", status)
        status, ack, _ = await self.call("POST", f"{self.url}/v1/jobs/{job}/result", {
            **fence, "outcome": "succeeded",
            "result": {"text": "s s", "language": "fr", "duration_s": 1.0, "segments": segs(0, 2)}},
            secret=self.seg_node.secret)
        self.tally.check("segments", status == 200 and ack["accepted"], f"result {status} {ack}", status)
        self.info["segments stored"] += n
        self.last_job = job

    async def many_nodes(self) -> None:
        n = self.args.many_nodes
        sem = asyncio.Semaphore(8)

        async def register(i: int) -> None:
            node_id = f"many-{i:05d}"
            async with sem:
                status, reply, _ = await self.call("POST", f"{self.url}/v1/nodes", register_body(
                    node_id, ["it"], devices=64, model="many", hostname=f"many-{i}"),
                    secret=self.many_secrets.get(node_id))
            if status == 201 and reply.get("node_secret"):
                self.many_secrets[node_id] = reply["node_secret"]
            self.tally.check("many_nodes", status == 201, f"register {i}: {status} {str(reply)[:200]}", status)

        await asyncio.gather(*(register(i) for i in range(n)))
        for what, body in [("65 devices", register_body("many-x", ["it"], devices=65)),
                           ("150 KB model", register_body("many-x", ["it"], model="m" * 150_000))]:
            status, reply, _ = await self.call("POST", f"{self.url}/v1/nodes", body)
            self.tally.check("many_nodes", status == 400, f"{what}: {status} {str(reply)[:200]}", status)
        health: list[float] = []
        listing = True

        async def probe() -> None:
            while listing:
                t = time.monotonic()
                async with self.session.get(self.url + "/healthz") as resp:
                    await resp.read()
                health.append(time.monotonic() - t)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        seen: list[str] = []
        after, pages, started = None, 0, time.monotonic()
        try:
            while True:
                query = f"?after={after}" if after else ""
                status, page, _ = await self.call("GET", f"{self.url}/v1/nodes{query}", timeout=60)
                pages += 1
                ids = [x["node_id"] for x in page["nodes"]] if status == 200 else []
                ok = (status == 200 and len(ids) <= NODES_PAGE_MAX and ids == sorted(ids)
                      and (not seen or not ids or ids[0] > seen[-1]))
                self.tally.check("many_nodes", ok, f"page {pages}: {status} {len(ids)} nodes", status)
                seen += ids
                after = page.get("next_after") if status == 200 else None
                if not after or pages > 100:
                    break
        finally:
            listing = False
            await prober
        took = time.monotonic() - started
        many = sum(1 for i in seen if i.startswith("many-"))
        self.tally.check("many_nodes", many == n and (n <= NODES_PAGE_MAX or pages > 1),
                         f"listing: {many} of {n} many-nodes in {pages} pages")
        self.info["listing max s"] = max(self.info["listing max s"], took)
        self.info["healthz during listing max s"] = max([self.info["healthz during listing max s"], *health])

    async def queue_cap(self) -> None:
        await self.finish_pending()  # nothing unfinished on the main scheduler: the cap is exact
        answers = await asyncio.gather(*(self.submit(language="es", audio=b"cap%05d" % i, deadline_s=2)
                                         for i in range(100)))
        statuses = Counter(s for s, _, _ in answers)
        for status, reply, _ in answers:
            self.tally.check("queue_cap", status in (202, 429), f"{status} {reply}", status)
        self.tally.check("queue_cap", statuses == {202: self.args.cap, 429: 100 - self.args.cap},
                         f"admitted {dict(statuses)}, cap {self.args.cap}")
        # They expire (no node polls for 'es'): wait until none is left, so the next round starts empty.
        jobs = [r["job_id"] for s, r, _ in answers if s == 202]
        views = await asyncio.gather(*(self.terminal(j, timeout=60) for j in jobs))
        self.tally.check("queue_cap", all(v is not None and v["state"] == "failed" for v in views),
                         f"capped jobs not all expired: {Counter(v and v['state'] for v in views)}")

    async def utterance(self) -> None:
        async def one_body(i: int) -> tuple[int, Any]:
            c = await Raw.open(self.agent_url)
            try:
                head = (f"POST /utterance HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(self.utterance_body)}\r\n\r\n").encode()
                await c.send(head)
                for k in range(0, len(self.utterance_body), MiB):
                    if not await c.send(self.utterance_body[k:k + MiB]):
                        break
                status, _, reply = await c.answer(60)
                return status, reply
            finally:
                c.close()

        answers = await asyncio.gather(*(one_body(i) for i in range(8)), return_exceptions=True)
        for ans in answers:
            if isinstance(ans, BaseException):
                self.tally.check("utterance", False, f"{ans!r}")
                continue
            status, reply = ans
            ok = status == 200 or (status == 503 and isinstance(reply, dict) and reply["error"]["code"] == "busy")
            self.tally.check("utterance", ok, f"{status} {reply}", None if ok else status)
            self.info["utterance 200"] += status == 200
            self.info["utterance 503 busy"] += status == 503 and ok

    # -------------------------------------------------------------- the loop

    async def run(self) -> int:
        self.bomb = gzip.compress(bytes(16 * MiB), compresslevel=9)
        cases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("stalled_json", self.stalled_json), ("stalled_multipart", self.stalled_multipart),
            ("upload_dropped", self.upload_dropped), ("upload_kept", self.upload_kept),
            ("same_key", self.same_key), ("hostile_input", self.hostile_input), ("raw_bearer", self.raw_bearer),
            ("gzip", self.gzip_case), ("segments", self.segments), ("many_nodes", self.many_nodes),
            ("queue_cap", self.queue_cap)]
        if not self.args.no_agent:
            cases.append(("utterance", self.utterance))
        stop = asyncio.Event()
        self.sampler.t0 = time.monotonic()
        sampler = asyncio.create_task(self.sampler.run(stop))
        stop_at = time.monotonic() + self.args.minutes * 60
        rounds = 0
        try:
            while time.monotonic() < stop_at:
                rounds += 1
                for name, case in cases:
                    if time.monotonic() >= stop_at and rounds > 1:
                        break
                    self.sampler.current = name
                    try:
                        await asyncio.wait_for(case(), CASE_TIMEOUT_S)
                        self.tally.rounds[name] += 1
                    except Exception as exc:  # noqa: BLE001 - any error of a case is a failure to report
                        self.tally.check(name, False, f"raised {exc!r}")
                    for p in self.procs:
                        if not p.alive():
                            self.tally.check("processes", False, f"{p.name} exited {p.proc.returncode}")
                            raise RuntimeError(f"{p.name} exited; see {p.log_path}")
                self.sampler.current = "between rounds"
                await self.finish_pending()
                await self.reaped()
                log(f"{self.store}: round {rounds} done; failures so far {self.tally.failures()}")
            await self.finish_pending()
            await self.reaped(wait=True)
        finally:
            stop.set()
            await sampler
        self.rounds_run = rounds
        return rounds

    # -------------------------------------------------------------- the report

    def report(self) -> list[str]:
        out = [f"store {self.store}: {self.args.minutes:g} min, {self.rounds_run} rounds"]
        out.append(f"  {'process':<18} {'start':>8} {'at 1 min':>9} {'peak':>8} {'end':>8}  (RSS, MiB; the case "
                   "running at the peak)")
        growth: list[str] = []
        for name, s in self.sampler.series.items():
            if not s.samples:
                out.append(f"  {name:<18} no samples")
                continue
            vals = [v for _, v in s.samples]
            first = s.after_first_minute()
            at_peak = s.cases[vals.index(max(vals))]
            out.append(f"  {name:<18} {vals[0] / MiB:>8.1f} {mib(first):>9} {max(vals) / MiB:>8.1f} "
                       f"{vals[-1] / MiB:>8.1f}  {at_peak}")
            if s.pss:
                p = [v for _, v in s.pss]
                pfirst = s.after_first_minute("pss")
                out.append(f"  {name + ' PSS':<18} {p[0] / MiB:>8.1f} {mib(pfirst):>9} "
                           f"{max(p) / MiB:>8.1f} {p[-1] / MiB:>8.1f}")
            ruled, base, end = (s.pss, s.after_first_minute("pss"), s.pss[-1][1]) if s.pss else (
                s.samples, first, vals[-1])
            if self.args.minutes >= GROWTH_MIN_MINUTES and base and ruled and end > GROWTH_FACTOR * base \
                    and end - base >= GROWTH_FLOOR:
                growth.append(f"{name}: {base / MiB:.1f} MiB after the first minute -> {end / MiB:.1f} MiB at the end")
        out.append(f"  {'case':<18} {'rounds':>6} {'expected':>9} {'unexpected':>10} {'5xx':>5}")
        names = list(dict.fromkeys([*self.tally.rounds, *self.tally.ok, *self.tally.bad]))
        for name in names:
            out.append(f"  {name:<18} {self.tally.rounds.get(name, 0):>6} {self.tally.ok[name]:>9} "
                       f"{self.tally.bad[name]:>10} {self.tally.server_errors[name]:>5}")
        out.append(f"  total: {sum(self.tally.ok.values())} expected, {self.tally.failures()} unexpected "
                   f"({sum(self.tally.server_errors.values())} 5xx)")
        if self.info:
            out.append("  " + ", ".join(f"{k}: {v:.2f}" if isinstance(v, float) and not v.is_integer()
                                        else f"{k}: {v:g}" for k, v in self.info.items()))
        for name, examples in self.tally.examples.items():
            for e in examples:
                out.append(f"  unexpected {name}: {e}")
        for g in growth:
            out.append(f"  RSS GROWTH (end > {GROWTH_FACTOR:g}x the first minute's and +{GROWTH_FLOOR // MiB} MiB): "
                       f"{g}")
        self.growth = growth
        return out


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


async def soak_store(args: argparse.Namespace, store: str, base: Path, pg_server: Any) -> tuple[list[str], bool]:
    tmp = base / store
    tmp.mkdir(parents=True)
    soak = Soak(args, store, tmp, pg_server)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=90)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        log(f"{store}: starting the schedulers{'' if args.no_agent else ', the agent'} and the fake nodes")
        try:
            await soak.start(session)
            log(f"{store}: running the cases for {args.minutes:g} min")
            await soak.run()
        except Exception as exc:  # noqa: BLE001
            soak.tally.check("processes", False, f"the soak stopped: {exc!r}")
            soak.rounds_run = getattr(soak, "rounds_run", 0)
        finally:
            await soak.stop()
    lines = soak.report()
    return lines, soak.tally.failures() == 0 and not soak.growth


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="per store")
    ap.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql, memory")
    ap.add_argument("--big-mb", type=int, default=50, help="size of each big upload (MB)")
    ap.add_argument("--segments", type=int, default=MAX_SEGMENTS_PER_JOB, help="segments of the segments job")
    ap.add_argument("--many-nodes", type=int, default=600, help="nodes x 64 devices registered each round")
    ap.add_argument("--cap", type=int, default=50, help="scheduler.max_queued_jobs")
    ap.add_argument("--no-agent", action="store_true", help="no agent process (no /utterance cases)")
    ap.add_argument("--keep", action="store_true", help="keep the logs and state directories")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in ("sqlite", "postgresql", "memory"):
            ap.error(f"--stores: {s!r} is not sqlite, postgresql or memory")

    base = Path(tempfile.mkdtemp(prefix="node-agent-bounds-soak-"))
    pg_server = None
    if "postgresql" in stores:
        import pg

        pg_server = pg.PgServer().start()
    results: list[tuple[list[str], bool]] = []
    try:
        for store in stores:
            results.append(await soak_store(args, store, base, pg_server))
    finally:
        if pg_server is not None:
            pg_server.close()
    print(f"\nbounds soak: {args.minutes:g} min per store, big uploads {args.big_mb} MB, {args.segments} segments "
          f"per job, {args.many_nodes} nodes x 64 devices, queue cap {args.cap}; growth rule: end RSS > "
          f"{GROWTH_FACTOR:g}x the RSS after the first minute and +{GROWTH_FLOOR // MiB} MiB "
          f"(runs of {GROWTH_MIN_MINUTES:g} min or more; PostgreSQL by PSS)")
    for lines, _ in results:
        print("\n".join(lines))
    ok = all(good for _, good in results)
    if args.keep or not ok:
        print(f"logs: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
