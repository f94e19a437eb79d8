"""The agent against a scheduler that answers 500, 503 + Retry-After, garbage, or nothing, on each endpoint in
turn: no crash, no job reported twice as a new result, recovery within bounded time."""

from __future__ import annotations

import asyncio
import json

from chaos_proxy import ChaosProxy
from helpers import clip, plain_wer
from procs import free_port, metric, submit, wait_for, wait_finished
from test_cluster import long_audio_b64_fields, ready, start_agent, start_scheduler, status_of

ALL = ("500", "503", "garbage", "hang")
# Heartbeats and renewals have deadlines of their own (node gone after 3 missed heartbeats, self-fencing after
# 2/3 TTL): two faults in a row are what they must ride out; more is a partition, tested elsewhere.
PLAN = {
    "next_job": ALL, "audio": ALL, "lease_acquire": ALL, "events": ALL, "result": ALL, "lease_release": ALL,
    "heartbeat": ("500", "garbage"), "lease_renew": ("500", "garbage"), "register": ALL,
}


async def test_each_endpoint_in_turn_fails_every_way_and_the_agent_recovers(tmp_path):
    sched_port = free_port()
    # Long polls capped at 1 s: a fault that is forwarded first (garbage on next_job) answers when the poll ends,
    # and the poll's length is not what is tested here.
    sched, scheduler = await start_scheduler(tmp_path, sched_port, NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S="2",
                                             NODE_AGENT_SCHEDULER__MAX_WAIT_S="1")
    proxy = await ChaosProxy(scheduler, hang_s=2.5).start(free_port())
    proxy.inject("register", *ALL)  # the very first registration meets every failure shape
    agent = None
    try:
        agent, url = await start_agent(tmp_path, "agent", proxy.url, NODE_AGENT_SCHEDULER__REQUEST_TIMEOUT_S="1.5",
                                       NODE_AGENT_LEASE__TTL_S="6")
        assert proxy.injected[("register", "hang")] == 1
        jobs = []
        for endpoint, kinds in PLAN.items():
            if endpoint == "register":
                continue
            proxy.inject(endpoint, *kinds)
            if endpoint in ("lease_renew", "events"):
                # Many segments for events; for renewals, the two faults land at 2 and 2.5 s into the lease
                # (TTL 6: renew every 2 s, retry after 0.5 s), so the job must outlast them with room to
                # spare: 51 s of audio decoded in 2.4 s on a CI machine once, and the second fault was never met;
                # three times that (about 7 s there, more on a slower or busier machine) leaves 4.5 s after it,
                # and still 1 s on a machine twice as fast as that CI.
                audio, fields = long_audio_b64_fields(3 if endpoint == "lease_renew" else 1)
                job_id = submit(scheduler, audio, **fields)
            else:
                job_id = submit(scheduler, clip("jfk.flac"))
            jobs.append(job_id)
            view = await wait_finished(scheduler, job_id, 90, f"job with faults on {endpoint}")
            assert view["state"] == "succeeded", (endpoint, view)
            assert view["attempt"] == 1, (endpoint, view["attempt"], proxy.answers[-3:])
            if endpoint not in ("lease_renew", "events"):
                assert await asyncio.to_thread(plain_wer, view["result"]["text"], "jfk.flac") == 0.0, view["result"]
            await wait_for(lambda: not proxy.faults[endpoint], 30, f"all faults on {endpoint} consumed")
            if endpoint == "events":
                # Undelivered batches were carried forward: the scheduler had every segment before the result
                # (which replaces the streamed segments, so the job view alone would not show a loss).
                ids = [s["id"] for s in view["result"]["segments"]]
                assert len(ids) >= 5 and proxy.delivered_segment_ids() == set(ids)
            await wait_for(lambda: ready(url), 30, "agent ready again")
        for endpoint, kinds in PLAN.items():
            for kind in kinds:
                assert proxy.injected[(endpoint, kind)] == 1, (endpoint, kind)
        # Exactly one accepted result per job; retries after a garbage answer were recognised as duplicates.
        assert metric(scheduler, "node_agent_scheduler_jobs_total", {"outcome": "succeeded"}) == len(jobs)
        assert (metric(scheduler, "node_agent_scheduler_results_rejected_total") or 0) == 0

        def new_results() -> int:
            return sum(1 for name, status, body in proxy.answers
                       if name == "result" and status == 200 and not json.loads(body).get("duplicate"))

        # The last job's answer may still be on its way through the proxy (the job showed finished first).
        await wait_for(lambda: new_results() >= len(jobs), 10, "every result relayed")
        assert new_results() == len(jobs), proxy.answers
        st = status_of(url)
        assert st["totals"]["succeeded"] == len(jobs) and st["agent"]["registered"]
        assert "Traceback" not in agent.log()
    finally:
        if agent is not None:
            await agent.stop()
        await proxy.stop()
        await sched.stop()


async def test_events_failing_at_the_end_of_a_job_are_retried_before_the_result(tmp_path):
    """A scheduler blip as the last segments arrive: they are retried (bounded), not dropped with one try."""
    sched, scheduler = await start_scheduler(tmp_path, free_port())
    proxy = await ChaosProxy(scheduler).start(free_port())
    agent = None
    try:
        agent, url = await start_agent(tmp_path, "agent", proxy.url)
        # More failures than a job as short as jfk.flac has batches: every post during the job fails, and the
        # flush after its last segment meets the rest.
        proxy.inject("events", "500", "503", "500", "500")
        job_id = submit(scheduler, clip("jfk.flac"))
        view = await wait_finished(scheduler, job_id, 60, "job finished")
        assert view["state"] == "succeeded", view
        assert not proxy.faults["events"]
        ids = {s["id"] for s in view["result"]["segments"]}
        assert ids and proxy.delivered_segment_ids() == ids
        # Delivered before the result was reported: the result is the last thing the proxy saw for this job. The
        # scheduler shows the job finished before the proxy has relayed its answer to the result (the proxy runs
        # in this process, the job is polled from a thread), so first wait for that answer.
        await wait_for(lambda: any(name == "result" for name, _, _ in proxy.answers), 10, "the result relayed")
        assert [name for name, _, _ in proxy.answers][-1] == "result", [name for name, _, _ in proxy.answers]
        assert "never delivered" not in agent.log() and "Traceback" not in agent.log()
    finally:
        if agent is not None:
            await agent.stop()
        await proxy.stop()
        await sched.stop()
