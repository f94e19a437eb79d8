"""Small shared test helpers: clips, references, scoring, building audio, and plain faster-whisper."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import unicodedata
import uuid
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jiwer
import numpy as np

if TYPE_CHECKING:
    from node_agent.config import AsrSettings

DATA = Path(__file__).parent / "data"
SR = 16000


@lru_cache(maxsize=None)
def references() -> dict[str, dict[str, str]]:
    with (DATA / "manifest.tsv").open(encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def reference(name: str) -> str:
    return references()[name]["reference_text"]


def clip(name: str) -> bytes:
    return (DATA / name).read_bytes()


# Spelling differences that are not recognition errors (models.md: "Mr." vs "mister", "1813" vs words).
_EQUIVALENT = {r"\bmr\b": "mister", r"\b1813\b": "eighteen thirteen"}


def normalize_en(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^\w\s']", " ", text)
    for pattern, spelled in _EQUIVALENT.items():
        text = re.sub(pattern, spelled, text)
    return " ".join(text.split())


def wer(reference_text: str, hypothesis: str) -> float:
    return jiwer.wer(normalize_en(reference_text), normalize_en(hypothesis))


def normalize_zh(text: str) -> str:
    import opencc

    text = opencc.OpenCC("t2s").convert(text)
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "Z", "S")) and not ch.isspace())


def cer(reference_text: str, hypothesis: str) -> float:
    return jiwer.cer(normalize_zh(reference_text), normalize_zh(hypothesis))


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def decode_clip(name: str) -> np.ndarray:
    """16 kHz mono float32 of a test clip (all clips are 16 kHz mono already)."""
    import av

    with av.open(str(DATA / name)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
        out = [f.to_ndarray().reshape(-1) for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32)


def joined(names: list[str], pause_s: float = 0.8) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips joined with silent pauses; returns the audio and each clip's (start, end) seconds."""
    parts: list[np.ndarray] = []
    spans = []
    t = 0.0
    gap = np.zeros(int(pause_s * SR), dtype=np.float32)
    for i, name in enumerate(names):
        audio = decode_clip(name)
        if i:
            parts.append(gap)
            t += pause_s
        spans.append((t, t + len(audio) / SR))
        parts.append(audio)
        t += len(audio) / SR
    return np.concatenate(parts), spans


def multipart(fields: dict[str, str], filename: str, data: bytes,
              content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and one ``file`` part; ``filename`` goes in verbatim (hostile
    names are a test case). Returns (body, Content-Type header)."""
    boundary = "----node-agent-" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def wav_bytes(samples: np.ndarray, rate: int = SR, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm16(samples))
    return buf.getvalue()


# ----- plain faster-whisper on the same audio, the yardstick for every accuracy check -----------------------------
#
# A model's output depends on the CPU's kernels (another machine decodes the same clip differently), so accuracy
# tests never compare the agent with transcripts or scores measured on one machine. They compare it with plain
# faster-whisper run here, on this machine, on the very samples the agent was sent, with the settings and decode
# options the agent's worker uses: same model directory, device, compute type, thread count and options.


@dataclass(frozen=True)
class PlainTranscript:
    """What the agent would report for the same audio: text and segments (times rounded as the worker rounds)."""

    text: str
    language: str
    segments: tuple[dict[str, Any], ...]


#: Raw decodes (faster-whisper's own text, before any script conversion) by audio, model and options.
_PLAIN_DECODES: dict[tuple[Any, ...], tuple[str, tuple[tuple[float, float, str], ...]]] = {}


@lru_cache(maxsize=None)
def _plain_model(path: str, device: str, compute_type: str, cpu_threads: int) -> Any:
    """One loaded model per configuration for the whole test session (loading base takes seconds)."""
    from faster_whisper import WhisperModel

    return WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=cpu_threads, num_workers=1)


@lru_cache(maxsize=None)
def _converter(zh_script: str) -> Any:
    """The worker's own OpenCC step (``AsrEngine._convert_zh``) for one ``asr.zh_script``."""
    from node_agent.config import AsrSettings
    from node_agent.plugin_messages import WorkerSpec
    from plugins.asr.worker import AsrEngine

    spec = WorkerSpec(asr=AsrSettings(zh_script=zh_script), device="cpu", device_index=0, cpu_threads=0,
                      log_level="WARNING")
    return AsrEngine(spec)._convert_zh


def samples_of_pcm16(data: bytes) -> np.ndarray:
    """Raw little-endian pcm16 at 16 kHz as float32, the way the worker's decoder reads it."""
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def plain_transcript(audio: str | np.ndarray, *, asr: "AsrSettings | None" = None, model: str | None = None,
                     language: str | None = None, **options: Any) -> PlainTranscript:
    """Plain ``faster_whisper.WhisperModel.transcribe`` of ``audio`` (a clip name, or 16 kHz float32 samples);
    with ``batched=True``, plain ``BatchedInferencePipeline.transcribe`` (VAD on, ``batch_size`` by default the
    settings' ``asr.batch_size``), as a ``batched`` job runs.

    ``asr`` is the agent's ASR settings (default: the tests' ``make_settings()``, i.e. tiny.en on the CPU with
    2 threads; ``model`` overrides just the model). Device, compute type and threads are chosen with the agent's
    own functions; the decode options are the agent's defaults (``asr.beam_size``, ``vad_filter``,
    ``condition_on_previous_text``, ``language``) updated with ``options``, as a job's options update them.
    Mandarin text is converted per segment by the worker's own converter, as the worker converts it. Results are
    cached per audio and options, so a clip many tests check is decoded once per session.
    """
    import ctranslate2

    from conftest import make_settings
    from node_agent.devices import choose_compute_type, choose_cpu_threads, choose_device
    from node_agent.model_resolution import resolve_model

    asr = asr or make_settings().asr
    if model is not None:
        asr = asr.model_copy(update={"model": model})
    batched = bool(options.pop("batched", False))
    device = choose_device(asr.device.value, ctranslate2.get_cuda_device_count())
    compute_type = choose_compute_type(device, ctranslate2.get_supported_compute_types(device), asr.compute_type)
    threads = choose_cpu_threads(asr.cpu_threads, len(os.sched_getaffinity(0)))
    path = resolve_model(asr.model)
    lang = language or asr.language
    kwargs = {"language": None if lang == "auto" else lang, "beam_size": asr.beam_size,
              "vad_filter": asr.vad_filter, "condition_on_previous_text": asr.condition_on_previous_text, **options}
    if batched:  # faster-whisper's own BatchedInferencePipeline, as the worker runs it: always with VAD
        kwargs.update(vad_filter=True, batch_size=options.get("batch_size", asr.batch_size))
    samples = decode_clip(audio) if isinstance(audio, str) else np.ascontiguousarray(audio, dtype=np.float32)
    key = (hashlib.sha1(samples.tobytes()).hexdigest(), path, device, compute_type, threads, batched,
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key not in _PLAIN_DECODES:
        whisper = _plain_model(path, device, compute_type, threads)
        if batched:
            from faster_whisper import BatchedInferencePipeline

            segments, info = BatchedInferencePipeline(whisper).transcribe(samples, **kwargs)
        else:
            segments, info = whisper.transcribe(samples, **kwargs)
        _PLAIN_DECODES[key] = (info.language, tuple((seg.start, seg.end, seg.text) for seg in segments))
    language_found, decoded = _PLAIN_DECODES[key]
    convert = _converter(asr.zh_script.value)
    out = tuple({"start": round(start, 3), "end": round(end, 3), "text": convert(text, language_found)}
                for start, end, text in decoded)
    return PlainTranscript("".join(seg["text"] for seg in out).strip(), language_found, out)


def plain_wer(hypothesis: str, audio: str | np.ndarray, **kwargs: Any) -> float:
    """Word error rate of the agent's ``hypothesis`` against plain faster-whisper's transcript of the same audio
    (``plain_transcript`` arguments); 0.0 means the same words."""
    return jiwer.wer(normalize_en(plain_transcript(audio, **kwargs).text), normalize_en(hypothesis))
