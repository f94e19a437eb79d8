"""The supervisor with the real plugin process and the real tiny.en model."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

from helpers import clip, joined, pcm16, reference, wer
from node_agent.errors import BadAudio, JobStalled, JobTimeout, WorkerCrashed, WorkerUnavailable
from node_agent.supervisor import JobRequest, WorkerState
from conftest import RecordingObserver, make_settings

LONG_CLIPS = [
    "librispeech_1995-1837-0001.wav", "librivox_sense_and_sensibility_01_austen_64kb-0870.wav",
    "jfk.flac", "librivox_sense_and_sensibility_01_austen_64kb-0890.wav", "librispeech_1272-128104-0000.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0930.wav", "stereo_diarization_left.wav",
]


def long_job(job_id: str, repeat: int = 1, **kw) -> JobRequest:
    """About 50 s of real speech per repeat as raw pcm_s16le: several 30 s windows, several seconds to decode."""
    audio, _ = joined(LONG_CLIPS * repeat, pause_s=0.8)
    return JobRequest(job_id, pcm16(audio), format="pcm_s16le", sample_rate=16000, **kw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; the supervisor reaps it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_jfk_through_supervisor(worker_factory):
    worker = await worker_factory()
    seen = []
    result = await worker.run_job(JobRequest("jfk", clip("jfk.flac")), on_segment=seen.append)
    assert wer(reference("jfk.flac"), result.text) <= 0.05, result.text
    assert result.language == "en"
    assert result.duration_s == pytest.approx(11.0, abs=0.05)
    assert len(seen) == len(result.segments) >= 1
    assert {"id", "start", "end", "text", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob",
            "decode_s"} <= set(seen[0])
    t = result.timings
    assert t["transcribe_call_s"] > 0 and t["segments_iteration_s"] > 0
    assert worker.state is WorkerState.ready and worker.snapshot()["jobs_served"] == 1


async def test_segments_stream_before_the_final_message(worker_factory):
    worker = await worker_factory()
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    result = await worker.run_job(long_job("long"), on_segment=lambda e: arrivals.append(loop.time()))
    done = loop.time()
    assert len(result.segments) >= 4
    # The first 30 s window's segments arrive while later windows are still being decoded.
    assert done - arrivals[0] > 0.3, (arrivals[0], done)
    assert result.duration_s > 45


async def test_deadline_kills_the_worker_and_the_next_job_runs_on_a_new_one(worker_factory):
    worker = await worker_factory()
    old_pid = worker.pid
    loop = asyncio.get_running_loop()
    with pytest.raises(JobTimeout) as info:
        await worker.run_job(long_job("slow", repeat=2, deadline=loop.time() + 1.0))
    assert "deadline" in str(info.value)
    assert not pid_alive(old_pid)
    assert worker.restarts["timeout"] == 1
    result = await worker.run_job(JobRequest("next", clip("jfk.flac")))
    assert wer(reference("jfk.flac"), result.text) <= 0.05
    assert worker.pid != old_pid


async def test_per_audio_timeout_applies_after_the_audio_length_is_known(worker_factory):
    # ~207 s of audio needs ~10 s here; the budget is max(2 s, 0.02 x 206.7 s) = 4.1 s, which only the audio's
    # length can give (min_s alone would say 2.0 s). jfk needs ~1 s.
    s = make_settings(asr={"timeout": {"min_s": 2, "per_audio_s": 0.02, "stall_s": 60}})
    worker = await worker_factory(s)
    with pytest.raises(JobTimeout, match=r"deadline of 4\.1 s"):
        await worker.run_job(long_job("slow", repeat=4))
    assert (await worker.run_job(JobRequest("short", clip("jfk.flac")))).text


@pytest.mark.parametrize("sig, expect", [(signal.SIGKILL, "SIGKILL"), (signal.SIGSEGV, "SIGSEGV")])
async def test_crash_mid_job_fails_only_that_job(worker_factory, sig, expect):
    observer = RecordingObserver()
    worker = await worker_factory(observer=observer)
    pid = worker.pid
    task = asyncio.create_task(worker.run_job(long_job("victim")))
    await asyncio.wait_for(observer.started.wait(), 30)
    os.kill(pid, sig)
    with pytest.raises(WorkerCrashed) as info:
        await task
    assert expect in str(info.value)
    assert worker.restarts["crash"] == 1
    result = await worker.run_job(JobRequest("after", clip("jfk.flac")))
    assert wer(reference("jfk.flac"), result.text) <= 0.05
    assert worker.pid != pid


async def test_hung_worker_is_caught_by_the_stall_limit(worker_factory):
    observer = RecordingObserver()
    s = make_settings(asr={"timeout": {"stall_s": 1.5}})
    worker = await worker_factory(s, observer=observer)
    pid = worker.pid
    task = asyncio.create_task(worker.run_job(long_job("hung")))
    await asyncio.wait_for(observer.started.wait(), 30)
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(JobStalled):
        await asyncio.wait_for(task, 30)
    assert not pid_alive(pid)
    assert worker.restarts["stall"] == 1
    assert (await worker.run_job(JobRequest("after", clip("jfk.flac")))).text


async def test_recycled_between_jobs_after_max_jobs(worker_factory):
    s = make_settings(worker={"max_jobs": 2})
    worker = await worker_factory(s)
    first = worker.pid
    for i in range(2):
        r = await worker.run_job(JobRequest(f"j{i}", clip("ljspeech_LJ002-0020.wav")))
        assert r.worker_pid == first
    third = await worker.run_job(JobRequest("j2", clip("ljspeech_LJ002-0020.wav")))
    assert third.worker_pid != first
    assert worker.restarts["recycle"] == 1
    assert not pid_alive(first)


async def test_missing_model_goes_fatal_with_the_reason(worker_factory):
    s = make_settings(asr={"model": "/nonexistent/model-dir"}, worker={"backoff": {"max_quick_failures": 2}})
    worker = await worker_factory(s, wait=False)
    assert await worker.wait_ready(60) is WorkerState.fatal
    assert "/nonexistent/model-dir" in worker.last_error
    assert worker.restarts.total() == 0
    with pytest.raises(WorkerUnavailable, match="fatal"):
        await worker.run_job(JobRequest("x", clip("jfk.flac")))


def _wav_with_lying_header() -> bytes:
    data = bytearray(clip("ljspeech_LJ002-0020.wav"))
    data[40:44] = (10**8).to_bytes(4, "little")  # data chunk claims 100 MB
    return bytes(data)


def _float_wav_with_nan() -> bytes:
    import io
    import wave  # noqa: F401  (wave cannot write float; build the header by hand)

    samples = np.full(16000, np.nan, dtype="<f4")
    samples[::2] = np.inf
    body = samples.tobytes()
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
    fmt += (64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    out = io.BytesIO()
    out.write(b"RIFF" + (36 + len(body)).to_bytes(4, "little") + b"WAVE")
    out.write(b"fmt " + (16).to_bytes(4, "little") + fmt)
    out.write(b"data" + len(body).to_bytes(4, "little") + body)
    return out.getvalue()


BAD_AUDIO = {
    "empty": (b"", "auto", None, "empty"),
    "one-sample": (b"\x01\x00", "pcm_s16le", 16000, "too short"),
    "random-bytes": (np.random.default_rng(1).bytes(20000), "auto", None, "cannot decode"),
    "truncated-wav": (clip("jfk.flac")[:300], "auto", None, "decode"),
    "text-file": (b"hello, this is not audio\n" * 40, "auto", None, "cannot decode"),
    "nan-float-wav": (_float_wav_with_nan(), "auto", None, "NaN"),
    "odd-pcm": (b"\x00" * 33, "pcm_s16le", 16000, "odd byte count"),
    "pcm-without-rate": (b"\x00" * 32000, "pcm_s16le", None, "sample_rate"),
}


async def test_bad_audio_fails_the_job_not_the_worker(worker_factory):
    s = make_settings(asr={"max_audio_s": 30})
    worker = await worker_factory(s)
    pid = worker.pid
    for name, (data, fmt, rate, needle) in BAD_AUDIO.items():
        with pytest.raises(BadAudio) as info:
            await worker.run_job(JobRequest(name, data, format=fmt, sample_rate=rate))
        assert needle in str(info.value), (name, str(info.value))
    with pytest.raises(BadAudio, match="max_audio_s"):
        await worker.run_job(long_job("too-long"))
    # A header that lies about its length decodes what is really there.
    lying = await worker.run_job(JobRequest("lying-header", _wav_with_lying_header()))
    assert "eighteen" in lying.text.lower() or "1813" in lying.text
    assert worker.pid == pid and worker.restarts.total() == 0
    assert (await worker.run_job(JobRequest("good", clip("jfk.flac")))).text
