"""Prometheus metrics of the scheduler, all on an injected registry.

Counters are bumped by the state machine; the gauges (queue depth, nodes by state, unfinished jobs and their
audio bytes) are read from it at scrape time so they can never drift from the truth.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..contracts import JOB_OUTCOMES, job_outcome
from .schemas import NODE_STATES, Priority

PRIORITIES: tuple[str, ...] = tuple(Priority)

REQUEUE_REASONS: tuple[str, ...] = ("lease_expired", "released", "assign_timeout", "node_gone", "retryable_error",
                                    "drained")
REJECT_REASONS: tuple[str, ...] = ("stale_attempt", "stale_epoch", "already_completed", "job_cancelled")
#: The open states a job can be cancelled from (``DELETE /v1/jobs/{id}``).
CANCELLED_FROM: tuple[str, ...] = ("queued", "assigned", "running")
#: Why a submission was refused before it was queued (the error codes of the 429 and the 422).
REFUSE_REASONS: tuple[str, ...] = ("queue_full", "no_capable_node")

#: Queue waits from a free slot's poll (milliseconds) to a batch job's batch_max_wait_s and beyond (an hour).
QUEUE_WAIT_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                                           300, 600, 1800, 3600)

#: Returns (queued jobs, {node state: count}).
Snapshot = Callable[[], tuple[int, Mapping[str, int]]]
#: Returns (unfinished jobs, their audio bytes): what scheduler.max_queued_jobs / max_queued_bytes bound.
Load = Callable[[], tuple[int, int]]
#: The queue by (priority, model asked or "any", jobs, oldest wait in seconds), and the cordoned nodes, as a scrape
#: last read them (``SchedulerMetrics.queue_seen``).
QueueGroups = list[tuple[str, str, int, float]]


class _GaugeCollector(Collector):
    def __init__(self, snapshot: Snapshot, load: Load | None,
                 operators: Callable[[], tuple[QueueGroups, int]] | None = None) -> None:
        self._snapshot = snapshot
        self._load = load
        self._operators = operators

    def _families(self) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily("node_agent_scheduler_queue_depth", "Jobs waiting in the queue."),
            GaugeMetricFamily("node_agent_scheduler_nodes", "Known nodes by state.", labels=["state"]),
        ]
        if self._load is not None:
            families += [
                GaugeMetricFamily(
                    "node_agent_scheduler_unfinished_jobs",
                    "Jobs queued, assigned or running (bounded by scheduler.max_queued_jobs).",
                ),
                GaugeMetricFamily(
                    "node_agent_scheduler_unfinished_audio_bytes",
                    "Audio bytes of unfinished jobs (bounded by scheduler.max_queued_bytes).",
                ),
            ]
        if self._operators is not None:
            families += [
                GaugeMetricFamily("node_agent_scheduler_queued_jobs", "Queued jobs by priority and by the model they "
                                  "ask for (any: none asked).", labels=["priority", "model"]),
                GaugeMetricFamily("node_agent_scheduler_queue_oldest_wait_seconds", "How long the oldest queued job "
                                  "of each priority and model has waited.", labels=["priority", "model"]),
                GaugeMetricFamily("node_agent_scheduler_nodes_cordoned", "Nodes an operator cordoned or is "
                                  "draining (they get no new jobs)."),
            ]
        return families

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        depth, by_state = self._snapshot()
        families = self._families()
        queue, nodes = families[0], families[1]
        queue.add_metric([], depth)
        for state in NODE_STATES:
            nodes.add_metric([state], by_state.get(state, 0))
        if self._load is not None:
            jobs, audio_bytes = self._load()
            families[2].add_metric([], jobs)
            families[3].add_metric([], audio_bytes)
        if self._operators is not None:
            groups, cordoned = self._operators()
            queued, waits, cordon = families[-3:]
            seen = {priority for priority, _, _, _ in groups}
            # Every priority has a series even when none of its jobs waits, so a rule on it never sees a gap.
            for priority, model, count, wait in groups + [(p, "any", 0, 0.0) for p in PRIORITIES if p not in seen]:
                queued.add_metric([priority, model], count)
                waits.add_metric([priority, model], wait)
            cordon.add_metric([], cordoned)
        return families


class SchedulerMetrics:
    """The scheduler's metrics; names are fixed by docs/protocol.md."""

    def __init__(self, registry: CollectorRegistry, snapshot: Snapshot, load: Load | None = None) -> None:
        self.leases_granted = Counter(
            "node_agent_scheduler_leases_granted", "Device leases granted.", ["node_id"], registry=registry
        )
        self.leases_renewed = Counter(
            "node_agent_scheduler_leases_renewed", "Device lease renewals accepted.", ["node_id"], registry=registry
        )
        self.leases_expired = Counter(
            "node_agent_scheduler_leases_expired",
            "Device leases that expired unrenewed (or with their node gone).",
            ["node_id"],
            registry=registry,
        )
        self.jobs_submitted = Counter("node_agent_scheduler_jobs_submitted", "Jobs submitted.", registry=registry)
        self.jobs = Counter(
            "node_agent_scheduler_jobs", "Jobs finished, by terminal outcome.", ["outcome"], registry=registry
        )
        self.results_accepted = Counter(
            "node_agent_scheduler_results_accepted", "Result reports accepted (duplicates excluded).", registry=registry
        )
        self.results_rejected = Counter(
            "node_agent_scheduler_results_rejected",
            "Result reports rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        self.jobs_requeued = Counter(
            "node_agent_scheduler_jobs_requeued",
            "Jobs put back in the queue, by reason.",
            ["reason"],
            registry=registry,
        )
        self.jobs_refused = Counter(
            "node_agent_scheduler_jobs_refused",
            "Job submissions refused before they were queued, by reason (queue_full: 429, no_capable_node: 422).",
            ["reason"],
            registry=registry,
        )
        self.jobs_cancelled = Counter(
            "node_agent_scheduler_jobs_cancelled",
            "Jobs cancelled by a client or operator, by the state they were in (running: a decode was stopped).",
            ["state"],
            registry=registry,
        )
        self.sections = Counter(
            "node_agent_scheduler_sections",
            "Section jobs made of long recordings (POST /v1/jobs/{id}/sections; retries of one excluded).",
            registry=registry,
        )
        # Its model label's values are bounded by the models nodes register: a job asking for one no live node
        # serves is refused at submit. "" : the job asked for none.
        self.queue_wait = Histogram(
            "node_agent_scheduler_queue_wait_seconds",
            "How long jobs waited in the queue, observed when a node takes one (its latest wait, from its last "
            "re-queue), by priority and by the model asked for (empty: none).",
            ["priority", "model"],
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=registry,
        )
        for priority in PRIORITIES:
            self.queue_wait.labels(priority, "")
        for state in CANCELLED_FROM:
            self.jobs_cancelled.labels(state)
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome)
        for reason in REFUSE_REASONS:
            self.jobs_refused.labels(reason)
        for reason in REJECT_REASONS:
            self.results_rejected.labels(reason)
        for reason in REQUEUE_REASONS:
            self.jobs_requeued.labels(reason)
        self._queue_groups: QueueGroups = []
        self._cordoned = 0
        registry.register(_GaugeCollector(snapshot, load, lambda: (self._queue_groups, self._cordoned)))

    def queue_seen(self, groups: QueueGroups, cordoned: int) -> None:
        """A scrape read the queue by priority and model, and the cordoned nodes, from the store."""
        self._queue_groups = groups
        self._cordoned = cordoned

    def node_seen(self, node_id: str) -> None:
        """Export the per-node lease series at 0 as soon as a node registers."""
        for counter in (self.leases_granted, self.leases_renewed, self.leases_expired):
            counter.labels(node_id)

    def job_finished(self, outcome: str) -> None:
        """Count a terminal job; ``outcome`` is ``succeeded`` or a ``JobErrorCode`` (anything else raises)."""
        self.jobs.labels(job_outcome(None if outcome == "succeeded" else outcome)).inc()

    def node_forgotten(self, node_id: str) -> None:
        """Drop a long-gone node's series so the label set stays bounded."""
        for counter in (self.leases_granted, self.leases_renewed, self.leases_expired):
            try:
                counter.remove(node_id)
            except KeyError:
                pass
