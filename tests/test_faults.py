"""Reliability faults with real processes: scheduler down at start, network partition mid-job."""

from __future__ import annotations

import asyncio
import signal

from conftest import machine_slowdown
from helpers import clip, plain_wer
from procs import Proc, agent_env, free_port, job, metric, submit, wait_for
from test_cluster import long_audio_b64_fields, ready, start_agent, start_scheduler, status_of


async def test_scheduler_down_at_agent_start_registers_once_it_is_up(tmp_path):
    port = free_port()
    scheduler = f"http://127.0.0.1:{port}"
    http_port = free_port()
    agent = await Proc("agent", ["run"], agent_env(scheduler, tmp_path / "agent", http_port), tmp_path).start()
    sched = None
    try:
        url = f"http://127.0.0.1:{http_port}"
        await wait_for(lambda: status_of(url)["workers"][0]["state"] == "ready" if _up(url) else False, 90,
                       "worker ready while the scheduler is down")
        st = status_of(url)
        assert not st["agent"]["registered"] and st["health"]["status"] == "degraded"
        # A few failed registration attempts (its retries counted; often made already while the model loaded).
        await wait_for(lambda: (metric(url, "node_agent_retries_total", {"operation": "register"}) or 0) >= 2, 30,
                       "two registration retries")
        sched, _ = await start_scheduler(tmp_path, port)
        await wait_for(lambda: ready(url), 60, "registered after the scheduler came up")
        job_id = submit(scheduler, clip("jfk.flac"))
        view = await wait_for(lambda: (v := job(scheduler, job_id, 5))["state"] == "succeeded" and v, 60, "job")
        assert plain_wer(view["result"]["text"], "jfk.flac") == 0.0, view["result"]["text"]
        log = agent.log()
        # Each distinct failure is logged once, not once per retry.
        assert log.count("registration failed") == 1, log
    finally:
        await agent.stop()
        if sched is not None:
            await sched.stop()


def _up(url: str) -> bool:
    try:
        status_of(url)
        return True
    except Exception:
        return False


async def test_partition_mid_job_self_fences_within_the_renew_deadline(tmp_path):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port)
    agent = None
    try:
        agent, url = await start_agent(tmp_path, "agent", scheduler, NODE_AGENT_LEASE__TTL_S="3",
                                       NODE_AGENT_SCHEDULER__REQUEST_TIMEOUT_S="1")
        audio, fields = long_audio_b64_fields(3)
        job_id = submit(scheduler, audio, **fields)
        await wait_for(lambda: job(scheduler, job_id)["state"] == "running", 30, "job running")
        # Decoding, not only leased: the lease comes with the assignment, before the audio download, and one lost
        # during the download has no decode to stop (the worker would rightly stay).
        await wait_for(lambda: status_of(url)["workers"][0]["current_job"] is not None, 30, "job decoding")
        worker_pid = status_of(url)["workers"][0]["pid"]
        # A partition: the scheduler stops answering (its process is frozen), the agent keeps running.
        sched.signal(signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await wait_for(lambda: (metric(url, "node_agent_lease_lost_total", {"reason": "self_fenced"}) or 0) >= 1,
                       10, "self-fencing")
        fenced_after = loop.time() - t0
        # Renew deadline is 2/3 x 3 s = 2 s after the last good renewal (at most 1 s before the freeze), so 1-2 s
        # after the freeze; the rest is the machine's latency (timers, the 0.1 s polls), stretched by its load.
        assert fenced_after < 2.0 + 1.0 * machine_slowdown(), fenced_after
        # A fresh worker loads the model: no latency claim here, so a bound generous for any machine's load.
        await wait_for(lambda: status_of(url)["workers"][0]["pid"] not in (None, worker_pid), 120, "new worker")
        assert metric(url, "node_agent_worker_restarts_total", {"reason": "lease_lost"}) == 1
        sched.signal(signal.SIGCONT)
        await wait_for(lambda: status_of(url)["totals"]["lease_lost"] == 1, 30, "lease_lost counted")
        # The job is retried (attempt 2) and completes; the agent keeps serving.
        view = await wait_for(lambda: (v := job(scheduler, job_id, 5))["state"] == "succeeded" and v, 180,
                              "job completed after the partition")
        assert view["attempt"] >= 2
        assert metric(scheduler, "node_agent_scheduler_jobs_total", {"outcome": "succeeded"}) == 1
    finally:
        if agent is not None:
            await agent.stop()
        sched.signal(signal.SIGCONT)
        await sched.stop()


async def test_worker_that_never_becomes_ready_is_fatal_and_the_node_degraded(tmp_path):
    from procs import http_json

    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port, NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S="1")
    http_port = free_port()
    damaged = tmp_path / "damaged-model"  # passes the settings check (a directory with model.bin), fails to load
    damaged.mkdir()
    (damaged / "model.bin").write_bytes(b"not a model")
    agent = await Proc("agent", ["run"], agent_env(scheduler, tmp_path / "agent", http_port,
                                                    NODE_AGENT_ASR__MODEL=str(damaged),
                                                    NODE_AGENT_WORKER__BACKOFF__INITIAL_S="0.1",
                                                    NODE_AGENT_WORKER__FATAL_UNHEALTHY_AFTER_S="8"),
                       tmp_path).start()
    url = f"http://127.0.0.1:{http_port}"
    try:
        await wait_for(lambda: _up(url) and status_of(url)["workers"][0]["state"] == "fatal", 90, "fatal worker")
        loop = asyncio.get_running_loop()
        fatal_seen = loop.time()
        # Still live (a retry may fix it: worker.fatal_retry_s, 300 s here) ...
        assert http_json("GET", f"{url}/healthz")[0] == 200
        assert 0 < status_of(url)["workers"][0]["fatal_retry_in_s"] <= 330
        code, body = http_json("GET", f"{url}/readyz")
        assert code == 503 and "damaged-model" in body["reason"] and "fatal" in body["reason"]
        await wait_for(lambda: any(n["state"] == "degraded" for n in http_json("GET", f"{scheduler}/v1/nodes")[1]
                                   ["nodes"]), 30, "node heartbeating degraded")
        # No job is taken: it stays queued while the node stays registered and heartbeating.
        job_id = submit(scheduler, clip("jfk.flac"))
        await asyncio.sleep(3)
        assert job(scheduler, job_id)["state"] == "queued"
        assert metric(scheduler, "node_agent_scheduler_nodes", {"state": "degraded"}) == 1
        assert "not taking jobs" in agent.log()
        # ... until every worker has been fatal for worker.fatal_unhealthy_after_s: then a liveness probe restarts
        # the agent.
        await wait_for(lambda: http_json("GET", f"{url}/healthz")[0] == 503, 30, "/healthz 503")
        assert loop.time() - fatal_seen > 8 - 3  # not before (3 s of slack for how late the test saw "fatal")
        code, body = http_json("GET", f"{url}/healthz")
        assert code == 503 and "fatal" in body["reason"] and "damaged-model" in body["reason"]
    finally:
        await agent.stop()
        await sched.stop()


async def test_scheduler_restarted_mid_job_keeps_the_lease_and_the_job_finishes(tmp_path):
    """The scheduler's state is in its store (SQLite, the default): a restart mid-job is a pause. The holder's
    renewals are refused while it is down and accepted again by the new process, the job finishes on its first
    attempt, and the node is not registered again."""
    port = free_port()
    env = {"NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S": "1"}
    sched, scheduler = await start_scheduler(tmp_path, port, **env)
    agent = None
    try:
        # 9 s leases: renewals every 3 s, self-fencing after 6 s without one, room for a restart on a busy box.
        # Stretched by the machine's load, as the restart (a Python process starting) is, and the decode with it:
        # the job still spans renewals.
        ttl_s = round(9 * machine_slowdown(), 1)
        agent, url = await start_agent(tmp_path, "agent", scheduler, NODE_AGENT_LEASE__TTL_S=str(ttl_s))
        audio, fields = long_audio_b64_fields(3)
        job_id = submit(scheduler, audio, **fields)
        await wait_for(lambda: job(scheduler, job_id)["state"] == "running", 30, "job running")
        await sched.stop()
        sched, _ = await start_scheduler(tmp_path, port, name="scheduler-2", **env)
        view = await wait_for(lambda: (v := job(scheduler, job_id, 5))["state"] == "succeeded" and v, 180, "job")
        assert view["attempt"] == 1, view
        assert status_of(url)["totals"]["lease_lost"] == 0
        assert agent.log().count("registered with") == 1  # the new process knew the node: no second registration
        assert "Traceback" not in agent.log()
    finally:
        if agent is not None:
            await agent.stop()
        await sched.stop()
