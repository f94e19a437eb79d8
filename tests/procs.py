"""Real processes for cluster tests: a standalone scheduler and agents, each on its own loopback ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw


class Proc:
    """A node-agent subprocess with its log captured to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path,
                 python_opts: tuple[str, ...] = ()) -> None:
        # python_opts: interpreter options (``-X tracemalloc``) for this process alone; unlike PYTHON* variables,
        # the plugin processes it starts do not inherit them.
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._args = [sys.executable, *python_opts, "-m", "node_agent", *args]
        # XDG_STATE_HOME in the test's directory: an agent given no node.state_dir never uses the user's own.
        self._env = {**os.environ, "XDG_STATE_HOME": str(log_dir / "xdg-state"), **env, "PYTHONUNBUFFERED": "1"}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> "Proc":
        self.proc = await asyncio.create_subprocess_exec(*self._args, env=self._env, stdout=self._log,
                                                         stderr=asyncio.subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(self.proc.wait(), timeout)
            except (ProcessLookupError, asyncio.TimeoutError):
                self.proc.kill()
                await self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` (sync, run in a thread so the loop stays free) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def agent_env(scheduler_url: str, state_dir: Path, http_port: int, **extra: str) -> dict[str, str]:
    env = {
        "NODE_AGENT_SCHEDULER__URL": scheduler_url,
        "NODE_AGENT_NODE__STATE_DIR": str(state_dir),
        "NODE_AGENT_HTTP__LISTEN": f"127.0.0.1:{http_port}",
        "NODE_AGENT_ASR__DEVICE": "cpu",
        # Pinned like the in-process tests: the default (all cores, up to 8) would make a many-core CI decode
        # several times faster and eat the margins of tests that act while a job is still running.
        "NODE_AGENT_ASR__CPU_THREADS": "2",
        # One slot (cpu/0), as the in-process tests' make_settings: auto would run one per 2 cores.
        "NODE_AGENT_ASR__WORKERS_PER_DEVICE": "1",
        "NODE_AGENT_WORKER__STOP_GRACE_S": "0.5",
    }
    env.update(extra)
    return env


def submit(scheduler: str, audio: bytes, **fields: Any) -> str:
    import base64

    body = {"audio_b64": base64.b64encode(audio).decode(), **fields}
    status, reply = http_json("POST", f"{scheduler}/v1/jobs", body)
    assert status == 202, reply
    return reply["job_id"]


def job(scheduler: str, job_id: str, wait_s: float = 0) -> dict[str, Any]:
    status, reply = http_json("GET", f"{scheduler}/v1/jobs/{job_id}?wait_s={wait_s}", timeout=wait_s + 10)
    assert status == 200, reply
    return reply


async def wait_finished(scheduler: str, job_id: str, timeout: float, what: str) -> dict[str, Any]:
    """The job's view once it succeeded or failed (long-polling the scheduler 5 s at a time)."""
    return await wait_for(lambda: (v := job(scheduler, job_id, 5))["state"] in ("succeeded", "failed") and v,
                          timeout, what)


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample from a /metrics page (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total = (total or 0.0) + sample.value
    return total


def run_script(cmd: list[str], cwd: Path, timeout: float, returncode: int = 0) -> str:
    """Run a driver script (the benchmarks) to its end: its stdout, or a test failure with its output (or when it
    exits other than ``returncode``). It runs in a session of its own, so a driver that hangs takes the processes
    it started (agents, schedulers) with it."""
    import pytest

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{Path(cmd[1]).name} did not finish in {timeout:g} s:\n{out}\n{err[-3000:]}")
    assert proc.returncode == returncode, f"{out}\n{err[-3000:]}"
    return out
