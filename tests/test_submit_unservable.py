"""`node-agent submit` on the default install (tiny.en, English only) for a language no node serves: the
scheduler refuses the job at once (422 no_capable_node) and the command prints that one line, instead of waiting
until its timeout for a job that can never run."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from procs import free_port
from test_cluster import start_agent

AUDIO = Path(__file__).parent / "data" / "jfk.flac"
ZH_REFUSAL = "no live node serves language 'zh' (nodes serve: en with tiny.en); run a node with asr.model: base"


async def test_submit_in_a_language_no_node_serves_prints_the_one_line_within_two_seconds(tmp_path: Path) -> None:
    sched_port = free_port()
    scheduler = f"http://127.0.0.1:{sched_port}"
    # Ready (registered, model loaded), so the command below does not compete with the load for CPU.
    agent, _ = await start_agent(tmp_path, "agent", "embedded", NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{sched_port}")
    try:
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
