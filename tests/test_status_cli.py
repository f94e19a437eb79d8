"""``node-agent status``: the pure layout on hand-made status documents, then the real command as a subprocess
against a real in-process agent (healthy, degraded with a fatal worker, busy with a job) and a closed port."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from node_agent import status_render as st
from node_agent.supervisor import WorkerState
from stack import AgentStack, agent_stack, eventually, long_audio

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

pytestmark = pytest.mark.timeout(180)


# ----- hand-made documents --------------------------------------------------------------------------------------


def healthy_doc() -> dict[str, Any]:
    return {
        "agent": {"version": "0.1.0", "pid": 4242, "hostname": "node-a", "uptime_s": 3725.0,
                  "node_id": "node-5f1c2a9e", "scheduler_url": "http://10.0.0.5:8470", "registered": True,
                  "last_heartbeat_age_s": 2.4, "state": "ready", "rss_bytes": 85 * MiB},
        "health": {"status": "healthy", "reasons": []},
        "slots": {"workers_per_device": 2, "cpu_threads": 1, "workers_auto": True, "threads_auto": True,
                  "worker_bytes_estimate": 270 * MiB, "text": "2 workers x 1 thread per device (auto)",
                  "total": 2, "busy": 0, "ready": 2},
        "workers": [{"resource": "cpu/0", "state": "ready", "pid": 5151, "model": "tiny.en", "device": "cpu",
                     "compute_type": "int8", "rss_bytes": 312 * MiB, "jobs_served": 7, "jobs_served_total": 9,
                     "restarts": {"recycle": 1, "crash": 0}, "uptime_s": 754.0, "model_load_s": 0.84,
                     "last_error": None, "current_job": None}],
        "jobs": [],
        "totals": {"succeeded": 9, "failed": 0, "timeout": 0, "stalled": 0, "worker_crashed": 0,
                   "lease_lost": 0, "bad_audio": 1, "shutdown": 0},
        "recent_failures": [{"job_id": "job-0badaud10", "code": "bad_audio", "message": "cannot decode the audio",
                             "at": 0, "accepted": True, "age_s": 65.0}],
        "lease_losses_10m": 0,
    }


LONG_ERROR = ("worker_crashed: worker pid 5151 on gpu:0 died during job job-1234: killed by SIGKILL\n"
              "\x1b[31mTraceback (most recent call last):\x1b[0m\n  File \"/opt/node-agent/lib/python3.11/"
              "site-packages/ctranslate2/" + "very-long-path-component/" * 8 + "models.py\", line 42 "
              "模型加载失败：显存不足 " * 3 + "END-OF-MESSAGE-MARKER")


def degraded_doc() -> dict[str, Any]:
    doc = healthy_doc()
    doc["agent"].update(registered=False, last_heartbeat_age_s=None, state="degraded", node_id=None)
    doc["health"] = {"status": "degraded", "reasons": [
        "not registered with the scheduler",
        f"worker gpu:0 is backoff: {LONG_ERROR}",
        "2 lease loss(es) in the last 10 minutes"]}
    doc["workers"] = [{"resource": "gpu:0", "state": "backoff", "pid": None,
                       "model": "/srv/models/" + "faster-whisper-large-v3-turbo-ct2-" * 3,
                       "device": None, "compute_type": None, "rss_bytes": 0, "jobs_served": 0,
                       "jobs_served_total": 40, "restarts": {"crash": 3, "timeout": 1, "recycle": 0},
                       "uptime_s": None, "model_load_s": None, "last_error": LONG_ERROR, "current_job": None}]
    doc["lease_losses_10m"] = 2
    doc["recent_failures"] = [{"job_id": f"job-{i:016x}", "code": "lease_lost", "message": LONG_ERROR,
                               "at": 0, "accepted": i % 2 == 0, "age_s": 30.0 * i} for i in range(8)]
    return doc


def busy_doc() -> dict[str, Any]:
    doc = healthy_doc()
    doc["agent"]["state"] = "busy"
    doc["workers"][0]["state"] = "busy"
    doc["jobs"] = [{"job_id": "job-7e57c0ffee000001", "attempt": 2, "resource": "cpu/0", "audio_s": 11.0,
                    "elapsed_s": 3.21, "segments": 4, "since_last_segment_s": 0.52,
                    "lease_id": "lease-0123456789abcdef", "epoch": 7, "since_last_renewal_s": 1.25,
                    "lease_margin_s": 9.812, "renewals": 3}]
    return doc


def assert_fits(text: str, width: int = 80) -> list[str]:
    lines = text.splitlines()
    assert lines, "nothing rendered"
    too_wide = [line for line in lines if st.cells(line) > width]
    assert not too_wide, too_wide
    assert all(ch == "\n" or ch.isprintable() for ch in text), repr(text)
    return lines


def flat(text: str) -> str:
    """Rendered text with the wrapping undone, for phrases that may be broken across lines."""
    return " ".join(text.split())


# ----- pure layout ----------------------------------------------------------------------------------------------


def test_render_healthy() -> None:
    text = st.render(healthy_doc())
    lines = assert_fits(text)
    assert text.endswith("\n")
    assert lines[0] == "node-agent 0.1.0 on node-a (pid 4242)"
    for fact in ("node-5f1c2a9e  registered, last heartbeat 2.4s ago", "http://10.0.0.5:8470",
                 "ready, up 1h02m, RSS 85.0 MiB", "health     healthy",
                 "slots 2 workers x 1 thread per device (auto); 0 busy, 2 ready of 2",
                 "cpu/0  ready  pid 5151  cpu/int8  up 12m34s", "model tiny.en",
                 "RSS 312.0 MiB, jobs 7 (total 9), restarts 1 (recycle 1), load 0.8s",
                 "running jobs: none", "succeeded 9", "bad_audio 1",
                 "1m05s ago  job-0badaud10  bad_audio\n      cannot decode the audio"):
        assert fact in text, (fact, text)
    assert st.exit_code(healthy_doc()) == 0


def test_render_names_the_embedded_schedulers_store() -> None:
    doc = healthy_doc()
    doc["agent"].update(scheduler_url="http://127.0.0.1:8470", scheduler_store="sqlite:////var/lib/node-agent/x.db")
    text = st.render(doc)
    assert "http://127.0.0.1:8470" in text and "embedded, store sqlite:////var/lib/node-agent/x.db" in text, text
    assert "embedded" not in st.render(healthy_doc())


def test_render_degraded_with_a_long_last_error() -> None:
    doc = degraded_doc()
    for width in (80, 60):
        text = st.render(doc, width)
        lines = assert_fits(text, width)
        # Terminal escapes in a message are removed whole; the words around them stay.
        assert "\x1b" not in text and "[31m" not in text and "SIGKILL Traceback" in flat(text)
        assert "health     DEGRADED" in text
        assert "- not registered with the scheduler" in text
        assert "- 2 lease loss(es) in the last 10 minutes" in text
        assert "NOT registered, last heartbeat never" in flat(text)
        assert "restarts 4 (crash 3, timeout 1)" in text
        assert "gpu:0  backoff  pid -" in text
        # The long error is wrapped onto a few lines and cut with an ellipsis: its end is not shown.
        error_lines = [i for i, line in enumerate(lines) if "last error: worker_crashed: worker pid 5151" in line]
        assert len(error_lines) == 1
        block = lines[error_lines[0]:error_lines[0] + 3]
        assert all(st.cells(line) <= width for line in block)
        assert block[-1].endswith("..."), block
        assert "END-OF-MESSAGE-MARKER" not in text
        # Newlines inside the message do not start unindented lines.
        assert not any(line.startswith(("Traceback", "  File")) for line in lines)
        # The last few failures only, newest first.
        assert "recent failures (5 shown, newest first)" in text
        assert "job-0000000000000004" in text and "job-0000000000000005" not in text
        assert "(report not accepted)" in text
        assert "job-0000000000000001 lease_lost (report not accepted)" in flat(text)
    assert st.exit_code(doc) == 1


def test_render_a_running_job() -> None:
    text = st.render(busy_doc())
    assert_fits(text)
    for fact in ("running jobs (1)", "job-7e57c0ffee000001  attempt 2 on cpu",
                 "audio 11.0s, elapsed 3.2s, segments 4, last 0.5s ago",
                 "lease lease-0123456789abcdef epoch 7", "renewed 1.2s ago (3 renewals), margin 9.81s"):
        assert fact in text, (fact, text)


def test_render_a_lone_job_on_the_lone_job_worker() -> None:
    """The lone-job worker after the slots' (no slot of its own: lent to the slot whose job found the others
    idle), and the running job names the worker it decodes on."""
    doc = busy_doc()
    doc["workers"][0]["state"] = "ready"
    doc["slots"].update(text="2 workers x 1 thread per device, lone jobs 2 threads (auto)", lone_threads=2,
                        busy=1, ready=1)
    doc["workers"].append({**healthy_doc()["workers"][0], "resource": "cpu/lone", "state": "busy", "pid": 5353,
                           "lone": True, "lent_to": "cpu/0", "lone_jobs_total": 4})
    doc["jobs"][0]["worker"] = "cpu/lone"
    text = flat(st.render(doc))
    assert_fits(st.render(doc))
    for fact in ("slots 2 workers x 1 thread per device, lone jobs 2 threads (auto); 1 busy, 1 ready of 2",
                 "cpu/lone busy lone-job worker, lent to cpu/0 pid 5353",
                 "job-7e57c0ffee000001 attempt 2 on cpu/0 (decoding on cpu/lone)"):
        assert fact in text, (fact, text)
    # A job on its slot's own worker says nothing more.
    assert "decoding on" not in st.render(busy_doc())


def test_render_survives_a_sparse_or_unknown_document() -> None:
    text = st.render({"health": {"status": "starting"}})
    assert_fits(text)
    assert "STARTING" in text
    assert st.exit_code({"health": {"status": "starting"}}) == 1
    assert st.exit_code({}) == 1


def test_wrap_and_truncate() -> None:
    assert st.wrap("short text", 80, first="> ") == ["> short text"]
    lines = st.wrap("word " * 100, 30, first="- ", indent="  ", max_lines=3)
    assert len(lines) == 3 and lines[0].startswith("- word") and lines[1].startswith("  word")
    assert lines[-1].endswith("...") and all(len(line) <= 30 for line in lines)
    assert st.wrap("x" * 70, 30, max_lines=5) == ["x" * 30, "x" * 30, "x" * 10]
    wide = st.wrap("显存不足" * 10, 20, max_lines=10)
    assert [st.cells(line) for line in wide] == [20, 20, 20, 20]
    assert st.truncate("abcdef", 6) == "abcdef" and st.truncate("abcdefg", 6) == "abc..."
    assert st.clean("a\n\tb\x1b[0m  c\x07") == "a b c"
    assert st.clean("\x1b]0;title\x07ok\x1b[2J") == "ok"


@pytest.mark.parametrize("seconds, shown", [(None, "-"), (0.04, "0.0s"), (59.94, "59.9s"), (61, "1m01s"),
                                            (3725, "1h02m"), (2 * 86400 + 3 * 3600 + 5, "2d03h")])
def test_duration(seconds: float | None, shown: str) -> None:
    assert st.duration(seconds) == shown


@pytest.mark.parametrize("listen, url", [("127.0.0.1:9464", "http://127.0.0.1:9464"),
                                         ("0.0.0.0:9464", "http://127.0.0.1:9464"),
                                         ("[::]:9464", "http://127.0.0.1:9464"),
                                         ("[::1]:9000", "http://[::1]:9000"),
                                         ("node-a.local:9464", "http://node-a.local:9464")])
def test_default_url_from_http_listen(listen: str, url: str) -> None:
    assert st.default_url(listen) == url


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_url_from_config_and_unreachable_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    config = tmp_path / "agent.yaml"
    config.write_text(f"http:\n  listen: 0.0.0.0:{port}\n  allow_unauthenticated: true\n")
    code = st.status_command(argparse.Namespace(url=None, json=False, config=str(config)))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"node-agent: cannot reach the agent at http://127.0.0.1:{port}: ")
    assert "refused" in err.lower() and err.count("\n") == 1


def test_an_agent_that_never_answers_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections complete in the kernel; nobody ever answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(st.AgentUnreachable, match=r"no answer within 0.3 s"):
            st.fetch_status(url, timeout_s=0.3)


# ----- the real command against a real agent --------------------------------------------------------------------


async def run_status(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m node_agent status ...`` as a subprocess; the event loop keeps serving the agent meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node_agent", "status", *args, cwd=ROOT,
        env={**os.environ, **(env or {})}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def agent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AgentStack]:
    """One agent with the default settings for the healthy and the busy status, started once: the healthy test
    comes first (file order), the busy one leaves its job running for this teardown to stop."""
    async with agent_stack(tmp_path_factory.mktemp("status-agent")) as s:
        yield s


@pytest.mark.asyncio(loop_scope="module")
async def test_status_of_a_healthy_agent(agent: AgentStack) -> None:
    s = agent
    assert s.agent.workers["cpu/0"].state is WorkerState.ready
    # A proxy configured for outbound traffic is not used for the agent on loopback.
    proxy = f"http://127.0.0.1:{closed_port()}"
    code, out, err = await run_status("--url", s.http.url,
                                      env={"http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": ""})
    assert code == 0, (out, err)
    assert err == ""
    assert_fits(out)
    node_id = s.agent.identity.node_id
    assert node_id and f"{node_id}  registered, last heartbeat" in out
    assert s.scheduler.url in out and "health     healthy" in out
    worker = s.agent.workers["cpu/0"]
    assert f"cpu/0  ready  pid {worker.pid}  cpu/int8" in out
    assert "slots 1 worker x 2 threads per device (set); 0 busy, 1 ready of 1" in out
    assert "model tiny.en" in out

    code, out, err = await run_status("--url", s.http.url, "--json")
    assert code == 0, err
    assert out.startswith('{\n  "agent": {\n    "')  # pretty, indent 2
    doc = json.loads(out)
    assert doc["agent"]["node_id"] == node_id and doc["health"] == {"status": "healthy", "reasons": []}
    assert doc["workers"][0]["pid"] == worker.pid

    # Something that answers, but not with a status document (the scheduler has no /status).
    code, out, err = await run_status("--url", s.scheduler.url)
    assert code == 2 and out == ""
    assert err == f"node-agent: cannot reach the agent at {s.scheduler.url}: HTTP 404 Not Found\n"


async def test_status_of_an_agent_with_a_fatal_worker(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged-model"  # passes the settings check (a directory with model.bin), fails to load
    damaged.mkdir()
    (damaged / "model.bin").write_bytes(b"not a model")
    async with agent_stack(tmp_path, asr={"model": str(damaged)},
                           worker={"backoff": {"max_quick_failures": 1}}) as s:
        worker = s.agent.workers["cpu/0"]
        assert worker.state is WorkerState.fatal, worker.state
        code, out, err = await run_status("--url", s.http.url)
        assert code == 1, (out, err)
        assert_fits(out)
        text = flat(out)
        assert "health DEGRADED" in text
        assert "- worker cpu/0 is fatal: start failed:" in text
        assert "cpu/0 fatal pid -" in text
        assert "last error: start failed:" in text

        code, out, _ = await run_status("--url", s.http.url, "--json")
        assert code == 1
        health = json.loads(out)["health"]
        assert health["status"] == "degraded"
        assert any(r.startswith("worker cpu/0 is fatal") and "damaged-model" in r for r in health["reasons"]), health


@pytest.mark.asyncio(loop_scope="module")
async def test_status_shows_the_running_job_and_its_lease(agent: AgentStack) -> None:
    s = agent
    # ~413 s of speech (~18 s to decode here, several seconds even on a CPU several times faster): a
    # `node-agent status` subprocess starts well within it. The job is not awaited: the fixture's teardown stops it.
    audio = long_audio(36)
    job_id = await s.submit_json(audio, format="pcm_s16le", sample_rate=16000)

    def leased() -> bool:
        running = s.agent.ledger.running.get(job_id)
        return running is not None and running.lease is not None and running.worker is not None \
            and (running.worker.current_job or {}).get("audio_s") is not None

    await eventually(leased, 30, "the job is running under a lease")
    lease = s.agent.ledger.running[job_id].lease
    assert lease is not None
    code, out, err = await run_status("--url", s.http.url)
    assert code == 0, (out, err)
    assert_fits(out)
    assert "running jobs (1)" in out
    assert f"{job_id}  attempt 1 on cpu/0" in out
    assert f"lease {lease.lease_id} epoch {lease.epoch}" in out
    assert f"audio {st.duration(len(audio) / 32000)}" in out  # known once the plugin decoded it


async def test_status_when_nothing_listens() -> None:
    port = closed_port()
    for extra in ((), ("--json",)):
        code, out, err = await run_status("--url", f"127.0.0.1:{port}", *extra)
        assert code == 2, (out, err)
        assert out == ""
        assert err.startswith(f"node-agent: cannot reach the agent at http://127.0.0.1:{port}: ")
        assert err.count("\n") == 1 and "Traceback" not in err
