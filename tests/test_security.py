"""The scheduler token: required on every call, sent by the agent, never shown anywhere."""

from __future__ import annotations

import asyncio
import sys
import urllib.request

from helpers import DATA, plain_wer
from procs import Proc, agent_env, free_port, http_json, wait_for
from test_cluster import ready, start_agent, start_scheduler

TOKEN = "tok-Secret-4f9a1c77e0"


async def test_token_required_sent_and_never_shown(tmp_path):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port, NODE_AGENT_SCHEDULER__TOKEN=TOKEN)
    procs = [sched]
    try:
        # Every /v1 call without the token, or with a wrong one, is refused.
        for path, method in [("/v1/nodes", "GET"), ("/v1/jobs", "POST"), ("/v1/leases", "POST"),
                             ("/v1/nodes/x/jobs/next", "GET"), ("/v1/audio/transcriptions", "POST")]:
            assert http_json(method, scheduler + path, {} if method == "POST" else None)[0] == 401
        req = urllib.request.Request(f"{scheduler}/v1/nodes", headers={"Authorization": "Bearer zz-presented-zz"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("wrong token accepted")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            assert exc.code == 401 and TOKEN not in body and "zz-presented-zz" not in body

        # An agent with the wrong token cannot register, and says why without printing either token.
        bad_http = free_port()
        bad = await Proc("agent-bad", ["run"], agent_env(scheduler, tmp_path / "bad", bad_http,
                                                          NODE_AGENT_SCHEDULER__TOKEN="not-the-token"),
                         tmp_path).start()
        procs.append(bad)
        await wait_for(lambda: "registration failed" in bad.log(), 60, "401 logged")
        assert "401" in bad.log() and "not-the-token" not in bad.log() and TOKEN not in bad.log()

        # The right token: the agent registers and serves; submit sends the token from the config.
        agent, url = await start_agent(tmp_path, "agent", scheduler, NODE_AGENT_SCHEDULER__TOKEN=TOKEN)
        procs.append(agent)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node_agent", "submit", "--scheduler", scheduler, str(DATA / "jfk.flac"),
            env={**__import__("os").environ, "NODE_AGENT_SCHEDULER__TOKEN": TOKEN},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert plain_wer(out.decode().strip().splitlines()[-1].split(": ", 1)[1], "jfk.flac") == 0.0, out.decode()
        status = urllib.request.urlopen(f"{url}/status", timeout=5).read().decode()
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        for text in (status, metrics, agent.log(), sched.log()):
            assert TOKEN not in text
        assert ready(url)
    finally:
        for p in reversed(procs):
            await p.stop()
        for p in procs:
            assert TOKEN not in p.log()


def test_servers_listen_on_loopback_by_default():
    from node_agent.config import load_settings

    s = load_settings(None, {})
    assert s.scheduler.listen.startswith("127.0.0.1:") and s.http.listen.startswith("127.0.0.1:")
