"""The composition root: builds the node's parts, wires them together, and runs them (start, drain, stop).

The pipeline it wires, data flowing one way::

    Registration (registration.py): register once the workers settle (ready, fatal or worker.start_timeout_s),
        heartbeat (the state LocalNodeView gives) ──> NodeIdentity; the lease TTL range ──> each LeaseKeeper
    JobLoop (job_loop.py), one per slot (one worker of a device): poll ──> JobRunner (job_runner.py): the lease
        (granted with the assignment, else asked for: LeaseKeeper, lease.py), renewed from then on -> the audio,
        fetched under it -> Worker (supervisor.py) -> plugin process, segments posted as they come -> result
        report (accepted, it releases the lease on the scheduler; otherwise LeaseKeeper releases it)
        ──> JobOutcome, JobLedger; a poll answered "unknown node" ──> Registration registers again
    LocalNodeView (node_view.py) <── read by the HTTP face (http_api.py, compat.py)

Nothing here decides anything about a job; every retry goes through ``retry.retrying`` with its policy from
``retry.RetryPolicies`` (a lease renewal's is made from its TTL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import psutil

from . import __version__
from .scheduler_client import SchedulerClient
from .config import Settings, secret
from .devices import KNOWN_MODEL_BYTES, UNKNOWN_MODEL_BYTES, SlotPlan, choose_device, choose_slots, resources_for
from .errors import ConfigError, JobShutdown
from .job_loop import JobLoop
from .job_runner import JobLedger, JobRunner
from .lease import LeaseKeeper
from .lone_worker import LONE_RESOURCE, LoneWorker
from .metrics import AgentMetrics, MetricsObserver
from .model_resolution import resolve_model
from .node_view import LocalNodeView
from .registration import NodeIdentity, Registration
from .retry import RetryPolicies
from .statedir import StateDir
from .supervisor import Worker, worker_spec

log = logging.getLogger("node_agent.agent")


async def probe_node(timeout_s: float = 60.0) -> dict[str, Any]:
    """Ask a throwaway plugin process what this node can run (ctranslate2 never loads in the agent)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "plugins.asr", "--probe",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise ConfigError(f"device probe did not answer within {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise ConfigError(f"device probe failed ({proc.returncode}): {err.decode(errors='replace')[-300:]}")
    return json.loads(out)


#: A registration carries at most this many devices (``RegisterRequest.devices``): one per slot.
MAX_SLOTS = 64


def model_bytes(model: str) -> int:
    """The model's size: its directory on disk, else faster-whisper's hub size for the name, else the largest."""
    path = Path(resolve_model(model))
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return KNOWN_MODEL_BYTES.get(model, UNKNOWN_MODEL_BYTES)


def plan_slots(settings: Settings, device: str, facts: dict[str, Any]) -> SlotPlan:
    """The slot split for this machine (``devices.choose_slots`` on its cores, memory and model); ConfigError
    with one line when the workers cannot fit."""
    asr = settings.asr
    indexes = asr.device_index if device == "cuda" else [0]
    gpu_memory = [int(g.get("memory_bytes") or 0) for g in facts.get("gpus", []) if g.get("index") in indexes]
    plan = choose_slots(device, asr.workers_requested, asr.cpu_threads, len(os.sched_getaffinity(0)),
                        psutil.virtual_memory().available, model_bytes(asr.model), devices=len(indexes),
                        compute_type=asr.compute_type,
                        gpu_memory_bytes=min(gpu_memory) if gpu_memory and all(gpu_memory) else None)
    if plan.workers * len(indexes) > MAX_SLOTS:
        raise ConfigError(f"asr.workers_per_device = {plan.workers} on {len(indexes)} devices is "
                          f"{plan.workers * len(indexes)} slots, more than the {MAX_SLOTS} a node may register")
    return plan


async def slots_here(settings: Settings) -> tuple[dict[str, Any], SlotPlan]:
    """This machine's facts (the device probe) and the slot split ``settings`` gives on it; ConfigError (one
    line) when its workers cannot fit. ``node-agent run`` and ``check-config`` both ask this."""
    facts = await probe_node()
    device = choose_device(settings.asr.device.value, int(facts.get("cuda_device_count", 0)))
    return facts, plan_slots(settings, device, facts)


class Agent:
    """One node: builds its parts from the settings and runs them. Parts are public for wiring and tests."""

    def __init__(self, settings: Settings, scheduler_url: str | None = None, *, metrics: AgentMetrics | None = None,
                 facts: dict[str, Any] | None = None, state: StateDir | None = None,
                 policies: RetryPolicies | None = None, worker_command: list[str] | None = None,
                 slots: SlotPlan | None = None) -> None:
        # worker_command: the plugin's argv (default ``python -m plugins.asr``); tests pass a stand-in plugin.
        # slots: the split run_agent planned (and logged); planned here from this machine when not given.
        self.settings = settings
        self.state = state or StateDir(settings.node.state_dir)
        self.metrics = metrics or AgentMetrics(version=__version__)
        self.facts = facts or {"cuda_device_count": 0, "gpus": [], "compute_types": {}}
        self.policies = policies or RetryPolicies()
        self.hostname = settings.node.name or socket.gethostname()
        self.scheduler_url = scheduler_url or settings.scheduler.url
        self.draining = False
        token = secret(settings.scheduler.token)
        self.client = SchedulerClient(self.scheduler_url, token, settings.scheduler.request_timeout_s, self.metrics)
        # /utterance submits as a client: with per-role tokens a node's token may not, so it may have its own.
        utterance = settings.compat.scheduler_token
        self.utterance_client = self.client if utterance is None else SchedulerClient(
            self.scheduler_url, utterance.get_secret_value(), settings.scheduler.request_timeout_s, self.metrics)
        self.identity = NodeIdentity()
        self.ledger = JobLedger()

        self.device = choose_device(settings.asr.device.value, int(self.facts.get("cuda_device_count", 0)))
        observer = MetricsObserver(self.metrics)
        self.workers: dict[str, Worker] = {}
        self.keepers: dict[str, LeaseKeeper] = {}
        self.slot_plan = slots or plan_slots(settings, self.device, self.facts)
        # One Worker, LeaseKeeper and (below) JobLoop per slot: each slot leases its own resource.
        for slot in resources_for(self.device, settings.asr.device_index, self.slot_plan.workers):
            resource = slot.resource
            spec = worker_spec(settings.asr, self.device, slot.device_index, log_level=settings.log.level,
                               cpu_threads=self.slot_plan.threads)
            self.workers[resource] = Worker(resource, spec, settings.worker, settings.asr.timeout, observer,
                                            command=worker_command or settings.worker.command)
            self.keepers[resource] = LeaseKeeper(self.client, settings.lease, self.metrics, resource, self.policies)
            self.metrics.declare_device(resource, settings.asr.model)
            self.metrics.declare_slot(resource, slot.device, self.slot_plan.threads, self.slot_plan.workers_auto)
        # A CPU device's lone-job worker (every core as threads), lent to a job that finds the other slots idle.
        self.lone: LoneWorker | None = None
        if self.slot_plan.lone_threads:
            spec = worker_spec(settings.asr, self.device, 0, log_level=settings.log.level,
                               cpu_threads=self.slot_plan.lone_threads)
            self.lone = LoneWorker(Worker(LONE_RESOURCE, spec, settings.worker, settings.asr.timeout, observer,
                                          command=worker_command or settings.worker.command))
            self.metrics.declare_device(LONE_RESOURCE, settings.asr.model)
            self.metrics.lone_jobs.labels(LONE_RESOURCE)
            self.metrics.lone_info.labels(LONE_RESOURCE, "cpu", str(self.slot_plan.lone_threads)).set(1)

        self.view = LocalNodeView(workers=self.workers, lone=self.lone, identity=self.identity, ledger=self.ledger,
                                  metrics=self.metrics, model=settings.asr.model, scheduler_url=self.scheduler_url,
                                  hostname=self.hostname, is_draining=lambda: self.draining,
                                  slot_plan=self.slot_plan, scheduler_in_use=lambda: self.client.base_url)
        self.registration = Registration(
            self.client, self.identity, workers=self.workers, asr=settings.asr, facts=self.facts,
            hostname=self.hostname, metrics=self.metrics, heartbeat_state=self.view.heartbeat_state,
            state=self.state, policies=self.policies, on_lease_bounds=self._set_lease_bounds,
            labels=settings.node.labels)
        self.loops: dict[str, JobLoop] = {}
        for resource, worker in self.workers.items():
            runner = JobRunner(self.client, self.keepers[resource], worker, self.identity, metrics=self.metrics,
                               policies=self.policies, ledger=self.ledger, lone=self.lone)
            self.loops[resource] = JobLoop(self.client, worker, runner, self.identity, metrics=self.metrics,
                                           reregister=self.registration.reregister, policies=self.policies)
        self._tasks: list[asyncio.Task[Any]] = []
        self._poll_tasks: list[asyncio.Task[Any]] = []

    def _set_lease_bounds(self, min_ttl_s: float, max_ttl_s: float) -> None:
        for keeper in self.keepers.values():
            keeper.set_bounds(min_ttl_s, max_ttl_s)

    # ----- start and stop ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start workers and the background loops; returns at once."""
        self.state.lock()  # before anything starts: a second agent on this directory stops here
        for worker in self.workers.values():
            await worker.start()
        if self.lone is not None:
            await self.lone.worker.start()
        self.registration.restore()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._register_when_settled(), name="registration"))
        self._tasks.append(loop.create_task(self.registration.run_heartbeats(), name="heartbeat"))
        for resource, job_loop in self.loops.items():
            self._poll_tasks.append(loop.create_task(job_loop.run(), name=f"jobs-{resource}"))

    async def _register_when_settled(self) -> None:
        """Register once each worker is ready or fatal, so the scheduler learns real compute types."""
        try:
            await asyncio.wait_for(asyncio.gather(*(w.wait_ready() for w in self.workers.values())),
                                   self.settings.worker.start_timeout_s)
        except asyncio.TimeoutError:
            pass
        await self.registration.run()

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs, let running ones finish within ``grace_s``, then stop them as ``shutdown``."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: no new jobs; %d running, grace %.0f s", len(self.ledger.running), grace_s)
        for task in self._poll_tasks:
            task.cancel()  # jobs run in their own tasks; only the polling stops
        await self.registration.heartbeat()
        jobs = {loop.job: loop for loop in self.loops.values() if loop.job is not None and not loop.job.done()}
        if jobs:
            _, pending = await asyncio.wait(set(jobs), timeout=grace_s)
            if pending:
                log.warning("grace period over: stopping %d job(s) as shutdown", len(pending))
                for task in pending:
                    jobs[task].runner.decoding_on().abort(JobShutdown(
                        f"the agent is shutting down; job not finished within shutdown.grace_s = {grace_s:g} s"))
                await asyncio.wait(pending, timeout=30)
        # Tell the scheduler the node is idle and draining, so operators do not see ghost jobs.
        await self.registration.heartbeat()

    async def stop(self) -> None:
        await asyncio.gather(*(loop.runner.settle(5.0) for loop in self.loops.values()))
        workers = [*self.workers.values(), *([self.lone.worker] if self.lone is not None else [])]
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        for task in self._tasks + self._poll_tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._poll_tasks, return_exceptions=True)
        await self.client.close()
        if self.utterance_client is not self.client:
            await self.utterance_client.close()
        self.metrics.registered.set(0)
        self.state.unlock()


async def run_agent(settings: Settings) -> int:
    """``node-agent run``: everything until SIGTERM/SIGINT, then drain and exit 0."""
    from prometheus_client import disable_created_metrics

    from .diagnostics import MemoryReport
    from .http_api import start_http

    # *_created series double every counter's cardinality and no rule or dashboard reads them.
    disable_created_metrics()
    # First, so a second agent on the same node.state_dir exits at once instead of after the node probe.
    state = StateDir(settings.node.state_dir)
    state.lock()
    # Before the embedded scheduler starts: workers that cannot fit in memory end the start in one line.
    facts, slots = await slots_here(settings)
    embedded = None
    url = settings.scheduler.url
    if url == "embedded":
        from .scheduler.server import start_scheduler

        # A port in use (ListenError) or an unusable store (StoreError): one line in cli.main.
        embedded = await start_scheduler(settings.scheduler, state_dir=settings.node.state_dir)
        url = embedded.url
    agent = Agent(settings, url, facts=facts, state=state, slots=slots)
    if embedded is not None:
        agent.view.scheduler_store = embedded.store.where  # shown by /status; the password is never in it
    try:
        http = await start_http(agent.view, agent.utterance_client, settings)
    except BaseException:
        if embedded is not None:
            await embedded.stop()
        raise
    # Logged once both ports are bound, so a port in use ends in its one error line and nothing more.
    if embedded is not None:
        log.info("embedded scheduler listening on %s (store: %s)", url, embedded.store.where)
    log.info("agent endpoints on %s (/metrics /healthz /readyz /status)", http.url)
    log.info("slots: %s", slots.describe())

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: draining (grace %.0f s)", signal.Signals(signum).name, settings.shutdown.grace_s)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGUSR1, MemoryReport())
    await agent.start()
    await stop.wait()
    await agent.drain(settings.shutdown.grace_s)
    await agent.stop()
    await http.stop()
    if embedded is not None:
        await embedded.stop()
    log.info("stopped")
    return 0
