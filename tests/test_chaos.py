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
# The lease comes with the assignment; for the lease_acquire step the proxy plays a scheduler that does not grant
# it that way, so the agent asks with POST /v1/leases. (No lease_release step: the agent releases only a job it
# gives up without an accepted result, since accepting the result releases the lease; test_client_faults has that
# call's failure shapes and test_job_runner the give-up.)
PLAN = {
    "next_job": ALL, "audio": ALL, "lease_acquire": ALL, "events": ALL, "result": ALL,
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
            proxy.strip_query["next_job"] = {"lease_ttl_s"} if endpoint == "lease_acquire" else set()
            if endpoint == "lease_acquire":
                await asyncio.sleep(1.5)  # a poll already waiting (1 s at most) asked for the lease
            proxy.inject(endpoint, *kinds)
            if endpoint == "next_job":
                # Every fault met before the job is queued: a job handed out on the poll whose answer becomes
                # garbage is lost to the node (it waits out its lease, then runs again as attempt 2), which is
                # not what this step is about; the job then shows the agent polling normally again.
                await wait_for(lambda: not proxy.faults[endpoint], 30, "all faults on next_job met")
            if endpoint in ("lease_renew", "events"):
                # Many segments for events; for renewals, the two faults land at 2 and 2.5 s into the lease
                # (TTL 6: renew every 2 s, retry after 0.5 s), so the job must outlast them with room to
                # spare: 51 s of audio decoded in 2.4 s on a CI machine once, and the second fault was never met;
                # three times that (about 7 s there, more on a slower or busier machine) leaves 4.5 s after it,
                # and still 1 s on a machine twice as fast as that CI.
                # Events: a post per 30 s window but the last (whose segments come with the result), so the same
                # three times gives the four faults a post each and one more to deliver what they held back. The
                # number of windows is what counts there, not how well they decode: greedy at one temperature (a
                # window is one pass: no beam, no fallback) does it in about two thirds of the time.
                audio, fields = long_audio_b64_fields(3)
                if endpoint == "events":
                    fields["options"] = {"beam_size": 1, "temperature": 0.0}
                job_id = submit(scheduler, audio, **fields)
            else:
                job_id = submit(scheduler, clip("jfk.flac"))
            jobs.append(job_id)
            view = await wait_finished(scheduler, job_id, 90, f"job with faults on {endpoint}")
            assert view["state"] == "succeeded", (endpoint, view)
            assert view["attempt"] == 1, (endpoint, view["attempt"], proxy.answers[-3:],
                                          sched.log()[-4000:], agent.log()[-4000:])
            if endpoint not in ("lease_renew", "events"):
                assert await asyncio.to_thread(plain_wer, view["result"]["text"], "jfk.flac") == 0.0, view["result"]
            await wait_for(lambda: not proxy.faults[endpoint], 30, f"all faults on {endpoint} consumed")
            if endpoint == "events":
                # Undelivered batches were carried forward: what the events delivered is every segment up to the
                # last window's, which came with the result (that replaces the streamed segments, so the job
                # view alone would not show a loss).
                ids = sorted(s["id"] for s in view["result"]["segments"])
                delivered = proxy.delivered_segment_ids()
                assert len(ids) >= 5 and delivered and delivered == set(ids[:len(delivered)]), (ids, delivered)
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


async def test_a_short_jobs_segments_come_with_its_result_and_events_faults_never_meet_it(tmp_path):
    """A short clip's segments come together with the end of its decode: the agent posts no events for it (the
    result carries every segment, one request less per job), so a blip on the events endpoint costs it nothing.
    (A failed decode still flushes its pending segments, with retries: test_job_runner.)"""
    sched, scheduler = await start_scheduler(tmp_path, free_port())
    proxy = await ChaosProxy(scheduler).start(free_port())
    agent = None
    try:
        agent, _ = await start_agent(tmp_path, "agent", proxy.url)
        proxy.inject("events", "500", "503", "500", "500")
        job_id = submit(scheduler, clip("jfk.flac"))
        view = await wait_finished(scheduler, job_id, 60, "job finished")
        assert view["state"] == "succeeded", view
        assert [seg["id"] for seg in view["segments"]] == [seg["id"] for seg in view["result"]["segments"]]
        assert view["segments"] and proxy.forwarded["events"] == 0 and len(proxy.faults["events"]) == 4
        assert await asyncio.to_thread(plain_wer, view["result"]["text"], "jfk.flac") == 0.0, view["result"]
        assert "Traceback" not in agent.log()
    finally:
        if agent is not None:
            await agent.stop()
        await proxy.stop()
        await sched.stop()
