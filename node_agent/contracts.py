"""Contracts declared once and imported by every side that speaks them.

- ``DecodeOptions``: the per-job decode options, one typed model from where they enter to the plugin. They are
  checked once, where they enter: the scheduler API's submissions (``JobSpec``) and ``/utterance`` (from its flat
  fields). Past that edge they travel as this model: in the job's assignment, the supervisor's ``JobRequest`` and
  the plugin's ``job`` message, whose JSON carries only the options set.
- ``JobErrorCode``: every job error code (defined beside the typed errors in ``errors.py``, re-exported here),
  and from it ``JOB_OUTCOMES``, the ``outcome`` label values of the agent's and the scheduler's job metrics.
- ``one_line``: a pydantic ``ValidationError`` as the one line a user sees.

Light on purpose (pydantic and the standard library only): the plugin process imports it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidRequest, JobErrorCode

__all__ = ["DecodeOptions", "JOB_OUTCOMES", "JobErrorCode", "OPTION_KEYS", "PLUGIN_ONLY_OPTIONS", "error_key",
           "error_loc", "job_outcome", "one_line", "parse_options"]


class DecodeOptions(BaseModel):
    """The decode options a job may set; the one list of option keys.

    Unset options (None) are not sent on: the node applies its configured defaults. Types are strict, so
    ``"5"`` is not an int (``/utterance`` validates laxly, as the old service did).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    beam_size: int | None = Field(None, ge=1, le=20, description="Beam width of the search at temperature 0.")
    best_of: int | None = Field(None, ge=1, le=20, description="Candidates sampled at temperatures above 0.")
    patience: float | None = Field(None, gt=0.0, le=10.0, description="Beam search patience (1 = plain beam).")
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="Sampling temperature; 0 is greedy/beam.")
    initial_prompt: str | None = Field(None, max_length=4000, description="Text that conditions the first window.")
    hotwords: str | None = Field(None, max_length=4000, description="Words to favour, given as a prompt prefix.")
    vad_filter: bool | None = Field(None, description="Drop non-speech with Silero VAD before decoding.")
    condition_on_previous_text: bool | None = Field(None, description="Feed each window's text to the next.")
    batched: bool | None = Field(None, description="faster-whisper's BatchedInferencePipeline (VAD chunks "
                                                   "decoded in batches); unset: by asr.batched_min_audio_s.")
    batch_size: int | None = Field(None, ge=1, le=64, description="VAD chunks per batch in batched mode.")
    word_timestamps: bool | None = Field(None, description="Per-word start, end and probability in segments.")
    no_speech_threshold: float | None = Field(None, ge=0.0, le=1.0,
                                              description="No-speech probability above which a window is silence.")
    log_prob_threshold: float | None = Field(None, ge=-100.0, le=0.0,
                                             description="Average log probability below which a window is retried.")
    compression_ratio_threshold: float | None = Field(None, gt=0.0, le=100.0,
                                                      description="gzip ratio above which a window is retried.")
    allow_truncated: bool | None = Field(None, description="Decode audio shorter than its header declares (or "
                                                           "pcm16 with half a sample) instead of refusing it.")

    def wire(self) -> dict[str, Any]:
        """The options that are set, as sent to a scheduler or a plugin."""
        return self.model_dump(exclude_none=True)


#: Every option key, in declaration order (error messages list them).
OPTION_KEYS: tuple[str, ...] = tuple(DecodeOptions.model_fields)
#: What an unknown option key is told, wherever options are validated.
UNKNOWN_OPTION = f"unknown option; known options: {', '.join(OPTION_KEYS)}"
#: Options the plugin uses itself; the rest are faster-whisper's own ``transcribe`` arguments.
PLUGIN_ONLY_OPTIONS: frozenset[str] = frozenset({"allow_truncated", "batched", "batch_size"})


def parse_options(raw: Any, model: type[DecodeOptions] = DecodeOptions) -> DecodeOptions:
    """``raw`` (the wire form) as options, or ``InvalidRequest`` with the one-line message."""
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise InvalidRequest(one_line(exc, prefix="options.", unknown=UNKNOWN_OPTION)) from None


# ------------------------------------------------------------------------------------ job outcomes

#: Every ``outcome`` label of a finished job: success or one of the job error codes.
JOB_OUTCOMES: tuple[str, ...] = ("succeeded", *JobErrorCode)


def job_outcome(code: str | None) -> str:
    """The ``outcome`` label of a job error code (None = success). A code outside ``JobErrorCode`` is a
    ``ValueError``, not a silent ``failed``: every code has a series of its own."""
    if code is None:
        return "succeeded"
    return str(JobErrorCode(code))


# ------------------------------------------------------------------------------- validation errors


def error_loc(exc: ValidationError) -> tuple[str, ...]:
    """Where the first error is, as a tuple of names (empty: the object as a whole)."""
    return tuple(str(p) for p in exc.errors()[0]["loc"])


def error_key(exc: ValidationError, prefix: str = "") -> str | None:
    """The first error's dotted key, after ``prefix``; None when it is about the object as a whole."""
    key = ".".join(error_loc(exc))
    return f"{prefix}{key}" if key else (prefix.rstrip(".") or None)


def one_line(
    exc: ValidationError,
    *,
    prefix: str = "",
    unknown: str = "unknown field",
    where: str | None = None,
    value: Callable[[tuple[str, ...], Any], str] | None = None,
    top: str | None = None,
    more: bool = True,
) -> str:
    """The first error of ``exc`` as ``[where: ]key[ = value]: message[ (N more errors)]``.

    ``prefix`` goes before the key (a nested part validated on its own); ``unknown`` replaces pydantic's message
    for a forbidden extra key, which names nothing useful; ``where`` names the origin (a file, a variable);
    ``value`` shows the offending input from its loc (so a caller can mask secrets); ``top`` is the key shown
    for an error about the object as a whole (by default only the message); ``more`` counts the other errors.
    """
    errors = exc.errors()
    err = errors[0]
    if err["type"] == "extra_forbidden":
        message = unknown
    else:
        # A ValueError raised in a validator arrives as "Value error, <its text>": the text is the message.
        message = str(err["msg"]).removeprefix("Value error, ")
    key = error_key(exc, prefix) or top
    head = key or ""
    if value is not None and key is not None:
        head += f" = {value(error_loc(exc), err.get('input'))}"
    text = f"{head}: {message}" if head else message
    if where:
        text = f"{where}: {text}"
    n = len(errors) - 1
    if more and n:
        text += f" ({n} more error{'s' if n > 1 else ''})"
    return text
