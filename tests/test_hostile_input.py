"""Hostile input that once reached a 500 (issue 22, #6, #10, #11), against real schedulers on loopback.

Bearer tokens of raw bytes; NUL, lone surrogates and integers past the store's columns in bodies and paths; a
store password given as a query parameter. Every one is answered 400/401/404 naming what was wrong, and the
password never shows.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path
from typing import Any, AsyncIterator

import pg
import pytest
from aiohttp import web

from node_agent.config import SchedulerSettings, redact_dsn
from node_agent.http_api import _auth_middleware as agent_auth_middleware
from node_agent.scheduler.errors import StoreError
from node_agent.scheduler.server import start_scheduler
from procs import free_port
from test_scheduler import CPU_EN, HARDWARE, Harness
from test_store import LOG_RECORD, cli, close, serve, store  # noqa: F401  (store: the fixture)

pytestmark = pytest.mark.timeout(90)

TOKEN = "sched-Tok-4f1d"
INT32_PAST = 2**31
INT64_PAST = 2**63


async def raw_status(url: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` (raw bytes: headers aiohttp's client would refuse) and return the status and the reply."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(reply.split(b" ", 2)[1]), reply


def bearer_request(path: str, token: bytes) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b"Authorization: Bearer " + token + b"\r\n\r\n")


# ----------------------------------------------------------------------------------- #11 bearer bytes


@pytest.mark.parametrize("token", [b"\xc3\xa9\xff", b"\xff", b"\xc3\xa9", b"\x80abc"])
async def test_a_bearer_token_of_raw_bytes_is_401_on_the_scheduler(
    tmp_path: Path, token: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    h = await serve("sqlite", tmp_path, token=TOKEN)
    try:
        for path in ("/v1/nodes", "/v1/jobs/x"):
            status, reply = await raw_status(h.url, bearer_request(path, token))
            assert status == 401 and b"unauthorized" in reply, reply
        # The right token still works.
        status, _ = await raw_status(h.url, bearer_request("/v1/nodes", TOKEN.encode()))
        assert status == 200
    finally:
        await close(h)
    assert "Traceback" not in caplog.text and "UnicodeEncodeError" not in caplog.text, caplog.text


@pytest.mark.parametrize("token", [b"\xc3\xa9\xff", b"\xff", b"\xed\xb3\xbf"])
async def test_a_bearer_token_of_raw_bytes_is_401_on_the_agent(token: bytes) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[agent_auth_middleware("agent-Tok")])
    app.router.add_get("/status", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        assert (await raw_status(url, bearer_request("/status", token)))[0] == 401
        assert (await raw_status(url, bearer_request("/status", b"agent-Tok")))[0] == 200
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- #10 NUL, surrogates, integers


@pytest.fixture
async def held(store: str, tmp_path: Path) -> AsyncIterator[tuple[Harness, str, str, dict[str, Any]]]:  # noqa: F811
    """A scheduler on ``store`` with one node holding one job's lease: (harness, node, job, grant)."""
    h = await serve(store, tmp_path)
    try:
        node = await h.register(node_id="node-1")
        job = await h.submit()
        assert (await h.poll(node))[0] == 200
        status, grant, _ = await h.lease(node, job)
        assert status == 201, grant
        yield h, node, job, grant
    finally:
        await close(h)


def _hostile_bodies(node: str, job: str, grant: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], str]]:
    """(method, path, JSON body, the field its 400 names)."""
    lease = grant["lease_id"]
    epoch = grant["epoch"]
    register = {"node_id": "node-2", "agent_version": "0.1.0", "hostname": "host-b", "hardware": HARDWARE,
                "devices": [CPU_EN]}
    beat = {"state": "busy", "running_jobs": [job]}
    events = {"node_id": node, "lease_id": lease, "attempt": 1, "lease_epoch": epoch,
              "events": [{"id": 0, "start": 0.0, "end": 1.0, "text": "hi"}]}
    result = {"node_id": node, "lease_id": lease, "attempt": 1, "lease_epoch": epoch, "outcome": "succeeded",
              "result": {"text": "hi", "segments": []}}
    renew = {"node_id": node, "epoch": epoch}
    lease_req = {"node_id": node, "job_id": job, "resource": "cpu", "ttl_s": 10}

    def seg(**fields: Any) -> list[dict[str, Any]]:
        return [{"id": 0, "start": 0.0, "end": 1.0, "text": "hi", **fields}]

    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/v1/nodes", {**register, "hostname": "host\x00b"}, "hostname"),
        ("POST", "/v1/nodes", {**register, "agent_version": "0.1\x00"}, "agent_version"),
        ("POST", "/v1/nodes", {**register, "hostname": "host-\ud800"}, "hostname"),
        ("POST", "/v1/nodes", {**register, "hardware": {**HARDWARE, "memory_bytes": INT64_PAST}},
         "hardware.memory_bytes"),
        ("PUT", f"/v1/nodes/{node}/heartbeat", {**beat, "memory_used_bytes": INT64_PAST}, "memory_used_bytes"),
        ("PUT", f"/v1/nodes/{node}/heartbeat", {**beat, "memory_total_bytes": INT64_PAST}, "memory_total_bytes"),
        ("PUT", f"/v1/nodes/{node}/heartbeat", {**beat, "running_jobs": ["j\x00"]}, "running_jobs.0"),
        ("POST", "/v1/leases", {**lease_req, "node_id": "node\x00"}, "node_id"),
        ("POST", "/v1/leases", {**lease_req, "job_id": job + "\x00"}, "job_id"),
        ("POST", "/v1/leases", {**lease_req, "node_id": "node-\ud800"}, "node_id"),
        ("POST", "/v1/leases", {**lease_req, "job_id": "job-\udfff"}, "job_id"),
        ("POST", f"/v1/leases/{lease}/renew", {**renew, "node_id": "node\x00"}, "node_id"),
        ("POST", f"/v1/leases/{lease}/renew", {**renew, "epoch": INT64_PAST}, "epoch"),
        ("POST", f"/v1/leases/{lease}/renew", {**renew, "epoch": -INT64_PAST - 1}, "epoch"),
        ("POST", f"/v1/jobs/{job}/events", {**events, "node_id": "node\x00"}, "node_id"),
        ("POST", f"/v1/jobs/{job}/events", {**events, "lease_id": lease + "\x00"}, "lease_id"),
        ("POST", f"/v1/jobs/{job}/events", {**events, "attempt": INT32_PAST}, "attempt"),
        ("POST", f"/v1/jobs/{job}/events", {**events, "lease_epoch": INT64_PAST}, "lease_epoch"),
        ("POST", f"/v1/jobs/{job}/events", {**events, "events": seg(id=INT32_PAST)}, "events.0.id"),
        ("POST", f"/v1/jobs/{job}/events", {**events, "events": seg(id=-INT32_PAST - 1)}, "events.0.id"),
        ("POST", f"/v1/jobs/{job}/result", {**result, "node_id": "node\x00"}, "node_id"),
        ("POST", f"/v1/jobs/{job}/result", {**result, "lease_id": "l\x00"}, "lease_id"),
        ("POST", f"/v1/jobs/{job}/result", {**result, "attempt": INT32_PAST}, "attempt"),
        ("POST", f"/v1/jobs/{job}/result", {**result, "lease_epoch": INT64_PAST}, "lease_epoch"),
        ("POST", f"/v1/jobs/{job}/result",
         {**result, "result": {"text": "hi", "segments": seg(id=INT32_PAST)}}, "result.segments.0.id"),
    ]
    return cases


async def test_nul_surrogates_and_huge_integers_in_bodies_are_400_naming_the_field(
    held: tuple[Harness, str, str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    h, node, job, grant = held
    failures: list[str] = []
    for method, path, body, field in _hostile_bodies(node, job, grant):
        # json.dumps keeps a lone surrogate as \\udXXX, as a hostile client would send it.
        status, reply, _ = await h.call(method, path, data=json.dumps(body), headers={"Content-Type": "application/json"})
        named = isinstance(reply, dict) and reply["error"]["message"].startswith(f"{field}: ")
        if status != 400 or not named:
            failures.append(f"{method} {path} ({field}): {status} {str(reply)[:200]}")
    # Nothing of the above was taken: the holder still reports, and its job succeeds.
    status, ack = await h.result(job, node, 1, grant)
    assert status == 200 and ack["accepted"], ack
    assert not failures, "\n".join(failures)
    assert "Traceback" not in caplog.text, caplog.text


PATH_IDS = ["bad\x00id", "x" * 5000, "bad\ud800id"]


def _quoted(value: str) -> str:
    return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")


async def test_nul_and_absurd_ids_in_paths_are_400(
    held: tuple[Harness, str, str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    h, node, job, grant = held
    fence = {"node_id": node, "lease_id": grant["lease_id"], "attempt": 1, "lease_epoch": grant["epoch"]}
    failures: list[str] = []
    for bad in PATH_IDS:
        q = _quoted(bad)
        requests: list[tuple[str, str, dict[str, Any] | None]] = [
            ("PUT", f"/v1/nodes/{q}/heartbeat", {"state": "ready"}),
            ("GET", f"/v1/nodes/{q}/jobs/next", None),
            ("POST", f"/v1/leases/{q}/renew", {"node_id": node, "epoch": grant["epoch"]}),
            ("DELETE", f"/v1/leases/{q}", None),
            ("GET", f"/v1/jobs/{q}", None),
            ("GET", f"/v1/jobs/{q}?wait_s=0.1", None),
            ("GET", f"/v1/jobs/{q}/audio", None),
            ("POST", f"/v1/jobs/{q}/events", {**fence, "events": []}),
            ("POST", f"/v1/jobs/{q}/result", {**fence, "outcome": "failed"}),
        ]
        for method, path, body in requests:
            status, reply, _ = await h.call(method, path, json=body)
            if status != 400:
                failures.append(f"{method} {path[:60]}: {status} {str(reply)[:200]}")
    for query in (f"after_segment={INT64_PAST}", f"after_segment={INT64_PAST}&wait_s=0.1"):
        status, reply, _ = await h.call("GET", f"/v1/jobs/{job}?{query}")
        if status not in (200, 400):
            failures.append(f"GET /v1/jobs/{job}?{query}: {status} {str(reply)[:200]}")
    # The real ids still work.
    assert (await h.call("GET", f"/v1/jobs/{job}"))[0] == 200
    assert (await h.renew(grant["lease_id"], node, grant["epoch"]))[0] == 200
    assert not failures, "\n".join(failures)
    assert "Traceback" not in caplog.text, caplog.text


# --------------------------------------------------------------------- #6 a password as a query parameter


@pytest.mark.parametrize("dsn, secret", [
    ("postgresql://sched@db.example:5432/jobs?password=pw-Secret1", "pw-Secret1"),
    ("postgresql://sched@db.example:5432/jobs?sslmode=require&PASSWORD=pw-Secret2&x=1", "pw-Secret2"),
    ("postgres://sched@db.example:5432/jobs?Password=pw%2FSecret3", "pw%2FSecret3"),
    ("postgresql://sched:pw-Secret4@db.example:5432/jobs?password=pw-Secret5", "pw-Secret"),
    ("postgresql://sched@db.example:5432/jobs?sslpassword=pw-Secret6", "pw-Secret6"),
    ("postgresql://sched@db.example:5432/jobs?password=pw-Secret7#frag", "pw-Secret7"),
    ("postgresql://sched:pw-Secret8@[::1]:5432/jobs", "pw-Secret8"),
])
def test_redact_dsn_masks_every_password_form(dsn: str, secret: str) -> None:
    shown = redact_dsn(dsn)
    assert secret not in shown and "pw" not in shown.replace("password", "").replace("PASSWORD", "").replace(
        "Password", "").replace("sslpassword", ""), shown
    assert "***" in shown and "db.example" in shown or "[::1]" in shown, shown


def test_redact_dsn_keeps_what_has_no_password() -> None:
    for dsn in ("postgresql://sched@db.example:5432/jobs?sslmode=require", "sqlite", "memory",
                "sqlite:////var/lib/x.db"):
        assert redact_dsn(dsn) == dsn


async def test_a_query_password_never_shows(pg_dsn: str, tmp_path: Path) -> None:
    """check-config, the 'scheduler listening' line and the connect-error line, with the password given as
    ``?password=`` (on a real PostgreSQL, so the scheduler does start with it)."""
    parts = urllib.parse.urlsplit(pg_dsn)
    assert pg.PASSWORD in (parts.password or "")
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    query_dsn = parts._replace(netloc=netloc, query=f"password={pg.PASSWORD}").geturl()
    shown = redact_dsn(query_dsn)
    assert pg.PASSWORD not in shown

    # The scheduler starts with it (asyncpg takes the query form), and logs where it listens.
    settings = SchedulerSettings(store=query_dsn)
    running = await start_scheduler(settings, host="127.0.0.1", port=0, state_dir=tmp_path)
    await running.stop()

    port = free_port()
    env = {"NODE_AGENT_SCHEDULER__STORE": query_dsn, "NODE_AGENT_LOG__LEVEL": "DEBUG",
           "NODE_AGENT_NODE__STATE_DIR": str(tmp_path / "state"),
           "NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{port}"}
    rc, out, err = await cli(tmp_path, ["check-config"], env)
    assert rc == 0 and shown in out, out + err
    assert pg.PASSWORD not in out + err, out + err

    from test_cluster import start_scheduler as start_scheduler_process

    proc, _ = await start_scheduler_process(tmp_path, port, "scheduler", **env)
    rc = await proc.stop()
    log = proc.log()
    assert rc == 0 and "scheduler listening on" in log and shown in log, log
    assert pg.PASSWORD not in log, log

    unreachable = parts._replace(netloc=f"{parts.username}@{parts.hostname}:{free_port()}",
                                 query=f"password={pg.PASSWORD}").geturl()
    rc, out, err = await cli(tmp_path, ["scheduler"], {**env, "NODE_AGENT_SCHEDULER__STORE": unreachable,
                                                      "NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{free_port()}"})
    errors = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert rc != 0 and "Traceback" not in err, err
    assert len(errors) == 1 and "cannot connect" in errors[0] and redact_dsn(unreachable) in errors[0], err
    assert pg.PASSWORD not in out + err, out + err


async def test_a_connect_error_never_shows_a_query_password(tmp_path: Path) -> None:
    dsn = f"postgresql://sched@127.0.0.1:{free_port()}/jobs?password=pw-Secret9"
    with pytest.raises(StoreError) as info:
        await start_scheduler(SchedulerSettings(store=dsn), host="127.0.0.1", port=0, state_dir=tmp_path)
    assert "pw-Secret9" not in str(info.value) and "cannot connect" in str(info.value), str(info.value)


