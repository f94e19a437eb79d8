"""Decode job audio to 16 kHz mono float32 with PyAV, failing with BadAudio that says what was wrong."""

from __future__ import annotations

import io

import av
import numpy as np

from node_agent.errors import BadAudio

SAMPLE_RATE = 16000
MIN_AUDIO_S = 0.1


def decode(data: bytes, fmt: str, sample_rate: int | None, max_audio_s: float) -> np.ndarray:
    """Decode ``data`` (a container PyAV reads, or raw ``pcm_s16le`` at ``sample_rate``).

    Stops decoding as soon as the audio exceeds ``max_audio_s``, so a huge input costs bounded memory.
    """
    if not data:
        raise BadAudio("empty audio: 0 bytes received")
    if fmt == "pcm_s16le":
        if not sample_rate or sample_rate <= 0:
            raise BadAudio("raw pcm_s16le audio needs a positive sample_rate")
        if len(data) % 2:
            raise BadAudio(f"raw pcm_s16le audio has an odd byte count ({len(data)}); samples are 2 bytes")
        open_kwargs = {"format": "s16le", "options": {"sample_rate": str(sample_rate), "ch_layout": "mono"}}
    elif fmt == "auto":
        open_kwargs = {}
    else:
        raise BadAudio(f"unknown audio format {fmt!r} (expected auto or pcm_s16le)")

    max_samples = int(max_audio_s * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore", **open_kwargs) as container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
                raise BadAudio(
                    f"no audio stream in the input (container {container.format.name}, streams: {kinds})"
                )
            # float output keeps NaN/Inf visible, so corrupt float PCM is rejected instead of clipped to noise.
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in _frames(container):
                for out in resampler.resample(frame):
                    total = _append(chunks, out, total, max_samples, max_audio_s)
            for out in resampler.resample(None):
                total = _append(chunks, out, total, max_samples, max_audio_s)
    except BadAudio:
        raise
    except (av.FFmpegError, ValueError, EOFError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BadAudio(f"cannot decode audio ({len(data)} bytes, format {fmt}): {reason}") from None

    if total == 0:
        raise BadAudio("no audio samples could be decoded from the input")
    audio = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    if total < MIN_AUDIO_S * SAMPLE_RATE:
        raise BadAudio(f"audio too short: {total / SAMPLE_RATE:.4f} s (at least {MIN_AUDIO_S} s needed)")
    if not np.isfinite(audio).all():
        raise BadAudio("audio contains NaN or infinite sample values")
    return audio


def _frames(container: av.container.InputContainer):
    """Decoded frames, skipping the occasional corrupt packet rather than failing the whole file."""
    stream = container.streams.audio[0]
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.InvalidDataError:
            continue


def _append(chunks: list[np.ndarray], frame, total: int, max_samples: int, max_audio_s: float) -> int:
    samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
    total += samples.shape[0]
    if total > max_samples:
        raise BadAudio(f"audio longer than asr.max_audio_s = {max_audio_s:g} s")
    chunks.append(samples)
    return total
