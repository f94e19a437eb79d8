"""The agent in a cluster: real `node-agent run` / `node-agent scheduler` processes over loopback HTTP."""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.request

import pytest

from helpers import DATA, clip, joined, multipart, pcm16, plain_transcript, plain_wer
from node_agent.scheduler.formats import to_srt
from procs import Proc, agent_env, free_port, http_json, job, metric, submit, wait_for, wait_finished
from test_supervisor import LONG_CLIPS


def long_audio_b64_fields(repeat: int) -> tuple[bytes, dict]:
    audio, _ = joined(LONG_CLIPS * repeat, pause_s=0.8)
    return pcm16(audio), {"format": "pcm_s16le", "sample_rate": 16000}


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def status_of(url: str) -> dict:
    code, body = http_json("GET", f"{url}/status")
    assert code == 200
    return body


async def start_agent(tmp_path, name: str, scheduler_url: str, python_opts: tuple[str, ...] = (),
                      **env: str) -> tuple[Proc, str]:
    port = free_port()
    proc = await Proc(name, ["run"], agent_env(scheduler_url, tmp_path / name, port, **env), tmp_path,
                      python_opts).start()
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for(lambda: ready(url), 90, f"{name} ready")
    except AssertionError:
        await proc.stop()
        raise AssertionError(proc.log())
    return proc, url


async def start_agents(tmp_path, names: list[str], scheduler_url: str, **env: str) -> list[tuple[Proc, str]]:
    """Several agents started side by side (start-up is mostly waiting on imports, probe and model load)."""
    started = await asyncio.gather(*(start_agent(tmp_path, n, scheduler_url, **env) for n in names),
                                   return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for r in started:
            if not isinstance(r, BaseException):
                await r[0].stop()
        raise failed[0]
    return started


async def start_scheduler(tmp_path, port: int, name: str = "scheduler", **env: str) -> tuple[Proc, str]:
    proc = await Proc(name, ["scheduler", "--listen", f"127.0.0.1:{port}"], env, tmp_path).start()
    url = f"http://127.0.0.1:{port}"
    await wait_for(lambda: http_json("GET", f"{url}/healthz")[0] == 200 if _listening(port) else False, 30,
                   "scheduler up")
    return proc, url


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_run_with_embedded_scheduler_submit_and_openai_endpoint(tmp_path):
    sched_port = free_port()
    scheduler = f"http://127.0.0.1:{sched_port}"
    agent, url = await start_agent(tmp_path, "agent", "embedded",
                                   NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{sched_port}")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node_agent", "submit", "--scheduler", scheduler, str(DATA / "jfk.flac"),
            str(DATA / "jfk.flac"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().strip().splitlines()
        plain = plain_transcript("jfk.flac")  # the agent's settings; no fixed transcript holds on every CPU
        first = plain.segments[0]
        # Segment lines, then the transcript.
        assert lines[0] == f"jfk.flac [{first['start']:.2f} -> {first['end']:.2f}] {first['text'].strip()}", lines
        # (A clip this short is one window: its segments come with the end of the decode and reach the scheduler
        # inside the result, not as events; the client prints them from the job's segments all the same.)
        # The same file given twice is two jobs, and both transcripts are printed.
        finals = [line for line in lines if line.startswith("jfk.flac: ")]
        assert len(finals) == 2, lines
        for final in finals:
            assert plain_wer(final.split(": ", 1)[1], "jfk.flac") == 0.0, final

        def openai(fmt: str) -> tuple[int, str]:
            body, ctype = multipart({"model": "whisper-1", "response_format": fmt}, "jfk.flac", clip("jfk.flac"),
                                    "audio/flac")
            req = urllib.request.Request(f"{scheduler}/v1/audio/transcriptions", data=body,
                                         headers={"Content-Type": ctype})
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()

        import json

        status, body = await asyncio.to_thread(openai, "json")
        assert status == 200 and plain_wer(json.loads(body)["text"], "jfk.flac") == 0.0, body
        status, body = await asyncio.to_thread(openai, "text")
        assert status == 200 and plain_wer(body, "jfk.flac") == 0.0, body
        status, body = await asyncio.to_thread(openai, "srt")
        assert status == 200 and body.strip() == to_srt(plain.segments).strip(), (body, plain.segments)
        st = status_of(url)
        assert st["totals"]["succeeded"] == 5 and st["agent"]["registered"]
    finally:
        rc = await agent.stop()
    assert rc == 0, agent.log()
    assert "draining" in agent.log() and "Traceback" not in agent.log()


async def test_short_ttl_lease_is_renewed_through_a_long_job(tmp_path):
    sched_port = free_port()
    scheduler = f"http://127.0.0.1:{sched_port}"
    agent, url = await start_agent(tmp_path, "agent", "embedded",
                                   NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{sched_port}",
                                   NODE_AGENT_LEASE__TTL_S="1.0")
    try:
        # ~100 s of speech (~5 s to decode): renewals every 1/3 s need the job to last well past 1 s.
        audio, fields = long_audio_b64_fields(2)
        job_id = submit(scheduler, audio, **fields)
        view = await wait_finished(scheduler, job_id, 120, "job finished")
        assert view["state"] == "succeeded", view
        assert view["attempt"] == 1
        renewals = metric(url, "node_agent_lease_renewals_total", {"result": "ok"})
        assert renewals is not None and renewals >= 3, renewals
        assert metric(url, "node_agent_lease_lost_total") == 0
        assert metric(scheduler, "node_agent_scheduler_leases_expired_total") in (None, 0.0)
        assert metric(url, "node_agent_lease_margin_seconds_count") >= 3
    finally:
        await agent.stop()


async def test_paused_holder_is_fenced_and_the_job_completes_elsewhere(tmp_path):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port, NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S="1")
    procs = [sched]
    try:
        a, a_url = await start_agent(tmp_path, "agent-a", scheduler, NODE_AGENT_LEASE__TTL_S="2")
        procs.append(a)
        a_node = status_of(a_url)["agent"]["node_id"]
        # ~50 s of speech: 2.4 s or more to decode, against the one poll between "running" and the freeze.
        audio, fields = long_audio_b64_fields(1)
        job_id = submit(scheduler, audio, **fields)
        await wait_for(lambda: job(scheduler, job_id)["state"] == "running", 30, "job running on A")
        # Freeze A mid-job before B exists: B's start-up (imports, probe, model load) does not shrink with a
        # faster machine the way A's decode does, so starting B first would race A's result.
        a.signal(signal.SIGSTOP)  # A's event loop freezes; its lease cannot be renewed
        assert job(scheduler, job_id)["node_id"] == a_node
        await wait_for(lambda: job(scheduler, job_id)["attempt"] == 2, 20, "job re-queued after A's lease expired")
        b, b_url = await start_agent(tmp_path, "agent-b", scheduler, NODE_AGENT_LEASE__TTL_S="2")
        procs.append(b)
        b_node = status_of(b_url)["agent"]["node_id"]
        # B holds the second attempt before A wakes, so A cannot take it back.
        await wait_for(lambda: job(scheduler, job_id)["node_id"] == b_node, 30, "attempt 2 running on B")
        a.signal(signal.SIGCONT)

        view = await wait_finished(scheduler, job_id, 180, "job finished on B")
        assert view["state"] == "succeeded" and view["node_id"] == b_node and view["attempt"] == 2, view
        # A's late word (its result, or its lease_lost report) was refused: exactly one result counted.
        await wait_for(lambda: (metric(scheduler, "node_agent_scheduler_results_rejected_total") or 0) >= 1, 60,
                       "A's stale report rejected")
        assert metric(scheduler, "node_agent_scheduler_jobs_total", {"outcome": "succeeded"}) == 1
        assert metric(scheduler, "node_agent_scheduler_leases_expired_total", {"node_id": a_node}) == 1
        assert "rejected" in a.log()
        # Both agents keep serving.
        short = submit(scheduler, clip("jfk.flac"))
        assert (await wait_for(lambda: job(scheduler, short, 5)["state"] == "succeeded", 60, "next job")) is True
        assert ready(a_url) or status_of(a_url)["agent"]["registered"]
    finally:
        for p in reversed(procs):
            await p.stop()


async def test_scheduler_restart_agent_registers_again_and_keeps_serving(tmp_path):
    port = free_port()
    env = {"NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S": "1"}
    sched, scheduler = await start_scheduler(tmp_path, port, **env)
    agent = None
    try:
        agent, url = await start_agent(tmp_path, "agent", scheduler)
        node_id = status_of(url)["agent"]["node_id"]
        first = submit(scheduler, clip("jfk.flac"))
        await wait_for(lambda: job(scheduler, first, 5)["state"] == "succeeded", 60, "first job")
        await sched.stop()
        sched, _ = await start_scheduler(tmp_path, port, name="scheduler-2", **env)
        await wait_for(lambda: any(n["node_id"] == node_id for n in http_json("GET", f"{scheduler}/v1/nodes")[1]
                                   ["nodes"]), 30, "agent registered again with its persisted id")
        second = submit(scheduler, clip("jfk.flac"))
        view = await wait_for(lambda: (v := job(scheduler, second, 5))["state"] == "succeeded" and v, 60,
                              "job after restart")
        assert plain_wer(view["result"]["text"], "jfk.flac") == 0.0, view["result"]["text"]
    finally:
        if agent is not None:
            await agent.stop()
        await sched.stop()


async def test_two_agents_twenty_jobs_exactly_one_result_each(tmp_path):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port)
    procs = [sched]
    try:
        (a, a_url), (b, b_url) = await start_agents(tmp_path, ["agent-a", "agent-b"], scheduler)
        procs += [a, b]
        names = ["ljspeech_LJ002-0020.wav", "voices_Lab41-SRI-VOiCES-src-sp0307-ch127535-sg0042.wav",
                 "librivox_sense_and_sensibility_01_austen_64kb-0930.wav", "stereo_diarization_left.wav"]
        ids = {submit(scheduler, clip(names[i % len(names)])): names[i % len(names)] for i in range(20)}
        for job_id in ids:
            await wait_for(lambda: job(scheduler, job_id, 5)["state"] in ("succeeded", "failed"), 180, job_id)
        views = [job(scheduler, j) for j in ids]
        assert all(v["state"] == "succeeded" and v["attempt"] == 1 for v in views), views
        for v, name in zip(views, ids.values()):
            assert plain_wer(v["result"]["text"], name) == 0.0, (name, v["result"]["text"])
        assert metric(scheduler, "node_agent_scheduler_jobs_total", {"outcome": "succeeded"}) == 20
        assert (metric(scheduler, "node_agent_scheduler_results_rejected_total") or 0) == 0
        per_agent = [status_of(u)["totals"]["succeeded"] for u in (a_url, b_url)]
        assert sum(per_agent) == 20 and min(per_agent) >= 1, per_agent
    finally:
        for p in reversed(procs):
            await p.stop()


@pytest.mark.parametrize("grace, expect", [("30", "finishes"), ("0.5", "shutdown")])
async def test_sigterm_during_a_job_drains_releases_and_exits_zero(tmp_path, grace, expect):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port)
    agent = None
    try:
        agent, url = await start_agent(tmp_path, "agent", scheduler, NODE_AGENT_SHUTDOWN__GRACE_S=grace)
        # Still decoding when SIGTERM comes (right after "running"): ~50 s of speech (about 3 s to decode), decoded
        # to its end within the 30 s grace; ~100 s (about 5 s) when a 0.5 s grace must end first, stopping it.
        audio, fields = long_audio_b64_fields(1 if expect == "finishes" else 2)
        job_id = submit(scheduler, audio, **fields)
        await wait_for(lambda: job(scheduler, job_id)["state"] == "running", 30, "job running")
        agent.signal(signal.SIGTERM)
        rc = await asyncio.wait_for(agent.proc.wait(), 60)
        assert rc == 0, agent.log()
        view = job(scheduler, job_id)
        if expect == "finishes":
            assert view["state"] == "succeeded", view
        else:
            # Reported as shutdown (retryable): the scheduler put it back in the queue for another node.
            assert view["state"] == "queued" and view["attempt"] == 2, view
            assert "shutdown" in agent.log()
        assert "released" in agent.log()
        code, nodes = http_json("GET", f"{scheduler}/v1/nodes")
        assert all(not n["running_jobs"] for n in nodes["nodes"])
    finally:
        if agent is not None:
            await agent.stop()
        await sched.stop()


async def test_second_sigterm_exits_at_once(tmp_path):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port)
    agent = None
    try:
        agent, url = await start_agent(tmp_path, "agent", scheduler, NODE_AGENT_SHUTDOWN__GRACE_S="60")
        audio, fields = long_audio_b64_fields(3)
        job_id = submit(scheduler, audio, **fields)
        await wait_for(lambda: job(scheduler, job_id)["state"] == "running", 30, "job running")
        agent.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert agent.proc.returncode is None  # draining, waiting for the job
        agent.signal(signal.SIGTERM)
        rc = await asyncio.wait_for(agent.proc.wait(), 5)
        assert rc != 0
    finally:
        if agent is not None:
            await agent.stop()
        await sched.stop()
