#!/usr/bin/env python3
"""One long recording on a cluster of idle fake slots: the scheduler's side of issue 24's split, timed.

    .venv/bin/python bench/sections_cluster.py                       # 3,600 s of audio, 10 fake nodes x 2 slots,
                                                                     # RTF 0.05; SQLite, then PostgreSQL
    .venv/bin/python bench/sections_cluster.py --stores sqlite --audio-s 600 --nodes 2 --slots 2 --rtf 0.01
    make bench-sections-cluster                                      # the first line (MARKDOWN=FILE: also as
                                                                     # markdown there)

Per store, ``--repeat`` (3) split runs and one one-slot run, each on a fresh scheduler process (``node-agent scheduler``, started and stopped as
bench/scheduler.py does) and a fresh database (SQLite: a file in a temporary state directory; PostgreSQL: a fresh
database of the server bench/scheduler.py's ``Postgres`` starts, fsync on):
- **split** (the ratio is the median run's): ``--nodes`` fake nodes of ``--slots`` slots each (20 in all by default), every slot idle and
  long-polling; one recording of ``--audio-s`` seconds (pcm_s16le zeros: the scheduler never decodes audio) is
  submitted and timed from the submit's first byte to the moment its client's long poll sees it succeeded;
- **one slot**: the same recording on a cluster of one node with one slot: the time the whole file takes on one
  slot, measured the same way (the slot's capacity call answers 0, so it is decoded whole), not assumed.

A fake slot "decodes" a job by sleeping its audio's length x ``--rtf`` (0.05 by default: a GPU's pace on a large
model; a CPU slot is slower, which only makes the split's overheads a smaller share), under a lease it renews as
the agent does. A fake node is the agent less its plugin, and runs the agent's own code for everything the
scheduler sees: ``SchedulerClient`` for every call, one ``LeaseKeeper`` per slot (the lease taken with the
assignment, renewed every TTL/3 while it decodes), and, for a job long enough (``asr.split_min_s``, default 60 s)
that is not itself a section, the parent's side of the split, ``node_agent.sections.SectionSplit``: one capacity
call and ``section_plan.sections_for`` choose n, the audio is cut into n equal sections (no VAD here: the audio is
silence; the real plugin cuts in the longest pause near each equal-length boundary), sections 1..n-1 are posted
as child jobs (their real pcm_s16le bytes) while section 0 decodes on the parent's slot, the children are
followed by ``GET .../sections`` long polls, and the merged result (offsets added, ids continuing) is reported
as the parent's. A child is decoded by whichever slot the scheduler hands it to, the parent's node's included.

Reported per store: both wall times and their ratio (issue 24's target: at most 0.10), the sections made, which
node and slot decoded each, where the split run's time went (upload, assignment, audio fetch, capacity and
posts, section 0's decode, the wait for the last section, the report), and checks: the parent's result holds
every section's segments in time order up to the audio's end, and every job ended once with an accepted result.
A check that fails exits 1; a missed target is reported, not a failure. Defaults are the scheduler's and the
agent's (``scheduler.max_sections_per_job`` and ``asr.split_max_sections`` 32: 20 idle slots give up to 20 sections); ``--max-sections``
raises both bounds to see what more slots would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from node_agent import section_plan  # noqa: E402
from node_agent.config import AsrSettings, LeaseSettings  # noqa: E402
from node_agent.lease import LeaseKeeper  # noqa: E402
from node_agent.metrics import AgentMetrics  # noqa: E402
from node_agent.plugin_messages import ResultMessage  # noqa: E402
from node_agent.scheduler.schemas import (  # noqa: E402
    SECTION_SAMPLE_RATE,
    DeviceSpec,
    Hardware,
    HeartbeatRequest,
    JobAssignment,
    JobState,
    RegisterRequest,
)
from node_agent.scheduler_client import SchedulerClient, SchedulerError  # noqa: E402
from node_agent.sections import SectionSplit  # noqa: E402

from bench import scheduler as sched_bench  # noqa: E402  (its scheduler processes, PostgreSQL server, tables)


log = sched_bench.log

#: Issue 24: one hour of audio on 20 idle slots in at most a tenth of one slot's time.
TARGET_RATIO = 0.10
BYTES_PER_S = SECTION_SAMPLE_RATE * 2  # pcm_s16le mono at 16 kHz
#: The fake decode's segment length (a Whisper window).
SEGMENT_S = 30.0
POLL_WAIT_S = 30.0
DEFAULT_STORES = "sqlite,postgresql"


@dataclass
class Decode:
    """One job as a fake slot ran it (monotonic times)."""

    job_id: str
    parent_id: str | None
    node: int
    resource: str
    audio_s: float
    assigned_t: float
    decode_start_t: float = 0.0
    decode_end_t: float = 0.0
    reported_t: float = 0.0
    sections: int = 1
    #: The parent's steps (split jobs only): capacity answered, last section posted, all sections merged.
    capacity_t: float | None = None
    posted_t: float | None = None
    merged_t: float | None = None


@dataclass
class Cluster:
    """What every fake node shares: the scheduler's URL, the settings, the record of decodes and errors."""

    url: str
    rtf: float
    asr: AsrSettings
    lease: LeaseSettings
    decodes: list[Decode] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def fake_result(job_id: str, audio_s: float, decode_s: float) -> ResultMessage:
    """What the plugin would answer for ``audio_s`` of audio: a segment per ``SEGMENT_S`` window, ids from 1 (as
    faster-whisper numbers them), times relative to the audio's start."""
    segments, at, i = [], 0.0, 1
    while at < audio_s:
        end = min(audio_s, at + SEGMENT_S)
        segments.append({"id": i, "start": round(at, 3), "end": round(end, 3), "text": f" window {i}."})
        at, i = end, i + 1
    return ResultMessage(job_id=job_id, text="".join(s["text"] for s in segments).strip(), language="en",
                         language_probability=1.0, duration_s=audio_s, segments_count=len(segments),
                         timings={"total_s": round(decode_s, 6)}, segments=segments)


class FakeNode:
    """One node of ``slots`` slots (``cpu/0``, ``cpu/1``, ...), each polling, leasing and decoding on its own."""

    def __init__(self, index: int, slots: int, cluster: Cluster) -> None:
        self.index, self.cluster = index, cluster
        self.client = SchedulerClient(cluster.url, None, request_timeout_s=30.0)
        self.resources = [f"cpu/{n}" for n in range(slots)]
        self.keepers = {r: LeaseKeeper(self.client, cluster.lease, None, r) for r in self.resources}
        self.metrics = AgentMetrics(CollectorRegistry())
        self.node_id = ""
        self.heartbeat_s = 5.0
        self.running: set[str] = set()

    async def register(self) -> None:
        reply = await self.client.register(RegisterRequest(
            agent_version="bench", hostname=f"fake-{self.index}", hardware=Hardware(cpu_cores=len(self.resources),
                                                                                 memory_bytes=1 << 30),
            devices=[DeviceSpec(resource=r, device="cpu", model="fake", compute_type="int8") for r in self.resources]))
        self.node_id, self.heartbeat_s = reply.node_id, reply.heartbeat_interval_s
        for keeper in self.keepers.values():
            keeper.set_bounds(reply.lease.min_ttl_s, reply.lease.max_ttl_s)

    async def run(self) -> None:
        """Heartbeats and every slot's poll loop, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.heartbeats())
            for resource in self.resources:
                tasks.create_task(self.slot(resource))

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.client.heartbeat(self.node_id, HeartbeatRequest(
                state="busy" if self.running else "ready", running_jobs=sorted(self.running)))

    async def slot(self, resource: str) -> None:
        loop = asyncio.get_running_loop()
        keeper = self.keepers[resource]
        while True:
            polled = loop.time()
            a = await self.client.next_job(self.node_id, POLL_WAIT_S, resource, keeper.requested_ttl())
            if a is None:
                continue
            self.running.add(a.job_id)
            try:
                await self.job(a, resource, polled)
            except (SchedulerError, AssertionError) as exc:  # any refusal is a finding: the run fails its checks
                self.cluster.errors.append(f"node {self.index} {resource} job {a.job_id}: {type(exc).__name__}: "
                                           f"{exc}")
            finally:
                self.running.discard(a.job_id)

    async def job(self, a: JobAssignment, resource: str, polled: float) -> None:
        loop = asyncio.get_running_loop()
        record = Decode(a.job_id, a.parent_id, self.index, resource, 0.0, time.monotonic())
        self.cluster.decodes.append(record)
        keeper = self.keepers[resource]
        assert a.lease is not None, "the scheduler granted no lease with the assignment (the slot was idle)"
        lease = keeper.adopt(self.node_id, a.job_id, a.lease, polled + (a.poll_held_s or 0.0))
        lost: list[str] = []
        async with keeper.hold(lease, on_lost=lambda exc: lost.append(str(exc)),
                               on_cancelled=lambda exc: lost.append(str(exc))):
            audio = await self.client.fetch_audio(a.audio.url)
            record.audio_s = audio_s = len(audio) / BYTES_PER_S
            split_min_s = self.cluster.asr.split_min_s
            split = None
            if a.parent_id is None and split_min_s and audio_s >= split_min_s:
                split = SectionSplit(self.client, a.job_id, lease, self.cluster.asr, self.metrics,
                                     on_segment=lambda _seg: None, decode_local=self.refused)
                n = await split.sections_for(audio_s)
                record.capacity_t = time.monotonic()
                # Equal sections, cut at the plan's targets: the audio is silence, so the plugin's cut in the
                # longest pause near each target has nothing to choose between.
                edges = [0.0, *section_plan.targets(audio_s, n), audio_s]
                bounds = [(a, b - a) for a, b in zip(edges, edges[1:])]
                split.cut(bounds, 0.0)
                for index, (offset_s, duration_s) in enumerate(bounds[1:], start=1):
                    first, last = round(offset_s * SECTION_SAMPLE_RATE) * 2, round((offset_s + duration_s)
                                                                                   * SECTION_SAMPLE_RATE) * 2
                    split.section(index, offset_s, duration_s, SECTION_SAMPLE_RATE, audio[first:last])
                record.sections = len(bounds)
            own_s = split.bounds[0][1] if split is not None and split.split else audio_s
            record.decode_start_t = time.monotonic()
            started = loop.time()
            await asyncio.sleep(own_s * self.cluster.rtf)
            result = fake_result(a.job_id, own_s, loop.time() - started)
            record.decode_end_t = time.monotonic()
            if split is not None and split.split:
                record.posted_t = time.monotonic()
                try:
                    # Bounded like the agent's follow: the whole file's decode time on one slot, plus a minute.
                    result = await split.finish(result, started, loop.time() + audio_s * self.cluster.rtf + 60.0)
                finally:
                    split.close()
                record.merged_t = time.monotonic()
            assert not lost, f"lease lost while decoding: {lost}"
        ack = await self.client.report_result(a.job_id, {
            "node_id": lease.node_id, "lease_id": lease.lease_id, "attempt": a.attempt, "lease_epoch": lease.epoch,
            "outcome": "succeeded", "result": result.transcript(), "timings": dict(result.timings)})
        assert ack.accepted and not ack.duplicate, f"result not accepted: {ack}"
        keeper.released_by_result(lease)
        record.reported_t = time.monotonic()

    async def refused(self, index: int, audio: bytes, language: str | None = None) -> ResultMessage:
        """A section the scheduler would not take is decoded on the parent's slot (it never is here: counted)."""
        self.cluster.errors.append(f"node {self.index}: section {index} was refused and decoded on the parent's slot")
        audio_s = len(audio) / BYTES_PER_S
        await asyncio.sleep(audio_s * self.cluster.rtf)
        return fake_result(f"local-{index}", audio_s, audio_s * self.cluster.rtf)


async def one_run(url: str, name: str, nodes: int, slots: int, audio_s: float, args: argparse.Namespace,
                  procs: Any) -> dict[str, Any]:
    """Submit one recording to a cluster of ``nodes`` x ``slots`` idle fake slots; its times, the CPU each process
    spent meanwhile (``procs``: bench/scheduler.py's ``Procs``) and its checks."""
    asr = AsrSettings(split_max_sections=max(args.max_sections, 2))
    cluster = Cluster(url, args.rtf, asr, LeaseSettings())
    fakes = [FakeNode(i, slots, cluster) for i in range(nodes)]
    await asyncio.gather(*(f.register() for f in fakes))
    running = [asyncio.create_task(f.run(), name=f"fake-node-{f.index}") for f in fakes]
    client = SchedulerClient(url, None, request_timeout_s=120.0)
    view = None
    try:
        await asyncio.sleep(0.5)  # every slot's first long poll is in
        audio = bytes(round(audio_s * SECTION_SAMPLE_RATE) * 2)
        log(f"{name}: submitting {audio_s:g} s of audio ({len(audio) / 1e6:.1f} MB) to {nodes} x {slots} slots")
        cpu0 = procs.snapshot()
        t0 = time.monotonic()
        job_id = (await client.submit_job(audio, filename="long.pcm", format="pcm_s16le",
                                          sample_rate=SECTION_SAMPLE_RATE)).job_id
        submitted = time.monotonic()
        del audio
        deadline = t0 + audio_s * args.rtf * 3 + 300
        while True:
            # Raced with the nodes: a node that crashed ends the wait at once, not at the poll's end.
            poll = asyncio.ensure_future(client.get_job(job_id, wait_s=POLL_WAIT_S))
            await asyncio.wait([poll, *running], return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                poll.cancel()
                break
            view = poll.result()
            if view.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED) \
                    or time.monotonic() > deadline:
                break
        done = time.monotonic()
        cpu = procs.cores(cpu0, procs.snapshot(), done - t0)
    finally:
        for t in running:
            t.cancel()
        crashed = [repr(getattr(e, "exceptions", [e])[0]) for e in await asyncio.gather(*running, return_exceptions=True)
                   if isinstance(e, BaseException) and not isinstance(e, asyncio.CancelledError)]
        await asyncio.gather(client.close(), *(f.client.close() for f in fakes))
    parent = next((d for d in cluster.decodes if d.job_id == job_id), None)
    children = sorted((d for d in cluster.decodes if d.parent_id == job_id),
                      key=lambda d: next((s.index for s in view.sections if s.job_id == d.job_id), 0))
    problems = list(cluster.errors) + [f"a fake node crashed: {c}" for c in crashed]
    if view is None:
        raise RuntimeError(f"no view of job {job_id}: {problems[:3]}")
    if view.state is not JobState.SUCCEEDED:
        problems.append(f"job {job_id} ended {view.state.value}: {view.error}")
    segments = (view.result or {}).get("segments") or []
    starts = [s["start"] for s in segments]
    if starts != sorted(starts) or not segments or abs(segments[-1]["end"] - audio_s) > 0.01:
        problems.append(f"the merged result is not the whole audio in time order ({len(segments)} segments, "
                        f"last end {segments[-1]['end'] if segments else None})")
    made = len(view.sections)
    if parent is not None and made != parent.sections - 1:
        problems.append(f"the scheduler lists {made} sections, the parent posted {parent.sections - 1}")
    unknown = [d.job_id for d in cluster.decodes if d.job_id != job_id and d.parent_id != job_id]
    if unknown or any(d.reported_t == 0.0 for d in cluster.decodes):
        problems.append(f"jobs that were not this recording's or never reported: {unknown}")
    slots_used = {(d.node, d.resource) for d in cluster.decodes}
    out: dict[str, Any] = {
        "run": name, "nodes": nodes, "slots_per_node": slots, "slots": nodes * slots, "audio_s": audio_s,
        "job_id": job_id, "state": view.state.value, "wall_s": round(done - t0, 3),
        "upload_s": round(submitted - t0, 3), "accepted_to_done_s": round(done - submitted, 3), "sections": 1 + made,
        "jobs_decoded": len(cluster.decodes), "distinct_slots": len(slots_used),
        "distinct_nodes": len({n for n, _ in slots_used}),
        "per_node": {str(n): sum(1 for d in cluster.decodes if d.node == n) for n in range(nodes)},
        "decodes": [asdict(d) for d in [*([parent] if parent else []), *children]],
        "segments": len(segments), "problems": problems, "t0": t0, "done_t": done,
        # Cores each kept busy from submit to done ("cluster": this process, the fake nodes and the client).
        "cores": cpu, "load_at_end": os.getloadavg(),
    }
    if parent is not None:
        # Where the time went, from the submit's first byte (monotonic clock: one process).
        step = lambda t: round(t - t0, 3) if t else None  # noqa: E731
        out["timeline"] = {"submitted": step(submitted), "assigned": step(parent.assigned_t),
                           "capacity": step(parent.capacity_t), "decode_start": step(parent.decode_start_t),
                           "section0_done": step(parent.decode_end_t),
                           "last_child_done": step(max((c.reported_t for c in children), default=0.0)),
                           "merged": step(parent.merged_t), "reported": step(parent.reported_t),
                           "client_saw_done": step(done)}
        out["section0_s"] = round(parent.decode_end_t - parent.decode_start_t, 3)
        # Each child's wait from the moment section 0 began decoding to its own decode's start: the split's
        # dispatch latency (the posts' uploads included).
        out["child_start_after_s"] = [round(c.decode_start_t - parent.decode_start_t, 3) for c in children]
    return out


async def store_runs(args: argparse.Namespace, store: Any, postgres: Any, top: Path) -> dict[str, Any]:
    """The split runs (``--repeat``) and the one-slot run of one store, each on a fresh scheduler and database."""
    out: dict[str, Any] = {"store": store.name, "runs": []}
    env = [f"NODE_AGENT_SCHEDULER__MAX_SECTIONS_PER_JOB={args.max_sections}"]
    plan = [(f"split {i + 1}", args.nodes, args.slots) for i in range(args.repeat)]
    if not args.skip_one_slot:
        plan.append(("one slot", 1, 1))
    for name, nodes, slots in plan:
        tag = f"{store.name}-{name.replace(' ', '-')}"
        store_env = ({sched_bench.STORE_VAR: postgres.database("sections_" + tag.replace("-", "_"))}
                     if store.kind == "postgresql" else {sched_bench.STORE_VAR: store.kind})
        driver = sched_bench.Driver(argparse.Namespace(scheduler_env=env, profile=False), store, store_env,
                                    top / tag)
        driver.start_schedulers()
        try:
            async with aiohttp.ClientSession() as session:
                await driver.wait_schedulers(session)
            procs = sched_bench.Procs([p.pid for p in driver.schedulers], os.getpid(),
                                      postgres.pid() if store.kind == "postgresql" else None)
            procs.groups.pop("driver")  # the client and the fake nodes share this process: "cluster" counts it
            run = await one_run(driver.urls[0], f"{store.name}, {name}", nodes, slots, args.audio_s, args, procs)
            run["where"], run["kind"] = driver.where[0], name.split()[0]
        finally:
            await driver.stop()
        log(f"{store.name}, {name}: {run['wall_s']:.2f} s, {run['sections']} section(s) on {run['distinct_slots']} "
            f"slot(s) of {run['distinct_nodes']} node(s); problems: {run['problems'][:3] or 'none'}")
        out["runs"].append(run)
    splits = [r for r in out["runs"] if r["kind"] == "split"]
    single = next((r for r in out["runs"] if r["kind"] == "one"), None)
    if splits and single:
        for r in splits:
            r["ratio"] = round(r["wall_s"] / single["wall_s"], 4)
            # The same without the upload, which both runs pay alike (the client's transfer, before the job exists).
            r["ratio_accepted"] = round(r["accepted_to_done_s"] / single["accepted_to_done_s"], 4)
        out["ratio"] = statistics.median(r["ratio"] for r in splits)
        out["ratio_accepted"] = statistics.median(r["ratio_accepted"] for r in splits)
    return out


# ------------------------------------------------------------------------------------------- reporting


def report(result: dict[str, Any], command: str) -> str:
    c, m = result["config"], result["machine"]
    md = sched_bench.markdown_table
    lines = [
        f"`{command}` on {m['date']}: {m['cpu']}, {m['usable_cores']} cores; load (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in m['load_at_start'])}. One recording of {c['audio_s']:g} s "
        f"(pcm_s16le, {c['audio_s'] * BYTES_PER_S / 1e6:.0f} MB) submitted to idle fake slots that decode at RTF "
        f"{c['rtf']:g} (a sleep of audio x RTF, under a renewed lease); scheduler.max_sections_per_job "
        f"{c['max_sections']}; every run on a fresh scheduler and database.",
        "",
    ]
    head = ("store", "cluster", "sections", "nodes / slots used", "wall, submit to done", "of which upload",
            "section 0's decode", f"ratio (target <= {TARGET_RATIO:g})", "ratio from the job's acceptance")
    rows = []
    for s in result["stores"]:
        if "error" in s:
            rows.append((s["store"], "FAILED", s["error"].splitlines()[0][:80], "", "", "", "", "", ""))
            continue
        for r in s["runs"]:
            ratio = r.get("ratio")
            verdict = "" if ratio is None else f"{ratio:.3f}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}"
            accepted = "" if ratio is None else f"{r['ratio_accepted']:.3f}"
            rows.append((s["store"], f"{r['nodes']} x {r['slots_per_node']} slots", str(r["sections"]),
                         f"{r['distinct_nodes']} / {r['distinct_slots']}", f"{r['wall_s']:.2f} s",
                         f"{r['upload_s']:.2f} s", f"{r.get('section0_s', float('nan')):.2f} s", verdict, accepted))
    lines += [md(head, rows), ""]
    for s in result["stores"]:
        if s.get("ratio") is not None:
            ratio = s["ratio"]
            lines.append(f"- {s['store']}: median ratio of the split runs {ratio:.3f} (target <= {TARGET_RATIO:g}: "
                         f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); from the job's acceptance "
                         f"{s['ratio_accepted']:.3f}")
    for s in result["stores"]:
        for r in s.get("runs", []):
            if r["sections"] > 1:
                tl = r["timeline"]
                spread = ", ".join(f"{k}: {v}" for k, v in r["per_node"].items())
                starts = r["child_start_after_s"]
                lines.append(
                    f"- {r['run']}: jobs per node {{{spread}}}; after the submit (s): accepted {tl['submitted']}, "
                    f"assigned {tl['assigned']}, capacity answered {tl['capacity']}, section 0 decoded "
                    f"{tl['decode_start']}-{tl['section0_done']}, last section reported {tl['last_child_done']}, "
                    f"merged {tl['merged']}, parent reported {tl['reported']}, client saw it done "
                    f"{tl['client_saw_done']}; children began decoding {min(starts):.2f}-{max(starts):.2f} s after "
                    f"section 0 did; cores busy meanwhile: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cores"].items()
                                                                       if k != "scheduler_system"))
            if r["problems"]:
                lines.append(f"- {r['run']}: {len(r['problems'])} problem(s): " + "; ".join(r["problems"][:5]))
    return "\n".join(lines) + "\n"


def failed(result: dict[str, Any]) -> list[str]:
    return [s["store"] for s in result["stores"]
            if "error" in s or any(r["problems"] for r in s["runs"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default=DEFAULT_STORES, help=f"sqlite and/or postgresql (default {DEFAULT_STORES})")
    parser.add_argument("--audio-s", type=float, default=3600.0, help="the recording's length (default 3600)")
    parser.add_argument("--nodes", type=int, default=10, help="fake nodes of the split run (default 10)")
    parser.add_argument("--slots", type=int, default=2, help="slots per fake node (default 2)")
    parser.add_argument("--rtf", type=float, default=0.05, help="a fake decode lasts audio x this (default 0.05)")
    parser.add_argument("--max-sections", type=int, default=32,
                        help="scheduler.max_sections_per_job and asr.split_max_sections (default 32, the defaults)")
    parser.add_argument("--repeat", type=int, default=3, help="split runs per store (default 3; the ratio is their "
                        "median's: on a shared machine the bytes' share of the time varies from run to run)")
    parser.add_argument("--skip-one-slot", action="store_true", help="leave out the one-slot run (no ratio)")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--markdown", type=Path, help="write the table and notes as markdown here")
    parser.add_argument("--workdir", type=Path, help="keep the schedulers' logs here (default: a temporary "
                        "directory, removed after a run whose checks pass)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        stores = [s for s in sched_bench.parse_stores(args.stores)]
    except ValueError as exc:
        parser.error(f"--stores: {exc}")
    if any(s.kind not in ("sqlite", "postgresql") or s.replicas != 1 for s in stores):
        parser.error("--stores: sqlite and/or postgresql (one scheduler process each)")
    if not 2 <= args.max_sections <= 64 or args.repeat < 1 or args.nodes < 1 or args.slots < 1 or args.rtf <= 0 or args.audio_s <= 0:
        parser.error("--max-sections 2..64; --repeat, --nodes, --slots, --rtf and --audio-s above 0")
    if any(s.kind == "postgresql" for s in stores) and not sched_bench.pg_module().available():
        parser.error("--stores: PostgreSQL's server binaries (initdb, pg_ctl) are not installed; leave postgresql out")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="node-agent-bench-sections-", dir=args.workdir))
    result: dict[str, Any] = {"machine": sched_bench.machine(), "config": {
        "stores": args.stores, "audio_s": args.audio_s, "nodes": args.nodes, "slots": args.slots, "rtf": args.rtf,
        "max_sections": args.max_sections, "repeat": args.repeat}, "stores": [], "logs": str(top)}
    postgres = sched_bench.Postgres()
    try:
        for store in stores:
            try:
                result["stores"].append(asyncio.run(store_runs(args, store, postgres, top)))
            except Exception as exc:  # one store's failure must not hide the other's numbers
                log(f"{store.name}: FAILED: {type(exc).__name__}: {exc}")
                result["stores"].append({"store": store.name, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        postgres.close()
    command = " ".join(["bench/sections_cluster.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(result, command)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    bad = failed(result)
    if bad:
        log(f"FAILED: {', '.join(bad)}; logs in {top}")
        return 1
    if args.workdir is None:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
