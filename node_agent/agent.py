"""The composition root: wires scheduler client, job loops, lease keepers and workers, and runs them.

Data flows one way: scheduler client -> job loop -> lease keeper -> worker supervisor -> plugin process;
results come back as return values or typed errors and are reported once, under ``asyncio.shield``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import __version__
from .client import (
    BadRequest,
    Rejected,
    SchedulerClient,
    SchedulerError,
    SchedulerUnavailable,
    UnknownNode,
    backoff_delays,
)
from .config import Settings, host_port
from .devices import choose_device, resources_for
from .errors import ConfigError, JobError, JobShutdown, LeaseLost, WorkerUnavailable
from .lease import Lease, LeaseKeeper, LeaseUnavailable
from .metrics import JOB_OUTCOMES, AgentMetrics, MetricsObserver, job_outcome
from .scheduler.schemas import JobAssignment
from .statedir import StateDir
from .supervisor import JobRequest, JobResult, Worker, WorkerState, worker_spec

log = logging.getLogger("node_agent.agent")

#: Long-poll wait per request; the scheduler caps it too.
POLL_WAIT_S = 20.0
#: How long a final result report is retried before the job is left to the scheduler's lease expiry.
REPORT_RETRY_S = 300.0
#: How long segment events still undelivered at the end of a job are retried before the result is reported.
EVENTS_FLUSH_S = 4.0
RECENT_FAILURES = 10
LEASE_LOSS_WINDOW_S = 600.0


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


@dataclass
class RunningJob:
    """What status shows about a job in flight."""

    assignment: JobAssignment
    resource: str
    received: float
    lease: Lease | None = None
    worker: Worker | None = None

    def view(self, now: float) -> dict[str, Any]:
        current = (self.worker.current_job or {}) if self.worker else {}
        lease = self.lease
        last_seg = current.get("last_segment")
        return {
            "job_id": self.assignment.job_id,
            "attempt": self.assignment.attempt,
            "resource": self.resource,
            "audio_s": current.get("audio_s"),
            "elapsed_s": round(now - self.received, 2),
            "segments": current.get("segments", 0),
            "since_last_segment_s": round(time.monotonic() - last_seg, 2) if last_seg else None,
            "lease_id": lease.lease_id if lease else None,
            "epoch": lease.epoch if lease else None,
            "since_last_renewal_s": round(now - lease.renewed_at, 2) if lease else None,
            "lease_margin_s": round(lease.last_margin_s, 3) if lease and lease.last_margin_s is not None else None,
            "renewals": lease.renewals if lease else 0,
        }


@dataclass
class NodeIdentity:
    node_id: str | None = None
    registered: bool = False
    heartbeat_interval_s: float = 5.0
    last_heartbeat_ok: float | None = None  # monotonic
    registered_event: asyncio.Event = field(default_factory=asyncio.Event)


class Agent:
    """One node: its workers, its place in the cluster, its job loops."""

    def __init__(self, settings: Settings, metrics: AgentMetrics | None = None,
                 facts: dict[str, Any] | None = None, state: StateDir | None = None) -> None:
        self.settings = settings
        self.state = state or StateDir(settings.node.state_dir)
        self.metrics = metrics or AgentMetrics(version=__version__)
        self.facts = facts or {"cuda_device_count": 0, "gpus": [], "compute_types": {}}
        self.hostname = settings.node.name or socket.gethostname()
        self.identity = NodeIdentity()
        self.workers: dict[str, Worker] = {}
        self.keepers: dict[str, LeaseKeeper] = {}
        self.running: dict[str, RunningJob] = {}
        self.totals: Counter[str] = Counter()
        self.recent_failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self.lease_losses: deque[float] = deque(maxlen=100)
        self.draining = False
        self.started = time.monotonic()
        self.scheduler_url = settings.scheduler.url
        self.client: SchedulerClient | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._poll_tasks: list[asyncio.Task[Any]] = []
        self._job_tasks: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._reregister = asyncio.Event()
        self._outages: dict[str, str] = {}

        device = choose_device(settings.asr.device.value, int(self.facts.get("cuda_device_count", 0)))
        self.device = device
        observer = MetricsObserver(self.metrics)
        for index, resource in zip(settings.asr.device_index, resources_for(device, settings.asr.device_index)):
            spec = worker_spec(settings.asr, device, index, log_level=settings.log.level)
            self.workers[resource] = Worker(resource, spec, settings.worker, settings.asr.timeout, observer)
            self.metrics.declare_device(resource, settings.asr.model)

    # ----- start and stop ----------------------------------------------------------------------------------------

    async def start(self, scheduler_url: str) -> None:
        """Start workers and the background loops; returns at once."""
        self.scheduler_url = scheduler_url
        self.state.lock()  # before anything starts: a second agent on this directory stops here
        token = self.settings.scheduler.token.get_secret_value() if self.settings.scheduler.token else None
        self.client = SchedulerClient(scheduler_url, token, self.settings.scheduler.request_timeout_s, self.metrics)
        for resource, worker in self.workers.items():
            self.keepers[resource] = LeaseKeeper(self.client, self.settings.lease, self.metrics, resource)
            await worker.start()
        self.identity.node_id = self.state.load_node_id()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._registration_loop(), name="registration"))
        self._tasks.append(loop.create_task(self._heartbeat_loop(), name="heartbeat"))
        for resource in self.workers:
            self._poll_tasks.append(loop.create_task(self._job_loop(resource), name=f"jobs-{resource}"))

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs, let running ones finish within ``grace_s``, then stop them as ``shutdown``."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: no new jobs; %d running, grace %.0f s", len(self.running), grace_s)
        for task in self._poll_tasks:
            task.cancel()  # jobs run in their own tasks; only the polling stops
        await self._send_heartbeat()
        if self._job_tasks:
            _, pending = await asyncio.wait(self._job_tasks, timeout=grace_s)
            if pending:
                log.warning("grace period over: stopping %d job(s) as shutdown", len(pending))
                for resource, running in list(self.running.items()):
                    self.workers[running.resource].abort(JobShutdown(
                        f"the agent is shutting down; job not finished within shutdown.grace_s = {grace_s:g} s"))
                await asyncio.wait(pending, timeout=30)
        # Tell the scheduler the node is idle and draining, so operators do not see ghost jobs.
        await self._send_heartbeat()

    def _own(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task referenced until done; ``stop`` waits for the stragglers."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        for task in self._tasks + self._poll_tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._poll_tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        self.metrics.registered.set(0)
        self.state.unlock()

    # ----- registration and heartbeats ---------------------------------------------------------------------------

    def registration_body(self) -> dict[str, Any]:
        devices = []
        for resource, worker in self.workers.items():
            info = worker.info
            devices.append({
                "resource": resource,
                "plugin": "asr",
                "model": self.settings.asr.model,
                "compute_type": info.get("compute_type") or self.settings.asr.compute_type,
                "languages": info.get("languages", ["en"] if self.settings.asr.model.endswith(".en") else None),
            })
        return {
            "node_id": self.identity.node_id,
            "agent_version": __version__,
            "hostname": self.hostname,
            "hardware": {
                "cpu_cores": psutil.cpu_count() or 0,
                "memory_bytes": psutil.virtual_memory().total,
                "gpus": self.facts.get("gpus", []),
            },
            "devices": devices,
        }

    async def _wait_workers_settled(self) -> None:
        """Register once each worker is ready or fatal, so the scheduler learns real compute types."""
        limit = self.settings.worker.start_timeout_s
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(w.wait_ready() for w in self.workers.values())), limit)

    async def _registration_loop(self) -> None:
        assert self.client is not None
        await self._wait_workers_settled()
        while True:
            delays = backoff_delays(0.5, 30.0)
            last_reason = None
            while True:
                try:
                    reply = await self.client.register(self.registration_body())
                    break
                except SchedulerError as exc:
                    reason = str(exc)
                    # One log line per distinct failure, not one per retry.
                    if reason != last_reason:
                        log.warning("registration failed, retrying with backoff: %s", reason)
                        last_reason = reason
                    await asyncio.sleep(next(delays))
            ident = self.identity
            ident.node_id = reply.node_id
            ident.heartbeat_interval_s = reply.heartbeat_interval_s
            ident.registered = True
            ident.last_heartbeat_ok = asyncio.get_running_loop().time()
            ident.registered_event.set()
            self.state.save_node_id(reply.node_id)
            self.metrics.registered.set(1)
            self.metrics.heartbeat_last_success.set(time.time())
            self.metrics.set_node(reply.node_id, self.hostname, [g.get("uuid") for g in self.facts.get("gpus", [])])
            log.info("registered with %s as %s (heartbeat every %.0f s)", self.scheduler_url, reply.node_id,
                     reply.heartbeat_interval_s)
            self._reregister.clear()
            await self._reregister.wait()
            ident.registered = False
            ident.registered_event.clear()
            self.metrics.registered.set(0)

    def node_state(self) -> str:
        if self.draining:
            return "draining"
        states = [w.state for w in self.workers.values()]
        if all(s is WorkerState.fatal for s in states):
            return "degraded"
        if any(s is WorkerState.busy for s in states) or self.running:
            return "busy"
        if not any(s is WorkerState.ready for s in states):
            return "degraded"
        return "ready"

    async def _send_heartbeat(self) -> None:
        ident = self.identity
        if not ident.registered or ident.node_id is None or self.client is None:
            return
        mem = psutil.virtual_memory()
        body = {"state": self.node_state(), "running_jobs": list(self.running),
                "cpu_percent": psutil.cpu_percent(interval=None), "memory_used_bytes": mem.total - mem.available,
                "memory_total_bytes": mem.total}
        try:
            await self.client.heartbeat(ident.node_id, body)
        except UnknownNode:
            log.warning("scheduler does not know node %s any more: registering again", ident.node_id)
            self._reregister.set()
            return
        except SchedulerError as exc:
            self._log_outage("heartbeat", exc)
            return
        self._log_recovery("heartbeat")
        ident.last_heartbeat_ok = asyncio.get_running_loop().time()
        self.metrics.heartbeat_last_success.set(time.time())

    def _log_outage(self, what: str, exc: Exception) -> None:
        """One line when a repeating call starts failing or fails differently, not one per retry."""
        reason = str(exc)
        if self._outages.get(what) != reason:
            log.warning("%s failed (retrying with backoff): %s", what, reason)
            self._outages[what] = reason

    def _log_recovery(self, what: str) -> None:
        if self._outages.pop(what, None) is not None:
            log.info("%s works again", what)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.identity.registered_event.wait()
            await asyncio.sleep(self.identity.heartbeat_interval_s)
            await self._send_heartbeat()

    # ----- jobs --------------------------------------------------------------------------------------------------

    async def _job_loop(self, resource: str) -> None:
        """Long-poll for jobs while this device's worker can take them; one job at a time."""
        assert self.client is not None
        worker = self.workers[resource]
        delays = backoff_delays(0.5, 10.0)
        while not self.draining:
            await self.identity.registered_event.wait()
            if worker.state is WorkerState.fatal:
                log.error("worker %s is fatal (%s): not taking jobs on it until it is retried", resource,
                          worker.last_error)
                await worker.wait_not_fatal()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await worker.wait_ready(5.0)
            if worker.state is not WorkerState.ready:
                continue
            node_id = self.identity.node_id
            assert node_id is not None
            try:
                assignment = await self.client.next_job(node_id, POLL_WAIT_S, resource)
            except UnknownNode:
                self._reregister.set()
                await asyncio.sleep(0.2)
                continue
            except SchedulerError as exc:
                self._log_outage(f"polling for jobs on {resource}", exc)
                await asyncio.sleep(next(delays))
                continue
            self._log_recovery(f"polling for jobs on {resource}")
            delays = backoff_delays(0.5, 10.0)
            if assignment is None:
                continue
            # The job runs in its own task so that cancelling the poll (drain) never cancels a job.
            task = asyncio.get_running_loop().create_task(self._run_job(resource, assignment))
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)
            await asyncio.shield(task)

    async def _run_job(self, resource: str, assignment: JobAssignment) -> None:
        assert self.client is not None
        loop = asyncio.get_running_loop()
        job_id = assignment.job_id
        running = RunningJob(assignment, resource, loop.time(), worker=self.workers[resource])
        self.running[job_id] = running
        self.metrics.jobs_in_progress.inc()
        self.metrics.job_queue_wait.observe(max(0.0, assignment.queued_s))
        log.info("job %s attempt %d received on %s", job_id, assignment.attempt, resource)
        try:
            await self._execute(running)
        except Exception:
            log.exception("job %s: unexpected error", job_id)
        finally:
            self.running.pop(job_id, None)
            self.metrics.jobs_in_progress.dec()

    async def _execute(self, running: RunningJob) -> None:
        assert self.client is not None
        client = self.client
        loop = asyncio.get_running_loop()
        a = running.assignment
        worker = self.workers[running.resource]
        keeper = self.keepers[running.resource]
        deadline = running.received + a.deadline_s if a.deadline_s else None
        try:
            audio = await self._fetch_audio(a)
        except SchedulerError as exc:
            # Without a lease we cannot report; the scheduler re-queues the assignment on its own.
            log.error("job %s: could not fetch audio, leaving it to the scheduler: %s", a.job_id, exc)
            return
        try:
            lease = await keeper.acquire(self.identity.node_id or "", a.job_id)
        except LeaseUnavailable as exc:
            log.error("job %s: %s", a.job_id, exc)
            return
        running.lease = lease

        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        sender = loop.create_task(self._send_events(a.job_id, a.attempt, lease.epoch, events))
        result: JobResult | None = None
        error: JobError | None = None
        try:
            async with keeper.hold(lease, on_lost=worker.abort):
                result = await worker.run_job(
                    JobRequest(job_id=a.job_id, audio=audio, format=a.audio.format,
                               sample_rate=a.audio.sample_rate, language=a.language, options=a.options,
                               deadline=deadline),
                    on_segment=events.put_nowait)
        except JobError as exc:
            error = exc
        finally:
            events.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                # A little longer than the sender's own flush budget: it normally ends by itself.
                await asyncio.wait_for(asyncio.shield(sender), EVENTS_FLUSH_S + 1.0)
        if isinstance(error, LeaseLost):
            self.lease_losses.append(loop.time())
        # The report must survive cancellation (shutdown): shield it, and await it to the end.
        report = loop.create_task(self._report(running, lease, result, error))
        try:
            await asyncio.shield(report)
        except asyncio.CancelledError:
            await report
            raise
        finally:
            # The job is over once reported; releasing is housekeeping (the scheduler already dropped the lease
            # when it accepted the result) and may retry through a partition, so it must not hold up the node.
            self._own(loop.create_task(keeper.release(lease), name=f"release-{lease.lease_id}"))

    async def _fetch_audio(self, a: JobAssignment) -> bytes:
        assert self.client is not None
        delays = backoff_delays(0.2, 2.0)
        attempts = 6
        for attempt in range(1, attempts + 1):
            try:
                data = await self.client.fetch_audio(a.audio.url)
                # A proxy error page or a cut connection must not reach the decoder as "audio".
                if len(data) != a.audio.bytes:
                    raise SchedulerUnavailable(
                        f"audio: got {len(data)} bytes, the assignment announced {a.audio.bytes}")
                return data
            except SchedulerUnavailable as exc:
                if attempt == attempts:
                    raise
                log.warning("job %s: audio fetch failed (%s); retrying", a.job_id, exc)
                await asyncio.sleep(next(delays))
        raise AssertionError("unreachable")

    async def _send_events(self, job_id: str, attempt: int, epoch: int,
                           queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Forward segment events in order, batching what piled up. Never blocks the decode.

        A batch that could not be delivered is carried into the next post (the scheduler replaces segments by
        id, so a resend is harmless). After the last segment, what is still undelivered is retried with backoff
        for at most ``EVENTS_FLUSH_S``: the result waits for that flush (clients see segments before the
        transcript), so a blip at the very end of a job costs no events, and a dead scheduler costs seconds.
        """
        assert self.client is not None
        loop = asyncio.get_running_loop()
        pending: list[dict[str, Any]] = []
        done = False
        while not done:
            item = await queue.get()
            items = [item]
            while not queue.empty():
                items.append(queue.get_nowait())
            done = items[-1] is None
            pending.extend(e for e in items if e is not None)
            if not pending:
                continue
            try:
                await self.client.post_events(job_id, attempt, epoch, pending)
                pending = []
            except Rejected as exc:
                log.warning("job %s: segment events rejected (%s); no more will be sent", job_id, exc)
                return
            except SchedulerError as exc:
                log.warning("job %s: %d segment event(s) not delivered yet: %s", job_id, len(pending), exc)
        if not pending:
            return
        flush_by = loop.time() + EVENTS_FLUSH_S
        delays = backoff_delays(0.1, 0.5)  # several tries fit the budget even if one of them hangs
        while (wait := min(next(delays), flush_by - loop.time())) > 0:
            await asyncio.sleep(wait)
            try:
                await asyncio.wait_for(self.client.post_events(job_id, attempt, epoch, pending),
                                       max(0.1, flush_by - loop.time()))
                return
            except Rejected as exc:
                log.warning("job %s: segment events rejected (%s); no more will be sent", job_id, exc)
                return
            except (SchedulerError, asyncio.TimeoutError) as exc:
                log.warning("job %s: %d segment event(s) not delivered yet: %s", job_id, len(pending),
                            exc or "timed out")
        log.warning("job %s: %d segment event(s) never delivered; the result carries every segment",
                    job_id, len(pending))

    async def _report(self, running: RunningJob, lease: Lease, result: JobResult | None,
                      error: JobError | None) -> None:
        assert self.client is not None
        loop = asyncio.get_running_loop()
        a = running.assignment
        body: dict[str, Any] = {
            "node_id": self.identity.node_id,
            "attempt": a.attempt,
            "lease_epoch": lease.epoch,
            "outcome": "succeeded" if result is not None else "failed",
            "result": result.to_dict() if result is not None else None,
            "error": error.to_dict() if error is not None else None,
            "timings": {**(result.timings if result else {}),
                        "node_s": round(loop.time() - running.received, 4)},
        }
        code = None if result is not None else (error.code if error else "failed")
        give_up = loop.time() + REPORT_RETRY_S
        delays = backoff_delays(0.2, 10.0)
        accepted = False
        while True:
            try:
                ack = await self.client.report_result(a.job_id, body)
                accepted = True
                log.info("job %s attempt %d %s in %.2f s (result accepted%s)", a.job_id, a.attempt,
                         job_outcome(code), loop.time() - running.received,
                         ", requeued" if ack.requeued else "")
                break
            except (Rejected, BadRequest) as exc:
                log.warning("job %s attempt %d: result rejected by the scheduler: %s", a.job_id, a.attempt, exc)
                break
            except SchedulerError as exc:
                if loop.time() >= give_up:
                    log.error("job %s: giving up reporting after %.0f s: %s", a.job_id, REPORT_RETRY_S, exc)
                    break
                await asyncio.sleep(next(delays))
        self.totals[job_outcome(code)] += 1
        self.metrics.count_job(code, loop.time() - running.received)
        if error is not None:
            self.recent_failures.append({"job_id": a.job_id, "code": error.code, "message": error.message,
                                         "at": time.time(), "accepted": accepted})

    # ----- status ------------------------------------------------------------------------------------------------

    def health(self) -> tuple[str, list[str]]:
        reasons = []
        if not self.identity.registered:
            reasons.append("not registered with the scheduler")
        for w in self.workers.values():
            if w.state in (WorkerState.fatal, WorkerState.backoff):
                reasons.append(f"worker {w.resource} is {w.state.value}" +
                               (f": {w.last_error}" if w.last_error else ""))
        now = asyncio.get_running_loop().time()
        recent = sum(1 for t in self.lease_losses if now - t < LEASE_LOSS_WINDOW_S)
        if recent:
            reasons.append(f"{recent} lease loss(es) in the last 10 minutes")
        if self.draining:
            reasons.append("draining")
        return ("degraded" if reasons else "healthy"), reasons

    def ready(self) -> tuple[bool, str]:
        if not self.identity.registered:
            return False, "not registered with the scheduler"
        if self.draining:
            return False, "draining"
        if not any(w.state in (WorkerState.ready, WorkerState.busy) for w in self.workers.values()):
            why = "; ".join(f"{w.resource} {w.state.value}" + (f" ({w.last_error})" if w.last_error else "")
                            for w in self.workers.values())
            return False, f"no worker ready: {why}"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        ident = self.identity
        health, reasons = self.health()
        workers = []
        for resource, w in self.workers.items():
            snap = w.snapshot()
            workers.append(snap)
        return {
            "agent": {
                "version": __version__,
                "pid": os.getpid(),
                "hostname": self.hostname,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "node_id": ident.node_id,
                "scheduler_url": self.scheduler_url,
                "registered": ident.registered,
                "last_heartbeat_age_s": round(now - ident.last_heartbeat_ok, 1) if ident.last_heartbeat_ok else None,
                "state": self.node_state(),
                "rss_bytes": psutil.Process().memory_info().rss,
            },
            "health": {"status": health, "reasons": reasons},
            "workers": workers,
            "jobs": [r.view(now) for r in self.running.values()],
            "totals": {outcome: self.totals.get(outcome, 0) for outcome in JOB_OUTCOMES},
            "recent_failures": [
                {**f, "age_s": round(time.time() - f["at"], 1)} for f in reversed(self.recent_failures)],
            "lease_losses_10m": sum(1 for t in self.lease_losses if now - t < LEASE_LOSS_WINDOW_S),
        }


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
    facts = await probe_node()
    agent = Agent(settings, facts=facts, state=state)
    embedded = None
    url = settings.scheduler.url
    if url == "embedded":
        from .scheduler.server import start_scheduler

        embedded = await start_scheduler(settings.scheduler)  # a port in use: ListenError, one line in cli.main
        url = embedded.url
    try:
        http = await start_http(agent, settings.http)
    except BaseException:
        if embedded is not None:
            await embedded.stop()
        raise
    # Logged once both ports are bound, so a port in use ends in its one error line and nothing more.
    if embedded is not None:
        log.info("embedded scheduler listening on %s", url)
    log.info("agent endpoints on %s (/metrics /healthz /readyz /status)", http.url)

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
    await agent.start(url)
    await stop.wait()
    await agent.drain(settings.shutdown.grace_s)
    await agent.stop()
    await http.stop()
    if embedded is not None:
        await embedded.stop()
    log.info("stopped")
    return 0
