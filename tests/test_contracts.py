"""The contracts declared once (node_agent/contracts.py, node_agent/plugin_messages.py) and every side that uses
them: decode options, job error codes and their metric series and HTTP statuses, the one-line validation
message, and the typed agent <-> plugin messages (the plugin's side through the scripted stand-in process)."""

from __future__ import annotations

import inspect
import json
import socket
import subprocess
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, ValidationError, field_validator

from fake_plugin import COMMAND as FAKE_COMMAND
from fake_plugin import FakeOptions, spec as fake_spec
from node_agent import compat, errors, wire
from node_agent.contracts import (
    JOB_OUTCOMES,
    OPTION_KEYS,
    PLUGIN_ONLY_OPTIONS,
    DecodeOptions,
    JobErrorCode,
    job_outcome,
    one_line,
    parse_options,
)
from node_agent.metrics import AgentMetrics
from node_agent.plugin_messages import (
    CancelMessage,
    ErrorMessage,
    FatalMessage,
    JobMessage,
    ReadyMessage,
    ResultMessage,
    SegmentMessage,
    StartedMessage,
    StopMessage,
    StoppedMessage,
    WordInfo,
    parse_from_agent,
    parse_from_plugin,
    to_header,
)
from node_agent.scheduler.metrics import SchedulerMetrics
from node_agent.scheduler.schemas import JOB_ERROR_CODES, JobAssignment, JobOptions, JobSpec
from node_agent.supervisor import JobRequest

# ----- job error codes ----------------------------------------------------------------------------------------


def _job_error_classes() -> list[type[errors.JobError]]:
    found, todo = [], [errors.JobError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_job_error_code_is_a_member_and_every_member_has_a_class() -> None:
    for cls in _job_error_classes():
        assert isinstance(cls.code, JobErrorCode), f"{cls.__name__}.code = {cls.code!r} is not a JobErrorCode"
    assert set(errors.JOB_ERRORS) == set(JobErrorCode)
    assert set(JOB_ERROR_CODES) == set(JobErrorCode)
    for code in JobErrorCode:
        error = errors.job_error(code.value, "m")
        assert error.code is code and error.to_dict() == {"code": code.value, "message": "m"}
    with pytest.raises(ValueError):
        errors.job_error("no_such_code", "m")


def test_job_outcome_labels_come_from_the_enum_and_an_unknown_code_raises() -> None:
    assert JOB_OUTCOMES == ("succeeded", *(code.value for code in JobErrorCode))
    assert job_outcome(None) == "succeeded"
    for code in JobErrorCode:
        assert job_outcome(code) == job_outcome(code.value) == code.value
    with pytest.raises(ValueError):
        job_outcome("no_such_code")


def test_every_outcome_has_a_series_from_the_start_in_agent_and_scheduler_metrics() -> None:
    agent = AgentMetrics(CollectorRegistry())
    scheduler_registry = CollectorRegistry()
    scheduler = SchedulerMetrics(scheduler_registry, lambda: (0, {}))
    for outcome in JOB_OUTCOMES:
        assert agent.registry.get_sample_value("node_agent_jobs_total", {"outcome": outcome}) == 0.0, outcome
        assert scheduler_registry.get_sample_value("node_agent_scheduler_jobs_total", {"outcome": outcome}) == 0.0
    # Counted under their own names (invalid_request, worker_unavailable and lease_expired once fell to failed).
    for code in ("invalid_request", "worker_unavailable", "lease_expired"):
        agent.count_job(code)
        scheduler.job_finished(code)
        assert agent.registry.get_sample_value("node_agent_jobs_total", {"outcome": code}) == 1.0
        assert scheduler_registry.get_sample_value("node_agent_scheduler_jobs_total", {"outcome": code}) == 1.0
    assert agent.registry.get_sample_value("node_agent_jobs_total", {"outcome": "failed"}) == 0.0
    with pytest.raises(ValueError):
        agent.count_job("no_such_code")
    with pytest.raises(ValueError):
        scheduler.job_finished("no_such_code")


def test_one_table_maps_every_job_error_code_to_an_http_status_per_endpoint() -> None:
    missing = set(JobErrorCode) - set(errors.JOB_ERROR_HTTP)
    assert not missing, f"no HTTP status for {sorted(missing)}"
    assert all(entry.why for entry in errors.JOB_ERROR_HTTP.values())
    assert all(entry.openai_why for entry in errors.JOB_ERROR_HTTP.values() if entry.openai is not None)
    status = errors.job_error_status
    assert status(JobErrorCode.bad_audio) == status("bad_audio", openai=True) == 400
    assert status("timeout") == 504  # plain strings from the scheduler's JSON find them too
    # The one code the endpoints answer differently, each for its reason.
    assert (status("no_capable_node"), status("no_capable_node", openai=True)) == (503, 422)
    assert status("no_such_code") == 500


# ----- decode options -----------------------------------------------------------------------------------------


def test_one_options_model_on_every_side() -> None:
    assert JobOptions is DecodeOptions
    assert JobSpec.model_fields["options"].annotation is DecodeOptions
    assert compat.OPTION_FIELDS == OPTION_KEYS == tuple(DecodeOptions.model_fields)
    assert {"patience", "hotwords", "allow_truncated"} <= set(OPTION_KEYS)
    for name, field in DecodeOptions.model_fields.items():
        assert field.description, f"{name} has no description"
        assert field.default is None, f"{name}: an unset option must leave the node's default"


def test_every_decoder_option_is_a_faster_whisper_argument_in_both_modes() -> None:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    decoder = set(OPTION_KEYS) - PLUGIN_ONLY_OPTIONS
    assert PLUGIN_ONLY_OPTIONS <= set(OPTION_KEYS)
    accepted = set(inspect.signature(WhisperModel.transcribe).parameters)
    assert decoder <= accepted, sorted(decoder - accepted)
    # batched=true passes the same options (plus batch_size) to faster-whisper's own pipeline.
    batched = set(inspect.signature(BatchedInferencePipeline.transcribe).parameters)
    assert decoder | {"batch_size"} <= batched, sorted(decoder | {"batch_size"} - batched)


def test_parse_options_strict_with_one_line_errors() -> None:
    assert parse_options({"beam_size": 2, "hotwords": "Kubernetes"}).wire() == {"beam_size": 2,
                                                                                 "hotwords": "Kubernetes"}
    assert parse_options(None).wire() == {}
    cases = [
        ({"beam_size": 0}, "options.beam_size: Input should be greater than or equal to 1"),
        ({"beam_size": "5"}, "options.beam_size: Input should be a valid integer"),
        ({"patience": 0}, "options.patience: Input should be greater than 0"),
        ({"beam": 3}, "options.beam: unknown option; known options: beam_size, best_of, patience"),
        ({"vad_filter": "yes", "best_of": 0}, "(1 more error)"),
    ]
    for raw, words in cases:
        with pytest.raises(errors.InvalidRequest) as info:
            parse_options(raw)
        assert words in info.value.message and "\n" not in info.value.message, (raw, info.value.message)


def test_options_travel_typed_and_only_those_set_go_on_the_wire() -> None:
    # Checked once where they enter; past that the assignment, the job request and the job message carry the
    # same model, and each message's JSON holds only the options set.
    assert JobAssignment.model_fields["options"].annotation is DecodeOptions
    assert JobMessage.model_fields["options"].annotation is DecodeOptions
    options = DecodeOptions(allow_truncated=True, beam_size=2)
    request = JobRequest("j", b"", options=options)
    assert request.options is options
    header = to_header(JobMessage(job_id="j", options=request.options))
    assert header["options"] == {"beam_size": 2, "allow_truncated": True}
    assignment = JobAssignment.model_validate(
        {"job_id": "j", "attempt": 1, "language": None, "options": {"beam_size": 2},
         "audio": {"format": "auto", "sample_rate": None, "bytes": 2, "url": "/a"}, "deadline_s": None,
         "queued_s": 0.0})
    assert assignment.options == DecodeOptions(beam_size=2)
    assert assignment.model_dump(mode="json")["options"] == {"beam_size": 2}


def test_utterance_request_builds_decode_options_from_its_flat_fields() -> None:
    req = compat.UtteranceRequest.model_validate(
        {"audio": "AAAA", "beam_size": "5", "temperature": 0, "patience": 2, "decode": {"beam_size": 9},
         "context": "ignored"})
    # Lax like the old service ("5" is 5), and the caller's own "decode" key is not the options.
    assert req.decode == DecodeOptions(beam_size=5, temperature=0.0, patience=2.0)
    assert req.decode.wire() == {"beam_size": 5, "temperature": 0.0, "patience": 2.0}
    with pytest.raises(ValidationError) as info:
        compat.UtteranceRequest.model_validate({"audio": "AAAA", "best_of": 99})
    error = compat._invalid(info.value)
    assert (error.status, error.field) == (400, "best_of")
    assert error.message == "best_of: Input should be less than or equal to 20"


# ----- the one-line message -----------------------------------------------------------------------------------


class _Inner(BaseModel):
    size: int = Field(ge=1)


class _Outer(BaseModel, extra="forbid"):
    name: str
    inner: _Inner
    token: str = ""

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if value == "bad":
            raise ValueError("'bad' is not a name")
        return value


def _error(data: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(data)
    return info.value


def test_one_line_shapes() -> None:
    assert one_line(_error({"name": "bad", "inner": {"size": 1}})) == "name: 'bad' is not a name"
    nested = _error({"name": "a", "inner": {"size": 0}})
    assert one_line(nested) == "inner.size: Input should be greater than or equal to 1"
    assert one_line(nested, prefix="body.") == "body.inner.size: Input should be greater than or equal to 1"
    assert one_line(_error({"name": "a", "inner": {"size": 1}, "x": 1})) == "x: unknown field"
    assert one_line(_error({"name": "a", "inner": {"size": 1}, "x": 1}), unknown="unknown key") == "x: unknown key"
    two = _error({"name": "bad", "inner": {"size": 0}})
    assert one_line(two) == "name: 'bad' is not a name (1 more error)"
    assert one_line(two, more=False) == "name: 'bad' is not a name"
    whole = _error([1])
    assert one_line(whole) == "Input should be a valid dictionary or instance of _Outer"
    assert one_line(whole, top="(top level)", where="f.yaml", value=lambda loc, v: repr(v)) == (
        "f.yaml: (top level) = [1]: Input should be a valid dictionary or instance of _Outer")
    masked = _error({"name": "a", "inner": {"size": 1}, "token": 5})
    assert one_line(masked, value=lambda loc, v: "***" if "token" in loc else repr(v)) == (
        "token = ***: Input should be a valid string")


# ----- agent <-> plugin messages ------------------------------------------------------------------------------

EVERY_MESSAGE = [
    JobMessage(job_id="j", format="pcm_s16le", sample_rate=16000, options={"beam_size": 2}),
    CancelMessage(job_id="j"),
    StopMessage(),
    ReadyMessage(model="tiny.en", device="cpu", compute_type="int8", load_s=0.5, pid=7, languages=None),
    FatalMessage(message="model 'x': RuntimeError: no"),
    StartedMessage(job_id="j", duration_s=1.5, decode_audio_s=0.01),
    SegmentMessage(job_id="j", id=0, start=0.0, end=1.0, text=" hi", temperature=0.0, avg_logprob=-0.2,
                   compression_ratio=1.1, no_speech_prob=0.01, decode_s=0.2,
                   words=[WordInfo(start=0.0, end=0.5, word=" hi", probability=0.9)]),
    ResultMessage(job_id="j", text="hi", language="en", language_probability=1.0, duration_s=1.5,
                  segments_count=1, timings={"total_s": 0.3, "first_segment_s": None}),
    ErrorMessage(job_id=None, code=JobErrorCode.bad_audio, message="cannot decode"),
    StoppedMessage(job_id="j"),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: m.type)
def test_every_message_round_trips_through_a_frame_header(message: Any) -> None:
    header = json.loads(json.dumps(to_header(message)))  # what the other end's framing hands it
    parse = parse_from_agent if message.type in ("job", "cancel", "stop") else parse_from_plugin
    assert parse(header) == message


def test_ready_keeps_what_the_plugin_left_out_out() -> None:
    # The supervisor's worker info distinguishes "languages: null" (any language) from an older plugin's silence.
    header = to_header(ReadyMessage(model="m", device="cpu", compute_type="int8", load_s=0.0, pid=1))
    assert "languages" not in header
    assert to_header(EVERY_MESSAGE[3])["languages"] is None


@pytest.mark.parametrize("parse, header, words", [
    (parse_from_plugin, {"type": "hello"}, "unknown message type 'hello' from the plugin"),
    (parse_from_agent, {"type": "result", "job_id": "j"}, "unknown message type 'result' from the agent"),
    (parse_from_plugin, {"type": "started", "job_id": "j"}, "malformed 'started' message from the plugin: "
                                                            "duration_s: Field required"),
    (parse_from_plugin, {"type": "error", "job_id": "j", "code": "oops", "message": "m"}, "malformed 'error'"),
    (parse_from_agent, {"type": "cancel", "job_id": "j", "why": "x"}, "malformed 'cancel' message from the "
                                                                      "agent: why: unknown field"),
])
def test_unknown_or_malformed_messages_are_wire_errors_naming_the_type(parse: Any, header: dict, words: str) -> None:
    with pytest.raises(errors.WireError) as info:
        parse(header)
    assert words in str(info.value)


def test_the_plugin_validates_options_and_messages_on_arrival() -> None:
    """The plugin's serve loop (the real one, with the scripted engine) over a raw socket: bad options and
    unknown messages are answered with an ``error`` naming them, and the process serves the next job."""
    parent, child = socket.socketpair()
    proc = subprocess.Popen([*FAKE_COMMAND, "--fd", str(child.fileno()), "--spec", fake_spec().model_dump_json()],
                            pass_fds=(child.fileno(),))
    child.close()
    parent.settimeout(30)
    channel = wire.BlockingChannel(parent)

    def answer() -> Any:
        frame = channel.recv()
        assert frame is not None
        return parse_from_plugin(frame[0])

    try:
        assert isinstance(answer(), ReadyMessage)
        for options, words in [({"beam_size": 0}, "options.beam_size: Input should be greater than or equal to 1"),
                               ({"beam_sise": 2}, "options.beam_sise: unknown option"),
                               ({"vad_filter": "yes"}, "options.vad_filter: Input should be a valid boolean")]:
            channel.send({"type": "job", "job_id": "bad", "options": options})
            reply = answer()
            assert isinstance(reply, ErrorMessage) and reply.job_id == "bad", reply
            assert reply.code is JobErrorCode.invalid_request and words in reply.message, reply
        channel.send({"type": "transcribe", "job_id": "odd"})
        reply = answer()
        assert isinstance(reply, ErrorMessage) and reply.job_id == "odd" and "'transcribe'" in reply.message
        channel.send(to_header(JobMessage(job_id="good", options=FakeOptions(beam_size=2, fake={"segments": 2}))))
        kinds = [answer() for _ in range(4)]
        assert [type(m) for m in kinds] == [StartedMessage, SegmentMessage, SegmentMessage, ResultMessage]
        channel.send(to_header(StopMessage()))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        parent.close()


def test_an_assignment_with_an_option_this_node_does_not_know_is_readable_and_says_which() -> None:
    """A newer scheduler may hand out an option this node does not know: the assignment is still read (its lease
    and job id with it), and the job fails with invalid_request naming the option instead of never being read."""
    from node_agent.scheduler.schemas import JobAssignment

    wire = {"job_id": "j", "attempt": 1, "language": None, "deadline_s": None, "queued_s": 0.0,
            "audio": {"format": "auto", "sample_rate": None, "bytes": 3, "url": "/v1/jobs/j/audio"}}
    known = JobAssignment.model_validate({**wire, "options": {"beam_size": 2}})
    assert known.options == DecodeOptions(beam_size=2) and known.options_error is None
    newer = JobAssignment.model_validate({**wire, "options": {"beam_size": 2, "vad_speech_pad_ms": 30}})
    assert newer.options == DecodeOptions() and newer.options_error is not None
    assert "vad_speech_pad_ms" in newer.options_error and "unknown option" in newer.options_error
    assert "options_error" not in newer.model_dump(mode="json")
