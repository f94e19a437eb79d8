"""The agent's own HTTP token (``http.token``): required on /utterance, /health and /status, never on /metrics,
/healthz and /readyz; refused settings that would open the agent to anyone; ``node-agent status`` sending it.

The endpoint tests run a real in-process agent (embedded scheduler, real plugin process) on loopback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from helpers import reference, wer
from node_agent.config import load_settings
from node_agent.errors import ConfigError
from node_agent.http_api import bearer_ok
from stack import agent_stack
from test_compat import RESPONSE_KEYS, utterance_body

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "agent-Tok-9c1e55b0d2"
REFUSED = "a non-loopback address needs http.token (or http.allow_unauthenticated: true)"


# ----- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "10.1.2.3:9464", "node-a.local:9464"])
def test_a_non_loopback_listen_without_a_token_is_refused_at_load(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"NODE_AGENT_HTTP__LISTEN": listen})
    assert str(info.value) == f"environment NODE_AGENT_HTTP__LISTEN: http.listen = {listen!r}: {REFUSED}"
    config = tmp_path / "agent.yaml"
    config.write_text(f"http:\n  listen: '{listen}'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, {})
    assert str(info.value) == f"{config}: http.listen = {listen!r}: {REFUSED}"
    # A token, or the explicit opt-out, lets it start.
    assert load_settings(config, {"NODE_AGENT_HTTP__TOKEN": TOKEN}).http.token.get_secret_value() == TOKEN
    assert load_settings(config, {"NODE_AGENT_HTTP__ALLOW_UNAUTHENTICATED": "true"}).http.token is None


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "127.0.0.53:9464", "[::1]:9464", "localhost:9464"])
def test_loopback_needs_no_token(listen: str) -> None:
    assert load_settings(None, {"NODE_AGENT_HTTP__LISTEN": listen}).http.listen == listen


def test_blank_token_refused_and_token_masked(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("http:\n  token: '  '\n")
    with pytest.raises(ConfigError, match=r"http\.token = \*+: .*must not be empty"):
        load_settings(config, {})
    s = load_settings(None, {"NODE_AGENT_HTTP__TOKEN": TOKEN, "NODE_AGENT_HTTP__LISTEN": "0.0.0.0:9464"})
    assert s.redacted()["http"]["token"] == "**********" and TOKEN not in repr(s.redacted())
    out = subprocess.run([sys.executable, "-m", "node_agent", "check-config"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "NODE_AGENT_HTTP__TOKEN": TOKEN}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert TOKEN not in out.stdout + out.stderr and "**********" in out.stdout


def test_run_stops_with_one_line_on_an_open_listen(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
    env.update(NODE_AGENT_HTTP__LISTEN="0.0.0.0:9464", NODE_AGENT_NODE__STATE_DIR=str(tmp_path / "state"))
    out = subprocess.run([sys.executable, "-m", "node_agent", "run"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"node-agent: config error: environment NODE_AGENT_HTTP__LISTEN: http.listen = '0.0.0.0:9464': {REFUSED}"]


def test_bearer_header_parsing() -> None:
    expected = TOKEN.encode()
    assert bearer_ok(f"Bearer {TOKEN}", expected) and bearer_ok(f"bearer  {TOKEN} ", expected)
    for header in ("", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ",
                   "Bearer \udcff"):
        assert not bearer_ok(header, expected), header


# ----- the endpoints ----------------------------------------------------------------------------------------------


async def raw_exchange(url: str, head: str, body: bytes, timeout: float = 20.0) -> tuple[int, bytes]:
    """Send a request head and part of a body on a fresh connection; return the status and whatever came back."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout)
        return int(answer.split(b" ", 2)[1]), answer
    finally:
        writer.close()


async def test_token_required_on_the_service_endpoints_and_not_on_probes(tmp_path: Path) -> None:
    async with agent_stack(tmp_path, http={"token": TOKEN}) as s:
        url = s.http.url
        good = {"Authorization": f"Bearer {TOKEN}"}
        body = utterance_body("jfk.flac", "en")
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {TOKEN}"}):
            for method, path, kwargs in (("POST", "/utterance", {"json": body}), ("GET", "/health", {}),
                                         ("GET", "/status", {})):
                async with s.session.request(method, url + path, headers=headers, **kwargs) as resp:
                    reply: dict[str, Any] = await resp.json()
                    assert resp.status == 401, (path, headers, reply)
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
                    assert reply["error"]["code"] == "unauthorized", reply
                    assert TOKEN not in await resp.text() and "not-the-token" not in await resp.text()
                    if path == "/utterance":  # the old service's error shape: the ids are always there
                        assert reply["job_id"] is None and reply["trace_id"] is None
        # Probes and scrapers need nothing.
        for path in ("/metrics", "/healthz", "/readyz"):
            async with s.session.get(url + path) as resp:
                assert resp.status == 200, path
        # A stranger's body is not even read: the 401 comes back while most of it is still unsent.
        status, answer = await raw_exchange(url, "POST /utterance HTTP/1.1\r\nHost: agent\r\n"
                                                 "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n",
                                            b'{"audio": "')
        assert status == 401 and b'"unauthorized"' in answer

        # With the token: the same endpoints serve.
        async with s.session.get(url + "/status", headers=good) as resp:
            assert resp.status == 200 and "health" in await resp.json()
        async with s.session.get(url + "/health", headers=good) as resp:
            doc = await resp.json()
            assert resp.status == 200 and doc["status"] == "ok", doc
            assert doc["totals"]["completed"] == 0  # the refused requests never reached the endpoint
        async with s.session.post(url + "/utterance", json=body, headers=good) as resp:
            reply = await resp.json()
            assert resp.status == 200, reply
        assert set(reply) == RESPONSE_KEYS and wer(reference("jfk.flac"), reply["text"]) == 0.0, reply

        # `node-agent status` sends the token from its settings (here the environment).
        code, out, err = await status_cli(url, NODE_AGENT_HTTP__TOKEN=TOKEN)
        assert code in (0, 1), err
        assert '"health"' in out and TOKEN not in out + err
        code, out, err = await status_cli(url)
        assert code == 2 and out == ""
        assert "HTTP 401" in err and "http.token" in err and err.count("\n") == 1, err
        code, out, err = await status_cli(url, NODE_AGENT_HTTP__TOKEN="wrong-token")
        assert code == 2 and "wrong http.token" in err and "wrong-token" not in err, err


async def status_cli(url: str, **env: str) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node_agent", "status", "--url", url, "--json", cwd=ROOT, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
