"""Truncated audio (a header declaring more than the file holds) is refused as bad_audio naming both lengths,
through every entry point; allow_truncated decodes what is there; intact files of every format pass."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from helpers import DATA, clip, decode_clip, multipart, pcm16
from node_agent.errors import BadAudio
from plugins.asr import audio as audio_mod
from stack import AgentStack, agent_stack

WAV = "librispeech_1272-128104-0000.wav"  # 5.855 s, 16 kHz mono pcm16


def data_chunk(wav: bytes) -> tuple[int, int, int]:
    """(offset of the data bytes, declared data size, byte rate) of a plain RIFF WAV."""
    at, byte_rate = 12, 0
    while True:
        tag, size = wav[at:at + 4], int.from_bytes(wav[at + 4:at + 8], "little")
        if tag == b"fmt ":
            byte_rate = int.from_bytes(wav[at + 16:at + 20], "little")
        if tag == b"data":
            return at + 8, size, byte_rate
        at += 8 + size + (size & 1)


def cut_wav(wav: bytes, keep_s: float) -> tuple[bytes, str, str]:
    """The WAV with its data chunk cut to ``keep_s`` seconds, the header still claiming the full size; returns it
    and the declared and held lengths as the error message should print them."""
    start, size, byte_rate = data_chunk(wav)
    keep = int(keep_s * byte_rate) // 2 * 2
    assert keep < size
    return wav[:start + keep], f"{size / byte_rate:.2f} s", f"{keep / byte_rate:.2f} s"


def truncated_message(declared: str, held: str) -> str:
    return f"audio truncated: header declares {declared}, file holds {held}"


def encode(samples: np.ndarray, fmt: str, codec: str, rate: int = 16000, **codec_options: str) -> bytes:
    """``samples`` (16 kHz mono float) encoded by ffmpeg through PyAV, the way an everyday encoder writes them."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=codec_options)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for i in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, i:i + 1024], format="flt", layout="mono")
            frame.sample_rate = 16000
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    out.mux(packet)
        for resampled in resampler.resample(None):
            for packet in stream.encode(resampled):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decoded_s(data: bytes, **kwargs: bool) -> float:
    return len(audio_mod.decode(data, "auto", None, 600.0, **kwargs)) / audio_mod.SAMPLE_RATE


# ------------------------------------------------------------------------------------------ the check


def test_every_test_clip_passes_the_check():
    clips = sorted(p.name for p in DATA.iterdir() if p.suffix in (".wav", ".flac"))
    assert len(clips) >= 10
    for name in clips:
        assert decoded_s(clip(name)) > 1.0, name


ENCODED = {
    # Encoder priming and padding make these decode a little longer or shorter than declared: never refused.
    "mp3 cbr (Info frame)": ("mp3", "libmp3lame", 16000, {"b": "64k"}),
    "mp3 vbr (Xing frame)": ("mp3", "libmp3lame", 16000, {"q": "4"}),
    "ogg opus": ("ogg", "libopus", 48000, {}),
    "m4a aac": ("ipod", "aac", 16000, {}),
    "flac": ("flac", "flac", 16000, {}),
    "aiff": ("aiff", "pcm_s16be", 16000, {}),
}
#: Formats whose header states the length: cut in half, they are refused.
DECLARED = ("mp3 cbr (Info frame)", "mp3 vbr (Xing frame)", "flac", "aiff")


def test_encoded_formats_pass_intact_and_are_refused_when_cut():
    speech = decode_clip("jfk.flac")  # 11.0 s
    for name, (fmt, codec, rate, options) in ENCODED.items():
        data = encode(speech, fmt, codec, rate, **options)
        assert abs(decoded_s(data) - 11.0) < 0.2, name
        if fmt == "ipod":
            continue  # its index (moov) is written last: a cut file cannot be opened at all ("cannot decode")
        half = data[:len(data) // 2]
        if name in DECLARED:
            with pytest.raises(BadAudio, match=r"audio truncated: header declares 11\.00 s, file holds [45]\.\d\d s"):
                decoded_s(half)
        held = decoded_s(half, allow_truncated=True)
        assert 4.0 < held < 7.0, (name, held)


def test_wav_cut_names_both_lengths_and_streamed_wav_is_not_checked():
    wav, declared, held = cut_wav(clip(WAV), 0.93)
    assert (declared, held) == ("5.86 s", "0.93 s")
    with pytest.raises(BadAudio) as info:
        decoded_s(wav)
    assert truncated_message(declared, held) in str(info.value) and "allow_truncated" in str(info.value)
    assert decoded_s(wav, allow_truncated=True) == pytest.approx(0.93, abs=0.01)
    # A WAV written to a pipe cannot fill in its sizes: 0xFFFFFFFF means "unknown", and such a file is whole.
    start, _, _ = data_chunk(clip(WAV))
    streamed = bytearray(clip(WAV)[:start + 3 * 32000])
    streamed[start - 4:start] = (0xFFFFFFFF).to_bytes(4, "little")
    streamed[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    assert decoded_s(bytes(streamed)) == pytest.approx(3.0, abs=0.01)


def test_small_shortfall_within_tolerance_passes():
    # One missing 20 ms at the end is encoder-padding sized: not refused.
    wav = clip(WAV)
    start, size, byte_rate = data_chunk(wav)
    assert decoded_s(wav[:start + size - byte_rate // 50]) == pytest.approx(size / byte_rate - 0.02, abs=0.005)


def _ffmpeg(data: bytes, fmt: str = "auto", sample_rate: int | None = None) -> np.ndarray:
    """What ffmpeg (PyAV) decodes ``data`` to, as every file was decoded before the native path."""
    kwargs = {"format": "s16le", "options": {"sample_rate": str(sample_rate), "ch_layout": "mono"}} \
        if fmt == "pcm_s16le" else {}
    audio, _, _ = audio_mod._decode_with_ffmpeg(data, fmt, kwargs, 10**9, 1e9, True)
    return audio


def test_16k_mono_pcm16_is_read_natively_to_the_very_samples_ffmpeg_gives():
    """WAV files that already hold 16 kHz mono 16-bit samples, and raw pcm_s16le at 16 kHz (what sections travel
    as), are read without ffmpeg (10-20x faster for a 100 s file) to exactly the floats ffmpeg gives; anything
    else still goes through ffmpeg."""
    wavs = sorted(p.name for p in DATA.iterdir() if p.suffix == ".wav")
    assert len(wavs) >= 10
    for name in wavs:
        data = clip(name)
        assert audio_mod._native_samples(data, "auto", None) is not None, name
        assert np.array_equal(audio_mod.decode(data, "auto", None, 3600), _ffmpeg(data)), name
    start, size, _ = data_chunk(clip(WAV))
    raw = clip(WAV)[start:start + size]
    assert np.array_equal(audio_mod.decode(raw, "pcm_s16le", 16000, 3600), _ffmpeg(raw, "pcm_s16le", 16000))
    # Chunks after the data (a LIST of tags), an unknown size (to the end), half a sample at the end: as ffmpeg.
    tagged = clip(WAV) + b"LIST" + (12).to_bytes(4, "little") + b"INFOISFT\x00\x00\x00\x00"
    streamed = bytearray(clip(WAV)[:start + 32001])
    streamed[start - 4:start] = (0xFFFFFFFF).to_bytes(4, "little")
    for data in (tagged, bytes(streamed)):
        assert np.array_equal(audio_mod.decode(data, "auto", None, 3600, allow_truncated=True), _ffmpeg(data))
    # Not 16 kHz mono 16-bit: ffmpeg's (resampled, mixed down or converted).
    speech = decode_clip("jfk.flac")
    for other in (encode(speech, "wav", "pcm_s16le", 8000), encode(speech, "wav", "pcm_f32le"),
                  encode(speech, "wav", "pcm_u8")):
        assert audio_mod._native_samples(other, "auto", None) is None
        assert abs(decoded_s(other) - 11.0) < 0.1
    assert audio_mod._native_samples(raw, "pcm_s16le", 8000) is None
    # The bound holds before anything is allocated.
    with pytest.raises(BadAudio, match=r"audio longer than asr.max_audio_s = 2 s"):
        audio_mod.decode(clip(WAV), "auto", None, 2)


# ------------------------------------------------------------------------------------- every entry point


async def job_view(s: AgentStack, job_id: str) -> dict:
    view = await s.wait_job(job_id, timeout=120)
    assert view["state"] in ("succeeded", "failed"), view
    return view


async def post_json(s: AgentStack, url: str, body: dict) -> tuple[int, dict]:
    async with s.session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def post_form(s: AgentStack, url: str, fields: dict[str, str], data: bytes) -> tuple[int, object]:
    body, ctype = multipart(fields, "clip.bin", data)
    async with s.session.post(url, data=body, headers={"Content-Type": ctype}) as resp:
        reply = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, reply


async def test_truncated_audio_through_every_entry_point(tmp_path: Path):
    wav, declared, held = cut_wav(clip(WAV), 0.93)
    wav_long, declared_l, held_l = cut_wav(clip(WAV), 3.0)
    flac = clip("jfk.flac")
    half_flac = flac[:len(flac) // 2]
    odd_pcm = pcm16(decode_clip("jfk.flac")[:3 * 16000]) + b"\x00"
    async with agent_stack(tmp_path) as s:
        jobs = s.scheduler.url + "/v1/jobs"
        openai = s.scheduler.url + "/v1/audio/transcriptions"

        # POST /v1/jobs, multipart: accepted, then the job fails with bad_audio naming both lengths.
        view = await job_view(s, await s.submit_file(wav, filename="cut.wav"))
        assert view["state"] == "failed" and view["error"]["code"] == "bad_audio", view
        assert truncated_message(declared, held) in view["error"]["message"]
        # ... and the form field allow_truncated=true decodes what is there.
        view = await job_view(s, await s.submit_file(wav_long, filename="cut.wav", allow_truncated="true"))
        assert view["state"] == "succeeded" and view["result"]["text"].strip(), view
        assert view["result"]["duration_s"] == pytest.approx(3.0, abs=0.01)

        # POST /v1/jobs, JSON: a FLAC cut in the middle; options.allow_truncated accepts it.
        view = await job_view(s, await s.submit_json(half_flac))
        assert view["state"] == "failed" and view["error"]["code"] == "bad_audio", view
        assert "audio truncated: header declares 11.00 s, file holds" in view["error"]["message"]
        view = await job_view(s, await s.submit_json(half_flac, options={"allow_truncated": True}))
        assert view["state"] == "succeeded" and "fellow" in view["result"]["text"].lower(), view

        # Odd-length raw pcm16 is refused at submission, naming the byte count; allow_truncated drops the half sample.
        status, reply = await post_json(s, jobs, {"audio_b64": base64.b64encode(odd_pcm).decode(),
                                                  "format": "pcm_s16le", "sample_rate": 16000})
        assert status == 400 and reply["error"]["code"] == "bad_audio", reply
        assert f"got {len(odd_pcm)} bytes" in reply["error"]["message"]
        view = await job_view(s, await s.submit_json(odd_pcm, format="pcm_s16le", sample_rate=16000,
                                                     options={"allow_truncated": True}))
        assert view["state"] == "succeeded" and view["result"]["text"].strip(), view

        # OpenAI-compatible endpoint: 400 bad_audio with both lengths; allow_truncated=true gives 200.
        status, reply = await post_form(s, openai, {"model": "whisper-1"}, wav)
        assert status == 400 and reply["error"]["code"] == "bad_audio", reply
        assert reply["error"]["param"] == "file" and truncated_message(declared, held) in reply["error"]["message"]
        status, reply = await post_form(s, openai, {"model": "whisper-1", "allow_truncated": "true"}, wav_long)
        assert status == 200 and reply["text"].strip(), reply
        status, reply = await post_form(s, openai, {"allow_truncated": "maybe"}, wav_long)
        assert status == 400 and reply["error"]["code"] == "invalid_request", reply
        assert reply["error"]["message"].startswith("allow_truncated: ")
        # An intact file is unaffected.
        status, reply = await post_form(s, openai, {"response_format": "text"}, clip(WAV))
        assert status == 200 and reply.strip(), reply

        # The agent's /utterance (pcm16 only): an odd byte count is 400 bad_audio naming it.
        body = {"job_id": "u-1", "audio": base64.b64encode(odd_pcm).decode(), "sample_rate": 16000}
        status, reply = await post_json(s, s.http.url + "/utterance", body)
        assert status == 400 and reply["error"]["code"] == "bad_audio", reply
        assert reply["error"]["field"] == "audio" and f"got {len(odd_pcm)} bytes" in reply["error"]["message"]

        # node-agent submit: one line naming bad_audio and both lengths; the intact file still transcribes.
        (tmp_path / "cut.wav").write_bytes(wav)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node_agent", "submit", "--scheduler", s.scheduler.url, str(tmp_path / "cut.wav"),
            str(DATA / WAV), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 1, err.decode()
        errors = err.decode().strip().splitlines()
        assert len(errors) == 1 and "cut.wav" in errors[0] and "bad_audio" in errors[0], errors
        assert truncated_message(declared, held) in errors[0]
        assert f"{WAV}: " in out.decode()
        # Every refusal failed the job, not the worker.
        assert s.agent.workers["cpu/0"].restarts.total() == 0


async def test_transcribe_prints_one_bad_audio_line(tmp_path: Path):
    wav, declared, held = cut_wav(clip(WAV), 0.93)
    (tmp_path / "cut.wav").write_bytes(wav)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node_agent", "transcribe", str(tmp_path / "cut.wav"), str(DATA / WAV),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 1
    errors = err.decode().strip().splitlines()
    assert errors == [f"node-agent: {tmp_path / 'cut.wav'}: bad_audio: {truncated_message(declared, held)} "
                      "(allow_truncated=true decodes what is there)"], errors
    assert f"{WAV}: 5.86 s audio in " in out.decode()  # the intact file is unaffected
    # --allow-truncated decodes what the file holds, on purpose.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node_agent", "transcribe", "--allow-truncated", str(tmp_path / "cut.wav"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()
    assert "cut.wav: 0.93 s audio in " in out.decode(), out.decode()
