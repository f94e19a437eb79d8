"""A short load test in CI: 2 agents, 1 scheduler, 60 real clips from 4 clients, 2 workers killed mid-run."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import psutil

from helpers import clip
from procs import free_port, job, metric, submit, wait_finished, wait_for
from test_cluster import start_agents, start_scheduler, status_of

CLIPS = ["ljspeech_LJ002-0020.wav", "voices_Lab41-SRI-VOiCES-src-sp0307-ch127535-sg0042.wav",
         "librivox_sense_and_sensibility_01_austen_64kb-0930.wav", "stereo_diarization_left.wav",
         "librispeech_1272-128104-0000.wav"]


async def test_sixty_jobs_four_clients_two_worker_kills(tmp_path):
    port = free_port()
    sched, scheduler = await start_scheduler(tmp_path, port)
    procs = [sched]
    rng = random.Random(7)
    try:
        (a, a_url), (b, b_url) = await start_agents(tmp_path, ["agent-a", "agent-b"], scheduler)
        procs += [a, b]
        # Warm-up so the RSS baseline includes what a running agent normally holds.
        # Submitted together, so that each agent most likely takes one.
        for warm in [submit(scheduler, clip(CLIPS[0])) for _ in (a_url, b_url)]:
            await wait_for(lambda: job(scheduler, warm, 5)["state"] == "succeeded", 60, "warm-up")
        rss_before = {p.pid: psutil.Process(p.pid).memory_info().rss for p in (a, b)}

        results: dict[str, dict] = {}

        async def client(n: int) -> None:
            for i in range(15):
                name = CLIPS[(n * 15 + i) % len(CLIPS)]
                job_id = await asyncio.to_thread(submit, scheduler, clip(name))
                view = await wait_finished(scheduler, job_id, 180, job_id)
                results[job_id] = view

        async def killer() -> None:
            for url in (a_url, b_url):
                await asyncio.sleep(rng.uniform(2.0, 6.0))
                pid = await wait_for(lambda: status_of(url)["workers"][0]["pid"], 30, "worker pid")
                os.kill(pid, signal.SIGKILL)

        await asyncio.gather(*(client(n) for n in range(4)), killer())
        assert len(results) == 60
        outcomes = [v["state"] for v in results.values()]
        assert outcomes.count("succeeded") >= 58, [v.get("error") for v in results.values() if v["state"] != "succeeded"]
        # Exactly one accepted terminal result per job: the scheduler's count matches the jobs.
        succeeded = metric(scheduler, "node_agent_scheduler_jobs_total", {"outcome": "succeeded"})
        assert succeeded == outcomes.count("succeeded") + 2  # + the two warm-up jobs
        restarts = sum(metric(u, "node_agent_worker_restarts_total", {"reason": "crash"}) or 0
                       for u in (a_url, b_url))
        assert restarts == 2
        for p in (a, b):
            grown = psutil.Process(p.pid).memory_info().rss - rss_before[p.pid]
            assert grown < 20 * 1024 * 1024, f"agent RSS grew by {grown / 2**20:.1f} MiB"
        for url in (a_url, b_url):
            st = status_of(url)
            assert st["agent"]["registered"] and not st["jobs"]
    finally:
        for p in reversed(procs):
            await p.stop()
