"""Batched mode (``batched: true``): faster-whisper's own ``BatchedInferencePipeline`` in the real worker.

About 64 s of real speech (seven clips with 1.5 s pauses after 4 s of silence) through the real plugin process
with tiny.en. The yardstick is plain faster-whisper's ``BatchedInferencePipeline`` on the very samples the worker
was sent, on this machine, with the same settings: the agent must lose no word the library keeps (the same
segments, text and times), report times in the original audio (the leading silence that VAD drops still counts),
and send each segment as the pipeline produces it. Whether the pipeline itself loses words against sequential
decoding is the library's trade-off; the bench (section 3) measures it, and a result says ``batched``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from conftest import make_settings
from helpers import SR, clip, joined, pcm16, plain_transcript, plain_wer, samples_of_pcm16
from node_agent.contracts import DecodeOptions
from node_agent.supervisor import JobRequest, Worker
from test_supervisor import LONG_CLIPS

CLIPS = LONG_CLIPS + ["voices_Lab41-SRI-VOiCES-src-sp0307-ch127535-sg0042.wav", "ljspeech_LJ002-0020.wav"]
PAUSE_S = 1.5
#: Silence before the speech: VAD drops it, so a time relative to the speech chunks would land inside it.
LEAD_S = 4.0

pytestmark = pytest.mark.timeout(180)


def long_audio() -> tuple[bytes, np.ndarray, list[tuple[float, float]]]:
    """The job's pcm16 bytes, the samples the worker reads from them, and each clip's (start, end) seconds."""
    speech, spans = joined(CLIPS, pause_s=PAUSE_S)
    data = pcm16(np.concatenate([np.zeros(int(LEAD_S * SR), dtype=np.float32), speech]))
    return data, samples_of_pcm16(data), [(s + LEAD_S, e + LEAD_S) for s, e in spans]


def timeline_problems(segments: list[dict], spans: list[tuple[float, float]], duration: float,
                      end_slack: float = 0.021) -> list[str]:
    """What is wrong with the segments' times as times of the original audio (empty: nothing). ``end_slack``:
    how far past the last sample an end may be (Whisper's times step by 0.02 s)."""
    problems = []
    starts = [seg["start"] for seg in segments]
    if starts != sorted(starts):
        problems.append(f"out of order: {starts}")
    problems += [f"overlap: {a} / {b}" for a, b in zip(segments, segments[1:]) if a["end"] > b["start"] + 1e-3]
    for seg in segments:
        if not 0 <= seg["start"] < seg["end"] <= duration + end_slack:
            problems.append(f"outside the audio: {seg}")
        # VAD pads speech by 0.4 s; a time relative to the VAD chunks would fall in the leading silence.
        if seg["start"] < spans[0][0] - 1.0:
            problems.append(f"in the leading silence: {seg}")
        if not any(seg["start"] < e and s < seg["end"] for s, e in spans):
            problems.append(f"overlaps no speech: {seg}")
        for w in seg.get("words") or []:
            if not seg["start"] - 1e-3 <= w["start"] <= w["end"] <= seg["end"] + 1e-3:
                problems.append(f"word outside its segment: {w} in {seg['start']}-{seg['end']}")
    if segments and segments[-1]["end"] <= spans[-1][0]:
        problems.append(f"nothing reaches the last clip (starts at {spans[-1][0]:.1f} s): {segments[-1]}")
    return problems


def as_plain(segments: list[dict]) -> list[tuple[float, float, str]]:
    return [(seg["start"], seg["end"], seg["text"]) for seg in segments]


#: batched_min_audio_s: long audio is batched without asking, short audio is not; batch_size 1 makes one pipeline
#: batch per VAD chunk, so streaming is visible on the 64 s (a job that asks for sequential decoding has no batch).
SETTINGS = make_settings(asr={"batched_min_audio_s": 30, "batch_size": 1})


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(module_worker_factory: Callable[..., Any]) -> Worker:
    """One worker with SETTINGS for this module's tests (started once)."""
    return await module_worker_factory(SETTINGS)


@pytest.mark.asyncio(loop_scope="module")
async def test_batched_jobs_match_faster_whispers_pipeline_stream_and_keep_absolute_times(worker: Worker):
    settings = SETTINGS
    data, audio, spans = long_audio()
    duration = len(audio) / SR
    loop = asyncio.get_running_loop()

    arrivals: list[float] = []
    submitted = loop.time()
    one = await worker.run_job(JobRequest("batch-1", data, format="pcm_s16le", sample_rate=SR),
                               on_segment=lambda e: arrivals.append(loop.time()))
    done = loop.time()
    assert one.batched and one.language == "en"
    plain_one = plain_transcript(audio, asr=settings.asr, batched=True)  # batch_size 1, from the settings
    assert as_plain(one.segments) == as_plain(list(plain_one.segments))
    assert one.text == plain_one.text
    assert timeline_problems(one.segments, spans, duration) == []
    assert [seg["id"] for seg in one.segments] == list(range(1, len(one.segments) + 1))
    # More speech than one 30 s chunk holds: at least two chunks, so two batches of one.
    assert len(one.segments) >= 2 and len(arrivals) == len(one.segments)
    # Streamed: the last segment arrives a whole chunk's decode (a third of the job or more) after the first;
    # segments held back to the end would arrive milliseconds apart, whatever the machine's speed.
    assert arrivals[-1] - arrivals[0] > 0.1 * (done - submitted), (submitted, arrivals, done)

    # A job's own batch_size and decode options reach the pipeline; word times are absolute too.
    eight = await worker.run_job(JobRequest("batch-8", data, format="pcm_s16le", sample_rate=SR,
                                            options=DecodeOptions(batch_size=8, word_timestamps=True)))
    assert eight.batched
    plain_eight = plain_transcript(audio, asr=settings.asr, batched=True, batch_size=8, word_timestamps=True)
    assert as_plain(eight.segments) == as_plain(list(plain_eight.segments))
    assert all(seg.get("words") for seg in eight.segments)
    # The pipeline aligns words over each chunk's length rounded up to whole seconds, so the last word may end
    # up to 1 s past the audio (plain's pipeline does the same: the segments above are equal).
    assert timeline_problems(eight.segments, spans, duration, end_slack=1.0) == []

    short = await worker.run_job(JobRequest("short", clip("jfk.flac")))
    assert not short.batched
    assert plain_wer(short.text, "jfk.flac") == 0.0, short.text


@pytest.mark.asyncio(loop_scope="module")
async def test_batched_false_overrides_the_threshold(worker: Worker):
    data = pcm16(joined(CLIPS[:4], pause_s=PAUSE_S)[0])
    samples = samples_of_pcm16(data)
    assert len(samples) / SR > SETTINGS.asr.batched_min_audio_s
    result = await worker.run_job(JobRequest("seq", data, format="pcm_s16le", sample_rate=SR,
                                             options=DecodeOptions(batched=False)))
    assert not result.batched
    assert as_plain(result.segments) == as_plain(list(plain_transcript(samples).segments))
