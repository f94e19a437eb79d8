"""A read-only view of this node, for the HTTP face: workers, registration, jobs, and the documents built on them.

``/status``, ``/healthz``, ``/readyz``, ``/metrics`` and the old service's ``/utterance`` and ``/health`` read the
node through ``LocalNodeView`` and never hold the agent (the composition root), which keeps the package free of
import circles. (``NodeView`` in ``scheduler/schemas.py`` is the scheduler's wire view of a node; this is not it.)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import psutil
from prometheus_client import CollectorRegistry

from . import __version__
from .devices import SlotPlan
from .job_runner import LEASE_LOSS_WINDOW_S, JobLedger
from .lone_worker import LoneWorker
from .metrics import JOB_OUTCOMES, AgentMetrics
from .registration import NodeIdentity
from .scheduler.schemas import NodeState
from .supervisor import Worker, WorkerState


class LocalNodeView:
    """Reads the node's parts; changes nothing (but the scrape-time metric values it refreshes)."""

    def __init__(self, *, workers: Mapping[str, Worker], identity: NodeIdentity, ledger: JobLedger,
                 metrics: AgentMetrics, model: str, scheduler_url: str, hostname: str,
                 is_draining: Callable[[], bool], slot_plan: SlotPlan | None = None,
                 scheduler_in_use: Callable[[], str] | None = None, lone: LoneWorker | None = None) -> None:
        self._workers = workers  # one per slot
        #: The CPU device's lone-job worker, lent to a slot's job (``lone_worker``); None where there is none.
        self._lone = lone
        #: How each device is split into slots (workers x threads); None where no plan was made (unit tests).
        self.slot_plan = slot_plan
        self._identity = identity
        self._ledger = ledger
        self._metrics = metrics
        self._is_draining = is_draining
        self.model = model
        self.scheduler_url = scheduler_url
        #: The one of ``scheduler_url``'s replicas the agent calls now (its client fails over between them).
        self._scheduler_in_use = scheduler_in_use if scheduler_in_use is not None else lambda: scheduler_url
        #: The embedded scheduler's store, set by run_agent (None: the scheduler runs elsewhere).
        self.scheduler_store: str | None = None
        self.hostname = hostname
        self.started = time.monotonic()

    # ----- facts ---------------------------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._is_draining()

    @property
    def registered(self) -> bool:
        return self._identity.registered

    @property
    def node_id(self) -> str | None:
        return self._identity.node_id

    def worker_states(self) -> dict[str, WorkerState]:
        """Each device's worker state, by resource."""
        return {resource: w.state for resource, w in self._workers.items()}

    def _all_workers(self) -> list[Worker]:
        """The slots' workers and the lone-job worker."""
        return [*self._workers.values(), *([self._lone.worker] if self._lone is not None else [])]

    def worker_snapshots(self) -> list[dict[str, Any]]:
        """Each slot's worker, then the lone-job worker (``lone: true``, ``lent_to``: the slot whose job it runs)."""
        snapshots = [w.snapshot() for w in self._workers.values()]
        if self._lone is not None:
            snapshots.append({**self._lone.worker.snapshot(), "lone": True, "lent_to": self._lone.lent_to,
                              "lone_jobs_total": self._lone.jobs_total})
        return snapshots

    def served_languages(self) -> set[str] | None:
        """Languages this node's models serve; None means any (a multilingual model)."""
        fallback = ["en"] if self.model.endswith(".en") else None
        served: set[str] = set()
        for worker in self._workers.values():
            languages = worker.info.get("languages", fallback)
            if languages is None:
                return None
            served.update(languages)
        return served

    def running_job_ids(self) -> list[str]:
        return list(self._ledger.running)

    def metrics_registry(self) -> CollectorRegistry:
        """The registry to expose, its scrape-time values (worker RSS) refreshed."""
        self._metrics.refresh_workers(self._all_workers())
        return self._metrics.registry

    # ----- documents -----------------------------------------------------------------------------------------------

    def node_state(self) -> NodeState:
        """The state heartbeats announce: draining, degraded, busy or ready."""
        if self.draining:
            return NodeState.DRAINING
        states = [w.state for w in self._workers.values()]
        if all(s is WorkerState.fatal for s in states):
            return NodeState.DEGRADED
        if any(s is WorkerState.busy for s in states) or self._ledger.running:
            return NodeState.BUSY
        if not any(s is WorkerState.ready for s in states):
            return NodeState.DEGRADED
        return NodeState.READY

    def heartbeat_state(self) -> dict[str, Any]:
        """The node's part of a heartbeat: its state and the jobs it runs."""
        return {"state": self.node_state(), "running_jobs": self.running_job_ids()}

    def liveness(self) -> tuple[bool, str]:
        """``/healthz``: answering at all proves the event loop is alive, which is what liveness means here;
        except when every worker has been fatal for ``worker.fatal_unhealthy_after_s``: then a restart of the
        agent is the remedy left."""
        workers = list(self._workers.values())
        if workers and all(w.fatal_for_too_long() for w in workers):
            return False, "; ".join(f"worker {w.resource} fatal: {w.last_error}" for w in workers)
        return True, "ok"

    def health(self) -> tuple[str, list[str]]:
        reasons = []
        if not self.registered:
            reasons.append("not registered with the scheduler")
        for w in self._all_workers():  # a lone-job worker down: lone jobs decode at a slot's speed
            if w.state in (WorkerState.fatal, WorkerState.backoff):
                reasons.append(w.status_line())
        recent = self._recent_lease_losses()
        if recent:
            reasons.append(f"{recent} lease loss(es) in the last 10 minutes")
        if self.draining:
            reasons.append("draining")
        return ("degraded" if reasons else "healthy"), reasons

    def ready(self) -> tuple[bool, str]:
        if not self.registered:
            return False, "not registered with the scheduler"
        if self.draining:
            return False, "draining"
        workers = self._workers.values()
        if not any(w.state in (WorkerState.ready, WorkerState.busy) for w in workers):
            why = "; ".join(f"{w.resource} {w.state.value}" + (f" ({w.last_error})" if w.last_error else "")
                            for w in workers)
            return False, f"no worker ready: {why}"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        ident = self._identity
        ledger = self._ledger
        health, reasons = self.health()
        return {
            "agent": {
                "version": __version__,
                "pid": os.getpid(),
                "hostname": self.hostname,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "node_id": ident.node_id,
                "scheduler_url": self.scheduler_url,
                "scheduler_in_use": self._scheduler_in_use(),
                # The embedded scheduler's store (password redacted); None for a scheduler elsewhere.
                "scheduler_store": self.scheduler_store,
                "registered": ident.registered,
                "last_heartbeat_age_s": round(now - ident.last_heartbeat_ok, 1) if ident.last_heartbeat_ok else None,
                "state": self.node_state(),
                "rss_bytes": psutil.Process().memory_info().rss,
            },
            "health": {"status": health, "reasons": reasons},
            "slots": self.slots(),
            "workers": self.worker_snapshots(),
            "jobs": [r.view(now) for r in ledger.running.values()],
            "totals": {outcome: ledger.totals.get(outcome, 0) for outcome in JOB_OUTCOMES},
            "recent_failures": [
                {**f, "age_s": round(time.time() - f["at"], 1)} for f in reversed(ledger.recent_failures)],
            "lease_losses_10m": self._recent_lease_losses(),
        }

    def slots(self) -> dict[str, Any]:
        """The split (workers x threads per device, and whether it was auto) and how many slots are busy or ready
        (each worker is a slot; its state per slot is in ``workers``). A slot whose job decodes on the lone-job
        worker is busy."""
        lent = self._lone.lent_to if self._lone is not None else None
        states = [WorkerState.busy if resource == lent else w.state for resource, w in self._workers.items()]
        return {
            **(self.slot_plan.view() if self.slot_plan is not None else {}),
            "total": len(states),
            "busy": sum(1 for s in states if s is WorkerState.busy),
            "ready": sum(1 for s in states if s is WorkerState.ready),
        }

    def _recent_lease_losses(self) -> int:
        now = asyncio.get_running_loop().time()
        return self._ledger.lease_losses_since(now - LEASE_LOSS_WINDOW_S)
