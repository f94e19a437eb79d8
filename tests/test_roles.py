"""A credential per role and per node (issue 23): clients, nodes and operators each with named tokens, and a node's
own secret. Each refusal on every store (SQLite, PostgreSQL with and without its single statements), real HTTP on
loopback; the node secret through a real agent's restart; the config's forms and what it never shows."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

import fake_plugin
from conftest import make_settings
from node_agent.agent import Agent
from node_agent.config import SchedulerSettings, load_settings
from node_agent.errors import ConfigError
from node_agent.metrics import AgentMetrics
from node_agent.scheduler import auth
from node_agent.scheduler.server import start_scheduler
from node_agent.scheduler_client import BadRequest
from stack import eventually, node_facts
from test_scheduler import AUDIO, CPU_EN, HARDWARE
from test_store import store  # noqa: F401 - the fixture: sqlite, postgresql, postgresql-general

pytestmark = pytest.mark.timeout(60)

CLIENT_1, CLIENT_2 = "client-one-7f3a9b21c4", "client-two-0d5e8c3f6a"
NODE_OLD, NODE_NEW = "node-old-b41c6e9a27", "node-new-93fd20a7c5"  # one role's two tokens: a rotation midway
OPERATOR = "operator-5a8e1f0c3d"
TOKENS = {"clients": {"app1": CLIENT_1, "app2": CLIENT_2}, "nodes": {"rack1": NODE_OLD, "rack1-next": NODE_NEW},
          "operators": {"ops": OPERATOR}}
SECRETS = (CLIENT_1, CLIENT_2, NODE_OLD, NODE_NEW, OPERATOR)


class Caller:
    """Calls a scheduler with one token (and, for a node, a node secret)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | None, secret: str | None = None):
        self.session, self.url, self.token, self.secret = session, url, token, secret

    def as_node(self, secret: str | None) -> "Caller":
        return Caller(self.session, self.url, self.token, secret)

    async def __call__(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.secret is not None:
            headers[auth.NODE_SECRET_HEADER] = self.secret
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.read()
            return resp.status, body

    async def register(self, node_id: str | None = None) -> tuple[int, Any]:
        return await self("POST", "/v1/nodes", json={"node_id": node_id, "agent_version": "0.1.0", "hostname": "h",
                                                      "hardware": HARDWARE, "devices": [CPU_EN]})


def refused(status: int, body: Any, expected: int, *words: str) -> bool:
    message = body["error"]["message"] if isinstance(body, dict) else str(body)
    assert status == expected and all(w in message for w in words) and "\n" not in message, (status, body)
    return True


async def test_each_role_may_do_its_own_part_only(store: str, tmp_path: Path,  # noqa: F811 - the fixture
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = SchedulerSettings(store=store, heartbeat_interval_s=120.0, tokens=TOKENS)
    running = await start_scheduler(settings, CollectorRegistry(), host="127.0.0.1", port=0, state_dir=tmp_path)
    session = aiohttp.ClientSession()
    try:
        anonymous, stranger = Caller(session, running.url, None), Caller(session, running.url, "not-a-token")
        app1, app2 = Caller(session, running.url, CLIENT_1), Caller(session, running.url, CLIENT_2)
        rack, rack_next = Caller(session, running.url, NODE_OLD), Caller(session, running.url, NODE_NEW)
        ops = Caller(session, running.url, OPERATOR)
        for caller in (anonymous, stranger):
            assert refused(*await caller("GET", "/v1/nodes"), 401, "bearer token")

        # A client cannot register (nor list nodes); nothing is written.
        assert refused(*await app1.register("node-by-client"), 403, "needs a node token", "'app1' is a client")
        assert refused(*await app1("GET", "/v1/nodes"), 403, "needs an operator token")
        status, nodes = await ops("GET", "/v1/nodes")
        assert status == 200 and nodes["nodes"] == []

        # Nodes register under either of their role's two tokens; the first registration gives a node secret.
        status, a = await rack.register("node-a")
        assert status == 201 and a["node_secret"], a
        status, b = await rack_next.register("node-b")
        assert status == 201 and b["node_secret"] and b["node_secret"] != a["node_secret"]
        node_a, node_b = rack.as_node(a["node_secret"]), rack_next.as_node(b["node_secret"])

        # A node cannot submit; a client submits, and only it (and operators) can see its job.
        body = {"audio_b64": base64.b64encode(AUDIO).decode()}
        assert refused(*await node_a("POST", "/v1/jobs", json=body), 403, "needs a client token")
        status, job = await app1("POST", "/v1/jobs", json=body)
        assert status == 202, job
        job_id = job["job_id"]
        assert refused(*await app2("GET", f"/v1/jobs/{job_id}"), 404, job_id)
        assert (await app1("GET", f"/v1/jobs/{job_id}"))[0] == 200
        assert (await ops("GET", f"/v1/jobs/{job_id}"))[0] == 200
        assert refused(*await app2("DELETE", f"/v1/jobs/{job_id}"), 404, job_id)
        assert (await ops("GET", f"/v1/jobs/{job_id}"))[1]["state"] == "queued"
        assert refused(*await app1("GET", f"/v1/jobs/{job_id}/audio"), 403, "needs a node token")

        # Node b acting as node a, without a's secret or with its own: refused, and nothing changes.
        status, assignment = await node_a("GET", "/v1/nodes/node-a/jobs/next")
        assert status == 200 and assignment["job_id"] == job_id, assignment
        status, grant = await node_a("POST", "/v1/leases", json={"node_id": "node-a", "job_id": job_id,
                                                                 "resource": "cpu", "ttl_s": 60})
        assert status == 201, grant
        lease = grant["lease_id"]
        holder = {"node_id": "node-a", "lease_id": lease, "attempt": 1, "lease_epoch": grant["epoch"]}
        for impostor in (rack_next, node_b, rack_next.as_node("x" * 43)):
            for method, path, kwargs in [
                ("PUT", "/v1/nodes/node-a/heartbeat", {"json": {"state": "ready"}}),
                ("GET", "/v1/nodes/node-a/jobs/next", {}),
                ("POST", f"/v1/leases/{lease}/renew", {"json": {"node_id": "node-a", "epoch": grant["epoch"]}}),
                ("DELETE", f"/v1/leases/{lease}", {}),
                ("GET", f"/v1/jobs/{job_id}/audio", {}),
                ("POST", f"/v1/jobs/{job_id}/events", {"json": {**holder, "events": []}}),
                ("POST", f"/v1/jobs/{job_id}/result", {"json": {**holder, "outcome": "failed",
                                                                "error": {"code": "internal", "message": "x"}}}),
            ]:
                assert refused(*await impostor(method, path, **kwargs), 403, "node node-a has a node secret"), path
            assert refused(*await impostor.register("node-a"), 403, "node node-a", "node-id file")
        row = await running.store.lease_state(lease)
        assert row is not None and row["state"] == "active" and row["node_id"] == "node-a"
        assert (await ops("GET", f"/v1/jobs/{job_id}"))[1]["state"] in ("assigned", "running")

        # The holder itself: its audio, a renewal, and registering again (no new secret: it has one).
        status, audio = await node_a("GET", f"/v1/jobs/{job_id}/audio")
        assert status == 200 and audio == AUDIO
        # An operator reads any job's audio (acting for no node), without a node secret.
        status, audio = await ops("GET", f"/v1/jobs/{job_id}/audio")
        assert status == 200 and audio == AUDIO
        assert (await node_a("POST", f"/v1/leases/{lease}/renew", json={"node_id": "node-a",
                                                                       "epoch": grant["epoch"]}))[0] == 200
        status, again = await node_a.register("node-a")
        assert status == 201 and again["node_id"] == "node-a" and again.get("node_secret") is None
    finally:
        await session.close()
        await running.stop()
    logged = caplog.text
    assert not any(secret in logged for secret in (*SECRETS, a["node_secret"], b["node_secret"]))


async def test_a_node_keeps_its_secret_across_agent_restarts(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(node={"state_dir": str(tmp_path / "state")},
                             scheduler={"tokens": TOKENS, "token": NODE_OLD, "heartbeat_interval_s": 120.0},
                             compat={"scheduler_token": CLIENT_2})
    running = await start_scheduler(settings.scheduler, CollectorRegistry(), host="127.0.0.1", port=0,
                                    state_dir=tmp_path)
    facts = await node_facts()

    async def agent_run(until: str) -> str | None:
        agent = Agent(settings, running.url, metrics=AgentMetrics(registry=CollectorRegistry()), facts=facts,
                      worker_command=fake_plugin.command())
        await agent.start()
        try:
            if until == "registered":
                await asyncio.wait_for(agent.identity.registered_event.wait(), 30)
                # /utterance submits with the client token compat.scheduler_token (a node's may not submit).
                submitted = await agent.utterance_client.submit_job(bytes(3200), format="pcm_s16le", sample_rate=16000)
                assert await running.store.job_client(submitted.job_id) == "app2"
                with pytest.raises(BadRequest, match="403 forbidden"):
                    await agent.client.submit_job(bytes(3200), format="pcm_s16le", sample_rate=16000)
            else:
                await eventually(lambda: until in caplog.text, 30, until)
            return agent.identity.node_id
        finally:
            await agent.drain(0)
            await agent.stop()

    try:
        first = await agent_run("registered")
        kept = tmp_path / "state" / "node-secret"
        assert first and stat.S_IMODE(kept.stat().st_mode) == 0o600
        secret = kept.read_text().strip()
        # Restarted, the agent is the same node: its registration proves it with the kept secret.
        assert await agent_run("registered") == first
        assert kept.read_text().strip() == secret
        # A state dir that lost the secret: refused, with one line saying what to do.
        kept.unlink()
        caplog.clear()
        await agent_run("registration failed")
        line = next(r.getMessage() for r in caplog.records if "registration failed" in r.getMessage())
        assert "403" in line and f"node {first} has a node secret" in line and "node-id file" in line, line
        assert secret not in caplog.text and NODE_OLD not in caplog.text
    finally:
        await running.stop()


async def test_a_single_token_has_every_role_with_a_warning(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    settings = SchedulerSettings(store="memory", heartbeat_interval_s=120.0, token=OPERATOR)
    running = await start_scheduler(settings, CollectorRegistry(), host="127.0.0.1", port=0, state_dir=tmp_path)
    try:
        warnings = [r.getMessage() for r in caplog.records if "scheduler.token alone" in r.getMessage()]
        assert len(warnings) == 1 and "scheduler.tokens" in warnings[0]
        async with aiohttp.ClientSession() as session:
            shared = Caller(session, running.url, OPERATOR)
            status, node = await shared.register("node-a")
            assert status == 201 and node["node_secret"]
            assert (await shared("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(AUDIO).decode()}))[0] == 202
            assert (await shared("GET", "/v1/nodes"))[0] == 200
            # Whoever holds the shared token still cannot be another node without its secret.
            assert refused(*await shared.register("node-a"), 403, "node node-a has a node secret")
            assert (await shared.as_node(node["node_secret"]).register("node-a"))[0] == 201
    finally:
        await running.stop()


def test_tokens_from_the_environment_and_a_file_never_shown(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(f"operators:\n  ops: {OPERATOR}\nnodes:\n  rack1: '{NODE_OLD}'\n")
    env = {"NODE_AGENT_SCHEDULER__TOKENS__CLIENTS__APP1": "12345678",  # digits stay a string
           "NODE_AGENT_SCHEDULER__TOKENS_FILE": str(tokens_file)}
    s = load_settings(None, env).scheduler
    assert s.tokens.clients["app1"].get_secret_value() == "12345678"
    assert s.tokens.operators["ops"].get_secret_value() == OPERATOR and s.checks_tokens
    shown = subprocess.run([sys.executable, "-m", "node_agent", "check-config"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=60)
    assert shown.returncode == 0 and "app1" in shown.stdout, shown.stderr
    assert not any(t in shown.stdout + shown.stderr for t in ("12345678", OPERATOR, NODE_OLD))
    # One token under two names (which role would it be?), a name set twice, a bad file: one line, no secret.
    for extra, words in [({"NODE_AGENT_SCHEDULER__TOKENS__CLIENTS__APP2": OPERATOR}, "are the same token"),
                         ({"NODE_AGENT_SCHEDULER__TOKENS__NODES__RACK1": "other-token-1"}, "set both here and in"),
                         ({"NODE_AGENT_SCHEDULER__TOKENS__CLIENTS__APP1": " "}, "must not be empty")]:
        with pytest.raises(ConfigError) as info:
            load_settings(None, {**env, **extra})
        assert words in str(info.value) and "\n" not in str(info.value)
        assert not any(t in str(info.value) for t in (OPERATOR, NODE_OLD, "other-token-1"))
    tokens_file.write_text(f"clients: [{OPERATOR}]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert "tokens.yaml" in str(info.value) and OPERATOR not in str(info.value)


def test_a_standalone_scheduler_beyond_loopback_needs_tokens(tmp_path: Path) -> None:
    env = {**os.environ, "NODE_AGENT_NODE__STATE_DIR": str(tmp_path / "state"), "NODE_AGENT_SCHEDULER__STORE": "memory"}
    for key in [k for k in env if k.startswith("NODE_AGENT_SCHEDULER__TOKEN")]:
        del env[key]
    run = subprocess.run([sys.executable, "-m", "node_agent", "scheduler", "--listen", "0.0.0.0:0"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and run.stderr.count("\n") == 1, run.stderr
    assert "scheduler.listen 0.0.0.0: a non-loopback address needs scheduler.tokens" in run.stderr
    # A token of any form, or the explicit opt-out, lets it start; loopback needs none.
    for overrides in ({"token": OPERATOR}, {"tokens": {"nodes": {"rack1": NODE_OLD}}}, {"allow_unauthenticated": True}):
        auth.refuse_exposed(SchedulerSettings(**overrides), "0.0.0.0")
    auth.refuse_exposed(SchedulerSettings(), "127.0.0.1")
    auth.refuse_exposed(SchedulerSettings(), "::1")
    with pytest.raises(ConfigError):
        auth.refuse_exposed(SchedulerSettings(), "::")
