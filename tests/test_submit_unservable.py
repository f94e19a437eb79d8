"""`node-agent submit` on the default install (tiny.en, English only) for a language no node serves: the
scheduler refuses the job at once (422 no_capable_node) and the command prints that one line, instead of waiting
until its timeout for a job that can never run."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from pathlib import Path

from procs import Proc, agent_env, free_port

AUDIO = Path(__file__).parent / "data" / "jfk.flac"
ZH_REFUSAL = "no live node serves language 'zh' (nodes serve: en with tiny.en); run a node with asr.model: base"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


async def test_submit_in_a_language_no_node_serves_prints_the_one_line_within_two_seconds(tmp_path: Path) -> None:
    sched_port, http_port = free_port(), free_port()
    scheduler = f"http://127.0.0.1:{sched_port}"
    env = agent_env("embedded", tmp_path / "agent", http_port, NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{sched_port}")
    agent = await Proc("agent", ["run"], env, tmp_path).start()
    try:
        # Ready: registered, and its model loaded, so the command below does not compete with the load for CPU.
        deadline = time.monotonic() + 90
        while not await asyncio.to_thread(_ready, f"http://127.0.0.1:{http_port}"):
            assert time.monotonic() < deadline and agent.proc.returncode is None, agent.log()
            await asyncio.sleep(0.2)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node_agent", "submit", "--scheduler", scheduler, "--language", "zh", str(AUDIO),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        elapsed = time.monotonic() - started
    finally:
        rc = await agent.stop()
    assert err.decode() == f"node-agent: {ZH_REFUSAL}\n" and out == b""
    assert proc.returncode == 1
    # The whole command, interpreter start included (about 1 s of it here), not a wait for a job.
    assert elapsed < 2.0, elapsed
    assert rc == 0 and "job refused reason=no_capable_node" in agent.log(), agent.log()
