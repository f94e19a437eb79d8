"""Decode job audio to 16 kHz mono float32 (with PyAV, or read as it is when it already is 16 kHz mono 16-bit),
failing with BadAudio that says what was wrong."""

from __future__ import annotations

import io
import struct
from typing import Any

import av
import numpy as np

from node_agent.errors import BadAudio

SAMPLE_RATE = 16000
MIN_AUDIO_S = 0.1
#: A header may declare this much more audio than decodes before the file counts as truncated: encoder priming
#: and padding differ from the declared length by a few frames, never by whole seconds.
TRUNCATION_TOLERANCE_S = 0.1
TRUNCATION_TOLERANCE_FRACTION = 0.02
#: WAV data chunk sizes meaning "length unknown": writers on a pipe cannot seek back to fill in the size
#: (ffmpeg leaves 0xFFFFFFFF, sox about 0x7FFFF000), and 0 is used the same way.
_WAV_UNKNOWN_SIZE = 0x7FFF0000
#: Containers whose demuxer takes the duration from a header field (AIFF COMM, MP4 mdhd). Others (ogg, adts,
#: matroska without a Duration element, mp3 without a Xing/Info/VBRI frame) get an estimate from the file size
#: and bit rate, which can be off by several percent for VBR audio and says nothing about missing audio.
_HEADER_DURATION_FORMATS = frozenset({"aiff", "mov,mp4,m4a,3gp,3g2,mj2"})


def decode(
    data: bytes, fmt: str, sample_rate: int | None, max_audio_s: float, allow_truncated: bool = False
) -> np.ndarray:
    """Decode ``data`` (a container PyAV reads, or raw ``pcm_s16le`` at ``sample_rate``); a WAV or raw PCM
    that is already 16 kHz mono 16-bit is read without ffmpeg (``_native_samples``), to the same samples.

    Stops decoding as soon as the audio exceeds ``max_audio_s``, so a huge input costs bounded memory.
    Audio shorter than its header declares (or raw pcm16 with half a sample) is refused as truncated, since
    its transcript would silently miss the rest; ``allow_truncated`` decodes what is there instead.
    """
    if not data:
        raise BadAudio("empty audio: 0 bytes received")
    if fmt == "pcm_s16le":
        if not sample_rate or sample_rate <= 0:
            raise BadAudio("raw pcm_s16le audio needs a positive sample_rate")
        if len(data) % 2:
            if not allow_truncated:
                raise BadAudio(f"audio truncated: raw pcm_s16le audio has an odd byte count ({len(data)}); "
                               "samples are 2 bytes (allow_truncated=true decodes what is there)")
            data = data[:-1]
        open_kwargs = {"format": "s16le", "options": {"sample_rate": str(sample_rate), "ch_layout": "mono"}}
    elif fmt == "auto":
        open_kwargs = {}
    else:
        raise BadAudio(f"unknown audio format {fmt!r} (expected auto or pcm_s16le)")

    max_samples = int(max_audio_s * SAMPLE_RATE)
    declared_s: float | None = None
    native = _native_samples(data, fmt, sample_rate)
    if native is not None:
        # Already 16 kHz mono 16-bit: read as it is, 10-20x faster than through ffmpeg, to the same floats
        # (x / 32768, as ffmpeg's s16 -> flt), a cost a 100 s job pays before its decode can start.
        total = len(native) // 2
        if total > max_samples:
            raise BadAudio(f"audio longer than asr.max_audio_s = {max_audio_s:g} s")
        audio = np.frombuffer(native, dtype="<i2", count=total).astype(np.float32) * np.float32(1 / 32768)
        if not allow_truncated and fmt == "auto":
            declared_s = _wav_declared_seconds(data)
    else:
        audio, total, declared_s = _decode_with_ffmpeg(data, fmt, open_kwargs, max_samples, max_audio_s,
                                                       allow_truncated)
    held_s = total / SAMPLE_RATE
    if declared_s is not None and declared_s - held_s > max(TRUNCATION_TOLERANCE_S,
                                                             TRUNCATION_TOLERANCE_FRACTION * declared_s):
        raise BadAudio(f"audio truncated: header declares {declared_s:.2f} s, file holds {held_s:.2f} s "
                       "(allow_truncated=true decodes what is there)")
    if total == 0:
        raise BadAudio("no audio samples could be decoded from the input")
    if total < MIN_AUDIO_S * SAMPLE_RATE:
        raise BadAudio(f"audio too short: {total / SAMPLE_RATE:.4f} s (at least {MIN_AUDIO_S} s needed)")
    return audio


def _decode_with_ffmpeg(data: bytes, fmt: str, open_kwargs: dict[str, Any], max_samples: int, max_audio_s: float,
                        allow_truncated: bool) -> tuple[np.ndarray, int, float | None]:
    """Decode through PyAV (ffmpeg), resampled to 16 kHz mono float32: (the samples, how many, the length the
    header declares, where it declares one and ``allow_truncated`` is off)."""
    chunks: list[np.ndarray] = []
    total = 0
    declared_s: float | None = None
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
            if not allow_truncated and fmt == "auto":
                declared_s = _declared_seconds(container, data)
    except BadAudio:
        raise
    except (av.FFmpegError, ValueError, EOFError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BadAudio(f"cannot decode audio ({len(data)} bytes, format {fmt}): {reason}") from None
    if total == 0:
        return np.zeros(0, dtype=np.float32), 0, declared_s
    audio = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    if not np.isfinite(audio).all():
        raise BadAudio("audio contains NaN or infinite sample values")
    return audio, total, declared_s


def _native_samples(data: bytes, fmt: str, sample_rate: int | None) -> bytes | memoryview | None:
    """The 16-bit samples of audio that is already what the decoder wants (16 kHz, mono, 16-bit): raw
    ``pcm_s16le`` at 16 kHz (an even byte count), or a plain RIFF WAV of it (PCM format tag 1, its ``fmt ``
    chunk before its first ``data`` chunk, read up to the size that chunk declares, or to the end of the file
    where the size says unknown, as ffmpeg does). None for anything else: ffmpeg decodes it."""
    if fmt == "pcm_s16le":
        return data if sample_rate == SAMPLE_RATE else None
    if fmt != "auto" or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, plain = 12, False
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        body = offset + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                return None
            tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", data, body)
            plain = (tag, channels, rate, align, bits) == (1, 1, SAMPLE_RATE, 2, 16)
            if not plain:
                return None
        elif chunk == b"data":
            if not plain:
                return None
            end = len(data) if size == 0 or size >= _WAV_UNKNOWN_SIZE else min(len(data), body + size)
            end -= (end - body) & 1  # half a sample at a cut end: dropped, as ffmpeg drops it
            return memoryview(data)[body:end]
        offset = body + size + (size & 1)  # chunks are padded to an even size
    return None


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


def _declared_seconds(container: av.container.InputContainer, data: bytes) -> float | None:
    """The length the file's header states, or None where it states none (streamed or estimated lengths)."""
    name = container.format.name
    if name == "wav":
        # ffmpeg clamps a WAV data chunk to the bytes present, so its duration cannot show a cut: read the header.
        return _wav_declared_seconds(data)
    if name == "flac":
        return _flac_declared_seconds(data)
    if name == "mp3" and not _mp3_states_length(data):
        return None
    if name != "mp3" and name not in _HEADER_DURATION_FORMATS:
        return None
    stream = container.streams.audio[0]
    if not stream.duration or stream.duration <= 0 or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _wav_declared_seconds(data: bytes) -> float | None:
    """RIFF ``data`` chunk size over the ``fmt `` chunk's byte rate."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None  # RF64 and RIFX keep their sizes elsewhere; ffmpeg handles them, unchecked here
    offset, byte_rate = 12, 0
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if chunk == b"fmt " and size >= 16 and offset + 20 <= len(data):
            byte_rate = int.from_bytes(data[offset + 16:offset + 20], "little")
        elif chunk == b"data":
            if byte_rate <= 0 or size == 0 or size >= _WAV_UNKNOWN_SIZE:
                return None
            return size / byte_rate
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _id3v2_end(data: bytes) -> int:
    """Offset just past a leading ID3v2 tag (0 if none); FLAC and MP3 files may start with one."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
    return 10 + size + (10 if data[5] & 0x10 else 0)


def _flac_declared_seconds(data: bytes) -> float | None:
    """STREAMINFO total samples over its sample rate; a total of 0 means the encoder did not know it."""
    start = _id3v2_end(data)
    info = data[start + 8:start + 8 + 34]
    if data[start:start + 4] != b"fLaC" or data[start + 4] & 0x7F != 0 or len(info) < 34:
        return None
    rate = int.from_bytes(info[10:13], "big") >> 4
    total = int.from_bytes(info[13:18], "big") & ((1 << 36) - 1)
    return total / rate if total and rate else None


def _mp3_states_length(data: bytes) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info (with a frame count) or VBRI header.

    Without one, ffmpeg's mp3 duration is a file-size estimate, not a declaration.
    """
    start = _id3v2_end(data)
    limit = min(len(data) - 4, start + 64 * 1024)
    at = start
    while at < limit and not (data[at] == 0xFF and data[at + 1] & 0xE0 == 0xE0):
        at += 1
    if at >= limit:
        return False
    mpeg1 = (data[at + 1] >> 3) & 3 == 3
    mono = (data[at + 3] >> 6) & 3 == 3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    tag = at + 4 + side_info
    if data[tag:tag + 4] in (b"Xing", b"Info"):
        return bool(int.from_bytes(data[tag + 4:tag + 8], "big") & 1)  # flag 1: the frame count is present
    return data[at + 36:at + 40] == b"VBRI"
