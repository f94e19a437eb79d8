"""The messages between the agent and a plugin process, declared once for both sides.

``WorkerSpec`` is what a plugin process starts with (``--spec`` JSON): the node's ``asr`` settings and the slot
it serves. The plugin reads every setting and decode default from it and keeps none of its own.

A message travels as the JSON header of one ``node_agent.wire`` frame, its kind in ``type``; only ``job``
carries a payload (the audio), and ``section`` (a section's audio, ``pcm_s16le``). Agent -> plugin: ``job``,
``cancel`` (stop that job at the next segment boundary; one naming any other job is stale and ignored), ``stop``
(exit), ``split`` (the answer to ``long_audio``). Plugin -> agent: ``ready`` or ``fatal`` once, then per job
``started``, [``long_audio``, then for a split ``sections`` and one ``section`` per child], ``segment``... and one
of ``result``, ``error`` or ``stopped`` (the answer to ``cancel``).

Splitting (README, "Long recordings in sections"): a job whose ``split_min_s`` is set and whose audio is at least
that long says ``long_audio`` and waits up to ``SPLIT_ANSWER_WAIT_S`` for ``split`` (how many sections; no answer
in time: 1). With more than one it cuts at silences, says ``sections`` (every section's bounds) and sends sections
1..n-1 as ``section`` frames, then decodes section 0 as any job: its segments and result are section 0's, its
``duration_s`` included (times from the start of the file, which is section 0's start); the agent merges the
children's into the job's result.

``to_header`` encodes one; ``parse_from_agent`` / ``parse_from_plugin`` check one on arrival and raise
``WireError`` naming the type for an unknown or malformed message.

Both sides ship together, so the shapes are strict: an unknown field is an error, not ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from .config import AsrSettings
from .contracts import UNKNOWN_OPTION, DecodeOptions, error_loc, one_line
from .errors import JobErrorCode, WireError


class WorkerSpec(BaseModel):
    """What one plugin process runs with. ``asr`` is the node's settings as loaded (model, compute type, limits,
    decode defaults); ``device``, ``device_index`` and ``cpu_threads`` are this worker's slot of a device and
    take the place of ``asr``'s lists and automatic values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    asr: AsrSettings
    #: ``cpu``, ``cuda`` or ``auto`` (the plugin picks cuda when ctranslate2 sees a GPU).
    device: str
    device_index: int = Field(ge=0)
    #: Threads of this worker (the slot split's share); 0 = the plugin decides.
    cpu_threads: int = Field(ge=0)
    log_level: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The message's kind; each class below fixes it with a ``Literal``.
    type: str


# ------------------------------------------------------------------------------------- agent -> plugin


class JobMessage(_Message):
    """Decode one job; the audio is the frame's payload. ``options`` travels as only the options set (the node's
    ``asr`` settings fill in the rest); a plugin with options of its own parses with a subclass (see
    ``parse_from_agent``)."""

    type: Literal["job"] = "job"
    job_id: str
    format: str = "auto"
    sample_rate: int | None = None
    language: str | None = None
    options: DecodeOptions = Field(default_factory=DecodeOptions)
    #: Audio at least this long is offered for splitting (``long_audio``); None: never (a section child, a job
    #: off the scheduler's queue, a node with asr.split_min_s null).
    split_min_s: float | None = Field(None, gt=0)

    @field_serializer("options")
    def _options_set(self, options: DecodeOptions) -> dict[str, Any]:
        # The options' own class: a subclass's fields (a test plugin's) travel too.
        return options.wire()


class CancelMessage(_Message):
    """Stop job ``job_id`` at its next segment boundary and answer ``stopped``."""

    type: Literal["cancel"] = "cancel"
    job_id: str


class StopMessage(_Message):
    """Exit (after stopping a running job, if any)."""

    type: Literal["stop"] = "stop"


#: How long a plugin waits for ``split`` after ``long_audio`` before it decodes the job whole. The agent's own
#: bound on the scheduler call behind the answer is shorter (``sections.CAPACITY_WAIT_S``).
SPLIT_ANSWER_WAIT_S = 5.0
#: The most sections a plugin cuts a job into, whatever ``split`` asks (the scheduler's bound is its own).
MAX_SECTIONS = 64


class SplitMessage(_Message):
    """The answer to ``long_audio``: cut job ``job_id`` into ``sections`` (1: decode it whole, as any job)."""

    type: Literal["split"] = "split"
    job_id: str
    sections: int = Field(ge=1, le=MAX_SECTIONS)


# ------------------------------------------------------------------------------------- plugin -> agent


class ReadyMessage(_Message):
    """The model is loaded and warm; what the plugin loaded, for status and metrics."""

    type: Literal["ready"] = "ready"
    model: str
    device: str
    compute_type: str
    load_s: float
    pid: int
    model_path: str | None = None
    device_index: int | None = None
    cpu_threads: int | None = None
    warmup_s: float | None = None
    multilingual: bool | None = None
    #: Languages the model serves; None: any (a multilingual model).
    languages: list[str] | None = None
    versions: dict[str, str] | None = None


class FatalMessage(_Message):
    """Loading failed; the process exits next."""

    type: Literal["fatal"] = "fatal"
    message: str


class StartedMessage(_Message):
    """The job's audio is decoded: its length sets the job's time budget."""

    type: Literal["started"] = "started"
    job_id: str
    duration_s: float = Field(ge=0)
    decode_audio_s: float = 0.0


class LongAudioMessage(_Message):
    """The job's audio is at least its ``split_min_s`` long: the plugin waits for ``split`` (bounded)."""

    type: Literal["long_audio"] = "long_audio"
    job_id: str
    duration_s: float = Field(gt=0)


class SectionsMessage(_Message):
    """The cut: every section as ``[offset_s, duration_s]`` in order (section 0 first, decoded by this plugin
    next), and the seconds the cut took (VAD around each boundary and slicing)."""

    type: Literal["sections"] = "sections"
    job_id: str
    bounds: list[tuple[float, float]] = Field(min_length=2, max_length=MAX_SECTIONS)
    cut_s: float = Field(ge=0)


class SectionMessage(_Message):
    """Section ``index`` (1..n-1) of the job; the payload is its audio, ``pcm_s16le`` at ``sample_rate``.
    ``language``: what section 0 is decoded in when the job named none (detected, or the node's default), so that
    every section decodes in it as one decode of the file would; None when the job has a language of its own."""

    type: Literal["section"] = "section"
    job_id: str
    index: int = Field(ge=1, lt=MAX_SECTIONS)
    offset_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    sample_rate: int = 16000
    language: str | None = None


class WordInfo(BaseModel):
    """One word of a segment (``word_timestamps``)."""

    model_config = ConfigDict(extra="forbid")

    start: float
    end: float
    word: str
    probability: float


class SegmentMessage(_Message):
    """One transcript segment, sent the moment it exists."""

    type: Literal["segment"] = "segment"
    job_id: str
    id: int
    start: float
    end: float
    text: str
    #: The temperature the segment was finally decoded at (above 0: a fallback); faster-whisper allows None.
    temperature: float | None
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    decode_s: float
    #: Only with the ``word_timestamps`` option.
    words: list[WordInfo] | None = None

    def event(self) -> dict[str, Any]:
        """The segment as the agent streams and reports it (no ``type`` or ``job_id``)."""
        return self.model_dump(exclude={"type", "job_id"}, exclude_unset=True)


class ResultMessage(_Message):
    """The job's transcript; its segments went before it. The one result type: the supervisor hands the message
    on with ``segments`` (those streamed before it) and ``worker_pid`` filled in, and the job's report carries
    ``transcript()``."""

    type: Literal["result"] = "result"
    job_id: str
    text: str
    language: str
    language_probability: float
    duration_s: float
    segments_count: int
    fallback_segments: int = 0
    batched: bool = False
    timings: dict[str, float | None] = Field(default_factory=dict)
    #: Filled in by the supervisor, never on the wire: the segments as streamed (``SegmentMessage.event()``).
    segments: list[dict[str, Any]] = Field(default_factory=list, exclude=True)
    #: Filled in by the supervisor, never on the wire: the process that decoded the job.
    worker_pid: int | None = Field(None, exclude=True)

    def transcript(self) -> dict[str, Any]:
        """The result as the scheduler's report (``TranscriptResult``) and ``transcribe --json`` carry it."""
        return {"text": self.text, "language": self.language, "language_probability": self.language_probability,
                "duration_s": self.duration_s, "segments": self.segments, "timings": dict(self.timings),
                "fallback_segments": self.fallback_segments, "batched": self.batched}


class ErrorMessage(_Message):
    """The job failed; ``job_id`` is None when the message that failed named none."""

    type: Literal["error"] = "error"
    job_id: str | None
    code: JobErrorCode
    message: str


class StoppedMessage(_Message):
    """The answer to ``cancel``: the job stopped at a segment boundary and the process stays loaded."""

    type: Literal["stopped"] = "stopped"
    job_id: str


AgentMessage = JobMessage | CancelMessage | StopMessage | SplitMessage
PluginMessage = (ReadyMessage | FatalMessage | StartedMessage | SegmentMessage | ResultMessage | ErrorMessage
                 | StoppedMessage | LongAudioMessage | SectionsMessage | SectionMessage)

_FROM_AGENT: dict[str, type[_Message]] = {m.model_fields["type"].default: m
                                           for m in (JobMessage, CancelMessage, StopMessage, SplitMessage)}
_FROM_PLUGIN: dict[str, type[_Message]] = {m.model_fields["type"].default: m
                                            for m in (ReadyMessage, FatalMessage, StartedMessage, SegmentMessage,
                                                      ResultMessage, ErrorMessage, StoppedMessage, LongAudioMessage,
                                                      SectionsMessage, SectionMessage)}


def to_header(message: _Message) -> dict[str, Any]:
    """The frame header of ``message``: its ``type`` and the fields that were set."""
    return {"type": message.type, **message.model_dump(mode="json", exclude={"type"}, exclude_unset=True)}


def _parse(header: dict[str, Any], kinds: dict[str, type[_Message]], sender: str) -> Any:
    kind = header.get("type")
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message type {kind!r} from the {sender} (known: {', '.join(kinds)})")
    try:
        return cls.model_validate(header)
    except ValidationError as exc:
        unknown = UNKNOWN_OPTION if error_loc(exc)[:1] == ("options",) else "unknown field"
        raise WireError(f"malformed {kind!r} message from the {sender}: {one_line(exc, unknown=unknown)}") from None


def parse_from_agent(header: dict[str, Any], job: type[JobMessage] = JobMessage) -> AgentMessage:
    """A frame header the plugin received, checked; ``WireError`` naming the type if unknown or malformed.
    ``job``: the plugin's job message, a subclass when its options have fields of its own (a test plugin's)."""
    kinds = _FROM_AGENT if job is JobMessage else {**_FROM_AGENT, "job": job}
    return _parse(header, kinds, "agent")  # type: ignore[no-any-return]


def parse_from_plugin(header: dict[str, Any]) -> PluginMessage:
    """A frame header the agent received, checked; ``WireError`` naming the type if unknown or malformed."""
    return _parse(header, _FROM_PLUGIN, "plugin")  # type: ignore[no-any-return]


__all__ = ["MAX_SECTIONS", "SPLIT_ANSWER_WAIT_S", "AgentMessage", "CancelMessage", "ErrorMessage", "FatalMessage",
           "JobMessage", "LongAudioMessage", "PluginMessage", "ReadyMessage", "ResultMessage", "SectionMessage",
           "SectionsMessage", "SegmentMessage", "SplitMessage", "StartedMessage", "StopMessage", "StoppedMessage",
           "WordInfo", "WorkerSpec", "parse_from_agent", "parse_from_plugin", "to_header"]
