"""The scheduler's state machine: nodes, the job queue, assignments, fenced leases, expiry.

Pure and synchronous (no I/O, no event loop) so it can be driven by a fake clock in tests. Every
public method first applies everything that fell due by "now" (lease expiry, vanished nodes,
assignment timeouts, deadlines, retention), so an answer never depends on when the background tick
last ran. Changes are announced to listeners by topic (``QUEUE_TOPIC``, ``job_topic(job_id)``) so the
HTTP layer can wake long polls.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from prometheus_client import CollectorRegistry

from ..config import SchedulerSettings
from .errors import (
    InvalidInput,
    JobNotAssigned,
    LeaseUnusable,
    NodeNotFound,
    ReportRejected,
    ResourceHeld,
    UnknownJob,
    Unservable,
)
from .metrics import SchedulerMetrics
from .topics import QUEUE_TOPIC, job_topic
from .rules import (
    Holder,
    Served,
    admission_refusal,
    check_holder,
    clamp_ttl,
    language_fits,
    queue_full,
    requeue_or_fail,
    unservable_error,
    unservable_message,
)
from .schemas import (
    JOB_ERROR_CODES,
    RETRYABLE_ERROR_CODES,
    TERMINAL_JOB_STATES,
    AudioRef,
    DeviceSpec,
    EventsReport,
    Hardware,
    HeartbeatRequest,
    HeartbeatResponse,
    JobAssignment,
    JobErrorInfo,
    JobSpec,
    JobView,
    LeaseBounds,
    LeaseGrant,
    LeaseRequest,
    NodeList,
    NodeView,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    RenewResponse,
    ResultAck,
    ResultReport,
)

log = logging.getLogger("node_agent.scheduler")

Listener = Callable[[str], None]
LeaseState = Literal["active", "expired", "released", "superseded"]


@dataclass
class Node:
    node_id: str
    hostname: str
    agent_version: str
    hardware: Hardware
    devices: list[DeviceSpec]
    registered_at: float
    last_heartbeat: float
    state: str = "ready"
    running_jobs: list[str] = field(default_factory=list)
    cpu_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    gone_at: float | None = None


@dataclass
class LeaseRecord:
    lease_id: str
    node_id: str
    job_id: str
    attempt: int
    resource: str
    epoch: int
    ttl_s: float
    granted_at: float
    expires_at: float
    state: LeaseState = "active"
    ended_at: float | None = None


@dataclass
class Job:
    job_id: str
    seq: int
    audio: bytes
    audio_bytes: int
    spec: JobSpec
    filename: str | None
    created_at: float
    queued_at: float
    deadline_at: float | None
    state: str = "queued"
    attempt: int = 1
    node_id: str | None = None
    resource: str | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queued_total_s: float = 0.0
    lease_id: str | None = None
    lease_epoch: int | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)
    segment_pos: dict[int, int] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: JobErrorInfo | None = None
    node_timings: dict[str, Any] = field(default_factory=dict)
    #: (attempt, lease_id, lease_epoch, node_id) -> the answer given, so the holder's retried report gets the
    #: same answer (and a report naming anyone else does not).
    accepted_reports: dict[tuple[int, str, int, str], ResultAck] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_JOB_STATES


class SchedulerState:
    """In-memory scheduler for one site; all times come from ``clock`` (monotonic seconds)."""

    def __init__(
        self,
        settings: SchedulerSettings,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = SchedulerMetrics(
            registry if registry is not None else CollectorRegistry(), self._snapshot, self._load
        )
        self._listeners: list[Listener] = []
        self._nodes: dict[str, Node] = {}
        self._jobs: dict[str, Job] = {}
        self._seq = 0
        self._queue: list[tuple[int, str]] = []  # (seq, job_id), oldest submission first
        self._assigned: set[str] = set()  # job ids assigned and not yet leased
        self._deadlines: list[tuple[float, int, str]] = []  # heap of queued jobs' deadlines
        self._finished: deque[tuple[float, str]] = deque()  # (finished_at, job_id), in finishing order
        self._leases: dict[str, LeaseRecord] = {}  # every lease not yet forgotten
        self._active: dict[str, LeaseRecord] = {}  # live leases only
        self._holders: dict[tuple[str, str], LeaseRecord] = {}  # (node_id, resource) -> live lease
        self._dead_leases: deque[tuple[float, str]] = deque()
        # What max_queued_jobs / max_queued_bytes bound: jobs not yet finished, and their audio.
        self._open_jobs = 0
        self._open_bytes = 0
        self._refusing = False  # the last submission was refused queue_full (logged once per episode)
        self._served_cache: Served | None = None  # None: nodes changed since it was summed up
        self._recheck_queue = False  # nodes changed: which queued jobs are servable must be worked out again
        #: Queued jobs no live node can serve -> since when; insertion order is "since" order.
        self._unservable: dict[str, float] = {}
        #: Idempotency-Key -> (submitted at, job id, what was submitted), remembered for job_retention_s so that
        #: a client retrying a POST whose answer it lost gets the job the first try created. Insertion order is
        #: submission order, so expired keys are dropped from the front.
        self._submissions: dict[str, tuple[float, str, tuple[Any, ...]]] = {}
        #: The last epoch granted. One sequence for the whole scheduler (every node and resource), never reset
        #: or reused, so an epoch names exactly one lease; a store backs it with a database sequence.
        self._epoch = 0

    # ------------------------------------------------------------------------------------ plumbing

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(topic)`` after each change of the queue or of a job."""
        self._listeners.append(listener)

    def _emit(self, topic: str) -> None:
        for listener in self._listeners:
            listener(topic)

    def _now(self) -> float:
        now = self.clock()
        self._advance(now)
        return now

    def tick(self, now: float | None = None) -> None:
        """Apply everything due by ``now`` (default: the clock); the server calls this periodically."""
        self._advance(self.clock() if now is None else now)

    def _snapshot(self) -> tuple[int, dict[str, int]]:
        counts: dict[str, int] = {}
        for node in self._nodes.values():
            counts[node.state] = counts.get(node.state, 0) + 1
        return len(self._queue), counts

    def queue_depth(self) -> int:
        return len(self._queue)

    def _load(self) -> tuple[int, int]:
        return self._open_jobs, self._open_bytes

    def _served(self) -> Served:
        if self._served_cache is None:
            self._served_cache = Served.of(n.devices for n in self._nodes.values() if n.state != "gone")
        return self._served_cache

    def _nodes_changed(self) -> None:
        self._served_cache = None
        self._recheck_queue = True

    # ------------------------------------------------------------------------------------- nodes

    def register(self, req: RegisterRequest) -> RegisterResponse:
        """Register a node, or refresh a known (or gone) node that gives its persisted id."""
        now = self._now()
        node_id = req.node_id or f"node-{secrets.token_hex(6)}"
        known = self._nodes.get(node_id)
        if known is not None and known.state != "gone":
            # A new agent process: what its previous one held is void (see SqlStore.register).
            self._release_node(known, now, "restarted")
        self._nodes[node_id] = Node(
            node_id=node_id,
            hostname=req.hostname,
            agent_version=req.agent_version,
            hardware=req.hardware,
            devices=list(req.devices),
            registered_at=now,
            last_heartbeat=now,
        )
        self._nodes_changed()
        self.metrics.node_seen(node_id)
        log.info(
            "node registered node_id=%s hostname=%s devices=%s%s",
            node_id,
            req.hostname,
            ",".join(d.resource for d in req.devices) or "-",
            " (again)" if known is not None else "",
        )
        s = self.settings
        return RegisterResponse(
            node_id=node_id,
            heartbeat_interval_s=s.heartbeat_interval_s,
            lease=LeaseBounds(min_ttl_s=s.lease_min_ttl_s, max_ttl_s=s.lease_max_ttl_s),
        )

    def _live_node(self, node_id: str) -> Node:
        node = self._nodes.get(node_id)
        if node is None or node.state == "gone":
            why = "is gone (missed its heartbeats)" if node is not None else "is not registered"
            raise NodeNotFound(f"node {node_id} {why}; register again")
        return node

    def heartbeat(self, node_id: str, req: HeartbeatRequest) -> HeartbeatResponse:
        now = self._now()
        node = self._live_node(node_id)
        node.last_heartbeat = now
        node.state = req.state
        node.running_jobs = list(req.running_jobs)
        node.cpu_percent = req.cpu_percent
        node.memory_used_bytes = req.memory_used_bytes
        node.memory_total_bytes = req.memory_total_bytes
        return HeartbeatResponse(heartbeat_interval_s=self.settings.heartbeat_interval_s)

    def list_nodes(self) -> NodeList:
        now = self._now()
        return NodeList(
            nodes=[
                NodeView(
                    node_id=n.node_id,
                    hostname=n.hostname,
                    agent_version=n.agent_version,
                    state=n.state,  # type: ignore[arg-type]
                    hardware=n.hardware,
                    devices=n.devices,
                    running_jobs=n.running_jobs,
                    last_heartbeat_age_s=round(now - n.last_heartbeat, 3),
                    registered_age_s=round(now - n.registered_at, 3),
                )
                for n in self._nodes.values()
            ]
        )

    def _node_gone(self, node: Node, now: float) -> None:
        node.state = "gone"
        node.gone_at = now
        self._nodes_changed()  # before its jobs are re-queued: they are checked against the nodes left
        log.info("node gone node_id=%s last_heartbeat_age_s=%.1f", node.node_id, now - node.last_heartbeat)
        self._release_node(node, now, "is gone")

    def _release_node(self, node: Node, now: float, why: str) -> None:
        """The node is gone (or restarted): expire its live leases and re-queue what it was assigned."""
        for lease in [lease for lease in self._active.values() if lease.node_id == node.node_id]:
            self._expire_lease(lease, now, reason="node_gone")
        for job_id in [j for j in self._assigned if self._jobs[j].node_id == node.node_id]:
            self._requeue_or_fail(
                self._jobs[job_id], now, "node_gone", "worker_unavailable", f"node {node.node_id} {why}"
            )

    # -------------------------------------------------------------------------------- jobs: client

    def submitted(self, idempotency_key: str, spec: JobSpec, size: int, filename: str | None = None) -> Job | None:
        """The job an earlier submission with this ``Idempotency-Key`` created (within job_retention_s), or None.
        The same key on a different submission is the client's mistake: ``InvalidInput``."""
        now = self._now()
        cutoff = now - self.settings.job_retention_s
        while self._submissions:
            key, (at, _, _) = next(iter(self._submissions.items()))
            if at > cutoff:
                break
            del self._submissions[key]
        known = self._submissions.get(idempotency_key)
        if known is None or known[1] not in self._jobs:
            return None
        if known[2] != (spec, size, filename):
            raise InvalidInput(
                f"Idempotency-Key {idempotency_key[:40]!r} was already used for a different submission (job "
                f"{known[1]}); use a new key for a new job",
                code="idempotency_key_reused",
                param="Idempotency-Key",
            )
        return self._jobs[known[1]]

    def submit(self, spec: JobSpec, audio: bytes, filename: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Queue a job (audio already decoded and checked non-empty), or refuse it: ``Unservable`` when live
        nodes exist and none serves it, ``QueueFull`` past the queue's bounds. With an ``idempotency_key`` seen
        before, the job that submission created is returned instead (see ``submitted``)."""
        if idempotency_key is not None:
            earlier = self.submitted(idempotency_key, spec, len(audio), filename)
            if earlier is not None:
                log.info("job submission replayed job_id=%s (same Idempotency-Key)", earlier.job_id)
                return earlier
        now = self._now()
        if not audio:
            raise InvalidInput("audio is empty", param="audio")
        self._admit(spec, len(audio))
        deadline_s = spec.deadline_s if spec.deadline_s is not None else self.settings.default_deadline_s
        self._seq += 1
        job = Job(
            job_id=f"job-{secrets.token_hex(8)}",
            seq=self._seq,
            audio=audio,
            audio_bytes=len(audio),
            spec=spec,
            filename=filename,
            created_at=now,
            queued_at=now,
            deadline_at=now + deadline_s,
        )
        self._jobs[job.job_id] = job
        if idempotency_key is not None:
            self._submissions[idempotency_key] = (now, job.job_id, (spec, len(audio), filename))
        self._open_jobs += 1
        self._open_bytes += job.audio_bytes
        self.metrics.jobs_submitted.inc()
        log.info(
            "job queued job_id=%s bytes=%d format=%s language=%s",
            job.job_id,
            job.audio_bytes,
            spec.format,
            spec.language or "auto",
        )
        self._enqueue(job, now)
        return job

    def _admit(self, spec: JobSpec, size: int) -> None:
        """Refuse a submission that no live node can serve, or that the queue's bounds have no room for."""
        s = self.settings
        served = self._served()
        # No live node at all is not a refusal: nodes may be starting (the embedded scheduler starts before its
        # agent registers). Such a job waits, and fails after unservable_after_s if none comes.
        if served.live_nodes and not served.serves(spec.language):
            self.metrics.jobs_refused.labels("no_capable_node").inc()
            message = unservable_message(spec.language, served)
            log.info("job refused reason=no_capable_node %s", message)
            raise Unservable(message, param="language" if spec.language is not None else None)
        why = admission_refusal(s, self._open_jobs, self._open_bytes, size)
        if why is None:
            if self._refusing:
                self._refusing = False
                log.info("queue accepting jobs again unfinished_jobs=%d bytes=%d", self._open_jobs, self._open_bytes)
            return
        self.metrics.jobs_refused.labels("queue_full").inc()
        if not self._refusing:
            self._refusing = True
            log.warning("queue full, refusing jobs: %s", why)
        raise queue_full(why)

    def _enqueue(self, job: Job, now: float) -> None:
        bisect.insort(self._queue, (job.seq, job.job_id))
        if job.deadline_at is not None:
            heapq.heappush(self._deadlines, (job.deadline_at, job.seq, job.job_id))
            if len(self._deadlines) > 2 * len(self._queue) + 64:
                # Entries of jobs that left the queue are dropped lazily; with a day-long default deadline they
                # would pile up for a day, so the heap is rebuilt from the queue once they outnumber it.
                self._deadlines = [
                    (j.deadline_at, j.seq, j.job_id)
                    for j in (self._jobs[job_id] for _, job_id in self._queue)
                    if j.deadline_at is not None
                ]
                heapq.heapify(self._deadlines)
        if not self._served().serves(job.spec.language):
            self._unservable.pop(job.job_id, None)
            self._unservable[job.job_id] = now
        self._emit(QUEUE_TOPIC)
        self._emit(job_topic(job.job_id))

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"job {job_id} is not known (never submitted, or finished and forgotten)")
        return job

    def view_job(self, job_id: str) -> JobView:
        now = self._now()
        job = self._job(job_id)
        queued = job.queued_total_s + (now - job.queued_at if job.state == "queued" else 0.0)
        timings: dict[str, Any] = {"queued_s": round(queued, 3)}
        if job.finished_at is not None:
            timings["total_s"] = round(job.finished_at - job.created_at, 3)
        if job.node_timings:
            timings["node"] = job.node_timings
        return JobView(
            job_id=job.job_id,
            state=job.state,  # type: ignore[arg-type]
            attempt=job.attempt,
            node_id=job.node_id,
            language=job.spec.language,
            segments=list(job.segments),
            result=job.result,
            error=job.error,
            created_age_s=round(now - job.created_at, 3),
            timings=timings,
            filename=job.filename,
        )

    def job_settled(self, job_id: str, after_segment: int | None = None) -> bool:
        """Whether a long poll on the job may answer: it finished, or has more than K segments."""
        job = self._jobs.get(job_id)
        if job is None:
            self._now()
            job = self._job(job_id)
        return job.terminal or (after_segment is not None and len(job.segments) > after_segment)

    def job_audio(self, job_id: str) -> bytes:
        self._now()
        job = self._job(job_id)
        if job.terminal and not self.settings.keep_audio:
            raise UnknownJob(f"job {job_id} has finished; its audio was dropped")
        return job.audio

    # --------------------------------------------------------------------------------- jobs: node

    def assign_next(self, node_id: str, resource: str | None = None) -> JobAssignment | None:
        """Hand the oldest queued job that one of the node's devices can run to that node, or None."""
        now = self._now()
        node = self._live_node(node_id)
        devices = [d for d in node.devices if d.plugin == "asr" and (resource is None or d.resource == resource)]
        if resource is not None and not devices:
            raise InvalidInput(f"resource {resource} is not a registered device of node {node_id}", param="resource")
        if node.state == "draining":
            return None
        for index, (_, job_id) in enumerate(self._queue):
            job = self._jobs[job_id]
            device = next((d for d in devices if language_fits(d, job.spec.language)), None)
            if device is not None:
                del self._queue[index]
                return self._assign(job, node, device, now)
        return None

    def _assign(self, job: Job, node: Node, device: DeviceSpec, now: float) -> JobAssignment:
        waited = now - job.queued_at
        job.queued_total_s += waited
        self._unservable.pop(job.job_id, None)
        job.state = "assigned"
        job.node_id = node.node_id
        job.resource = device.resource
        job.assigned_at = now
        job.lease_id = None
        job.lease_epoch = None
        # A new attempt starts from scratch: segments of an earlier attempt are not its output.
        job.segments = []
        job.segment_pos = {}
        self._assigned.add(job.job_id)
        log.info(
            "job assigned job_id=%s node_id=%s resource=%s attempt=%d queued_s=%.3f",
            job.job_id,
            node.node_id,
            device.resource,
            job.attempt,
            waited,
        )
        self._emit(job_topic(job.job_id))
        spec = job.spec
        return JobAssignment(
            job_id=job.job_id,
            attempt=job.attempt,
            language=spec.language,
            options=spec.options.model_dump(exclude_none=True),
            audio=AudioRef(
                format=spec.format,
                sample_rate=spec.sample_rate,
                bytes=job.audio_bytes,
                url=f"/v1/jobs/{job.job_id}/audio",
            ),
            deadline_s=max(0.0, job.deadline_at - now) if job.deadline_at is not None else None,
            queued_s=round(waited, 6),
            resource=device.resource,
        )

    def post_events(self, job_id: str, report: EventsReport) -> None:
        """Store streamed segments from the job's current holder (a segment id seen before is replaced)."""
        self._now()
        job = self._job(job_id)
        self._check_reporter(job, report, "events")
        for segment in report.events:
            data = segment.model_dump()
            pos = job.segment_pos.get(segment.id)
            if pos is None:
                job.segment_pos[segment.id] = len(job.segments)
                job.segments.append(data)
            else:
                job.segments[pos] = data
        if report.events:
            self._emit(job_topic(job_id))

    def _check_reporter(self, job: Job, report: EventsReport | ResultReport, what: str) -> LeaseRecord:
        """``_check_holder`` for an events or result report, logging a refusal with the reporter's identity."""
        try:
            return self._check_holder(job, report.attempt, report.lease_id, report.lease_epoch, report.node_id)
        except ReportRejected as exc:
            log.info("%s rejected job_id=%s node_id=%s lease_id=%s attempt=%d lease_epoch=%d reason=%s", what,
                     job.job_id, report.node_id, report.lease_id, report.attempt, report.lease_epoch, exc.code)
            raise

    def _check_holder(self, job: Job, attempt: int, lease_id: str, epoch: int, node_id: str) -> LeaseRecord:
        """The job's live lease if (attempt, lease id, epoch, node) all name its current holder; else
        ReportRejected naming the first field that does not match. Renewals, events and results all pass here."""
        lease = self._active.get(job.lease_id) if job.lease_id is not None else None
        check_holder(
            Holder(job.job_id, job.terminal, job.state, job.attempt, lease.lease_id if lease else None,
                   lease.epoch if lease else None, lease.node_id if lease else None),
            attempt, lease_id, epoch, node_id,
        )
        assert lease is not None  # check_holder refuses a job without a live lease
        return lease

    def report_result(self, job_id: str, report: ResultReport) -> ResultAck:
        """Accept the one final result of a job from its current holder (``_check_holder``)."""
        now = self._now()
        job = self._job(job_id)
        holder = (report.attempt, report.lease_id, report.lease_epoch, report.node_id)
        previous = job.accepted_reports.get(holder)
        if previous is not None:
            # The accepted holder retrying (its answer was lost): the same answer again, nothing changes.
            return previous.model_copy(update={"duplicate": True})
        try:
            lease = self._check_reporter(job, report, "result")
        except ReportRejected as exc:
            self.metrics.results_rejected.labels(exc.code).inc()
            raise
        self.metrics.results_accepted.inc()
        self._end_lease(lease, "released", now)
        job.node_timings = dict(report.timings)
        if report.outcome == "succeeded":
            assert report.result is not None  # ResultReport guarantees it
            job.result = report.result.model_dump()
            if report.result.segments:
                job.segments = [s.model_dump() for s in report.result.segments]
                job.segment_pos = {s.id: i for i, s in enumerate(report.result.segments)}
            ack = ResultAck()
            self._finish(job, now, None)
        else:
            error = report.error or JobErrorInfo(code="failed", message="the node reported a failure")
            if error.code not in JOB_ERROR_CODES:
                error = JobErrorInfo(code="failed", message=f"{error.code}: {error.message}")
            if error.code in RETRYABLE_ERROR_CODES and job.attempt < self.settings.max_attempts:
                ack = ResultAck(requeued=True)
                self._requeue_or_fail(job, now, "retryable_error", error.code, error.message)
            else:
                ack = ResultAck()
                self._finish(job, now, error)
        job.accepted_reports[holder] = ack
        return ack

    # ------------------------------------------------------------------------------------ leases

    def grant_lease(self, req: LeaseRequest) -> LeaseGrant:
        """Grant a fenced lease on (node, resource) for a job assigned to that node."""
        now = self._now()
        node = self._live_node(req.node_id)
        if not any(d.resource == req.resource for d in node.devices):
            raise InvalidInput(
                f"resource {req.resource} is not a registered device of node {req.node_id}", param="resource"
            )
        job = self._jobs.get(req.job_id)
        if job is None or job.node_id != req.node_id or job.state not in ("assigned", "running"):
            state = "unknown" if job is None else f"{job.state} on node {job.node_id or 'none'}"
            raise JobNotAssigned(f"job {req.job_id} is not assigned to node {req.node_id} (it is {state})")
        key = (req.node_id, req.resource)
        holder = self._holders.get(key)
        if holder is not None and holder.job_id != job.job_id:
            raise ResourceHeld(
                f"{req.resource} on node {req.node_id} is held by lease {holder.lease_id} (job {holder.job_id})",
                retry_after_s=max(1, math.ceil(holder.expires_at - now)),
            )
        if job.lease_id is not None and job.lease_id in self._active:
            # The same job asks again (a retry after a lost answer, or another device): the older
            # lease is fenced off so only the newest epoch can report.
            self._end_lease(self._active[job.lease_id], "superseded", now)
        epoch = self._next_epoch()
        ttl = self._clamp_ttl(req.ttl_s)
        lease = LeaseRecord(
            lease_id=f"lease-{secrets.token_hex(8)}",
            node_id=req.node_id,
            job_id=job.job_id,
            attempt=job.attempt,
            resource=req.resource,
            epoch=epoch,
            ttl_s=ttl,
            granted_at=now,
            expires_at=now + ttl,
        )
        self._leases[lease.lease_id] = lease
        self._active[lease.lease_id] = lease
        self._holders[key] = lease
        self._assigned.discard(job.job_id)
        job.state = "running"
        job.resource = req.resource
        job.lease_id = lease.lease_id
        job.lease_epoch = epoch
        if job.started_at is None:
            job.started_at = now
        self.metrics.leases_granted.labels(req.node_id).inc()
        log.info(
            "lease granted lease_id=%s node_id=%s resource=%s epoch=%d job_id=%s attempt=%d ttl_s=%g",
            lease.lease_id,
            req.node_id,
            req.resource,
            epoch,
            job.job_id,
            job.attempt,
            ttl,
        )
        self._emit(job_topic(job.job_id))
        return LeaseGrant(lease_id=lease.lease_id, epoch=epoch, ttl_s=ttl, resource=req.resource)

    def _next_epoch(self) -> int:
        """The next fencing token: strictly greater than every epoch granted before, on any node or resource."""
        self._epoch += 1
        return self._epoch

    def _clamp_ttl(self, ttl_s: float) -> float:
        return clamp_ttl(self.settings, ttl_s)

    def renew_lease(self, lease_id: str, req: RenewRequest) -> RenewResponse:
        now = self._now()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseUnusable(f"lease {lease_id} is not known", code="unknown_lease")
        if lease.state != "active":
            raise LeaseUnusable(f"lease {lease_id} is {lease.state}", code=f"lease_{lease.state}")
        job = self._jobs.get(lease.job_id)
        if job is None:  # a live lease's job is never forgotten; this is only a guard
            raise LeaseUnusable(f"lease {lease_id} is for a forgotten job", code="unknown_lease")
        try:
            # The path names the lease and so its attempt; the body must name the same epoch and node.
            self._check_holder(job, lease.attempt, lease_id, req.epoch, req.node_id)
        except ReportRejected as exc:
            log.info(
                "renewal rejected lease_id=%s node_id=%s epoch=%d reason=%s", lease_id, req.node_id, req.epoch, exc.code
            )
            raise LeaseUnusable(exc.message, code=exc.code) from None
        if req.ttl_s is not None:
            lease.ttl_s = self._clamp_ttl(req.ttl_s)
        lease.expires_at = now + lease.ttl_s
        self.metrics.leases_renewed.labels(lease.node_id).inc()
        return RenewResponse(lease_id=lease_id, epoch=lease.epoch, ttl_s=lease.ttl_s)

    def release_lease(self, lease_id: str) -> None:
        """Give a lease back (idempotent). A job without an accepted result goes back to the queue."""
        now = self._now()
        lease = self._active.get(lease_id)
        if lease is None:
            return
        self._end_lease(lease, "released", now)
        log.info("lease released lease_id=%s node_id=%s job_id=%s", lease_id, lease.node_id, lease.job_id)
        job = self._jobs.get(lease.job_id)
        if job is not None and job.lease_id == lease_id and job.state == "running":
            self._requeue_or_fail(
                job, now, "released", "lease_lost", f"node {lease.node_id} released the lease without a result"
            )

    def lease(self, lease_id: str) -> LeaseRecord | None:
        """A lease by id (for tests and status pages); None once forgotten."""
        return self._leases.get(lease_id)

    def _end_lease(self, lease: LeaseRecord, state: LeaseState, now: float) -> None:
        lease.state = state
        lease.ended_at = now
        self._active.pop(lease.lease_id, None)
        key = (lease.node_id, lease.resource)
        if self._holders.get(key) is lease:
            del self._holders[key]
        self._dead_leases.append((now, lease.lease_id))

    def _expire_lease(self, lease: LeaseRecord, now: float, reason: str = "lease_expired") -> None:
        self._end_lease(lease, "expired", now)
        self.metrics.leases_expired.labels(lease.node_id).inc()
        log.info(
            "lease expired lease_id=%s node_id=%s resource=%s epoch=%d job_id=%s reason=%s",
            lease.lease_id,
            lease.node_id,
            lease.resource,
            lease.epoch,
            lease.job_id,
            reason,
        )
        job = self._jobs.get(lease.job_id)
        if job is not None and job.lease_id == lease.lease_id and job.state == "running":
            self._requeue_or_fail(
                job, now, reason, "lease_expired", f"lease {lease.lease_id} on node {lease.node_id} expired"
            )

    # ------------------------------------------------------------------------- requeue and finish

    def _requeue_or_fail(self, job: Job, now: float, reason: str, code: str, message: str) -> None:
        """Put the job back with attempt+1, or fail it with ``code`` once max_attempts is reached."""
        self._assigned.discard(job.job_id)
        if job.lease_id is not None and job.lease_id in self._active:
            self._end_lease(self._active[job.lease_id], "released", now)
        outcome = requeue_or_fail(self.settings, job.attempt, job.deadline_at, now, code, message)
        if outcome != "requeue":
            self._finish(job, now, outcome)
            return
        previous_node = job.node_id
        job.attempt += 1
        job.state = "queued"
        job.node_id = None
        job.resource = None
        job.lease_id = None
        job.lease_epoch = None
        job.assigned_at = None
        job.queued_at = now
        self.metrics.jobs_requeued.labels(reason).inc()
        log.info(
            "job requeued job_id=%s reason=%s from_node=%s attempt=%d",
            job.job_id,
            reason,
            previous_node or "-",
            job.attempt,
        )
        self._enqueue(job, now)

    def _finish(self, job: Job, now: float, error: JobErrorInfo | None) -> None:
        if job.state == "queued":
            self._queue.remove((job.seq, job.job_id))
            self._unservable.pop(job.job_id, None)
            job.queued_total_s += now - job.queued_at  # a job that ends in the queue reports its real wait
        self._assigned.discard(job.job_id)
        self._open_jobs -= 1
        self._open_bytes -= job.audio_bytes
        if job.lease_id is not None and job.lease_id in self._active:
            self._end_lease(self._active[job.lease_id], "released", now)
        job.state = "succeeded" if error is None else "failed"
        job.error = error
        job.finished_at = now
        if not self.settings.keep_audio:
            job.audio = b""  # nobody needs it any more; keep memory (and max_queued_bytes) for queued work
        self._finished.append((now, job.job_id))
        outcome = "succeeded" if error is None else error.code
        self.metrics.job_finished(outcome)
        log.info(
            "job finished job_id=%s outcome=%s attempt=%d node_id=%s seconds=%.3f%s",
            job.job_id,
            outcome,
            job.attempt,
            job.node_id or "-",
            now - job.created_at,
            f" error={error.message!r}" if error is not None else "",
        )
        self._emit(job_topic(job.job_id))

    # ---------------------------------------------------------------------------------- the clock

    def _fail_unservable(self, now: float) -> None:
        """Fail queued jobs that no live node has served for ``unservable_after_s`` (no_capable_node)."""
        after = self.settings.unservable_after_s
        if self._recheck_queue:  # the nodes changed: O(queue), but only then
            self._recheck_queue = False
            served = self._served()
            for _, job_id in self._queue:
                if served.serves(self._jobs[job_id].spec.language):
                    self._unservable.pop(job_id, None)
                elif job_id not in self._unservable:
                    self._unservable[job_id] = now
        while self._unservable:
            job_id, since = next(iter(self._unservable.items()))
            if now - since < after:
                break  # the rest became unservable later
            job = self._jobs.get(job_id)
            if job is None or job.state != "queued":  # a guard: leaving the queue removes a job from the map
                del self._unservable[job_id]
                continue
            self._finish(job, now, unservable_error(job.spec.language, self._served(), now - since, after))

    def _advance(self, now: float) -> None:
        s = self.settings
        gone_after = s.heartbeat_interval_s * s.node_gone_after_heartbeats
        for node in list(self._nodes.values()):
            if node.state == "gone":
                if node.gone_at is not None and now - node.gone_at >= s.job_retention_s:
                    del self._nodes[node.node_id]
                    self.metrics.node_forgotten(node.node_id)
            elif now - node.last_heartbeat >= gone_after:
                self._node_gone(node, now)
        for lease in [lease for lease in self._active.values() if lease.expires_at <= now]:
            if lease.state == "active":  # an earlier expiry in this loop may have ended it
                self._expire_lease(lease, now)
        for job_id in [j for j in self._assigned if now - (self._jobs[j].assigned_at or now) >= s.assign_timeout_s]:
            job = self._jobs[job_id]
            self._requeue_or_fail(
                job,
                now,
                "assign_timeout",
                "worker_unavailable",
                f"node {job.node_id} took no lease within {s.assign_timeout_s:g} s",
            )
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            job = self._jobs.get(job_id)
            if job is not None and job.state == "queued":
                self._finish(job, now, JobErrorInfo(code="timeout", message="the deadline passed while queued"))
        self._fail_unservable(now)
        while self._finished and now - self._finished[0][0] >= s.job_retention_s:
            _, job_id = self._finished.popleft()
            self._jobs.pop(job_id, None)
        while self._dead_leases and now - self._dead_leases[0][0] >= s.job_retention_s:
            _, lease_id = self._dead_leases.popleft()
            lease = self._leases.get(lease_id)
            if lease is not None and lease.state != "active":
                del self._leases[lease_id]
