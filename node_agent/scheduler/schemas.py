"""Wire shapes of scheduler protocol version 1, shared by the scheduler and the agent's client.

Messages a node sends ignore unknown fields (a newer agent may send more); replies ignore unknown
fields too (a newer scheduler may answer more). Job submissions from clients are strict: an unknown
field or option is a mistake the client should hear about.
"""

from __future__ import annotations

import functools
import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints,
                      field_serializer, model_validator)

from ..contracts import DecodeOptions, parse_options
from ..errors import JOB_ERRORS, InvalidRequest, JobErrorCode
from ..labels import Labels
from ..languages import NOT_A_CODE, is_language_code

PROTOCOL_VERSION = 1

#: Every job error code on the wire (``JobErrorCode``; docs/protocol.md explains each).
JOB_ERROR_CODES: tuple[str, ...] = tuple(JobErrorCode)
#: Failures that are the node's fault, not the input's: the job is dispatched again while attempts remain.
RETRYABLE_ERROR_CODES: frozenset[str] = frozenset(code for code, cls in JOB_ERRORS.items() if cls.retryable)

class JobState(StrEnum):
    """A job's life: queued -> assigned (to a node's poll) -> running (under a lease) -> succeeded or failed; an
    assigned or running job whose node or lease is lost goes back to queued as its next attempt; a client or
    operator may cancel a job in any open state (``DELETE /v1/jobs/{id}``). The one spelling of each name: the
    store's SQL, the rules and the wire all use these."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_JOB_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
#: Jobs that count against the queue's bounds and still hold their audio.
OPEN_JOB_STATES: tuple[JobState, ...] = (JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING)


class Priority(StrEnum):
    """Which queue a job waits in: ``interactive`` (a live utterance, the OpenAI endpoint) is dispatched before
    every queued ``batch`` job its node can also serve; a batch job queued longer than
    ``scheduler.batch_max_wait_s`` counts as interactive, so batch work is never starved."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class LeaseState(StrEnum):
    """A lease is active until it expires (its holder stopped renewing), is released (given back, or its job
    finished) or is superseded (its job leased again: only the newest epoch may report)."""

    ACTIVE = "active"
    EXPIRED = "expired"
    RELEASED = "released"
    SUPERSEDED = "superseded"


class NodeState(StrEnum):
    """What a node reports of itself (ready, busy, draining, degraded), and gone: missed its heartbeats."""

    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    DEGRADED = "degraded"
    GONE = "gone"


NODE_STATES: tuple[NodeState, ...] = tuple(NodeState)


def _reported_state(state: NodeState) -> NodeState:
    if state is NodeState.GONE:
        raise ValueError("a node reports ready, busy, draining or degraded; gone is the scheduler's to say")
    return state


#: A state a node may report in a heartbeat.
ReportedNodeState = Annotated[NodeState, AfterValidator(_reported_state)]

#: The store's integer columns: INTEGER (attempts, segment ids) is 32-bit on PostgreSQL, BIGINT (epochs, byte
#: counts) 64-bit; a number past them is the sender's mistake (400), never the store's error (500).
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def _storable_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\x00)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be Unicode text (a lone surrogate such as \\ud800 is not)") from None
    return value


#: Text a store column keeps: no NUL (PostgreSQL's text refuses it), no lone surrogate (no UTF-8 for it).
Text = Annotated[str, AfterValidator(_storable_text)]

#: An id a node or client names a node, job or lease by: those the scheduler makes (node-..., job-..., lease-...)
#: and those a node chooses (``RegisterRequest.node_id``). Path parameters are checked against it too.
ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
ID_MAX_CHARS = 64
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_CHARS, pattern=ID_PATTERN)]

#: A lease resource: a device (``cpu``, ``gpu:N``) or one slot of it (``cpu/0``, ``gpu:0/1``) where a node runs
#: several workers on the device, each leasing its own slot.
RESOURCE_PATTERN = r"^(cpu|gpu:[0-9]{1,3})(/[0-9]{1,3})?$"
Resource = Annotated[str, StringConstraints(pattern=RESOURCE_PATTERN)]


def _language_code(value: str) -> str:
    if not re.fullmatch(r"[a-z]{2,3}", value):
        raise ValueError(f"{value[:20]!r} is not a 2-3 letter lowercase language code (such as en or zh) or auto")
    return value


LanguageCode = Annotated[str, AfterValidator(_language_code)]


def _auto_is_none(value: Any) -> Any:
    return None if value in ("auto", "") else value


def _whisper_code(value: str | None) -> str | None:
    # Checked on submission, so a job no model can run is refused at once rather than decoded as detect.
    if value is not None and not is_language_code(value):
        raise ValueError(f"{value[:20]!r} is {NOT_A_CODE} (or auto to detect)")
    return value


#: A job's language: one of Whisper's codes (node_agent/languages.py); "auto" or null means detect it.
JobLanguage = Annotated[str | None, BeforeValidator(_auto_is_none), AfterValidator(_whisper_code)]


class _NodeMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _ClientRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- nodes


#: Bounds on what a node registers (issue 22, row 13): every node's list is read on each listing and each lease,
#: so 5000 nodes with 150 KB strings made GET /v1/nodes take seconds. Far past any real device: a model name or a
#: local model path, a compute type, a GPU's name; ~100 Whisper languages; GPUs per host.
NAME_MAX_CHARS = 256
MODEL_MAX_CHARS = 1024
LANGUAGES_MAX = 200
GPUS_MAX = 64


class GpuInfo(_NodeMessage):
    index: Int32 = Field(ge=0)
    name: str = Field(max_length=NAME_MAX_CHARS)
    memory_bytes: Int64 = Field(ge=0)
    uuid: str | None = Field(None, max_length=NAME_MAX_CHARS)


class Hardware(_NodeMessage):
    cpu_cores: Int32 = Field(ge=0)
    memory_bytes: Int64 = Field(ge=0)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=GPUS_MAX)


class DeviceSpec(_NodeMessage):
    """One device (or slot of a device) a node runs jobs on; ``languages`` null means any language."""

    resource: Resource
    #: The physical device a slot runs on (``cpu``, ``gpu:0``); informational, for operators.
    device: str | None = Field(None, max_length=16)
    plugin: str = Field("asr", max_length=NAME_MAX_CHARS)
    model: str = Field(max_length=MODEL_MAX_CHARS)
    compute_type: str = Field(max_length=NAME_MAX_CHARS)
    languages: list[LanguageCode] | None = Field(None, max_length=LANGUAGES_MAX)


@functools.lru_cache(maxsize=1024)
def stored_devices(text: str) -> tuple[DeviceSpec, ...]:
    """A node's device list as a store keeps it (JSON text), parsed once per distinct text (every poll and lease
    reads it; nodes rarely change it)."""
    return tuple(DeviceSpec.model_validate(d) for d in json.loads(text))


class RegisterRequest(_NodeMessage):
    node_id: Id | None = None
    agent_version: Text = Field(max_length=64)
    hostname: Text = Field(max_length=255)
    hardware: Hardware
    devices: list[DeviceSpec] = Field(max_length=64)
    #: The node's own labels (``node.labels``); its devices' automatic ones (device_class, model, compute_type)
    #: are the scheduler's to derive, and win over these.
    labels: Labels = Field(default_factory=dict)


class LeaseBounds(_Reply):
    min_ttl_s: float
    max_ttl_s: float


#: The header a node proves its identity with on every node call: the secret its first registration returned.
NODE_SECRET_HEADER = "X-Node-Secret"


class RegisterResponse(_Reply):
    node_id: str
    heartbeat_interval_s: float
    lease: LeaseBounds
    protocol_version: int = PROTOCOL_VERSION
    #: Given on a node's first registration only (the scheduler keeps just its hash): the node keeps it and sends
    #: it as ``X-Node-Secret`` on every node call; a scheduler with tokens refuses that node's id without it.
    node_secret: str | None = None


class HeartbeatRequest(_NodeMessage):
    state: ReportedNodeState
    running_jobs: list[Id] = Field(default_factory=list, max_length=1024)
    cpu_percent: float = Field(0.0, ge=0)
    memory_used_bytes: Int64 = Field(0, ge=0)
    memory_total_bytes: Int64 = Field(0, ge=0)


class HeartbeatResponse(_Reply):
    heartbeat_interval_s: float


class NodeView(_Reply):
    node_id: str
    hostname: str
    agent_version: str
    state: NodeState
    hardware: Hardware
    devices: list[DeviceSpec]
    running_jobs: list[str]
    last_heartbeat_age_s: float
    registered_age_s: float
    #: The node's own labels as it registered them (each device adds its automatic ones: ``rules.automatic_labels``).
    labels: dict[str, str] = Field(default_factory=dict)
    #: An operator cordoned the node (``POST /v1/nodes/{id}/cordon`` or a drain): it gets no new jobs.
    cordoned: bool = False
    #: Seconds left until a drain hands the node's running jobs back to the queue; None: no drain deadline.
    drain_deadline_s: float | None = None


#: Nodes one ``GET /v1/nodes`` answers at most (its default page): thousands of nodes with their device lists in
#: one answer held the scheduler's event loop for seconds.
NODES_PAGE_MAX = 500


class NodeList(_Reply):
    nodes: list[NodeView]
    #: More nodes follow: ask again with ``after`` set to this (keyset paging in node id order); None on the last page.
    next_after: str | None = None


# ------------------------------------------------------------------------------------- jobs (agent)


class AudioRef(_Reply):
    format: Literal["auto", "pcm_s16le"]
    sample_rate: int | None
    bytes: int
    url: str


class LeaseGrant(_Reply):
    lease_id: str
    epoch: int
    ttl_s: float
    resource: str


class JobAssignment(_Reply):
    """What a long poll hands a node. ``deadline_s`` is the time left (seconds) when it was handed out."""

    job_id: str
    attempt: int
    language: str | None
    #: The options the client set, checked at submission; typed from here to the plugin (only those set travel).
    options: DecodeOptions
    #: Why ``options`` could not be read here (an option of a newer scheduler this node does not know): not on the
    #: wire; the job then fails with invalid_request naming it, rather than the whole assignment being unreadable.
    options_error: str | None = Field(None, exclude=True)
    audio: AudioRef
    deadline_s: float | None
    queued_s: float
    #: The node device the job was matched to (its languages fit the job).
    resource: str | None = None
    #: The job's lease on ``resource``, granted with the assignment when the poll asked (``lease_ttl_s``) and the
    #: resource was free; otherwise None, and the node asks with ``POST /v1/leases`` (which says why it waits).
    lease: LeaseGrant | None = None
    #: The job is section ``JobView.section`` of this parent job (issue 24): its node decodes it as it comes, and
    #: never splits it again.
    parent_id: str | None = None
    #: How long the scheduler held the poll before assigning. The poll's sending plus this is no later than the
    #: lease's grant, so a node that times its renewals from there never believes a lease lives longer than it does.
    poll_held_s: float | None = None

    @field_serializer("options")
    def _options_set(self, options: DecodeOptions) -> dict[str, Any]:
        return options.wire()

    @model_validator(mode="before")
    @classmethod
    def _options_readable(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            try:
                return {**data, "options": parse_options(data["options"])}
            except InvalidRequest as exc:
                return {**data, "options": {}, "options_error": exc.message}
        return data


class LeaseRequest(_NodeMessage):
    node_id: Id
    job_id: Id
    resource: Resource
    ttl_s: float = Field(gt=0)


class RenewRequest(_NodeMessage):
    """Renewals, like events and results, are accepted only from the lease's holder (its node and epoch)."""

    node_id: Id
    epoch: Int64
    #: Optional new TTL (clamped like a grant's); default: the TTL the lease has.
    ttl_s: float | None = Field(None, gt=0)


class RenewResponse(_Reply):
    lease_id: str
    epoch: int
    ttl_s: float


#: Segments one job keeps (issue 22, row 13): a segment id is its key in the job, so ids in 0..this-1 bound them,
#: on every store and path. 500k events made one GET of the job take 752 MB; a 10-hour recording at a segment
#: per 2 s is 18k. Past it an events report, or a result, is refused with 400 naming the bound.
MAX_SEGMENTS_PER_JOB = 100_000


def _segment_id(value: int) -> int:
    if not 0 <= value < MAX_SEGMENTS_PER_JOB:
        raise ValueError(f"a segment id is 0..{MAX_SEGMENTS_PER_JOB - 1}: a job keeps at most "
                         f"{MAX_SEGMENTS_PER_JOB} segments (MAX_SEGMENTS_PER_JOB)")
    return value


class Segment(BaseModel):
    """One transcript segment; any further faster-whisper fields ride along unchanged. ``start`` and ``end``
    must be finite (NaN or an infinity is refused with 400 where it arrives, so SRT/VTT can always render)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    id: Annotated[Int32, AfterValidator(_segment_id)]
    start: float
    end: float
    text: str


class EventsReport(_NodeMessage):
    """Streamed segments, fenced like a result: (attempt, lease_id, lease_epoch, node_id) name the holder."""

    node_id: Id
    lease_id: Id
    attempt: Int32 = Field(ge=1)
    lease_epoch: Int64 = Field(ge=1)
    events: list[Segment] = Field(max_length=MAX_SEGMENTS_PER_JOB)


class TranscriptResult(BaseModel):
    # Declared numbers (duration_s, language_probability) finite, like a segment's times.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    text: str
    language: str | None = None
    language_probability: float | None = None
    duration_s: float | None = None
    segments: list[Segment] = Field(default_factory=list, max_length=MAX_SEGMENTS_PER_JOB)


class JobErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = "failed"
    message: str = ""


class ResultReport(_NodeMessage):
    """A node's final word on one attempt; accepted only from the job's current holder (attempt, lease_id,
    lease_epoch, node_id), and idempotent by those."""

    node_id: Id
    lease_id: Id
    attempt: Int32 = Field(ge=1)
    lease_epoch: Int64 = Field(ge=1)
    outcome: Literal["succeeded", "failed"]
    result: TranscriptResult | None = None
    error: JobErrorInfo | None = None
    timings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _result_present(self) -> "ResultReport":
        if self.outcome == "succeeded" and self.result is None:
            raise ValueError("result is required when outcome is succeeded")
        return self


class ResultAck(_Reply):
    accepted: bool = True
    duplicate: bool = False
    requeued: bool = False


# ------------------------------------------------------------------------------------ jobs (client)

def _any_model(value: Any) -> Any:
    # The OpenAI endpoint's whisper-1 (and an empty field) means "whichever model the node has".
    return None if value in ("", "whisper-1") else value



#: The decode options a client may set: the one model, ``node_agent.contracts.DecodeOptions``.
JobOptions = DecodeOptions


class JobSpec(_ClientRequest):
    """Everything about a job except its audio (shared by JSON and multipart submissions)."""

    format: Literal["auto", "pcm_s16le"] = "auto"
    sample_rate: int | None = Field(None, ge=1000, le=384_000)
    language: JobLanguage = None
    options: JobOptions = Field(default_factory=JobOptions)
    deadline_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)
    #: A model as nodes register it (``asr.model``: a name such as large-v3, or a path); None: any node's model.
    model: Annotated[Annotated[Text, Field(max_length=MODEL_MAX_CHARS)] | None, BeforeValidator(_any_model)] = None
    #: Node labels that must all match (``node.labels`` and the automatic device_class, model, compute_type).
    labels: Labels = Field(default_factory=dict)
    priority: Priority = Priority.BATCH

    @model_validator(mode="after")
    def _rate_for_pcm(self) -> "JobSpec":
        if self.format == "pcm_s16le" and self.sample_rate is None:
            raise ValueError("sample_rate is required when format is pcm_s16le")
        return self


class JobSubmission(JobSpec):
    """JSON body of ``POST /v1/jobs``."""

    audio_b64: str = Field(min_length=1)


class JobSubmitted(_Reply):
    job_id: str
    state: JobState


#: The longest a ``GET /v1/jobs/{id}/sections`` long poll waits (``wait_s``).
SECTIONS_WAIT_MAX_S = 30.0
#: The sample rates a section's raw audio may have (the plugin cuts 16 kHz audio: the one Whisper decodes).
SECTION_SAMPLE_RATE = 16000


class SectionSummary(_Reply):
    """One section child of a parent job (issue 24), as the parent's view lists it: its index (1.., the parent's
    own audio is section 0), its job, where it runs, and where it lies in the parent's audio (seconds)."""

    index: int
    job_id: str
    state: JobState
    node_id: str | None
    offset_s: float
    duration_s: float


class SectionView(SectionSummary):
    """``GET /v1/jobs/{id}/sections``: a section as its parent's node follows it. ``result`` (times relative to the
    section's own audio) only for a section that succeeded at or after the poll's ``from``; ``error`` for one that
    failed or was cancelled."""

    attempt: int
    result: TranscriptResult | None = None
    error: JobErrorInfo | None = None


class SectionList(_Reply):
    sections: list[SectionView]


class Capacity(_Reply):
    """``GET /v1/jobs/{id}/capacity``: how many section children of the job would be dispatched at once now."""

    free_slots: int


class JobView(_Reply):
    job_id: str
    state: JobState
    attempt: int
    node_id: str | None
    language: str | None
    segments: list[dict[str, Any]]
    result: dict[str, Any] | None
    error: JobErrorInfo | None
    created_age_s: float
    timings: dict[str, Any]
    filename: str | None = None
    model: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    priority: Priority = Priority.BATCH
    #: A parent's sections of its current attempt, by index (empty: not split).
    sections: list[SectionSummary] = Field(default_factory=list)
    #: A section child's parent, its index there and where it starts in the parent's audio (None: not a section).
    parent_id: str | None = None
    section: int | None = None
    offset_s: float | None = None



# ------------------------------------------------------------------------------------------ operators

#: The longest drain deadline an operator may give (a week: maintenance windows, not forever).
DRAIN_DEADLINE_MAX_S = 7 * 24 * 3600.0


class DrainRequest(_ClientRequest):
    """Body of ``POST /v1/nodes/{id}/drain`` (optional): hand the node's running jobs back after ``deadline_s``;
    None waits for them however long they take."""

    deadline_s: float | None = Field(None, ge=0, le=DRAIN_DEADLINE_MAX_S)


#: Jobs one ``GET /v1/jobs`` answers at most (its default page), as for nodes.
JOBS_PAGE_MAX = 500


class JobSummary(_Reply):
    """One job in a listing: what an operator scans for, without its segments or result."""

    job_id: str
    state: JobState
    priority: Priority
    model: str | None
    language: str | None
    node_id: str | None
    resource: str | None
    attempt: int
    filename: str | None
    created_age_s: float
    #: Seconds since it finished; None while open.
    finished_age_s: float | None
    error_code: str | None
    #: As in ``JobView``: a parent's sections, a child's parent and index.
    sections: list[SectionSummary] = Field(default_factory=list)
    parent_id: str | None = None
    section: int | None = None
    offset_s: float | None = None


class JobList(_Reply):
    """``GET /v1/jobs``: newest first (by submission order); ``next_after`` is the job id to page on from."""

    jobs: list[JobSummary]
    next_after: str | None = None


class SlotView(_Reply):
    resource: str
    model: str
    busy: bool


class RunningJob(_Reply):
    job_id: str
    state: JobState
    resource: str | None
    attempt: int
    priority: Priority
    #: Seconds since the job's current lease was granted (since it was assigned, while it has none).
    lease_age_s: float
    #: Seconds until that lease expires unrenewed; None while the job has no lease.
    lease_expires_in_s: float | None


class ClusterNode(_Reply):
    node_id: str
    hostname: str
    state: NodeState
    cordoned: bool
    drain_deadline_s: float | None
    labels: dict[str, str]
    slots: list[SlotView]
    running_jobs: list[RunningJob]
    last_heartbeat_age_s: float


class QueueSummary(_Reply):
    """Queued jobs: how many per priority and per model asked (``any``: no model asked), and the oldest's wait."""

    interactive: int
    batch: int
    by_model: dict[str, int]
    oldest_wait_s: float | None
    oldest_wait_s_by_priority: dict[str, float]


class ReplicaInfo(_Reply):
    """Which scheduler process answered (replicas share one store: any of them may)."""

    hostname: str
    pid: int
    listen: str


class ClusterView(_Reply):
    """``GET /v1/cluster``: nodes (the first ``CLUSTER_NODES_MAX`` by id; the counts cover all), the queue, the
    jobs finished in the last hour by state, and the replica that answered (``scheduler``: the URL it was
    reached at)."""

    scheduler: str
    replica: ReplicaInfo
    nodes: list[ClusterNode]
    nodes_total: int
    nodes_by_state: dict[str, int]
    nodes_cordoned: int
    queue: QueueSummary
    #: Jobs that ended in the last hour, by terminal state (succeeded, failed, cancelled).
    finished_last_hour: dict[str, int]
    #: A batch job queued longer than this counts as interactive (``scheduler.batch_max_wait_s``): the CLI calls
    #: a queue whose oldest wait is past it degraded.
    batch_max_wait_s: float
