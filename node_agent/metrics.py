"""The agent's Prometheus metrics, all on an injected registry (names are fixed: rules and dashboards use them).

Conventions (docs: Prometheus naming): one ``node_agent_`` prefix, base units in names, counters end in
``_total``, histograms rather than summaries so quantiles aggregate across nodes, no job ids in labels, and
every series known to exist exported as 0 from the start.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .contracts import JOB_OUTCOMES, job_outcome
from .supervisor import RESTART_REASONS, JobRequest, ResultMessage, Worker, WorkerObserver, WorkerState

if TYPE_CHECKING:
    from .errors import JobError

LEASE_LOST_REASONS = ("expired", "rejected", "self_fenced")
#: Every operation the agent retries (``node_agent_retries_total{operation}``): the fields of ``RetryPolicies``
#: plus the lease renewal.
RETRY_OPERATIONS = ("register", "heartbeat", "poll", "audio", "lease_acquire", "lease_renew", "lease_release",
                    "events", "result")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_JOB_SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
_RTF = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
_MARGIN = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60)
_SEGMENT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class AgentMetrics:
    """Every metric the agent exports. Pass a fresh ``CollectorRegistry`` in tests."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "0") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge("node_agent_build_info", "Agent build; always 1.", ["version"], registry=r)
        self.build_info.labels(version).set(1)
        self.node_info = Gauge("node_agent_node_info", "This node's identity; join on gpu_uuid with DCGM.",
                               ["node_id", "hostname", "gpu_uuid"], registry=r)
        self.registered = Gauge("node_agent_registered", "1 while registered with the scheduler.", registry=r)
        self.heartbeat_last_success = Gauge(
            "node_agent_heartbeat_last_success_timestamp_seconds", "Unix time of the last accepted heartbeat.",
            registry=r)
        self.scheduler_requests = Counter(
            "node_agent_scheduler_requests_total", "Calls to the scheduler by endpoint and HTTP status "
            "(code 'error' = transport failure or timeout).", ["endpoint", "code"], registry=r)
        self.scheduler_request_duration = Histogram(
            "node_agent_scheduler_request_duration_seconds", "Scheduler call latency.", ["endpoint"],
            buckets=_LATENCY + (30,), registry=r)
        self.scheduler_url_index = Gauge(
            "node_agent_scheduler_url_index", "Which of scheduler.url's URLs calls go to now (0: the first); "
            "it changes on each failover.", registry=r)
        self.retries = Counter("node_agent_retries_total", "Retries of scheduler calls by operation (each one after "
                               "a failed try, under the retry policy).", ["operation"], registry=r)
        for operation in RETRY_OPERATIONS:
            self.retries.labels(operation)

        self.lease_acquire_duration = Histogram(
            "node_agent_lease_acquire_duration_seconds", "Time to get a lease, including waiting on 409.",
            ["device"], buckets=_LATENCY + (30, 60), registry=r)
        self.lease_renewals = Counter("node_agent_lease_renewals_total", "Lease renewals by result.",
                                      ["device", "result"], registry=r)
        self.lease_renew_duration = Histogram("node_agent_lease_renew_duration_seconds", "Renewal latency.",
                                              ["device"], buckets=_LATENCY, registry=r)
        self.lease_margin = Histogram(
            "node_agent_lease_margin_seconds", "TTL left when a renewal succeeded: how close to expiry we ran.",
            ["device"], buckets=_MARGIN, registry=r)
        self.lease_lost = Counter("node_agent_lease_lost_total", "Leases lost mid-job (the lease timeouts).",
                                  ["device", "reason"], registry=r)
        self.leases_held = Gauge("node_agent_leases_held", "Leases currently held.", ["device"], registry=r)

        self.jobs = Counter("node_agent_jobs_total", "Finished jobs by outcome.", ["outcome"], registry=r)
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome)
        self.jobs_in_progress = Gauge("node_agent_jobs_in_progress", "Jobs running on this node.", registry=r)
        self.job_duration = Histogram("node_agent_job_duration_seconds",
                                      "Job time on this node, receipt to result report.",
                                      buckets=_JOB_SECONDS, registry=r)
        self.job_queue_wait = Histogram("node_agent_job_queue_wait_seconds",
                                        "Time a job waited in the scheduler queue before this node took it.",
                                        buckets=_JOB_SECONDS, registry=r)

        # Long jobs cut into sections (issue 24), on the parent's node.
        self.job_sections = Histogram(
            "node_agent_job_sections", "Sections per job that was split (the parent's own section 0 included).",
            buckets=(2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.split_seconds_saved = Counter(
            "node_agent_split_seconds_saved_total",
            "Per split job: the sections' decode seconds added up (as one slot would have spent them) minus the "
            "job's decode wall time (cut, upload, waits included); 0 when the split cost time.", registry=r)

        asr = ["model", "device"]
        self.asr_audio_seconds = Counter("node_agent_asr_audio_seconds_total", "Audio transcribed.", asr,
                                         registry=r)
        self.asr_segments = Counter("node_agent_asr_segments_total", "Segments produced.", asr, registry=r)
        self.asr_segment_conversion = Histogram(
            "node_agent_asr_segment_conversion_seconds",
            "Whole segment-generator iteration per job (the decode itself): the slow-conversion signal.",
            asr, buckets=_JOB_SECONDS, registry=r)
        self.asr_segment_decode = Histogram("node_agent_asr_segment_decode_seconds",
                                            "Decode time of each segment.", asr, buckets=_SEGMENT, registry=r)
        self.asr_transcribe_call = Histogram(
            "node_agent_asr_transcribe_call_seconds",
            "transcribe() call per job: features, VAD and language detection.", asr, buckets=_SEGMENT,
            registry=r)
        self.asr_rtf = Histogram("node_agent_asr_realtime_factor", "Processing seconds / audio seconds per job.",
                                 asr, buckets=_RTF, registry=r)
        self.asr_fallback_segments = Counter(
            "node_agent_asr_fallback_segments_total",
            "Segments decoded again at temperature > 0 (the usual cause of slow conversion).", asr, registry=r)

        # On per-worker series ``device`` is the worker's slot, i.e. its lease resource (cpu/0, gpu:0/1);
        # node_agent_slot_info maps each slot to its physical device.
        dev = ["device"]
        self.slot_info = Gauge(
            "node_agent_slot_info", "One series per slot (a worker with its own lease resource, the device label); "
            "physical_device is the CPU or GPU it runs on, cpu_threads its threads, auto whether "
            "asr.workers_per_device was auto. Always 1.", ["device", "physical_device", "cpu_threads", "auto"],
            registry=r)
        self.lone_info = Gauge(
            "node_agent_lone_worker_info", "The lone-job worker of a device (device: its name, e.g. cpu/lone; no slot "
            "of its own: it runs a slot's job that found the others idle), its physical device and threads. "
            "Always 1.", ["device", "physical_device", "cpu_threads"], registry=r)
        self.lone_jobs = Counter(
            "node_agent_lone_worker_jobs_total", "Jobs that found every other slot of their device idle and decoded "
            "on its lone-job worker (device: that worker, e.g. cpu/lone), with every core as threads.", dev,
            registry=r)
        self.worker_up = Gauge("node_agent_worker_up", "1 while the worker can take a job (ready or busy).",
                               dev, registry=r)
        self.worker_state = Gauge("node_agent_worker_state", "1 for the worker's current state.",
                                  ["device", "state"], registry=r)
        self.worker_restarts = Counter("node_agent_worker_restarts_total", "Worker process replacements.",
                                       ["device", "reason"], registry=r)
        self.worker_rss = Gauge("node_agent_worker_resident_memory_bytes", "Worker process RSS.", dev, registry=r)
        self.worker_jobs_served = Gauge("node_agent_worker_jobs_served", "Jobs served by the current process.",
                                        dev, registry=r)
        self.worker_start_time = Gauge("node_agent_worker_start_time_seconds",
                                       "Unix time the current worker process became ready.", dev, registry=r)
        self.worker_model_load = Gauge("node_agent_worker_model_load_seconds",
                                       "Model load time of the current worker process.", dev, registry=r)

    # ----- wiring helpers --------------------------------------------------------------------------------------

    def declare_device(self, device: str, model: str) -> None:
        """Export zeros for every per-device series before anything happens."""
        for reason in RESTART_REASONS:
            self.worker_restarts.labels(device, reason)
        for reason in LEASE_LOST_REASONS:
            self.lease_lost.labels(device, reason)
        for result in ("ok", "failed"):
            self.lease_renewals.labels(device, result)
        self.leases_held.labels(device).set(0)
        self.worker_up.labels(device).set(0)
        for state in WorkerState:
            self.worker_state.labels(device, state.value).set(0)
        for metric in (self.asr_audio_seconds, self.asr_segments, self.asr_fallback_segments,
                       self.asr_segment_conversion, self.asr_segment_decode, self.asr_transcribe_call, self.asr_rtf):
            metric.labels(model, device)
        for histogram in (self.lease_acquire_duration, self.lease_renew_duration, self.lease_margin):
            histogram.labels(device)

    def declare_slot(self, resource: str, physical_device: str, cpu_threads: int, auto: bool) -> None:
        """Name a slot's physical device and split (``node_agent_slot_info``)."""
        self.slot_info.labels(resource, physical_device, str(cpu_threads), "true" if auto else "false").set(1)

    def set_node(self, node_id: str, hostname: str, gpu_uuids: Iterable[str | None]) -> None:
        self.node_info.clear()
        for uuid in list(gpu_uuids) or [""]:
            self.node_info.labels(node_id, hostname, uuid or "").set(1)

    def count_retry(self, operation: str) -> None:
        """The ``on_retry`` hook of every retry policy; the label set is bounded to ``RETRY_OPERATIONS``."""
        if operation not in RETRY_OPERATIONS:
            raise ValueError(f"unknown retry operation {operation!r}")
        self.retries.labels(operation).inc()

    def count_job(self, code: str | None, duration_s: float | None = None) -> None:
        self.jobs.labels(job_outcome(code)).inc()
        if duration_s is not None:
            self.job_duration.observe(duration_s)

    def refresh_workers(self, workers: Iterable[Worker]) -> None:
        """Scrape-time values that are cheap to read but not events (RSS)."""
        for w in workers:
            self.worker_rss.labels(w.resource).set(w.rss_bytes())


class MetricsObserver(WorkerObserver):
    """Turns supervisor events into metrics."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.m = metrics

    def state_changed(self, worker: Worker, state: WorkerState) -> None:
        for s in WorkerState:
            self.m.worker_state.labels(worker.resource, s.value).set(1 if s is state else 0)
        self.m.worker_up.labels(worker.resource).set(1 if state in (WorkerState.ready, WorkerState.busy) else 0)

    def worker_ready(self, worker: Worker, info: dict[str, Any]) -> None:
        self.m.worker_start_time.labels(worker.resource).set(time.time())
        self.m.worker_model_load.labels(worker.resource).set(float(info.get("load_s", 0.0)))
        self.m.worker_jobs_served.labels(worker.resource).set(0)
        self.m.worker_rss.labels(worker.resource).set(worker.rss_bytes())

    def worker_restarted(self, worker: Worker, reason: str) -> None:
        self.m.worker_restarts.labels(worker.resource, reason).inc()

    def segment(self, worker: Worker, event: dict[str, Any]) -> None:
        labels = (worker.model, worker.resource)
        self.m.asr_segments.labels(*labels).inc()
        self.m.asr_segment_decode.labels(*labels).observe(float(event.get("decode_s", 0.0)))
        if float(event.get("temperature") or 0.0) > 0:
            self.m.asr_fallback_segments.labels(*labels).inc()

    def job_succeeded(self, worker: Worker, result: ResultMessage) -> None:
        labels = (worker.model, worker.resource)
        t = result.timings
        self.m.asr_audio_seconds.labels(*labels).inc(result.duration_s)
        self.m.asr_segment_conversion.labels(*labels).observe(float(t.get("segments_iteration_s", 0.0)))
        self.m.asr_transcribe_call.labels(*labels).observe(float(t.get("transcribe_call_s", 0.0)))
        if result.duration_s > 0:
            processing = float(t.get("total_s") or 0.0)
            self.m.asr_rtf.labels(*labels).observe(processing / result.duration_s)
        self.m.worker_jobs_served.labels(worker.resource).set(worker.snapshot()["jobs_served"])
        self.m.worker_rss.labels(worker.resource).set(worker.rss_bytes())

    def job_failed(self, worker: Worker, job: JobRequest, error: "JobError") -> None:
        self.m.worker_jobs_served.labels(worker.resource).set(worker.snapshot()["jobs_served"])
