"""Transcript renderings for the OpenAI-compatible endpoint: text, SRT, WebVTT, verbose JSON."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "verbose_json", "vtt")
#: The latest time a cue can show (99:59:59.999); a later time is shown as this, never an error.
_MAX_MILLIS = 100 * 3_600_000 - 1


def seconds_of(value: Any) -> float:
    """A segment time as finite seconds >= 0: the scheduler refuses NaN and infinities where they arrive, but
    a renderer must not fail on one that got through (or on a missing or non-numeric value): those become 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return max(0.0, float(value))


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(min(seconds_of(seconds) * 1000, _MAX_MILLIS))  # min first: 1e308 * 1000 is inf
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt_timestamp(seconds: float) -> str:
    """``00:00:01,500``."""
    return _timestamp(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    """``00:00:01.500``."""
    return _timestamp(seconds, ".")


def _cue_text(segment: Mapping[str, Any]) -> str:
    # A blank line ends a cue in both formats, so collapse line breaks inside one segment.
    return " ".join(str(segment.get("text", "")).split())


def to_srt(segments: Iterable[Mapping[str, Any]]) -> str:
    cues = [
        f"{number}\n{srt_timestamp(s.get('start'))} --> {srt_timestamp(s.get('end'))}\n{_cue_text(s)}\n"
        for number, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(segments: Iterable[Mapping[str, Any]]) -> str:
    cues = [f"{vtt_timestamp(s.get('start'))} --> {vtt_timestamp(s.get('end'))}\n{_cue_text(s)}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_verbose_json(result: Mapping[str, Any], segments: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI's ``verbose_json`` shape; fields a node did not report get OpenAI's neutral values."""
    return {
        "task": "transcribe",
        "language": result.get("language"),
        "duration": result.get("duration_s"),
        "text": result.get("text", ""),
        "segments": [
            {
                # OpenAI numbers segments from 0; faster-whisper (and so a node's segments) from 1.
                "id": index,
                "seek": 0,
                "start": seconds_of(s.get("start")),
                "end": seconds_of(s.get("end")),
                "text": s.get("text", ""),
                "tokens": list(s.get("tokens") or []),
                "temperature": s.get("temperature", 0.0),
                "avg_logprob": s.get("avg_logprob", 0.0),
                "compression_ratio": s.get("compression_ratio", 0.0),
                "no_speech_prob": s.get("no_speech_prob", 0.0),
            }
            for index, s in enumerate(segments)
        ],
    }
