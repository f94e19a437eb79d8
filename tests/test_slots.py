"""Slots: several workers per device, each holding its own lease on its own resource (cpu/0, cpu/1, gpu:0/0).

The split rule and the memory check are pure functions (``devices.choose_slots``); the rest runs the real agent
with the real plugin and tiny.en against a real scheduler on loopback. Overlap is read from the scheduler (both
jobs running, two active leases on two slots of one node), never inferred from timings.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import make_settings
from node_agent.devices import (
    MAX_AUTO_CPU_WORKERS,
    WORKER_BASELINE_BYTES,
    choose_slots,
    worker_memory_bytes,
)
from node_agent.errors import ConfigError
from node_agent.scheduler.server import start_scheduler
from procs import free_port
from stack import agent_stack, eventually, long_audio

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
MB = 10**6
TINY = 78 * MB  # tiny.en's directory on disk
PLENTY = 64 * GiB

pytestmark = pytest.mark.timeout(240)


# ----- the auto rule, as a pure function ------------------------------------------------------------------------


@pytest.mark.parametrize("device, workers, threads, cores, expected", [
    # CPU, both auto: one worker per core, at most 16, sharing the cores (issue 15's best split), and a lone-job
    # worker with every core (at most 8) for a job that finds the other slots idle (issue 24): (workers, threads,
    # lone_threads).
    ("cpu", None, 0, 1, (1, 1, 0)),  # one worker has every core already: no lone-job worker
    ("cpu", None, 0, 2, (2, 1, 2)),
    ("cpu", None, 0, 4, (4, 1, 4)),
    ("cpu", None, 0, 16, (16, 1, 8)),
    ("cpu", None, 0, 32, (MAX_AUTO_CPU_WORKERS, 2, 8)),
    ("cpu", None, 0, 256, (MAX_AUTO_CPU_WORKERS, 8, 0)),  # at most 8 threads each: nothing left to lend
    # Threads set: as many workers as the cores hold at that many threads each; no lone-job worker.
    ("cpu", None, 2, 2, (1, 2, 0)),
    ("cpu", None, 2, 8, (4, 2, 0)),
    ("cpu", None, 4, 2, (1, 4, 0)),  # more threads than cores: still one worker
    # Workers set, threads auto: the cores shared, and the lone-job worker.
    ("cpu", 1, 0, 2, (1, 2, 0)),
    ("cpu", 2, 0, 8, (2, 4, 8)),
    ("cpu", 4, 0, 2, (4, 1, 2)),
    ("cpu", 3, 3, 2, (3, 3, 0)),  # both set: taken as they are
    # GPU: auto is one worker; threads for its CPU-side work as before; never a lone-job worker.
    ("cuda", None, 0, 8, (1, 8, 0)),
    ("cuda", 2, 0, 8, (2, 4, 0)),
    ("cuda", None, 2, 8, (1, 2, 0)),
])
def test_auto_rule(device: str, workers: int | None, threads: int, cores: int,
                   expected: tuple[int, int, int]) -> None:
    plan = choose_slots(device, workers, threads, cores, PLENTY, TINY, gpu_memory_bytes=80 * GiB)
    assert (plan.workers, plan.threads, plan.lone_threads) == expected
    assert plan.workers_auto is (workers is None) and plan.threads_auto is (threads == 0)


def test_the_split_is_described_as_status_shows_it() -> None:
    assert choose_slots("cpu", None, 0, 2, PLENTY, TINY).describe() == \
        "2 workers x 1 thread per device, lone jobs 2 threads (auto)"
    assert choose_slots("cpu", 1, 2, 2, PLENTY, TINY).describe() == "1 worker x 2 threads per device (set)"
    assert choose_slots("cpu", 2, 0, 8, PLENTY, TINY).describe() == \
        "2 workers x 4 threads per device, lone jobs 8 threads (threads auto)"
    assert choose_slots("cpu", None, 2, 8, PLENTY, TINY).describe() == \
        "4 workers x 2 threads per device (workers auto)"


# ----- memory -----------------------------------------------------------------------------------------------------


def test_auto_never_chooses_more_workers_than_fit() -> None:
    per_worker = worker_memory_bytes(TINY, "cpu")
    assert per_worker == WORKER_BASELINE_BYTES + TINY
    # 16 cores, but memory for 3 workers: 3 workers sharing the cores, and no room for a lone-job worker.
    plan = choose_slots("cpu", None, 0, 16, 3 * per_worker + per_worker // 2, TINY)
    assert (plan.workers, plan.threads, plan.lone_threads) == (3, 5, 0)
    # Room for one more: the lone-job worker has every core (at most 8).
    plan = choose_slots("cpu", 3, 0, 16, 4 * per_worker, TINY)
    assert (plan.workers, plan.threads, plan.lone_threads) == (3, 5, 8)
    assert choose_slots("cpu", None, 0, 16, per_worker, TINY).workers == 1
    # On a GPU, the GPU's memory counts too (two 3 GB models in 7 GB; host memory plenty).
    with pytest.raises(ConfigError, match="3 x 3240 MiB of model > 7168 MiB of GPU memory; "
                                          "set asr.workers_per_device to 2 or less"):
        choose_slots("cuda", 3, 0, 8, PLENTY, 3240 * 2**20, gpu_memory_bytes=7 * GiB)
    assert choose_slots("cuda", 2, 0, 8, PLENTY, 3240 * 2**20, gpu_memory_bytes=7 * GiB).workers == 2


def test_workers_that_cannot_fit_are_refused_in_one_line() -> None:
    per_worker = worker_memory_bytes(1500 * 2**20, "cpu")  # 1500 MiB model + 192 MiB process = 1692 MiB
    with pytest.raises(ConfigError) as refused:
        choose_slots("cpu", 4, 0, 8, 5 * GiB, 1500 * 2**20)
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("asr.workers_per_device = 4 cannot fit in memory: 4 workers x 1692 MiB (model and process) "
                       "= 6768 MiB > 5120 MiB available; set asr.workers_per_device to 3 or less, or a smaller "
                       "asr.model")
    assert per_worker == 1692 * 2**20
    # Not even one worker fits: auto refuses too, rather than start a worker the kernel would kill.
    with pytest.raises(ConfigError, match=r"^asr.workers_per_device = auto \(1 worker\) cannot fit in memory: "
                                          r"1 worker x 1692 MiB .* > 1024 MiB available; free memory"):
        choose_slots("cpu", None, 0, 8, GiB, 1500 * 2**20)
    # float32 on a CPU keeps the weights at twice the size of the float16 file.
    assert worker_memory_bytes(TINY, "cpu", "float32") == WORKER_BASELINE_BYTES + 2 * TINY


def test_settings_take_auto_or_a_number_of_workers() -> None:
    assert make_settings(asr={"workers_per_device": "auto"}).asr.workers_requested is None
    assert make_settings(asr={"workers_per_device": 3}).asr.workers_requested == 3
    from node_agent.config import load_settings

    for bad in ("0", "-1", "2.5", "many", "true", "65"):
        with pytest.raises(ConfigError) as refused:
            load_settings(None, {"NODE_AGENT_ASR__WORKERS_PER_DEVICE": bad})
        assert str(refused.value).endswith("must be auto or a whole number of workers from 1 to 64"), bad
        assert "environment NODE_AGENT_ASR__WORKERS_PER_DEVICE: asr.workers_per_device" in str(refused.value)


async def test_the_agent_refuses_to_start_workers_that_cannot_fit(tmp_path: Path) -> None:
    """``node-agent run`` with a model too big for this machine's memory x 2 workers: one line, status 2."""
    model = tmp_path / "huge-model"
    model.mkdir()
    with (model / "model.bin").open("wb") as f:
        f.truncate(2**40)  # sparse: 1 TiB by its size, nothing on the disk
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg"), "NODE_AGENT_ASR__MODEL": str(model),
           "NODE_AGENT_ASR__DEVICE": "cpu", "NODE_AGENT_ASR__WORKERS_PER_DEVICE": "2",
           "NODE_AGENT_NODE__STATE_DIR": str(tmp_path / "state"),
           "NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{free_port()}",
           "NODE_AGENT_HTTP__LISTEN": f"127.0.0.1:{free_port()}"}
    for command in ("check-config", "run"):  # check-config tells before a start does
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "node_agent", command, cwd=ROOT, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 2, (command, out, err)
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, (command, lines)
        assert lines[0].startswith("node-agent: config error: asr.workers_per_device = 2 cannot fit in memory: "
                                   "2 workers x "), lines
        assert lines[0].endswith("; free memory, or a smaller asr.model"), lines
    # The shipped model on this machine fits: check-config names the split run would choose.
    env.pop("NODE_AGENT_ASR__MODEL")
    out = subprocess.run([sys.executable, "-m", "node_agent", "check-config"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "# slots on this machine: 2 workers x " in out.stdout, out.stdout


# ----- fencing per slot, at the scheduler --------------------------------------------------------------------


async def test_each_slot_is_leased_and_fenced_on_its_own(tmp_path: Path) -> None:
    settings = make_settings(node={"state_dir": str(tmp_path / "state")})
    running = await start_scheduler(settings.scheduler, host="127.0.0.1", port=0, state_dir=tmp_path / "state")
    try:
        async with aiohttp.ClientSession(base_url=running.url) as http:
            async def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
                async with http.request(method, path, **kwargs) as resp:
                    return resp.status, await resp.json() if resp.content_type == "application/json" else None

            slots = [{"resource": f"cpu/{n}", "device": "cpu", "plugin": "asr", "model": "tiny.en",
                      "compute_type": "int8", "languages": ["en"]} for n in (0, 1)]
            status, reply = await call("POST", "/v1/nodes", json={
                "agent_version": "0.1.0", "hostname": "h", "devices": slots,
                "hardware": {"cpu_cores": 2, "memory_bytes": 8 * GiB, "gpus": []}})
            assert status == 201, reply
            node = reply["node_id"]
            jobs = []
            for _ in range(2):
                status, reply = await call("POST", "/v1/jobs", json={"audio_b64": base64.b64encode(b"x" * 64).decode()})
                assert status == 202, reply
                jobs.append(reply["job_id"])
            grants = {}
            for n, job in enumerate(jobs):
                status, assignment = await call("GET", f"/v1/nodes/{node}/jobs/next",
                                                params={"wait_s": 0, "resource": f"cpu/{n}"})
                assert status == 200 and assignment["job_id"] == job and assignment["resource"] == f"cpu/{n}"
                status, grants[job] = await call("POST", "/v1/leases", json={
                    "node_id": node, "job_id": job, "resource": f"cpu/{n}", "ttl_s": 30})
                assert status == 201, grants[job]
            # Two leases at once on one node: one per slot, each with its own epoch.
            a, b = jobs
            assert grants[a]["resource"] == "cpu/0" and grants[b]["resource"] == "cpu/1"
            assert grants[a]["epoch"] != grants[b]["epoch"]
            status, nodes = await call("GET", "/v1/nodes")
            (view,) = nodes["nodes"]
            assert [(d["resource"], d["device"]) for d in view["devices"]] == [("cpu/0", "cpu"), ("cpu/1", "cpu")]

            # Slot cpu/0 is held by job a: job b cannot lease it.
            status, reply = await call("POST", "/v1/leases", json={
                "node_id": node, "job_id": b, "resource": "cpu/0", "ttl_s": 30})
            assert status == 409 and reply["error"]["code"] == "resource_held", reply

            # A report for job b (on cpu/1) carrying slot cpu/0's lease is refused; b's own is accepted.
            def result(grant: dict[str, Any]) -> dict[str, Any]:
                return {"node_id": node, "attempt": 1, "lease_id": grant["lease_id"], "lease_epoch": grant["epoch"],
                        "outcome": "succeeded", "result": {"text": "hi", "language": "en", "duration_s": 1.0,
                                                           "segments": []}}
            status, reply = await call("POST", f"/v1/jobs/{b}/result", json=result(grants[a]))
            assert status == 409 and reply["error"]["code"] == "stale_epoch", reply
            assert grants[a]["lease_id"] in reply["error"]["message"], reply
            status, reply = await call("POST", f"/v1/jobs/{b}/result", json=result(grants[b]))
            assert status == 200, reply
            # ... and so is a renewal of cpu/0's lease by its epoch mixed with cpu/1's lease id.
            status, reply = await call("POST", f"/v1/leases/{grants[a]['lease_id']}/renew",
                                       json={"node_id": node, "epoch": grants[b]["epoch"]})
            assert status in (409, 410) and reply["error"]["code"] == "stale_epoch", reply
            status, reply = await call("POST", f"/v1/leases/{grants[a]['lease_id']}/renew",
                                       json={"node_id": node, "epoch": grants[a]["epoch"]})
            assert status == 200, reply
    finally:
        await running.stop()


# ----- the real agent with two slots ------------------------------------------------------------------------------


def active_leases(state_dir: Path) -> list[tuple[str, str]]:
    """(job id, resource) of the scheduler's active leases, read from its SQLite file."""
    db = sqlite3.connect(f"file:{state_dir / 'scheduler.db'}?mode=ro", uri=True, timeout=5)
    try:
        return sorted(db.execute("SELECT job_id, resource FROM leases WHERE state = 'active'").fetchall())
    finally:
        db.close()


async def both_running(s: Any, jobs: list[str], state_dir: Path, timeout: float = 60) -> list[tuple[str, str]]:
    """Wait until the scheduler has both jobs running at once, each under its own active lease; the leases."""
    async def views() -> list[dict[str, Any]]:
        out = []
        for job in jobs:
            async with s.session.get(f"{s.scheduler.url}/v1/jobs/{job}") as resp:
                out.append(await resp.json())
        return out

    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        states = [v["state"] for v in await views()]
        assert not {"succeeded", "failed"} & set(states), f"a job finished before both ran: {states}"
        if states == ["running", "running"]:
            leases = await asyncio.to_thread(active_leases, state_dir)
            if len(leases) == 2:
                return leases
        assert loop.time() < give_up, f"both jobs not running at once within {timeout:g} s: {states}"
        await asyncio.sleep(0.05)


async def test_two_jobs_run_at_once_on_two_slots_each_with_its_own_lease(tmp_path: Path) -> None:
    # ~35 s of speech each: seconds to decode with one thread, so both are seen running at once (the scheduler is
    # polled every 0.05 s); under asr.split_min_s, so each job stays one decode on one slot.
    audio = long_audio(3)
    async with agent_stack(tmp_path, asr={"workers_per_device": 2, "cpu_threads": 1}) as s:
        assert list(s.agent.workers) == ["cpu/0", "cpu/1"]
        assert all(w.spec.cpu_threads == 1 for w in s.agent.workers.values())
        await eventually(lambda: all(w.state.value == "ready" for w in s.agent.workers.values()), 60,
                         "both workers ready")
        jobs = [await s.submit_json(audio, format="pcm_s16le", sample_rate=16000) for _ in range(2)]
        leases = await both_running(s, jobs, tmp_path / "state")
        assert {job for job, _ in leases} == set(jobs)
        assert {resource for _, resource in leases} == {"cpu/0", "cpu/1"}
        # Leased with the assignment, a job is running on the scheduler while its slot still fetches the audio.
        await eventually(lambda: s.agent.view.status()["slots"]["busy"] == 2, 30, "both slots busy")
        status = s.agent.view.status()
        assert status["slots"]["busy"] == 2 and status["slots"]["total"] == 2
        assert status["slots"]["text"] == "2 workers x 1 thread per device (set)"
        assert sorted(j["resource"] for j in status["jobs"]) == ["cpu/0", "cpu/1"]
        for job in jobs:
            view = await s.wait_job(job, timeout=180)
            assert view["state"] == "succeeded" and view["attempt"] == 1, view
            assert "ask not what your country can do for you" in view["result"]["text"].lower()
        await s.wait_counted("succeeded", 2, timeout=30)
        for resource in ("cpu/0", "cpu/1"):
            assert s.sample("node_agent_worker_jobs_served", device=resource) == 1.0, resource
            assert s.sample("node_agent_lease_acquire_duration_seconds_count", device=resource) == 1.0, resource
            assert s.sample("node_agent_slot_info", device=resource, physical_device="cpu", cpu_threads="1",
                            auto="false") == 1.0


async def test_a_slots_worker_killed_fails_only_its_own_job(tmp_path: Path) -> None:
    audio = long_audio(3)  # as above: both jobs decoding when one slot's worker is killed
    async with agent_stack(tmp_path, asr={"workers_per_device": 2, "cpu_threads": 1},
                           scheduler={"max_attempts": 1}) as s:
        await eventually(lambda: all(w.state.value == "ready" for w in s.agent.workers.values()), 60,
                         "both workers ready")
        jobs = [await s.submit_json(audio, format="pcm_s16le", sample_rate=16000) for _ in range(2)]
        leases = dict(await both_running(s, jobs, tmp_path / "state"))
        victim, survivor = jobs
        victim_slot, survivor_slot = leases[victim], leases[survivor]
        killed = s.agent.workers[victim_slot]
        os.kill(killed.pid, signal.SIGKILL)

        lost = await s.wait_job(victim, timeout=60)
        # One attempt only (scheduler.max_attempts: 1), so the crash is the job's end, not a retry.
        assert lost["state"] == "failed" and lost["error"]["code"] == "worker_crashed", lost
        assert "SIGKILL" in lost["error"]["message"] and victim_slot in lost["error"]["message"], lost
        kept = await s.wait_job(survivor, timeout=180)
        assert kept["state"] == "succeeded" and kept["attempt"] == 1, kept
        assert "ask not what your country can do for you" in kept["result"]["text"].lower()

        assert s.sample("node_agent_worker_restarts_total", device=victim_slot, reason="crash") == 1.0
        assert s.sample("node_agent_worker_restarts_total", device=survivor_slot, reason="crash") == 0.0
        assert s.agent.workers[survivor_slot].restarts.total() == 0
        # The killed slot's worker comes back and takes jobs again.
        await eventually(lambda: killed.state.value == "ready", 60, f"worker {victim_slot} replaced")


# ----- the lone-job worker (issue 24) -----------------------------------------------------------------------------


class _Stub:
    """A worker as LoneWorker reads it: a resource and a state."""

    def __init__(self, resource: str, state: str = "ready") -> None:
        from node_agent.supervisor import WorkerState

        self.resource = resource
        self.state = WorkerState(state)


def test_the_lone_job_worker_is_lent_only_to_a_job_that_starts_alone() -> None:
    from node_agent.lone_worker import LoneWorker

    a, b, lone_stub = _Stub("cpu/0"), _Stub("cpu/1"), _Stub("cpu/lone")
    lone = LoneWorker(lone_stub)  # type: ignore[arg-type]
    first = lone.take(a)  # type: ignore[arg-type]
    assert first is lone_stub and lone.lent_to == "cpu/0"
    second = lone.take(b)  # type: ignore[arg-type]  # another job is in flight: its own slot's worker
    assert second is b and lone.lent_to == "cpu/0"
    lone.give_back(first)  # type: ignore[arg-type]
    # The first job ended, the second still runs: a third job is not alone either.
    assert lone.lent_to is None and lone.take(a) is a  # type: ignore[arg-type]
    lone.give_back(second)  # type: ignore[arg-type]
    lone.give_back(a)  # type: ignore[arg-type]
    # Nothing in flight: lent again, unless it is not ready (restarting after a crash, say).
    assert lone.take(b) is lone_stub and lone.jobs_total == 2  # type: ignore[arg-type]
    lone.give_back(lone_stub)  # type: ignore[arg-type]
    from node_agent.supervisor import WorkerState

    lone_stub.state = WorkerState.backoff
    assert lone.take(a) is a and lone.lent_to is None  # type: ignore[arg-type]


async def test_a_lone_job_decodes_on_every_core_and_a_job_beside_it_on_its_slot(tmp_path: Path) -> None:
    """The split of a 2-core machine (2 slots x 1 thread, a lone-job worker with 2), set here so that the test
    holds on any machine. A job that starts alone decodes on the lone-job worker under its slot's lease; one that
    starts while it runs decodes on its own slot's worker; both are what the text says."""
    from node_agent.devices import SlotPlan

    plan = SlotPlan(workers=2, threads=1, workers_auto=False, threads_auto=True, worker_bytes=0, lone_threads=2)
    # ~47 s of speech, never split (split_min_s off): a second or more to decode, against the tenth of a second
    # the second job takes to start, so it starts while the first runs.
    audio = long_audio(4)
    async with agent_stack(tmp_path, slots=plan,
                           asr={"workers_per_device": 2, "cpu_threads": 0, "split_min_s": None}) as s:
        lone = s.agent.lone
        assert lone is not None and lone.worker.spec.cpu_threads == 2
        assert [w.spec.cpu_threads for w in s.agent.workers.values()] == [1, 1]
        await eventually(lambda: lone.worker.state.value == "ready"
                         and all(w.state.value == "ready" for w in s.agent.workers.values()), 90, "workers ready")
        assert s.agent.view.status()["slots"]["text"] == \
            "2 workers x 1 thread per device, lone jobs 2 threads (threads auto)"

        first = await s.submit_json(audio, format="pcm_s16le", sample_rate=16000)
        await eventually(lambda: lone.worker.current_job is not None, 60, "the first job decoding on the lone worker")
        status = s.agent.view.status()
        (job,) = status["jobs"]
        assert job["job_id"] == first and job["worker"] == "cpu/lone" and job["resource"] == lone.lent_to
        assert status["slots"]["busy"] == 1
        (snapshot,) = [w for w in status["workers"] if w.get("lone")]
        assert snapshot["lent_to"] == lone.lent_to and snapshot["state"] == "busy"

        second = await s.submit_json(audio, format="pcm_s16le", sample_rate=16000)

        def second_decoding() -> bool:
            jobs = {j["job_id"]: j for j in s.agent.view.status()["jobs"]}
            return second in jobs and s.agent.workers[jobs[second]["resource"]].current_job is not None

        await eventually(second_decoding, 60, "the second job decoding on its slot")
        jobs = {j["job_id"]: j for j in s.agent.view.status()["jobs"]}
        assert jobs[first]["worker"] == "cpu/lone" and jobs[second]["resource"] != jobs[first]["resource"]
        assert jobs[second]["worker"] == jobs[second]["resource"]
        for job_id in (first, second):
            view = await s.wait_job(job_id, timeout=180)
            assert view["state"] == "succeeded", view
            assert "ask not what your country can do for you" in view["result"]["text"].lower()
        await s.wait_counted("succeeded", 2, timeout=30)
        assert s.sample("node_agent_lone_worker_jobs_total", device="cpu/lone") == 1.0
        assert s.sample("node_agent_lone_worker_info", device="cpu/lone", physical_device="cpu",
                        cpu_threads="2") == 1.0
        assert lone.lent_to is None and s.agent.view.status()["slots"]["busy"] == 0
        assert lone.worker.restarts.total() == 0


async def test_the_lone_job_worker_killed_costs_its_one_job_and_comes_back(tmp_path: Path) -> None:
    """A crash of the lone-job worker is any worker's: its job fails ``worker_crashed`` naming it, the job beside
    it on a slot finishes, and the lone-job worker is restarted and lent again."""
    from node_agent.devices import SlotPlan

    plan = SlotPlan(workers=2, threads=1, workers_auto=False, threads_auto=True, worker_bytes=0, lone_threads=2)
    audio = long_audio(4)  # as above: decoding for a second or more
    async with agent_stack(tmp_path, slots=plan, scheduler={"max_attempts": 1},
                           asr={"workers_per_device": 2, "cpu_threads": 0, "split_min_s": None}) as s:
        lone = s.agent.lone
        assert lone is not None
        await eventually(lambda: lone.worker.state.value == "ready"
                         and all(w.state.value == "ready" for w in s.agent.workers.values()), 90, "workers ready")
        victim = await s.submit_json(audio, format="pcm_s16le", sample_rate=16000)
        await eventually(lambda: lone.worker.current_job is not None, 60, "the lone job decoding")
        survivor = await s.submit_json(audio, format="pcm_s16le", sample_rate=16000)
        await eventually(lambda: sum(w.current_job is not None for w in s.agent.workers.values()) == 1, 60,
                         "the second job decoding on a slot")
        pid = lone.worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        lost = await s.wait_job(victim, timeout=60)
        assert lost["state"] == "failed" and lost["error"]["code"] == "worker_crashed", lost
        assert "cpu/lone" in lost["error"]["message"] and "SIGKILL" in lost["error"]["message"], lost
        kept = await s.wait_job(survivor, timeout=180)
        assert kept["state"] == "succeeded", kept
        assert all(w.restarts.total() == 0 for w in s.agent.workers.values())
        assert s.sample("node_agent_worker_restarts_total", device="cpu/lone", reason="crash") == 1.0
        await eventually(lambda: lone.worker.state.value == "ready" and lone.worker.pid != pid, 90,
                         "the lone-job worker restarted")
        again = await s.submit_json(long_audio(1), format="pcm_s16le", sample_rate=16000)
        view = await s.wait_job(again, timeout=120)
        assert view["state"] == "succeeded", view
        assert s.sample("node_agent_lone_worker_jobs_total", device="cpu/lone") == 2.0
