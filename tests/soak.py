"""Soak run (`make soak`, not in CI): hours-style load compressed into N minutes.

Two agents and a standalone scheduler as real processes; clients submit jobs of mixed lengths continuously;
a worker is SIGKILLed every ``--kill-every`` seconds and the scheduler restarted every ``--restart-every``.
Prints jobs by outcome, lease losses, p50/p95 job latency, and agent and worker memory at start and end.
The scheduler keeps its state in its default SQLite store, so a restart should forget nothing: a job it no longer
knows (404) is counted as forgotten (expected 0), and the client resubmits it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from helpers import clip, joined, pcm16  # noqa: E402
from procs import Proc, agent_env, free_port, http_json, metric, submit, wait_for  # noqa: E402

SHORT = ["jfk.flac", "ljspeech_LJ002-0020.wav", "librispeech_1995-1837-0001.wav",
         "voices_Lab41-SRI-VOiCES-src-sp0307-ch127535-sg0042.wav", "stereo_diarization_left.wav"]


def rss(pid: int | None) -> int:
    try:
        return psutil.Process(pid).memory_info().rss if pid else 0
    except psutil.Error:
        return 0


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--kill-every", type=float, default=120.0)
    ap.add_argument("--restart-every", type=float, default=600.0)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the agents' allocations and print the sites that grew (slows the agents a little)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="node-agent-soak-"))
    port = free_port()
    scheduler = f"http://127.0.0.1:{port}"
    sched_env = {"NODE_AGENT_SCHEDULER__HEARTBEAT_INTERVAL_S": "2"}
    sched = await Proc("scheduler", ["scheduler", "--listen", f"127.0.0.1:{port}"], sched_env, tmp).start()
    await wait_for(lambda: _ok(f"{scheduler}/healthz"), 30, "scheduler")
    agents = []
    for name in ("agent-a", "agent-b"):
        http_port = free_port()
        env = agent_env(scheduler, tmp / name, http_port)
        if args.tracemalloc:
            env["PYTHONTRACEMALLOC"] = "1"
        proc = await Proc(name, ["run"], env, tmp).start()
        agents.append((proc, f"http://127.0.0.1:{http_port}"))
    for proc, url in agents:
        await wait_for(lambda: _ok(f"{url}/readyz"), 120, f"{proc.name} ready")

    long_audio = pcm16(joined(SHORT * 3)[0])
    jobs_audio = [(clip(n), {}) for n in SHORT] + [(long_audio, {"format": "pcm_s16le", "sample_rate": 16000})]

    def worker_pid(url: str) -> int | None:
        code, body = http_json("GET", f"{url}/status")
        return body["workers"][0]["pid"] if code == 200 else None

    start_mem = {p.name: (rss(p.pid), rss(worker_pid(u))) for p, u in agents}
    for p, _ in agents:
        p.signal(signal.SIGUSR1)  # diagnostics baseline (node_agent/diagnostics.py)
    rss_series: dict[str, list[float]] = {p.name: [] for p, _ in agents}
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    forgotten = 0
    stop_at = time.monotonic() + args.minutes * 60
    rng = random.Random(1)
    sched_box = [sched]

    async def client(n: int) -> None:
        nonlocal forgotten
        while time.monotonic() < stop_at:
            audio, fields = rng.choice(jobs_audio)
            t0 = time.monotonic()
            try:
                job_id = await asyncio.to_thread(submit, scheduler, audio, **fields)
                while True:
                    code, view = await asyncio.to_thread(http_json, "GET", f"{scheduler}/v1/jobs/{job_id}?wait_s=5",
                                                         None, 15)
                    if code == 404:
                        forgotten += 1
                        break
                    if view["state"] in ("succeeded", "failed"):
                        outcomes[view["state"] if view["state"] == "succeeded" else view["error"]["code"]] += 1
                        latencies.append(time.monotonic() - t0)
                        break
            except (OSError, AssertionError, KeyError):
                forgotten += 1
                await asyncio.sleep(1)

    async def sample_rss() -> None:
        """Agent RSS once a minute: a leak climbs steadily, allocator fragmentation levels off."""
        while time.monotonic() < stop_at:
            for p, _ in agents:
                rss_series[p.name].append(rss(p.pid) / 2**20)
            await asyncio.sleep(min(60.0, max(0.0, stop_at - time.monotonic())))

    async def chaos() -> None:
        next_kill = time.monotonic() + args.kill_every
        next_restart = time.monotonic() + args.restart_every
        while time.monotonic() < stop_at:
            await asyncio.sleep(1)
            now = time.monotonic()
            if now >= next_kill:
                proc, url = rng.choice(agents)
                pid = await asyncio.to_thread(worker_pid, url)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    print(f"[{time.strftime('%H:%M:%S')}] killed worker {pid} of {proc.name}", flush=True)
                next_kill = now + args.kill_every
            if now >= next_restart:
                await sched_box[0].stop()
                sched_box[0] = await Proc(f"scheduler-{int(now)}", ["scheduler", "--listen", f"127.0.0.1:{port}"],
                                          sched_env, tmp).start()
                await wait_for(lambda: _ok(f"{scheduler}/healthz"), 30, "scheduler restarted")
                print(f"[{time.strftime('%H:%M:%S')}] restarted the scheduler", flush=True)
                next_restart = now + args.restart_every

    await asyncio.gather(*(client(i) for i in range(args.clients)), chaos(), sample_rss())
    end_mem = {p.name: (rss(p.pid), rss(worker_pid(u))) for p, u in agents}
    lease_losses = sum(metric(u, "node_agent_lease_lost_total") or 0 for _, u in agents)
    restarts = {p.name: metric(u, "node_agent_worker_restarts_total") for p, u in agents}
    end_marker = "memory growth since the baseline" if args.tracemalloc else "tracemalloc is off"
    for p, _ in agents:
        # The report blocks the agent while it snapshots; wait for its last record before stopping the agent.
        before = p.log().count(end_marker)
        p.signal(signal.SIGUSR1)
        await wait_for(lambda p=p, before=before: p.log().count(end_marker) > before, 60, f"{p.name} memory report")
    for p, _ in agents:
        await p.stop()
    await sched_box[0].stop()

    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 20 else [float("nan")] * 19
    print(f"\nsoak: {args.minutes:g} min, {args.clients} clients, worker kill every {args.kill_every:g} s, "
          f"scheduler restart every {args.restart_every:g} s")
    print("jobs by outcome:", dict(outcomes), f"| forgotten by scheduler restarts: {forgotten}")
    print(f"job latency p50 {statistics.median(latencies):.2f} s, p95 {q[18]:.2f} s over {len(latencies)} jobs")
    print(f"lease losses: {lease_losses:g}; worker restarts: {restarts}")
    for name in start_mem:
        (a0, w0), (a1, w1) = start_mem[name], end_mem[name]
        print(f"{name}: agent RSS {a0 / 2**20:.1f} -> {a1 / 2**20:.1f} MiB, worker RSS {w0 / 2**20:.1f} -> "
              f"{w1 / 2**20:.1f} MiB")
        print(f"{name}: agent RSS each minute (MiB): {' '.join(f'{v:.0f}' for v in rss_series[name])}")
    if args.tracemalloc:
        for p, _ in agents:
            log = p.log()
            # The final report: the traced-size record, then the growth record (a header and indented sites).
            first, header, *rest = log[log.rindex("memory: traced"):].splitlines()
            sites = itertools.takewhile(lambda ln: ln.startswith("  "), rest)
            print(f"{p.name} memory at the end, and growth since the start:")
            for ln in (first, header, *sites):
                print("   " + ln.split("node_agent.diagnostics: ", 1)[-1])
    print(f"logs: {tmp}")
    return 0


def _ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
