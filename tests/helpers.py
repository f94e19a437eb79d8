"""Small shared test helpers: clips, references, scoring, and building audio."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
import uuid
import wave
from functools import lru_cache
from pathlib import Path

import jiwer
import numpy as np

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
