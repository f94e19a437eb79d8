"""Long-audio mode (plugins/asr/longform.py): the pure planning, and ~60 s of real speech through the real worker.

The end-to-end checks are the ones that matter to a listener: every utterance of the input is in the
transcript (nothing lost where windows or sections meet), segments are in time order and do not overlap, and
segments reach the caller while later windows are still being decoded. "Every utterance" is judged against plain
faster-whisper's sequential decode of the same samples on the same machine (what long-audio mode replaces): the
long-audio transcript loses no utterance that one keeps, whatever the CPU's kernels make of the audio.
"""

from __future__ import annotations

import asyncio

import jiwer
import numpy as np
import pytest

from helpers import SR, joined, normalize_en, pcm16, plain_transcript, reference, samples_of_pcm16
from node_agent.supervisor import JobRequest
from plugins.asr.longform import (
    LongformSettings,
    Window,
    next_window,
    plan_sections,
    section_count,
    speech_pieces,
)
from test_supervisor import LONG_CLIPS

#: About 60 s: seven clips of read speech with 1.5 s pauses (longer than 2 x pad, so pauses get shortened).
CLIPS = LONG_CLIPS + ["voices_Lab41-SRI-VOiCES-src-sp0307-ch127535-sg0042.wav", "ljspeech_LJ002-0020.wav"]
PAUSE_S = 1.5

pytestmark = pytest.mark.timeout(120)


def s(seconds: float) -> int:
    return int(seconds * SR)


# ----------------------------------------------------------------------------------------- planning (pure)


def test_pieces_meet_in_short_pauses_and_keep_pad_in_long_ones():
    regions = [(s(1), s(5)), (s(5.4), s(9)), (s(12), s(14))]
    pieces = speech_pieces(regions, s(20), pad=s(0.5))
    # 0.4 s pause: the pieces meet in its middle; 3 s pause: 0.5 s of context each side, the rest dropped.
    assert pieces == [(s(0.5), s(5.2)), (s(5.2), s(9.5)), (s(11.5), s(14.5))]


def test_overlapping_regions_become_one_piece_and_edges_are_clipped():
    pieces = speech_pieces([(s(0.1), s(3)), (s(2), s(4)), (s(19.8), s(20))], s(20), pad=s(0.5))
    assert pieces == [(0, s(4.5)), (s(19.3), s(20))]


def test_windows_end_in_a_pause_and_join_across_long_ones():
    pieces = [(s(0), s(10)), (s(10), s(20)), (s(24), s(28)), (s(28), s(35))]
    w = next_window(pieces, 0, s(29))
    # 0-20 contiguous, then 24-28 after a dropped pause: 24 s of audio; adding 28-35 would exceed 29 s.
    assert w.spans == [(0, s(20)), (s(24), s(28))]
    assert w.samples == s(24)
    assert w.to_original(19.0) == pytest.approx(19.0)
    assert w.to_original(21.0) == pytest.approx(25.0)  # 1 s into the second span
    assert w.to_original(20.0, is_end=True) == pytest.approx(20.0)  # an end on the join stays before it
    assert next_window(pieces, w.end, s(29)).spans == [(s(28), s(35))]
    assert next_window(pieces, s(35), s(29)) is None


def test_window_resumes_inside_a_piece_and_cuts_an_overlong_one():
    assert next_window([(0, s(20))], s(12.5), s(29)).spans == [(s(12.5), s(20))]
    assert next_window([(0, s(40))], 0, s(29)).spans == [(0, s(29))]


def test_window_time_past_the_audio_maps_to_its_end():
    w = Window([(s(1), s(2)), (s(5), s(6))])
    assert w.to_original(30.0) == pytest.approx(6.0)
    assert w.to_original(0.0) == pytest.approx(1.0)


def test_sections_cut_in_the_longest_nearby_pause():
    # Four 10 s regions; the pause after the second is the longest near the middle of the speech.
    regions = [(s(0), s(10)), (s(10.3), s(20.3)), (s(23.3), s(33.3)), (s(33.5), s(43.5))]
    assert plan_sections(regions, 2, s(44)) == [(0, s(21.8)), (s(21.8), s(44))]
    assert plan_sections(regions, 1, s(44)) == [(0, s(44))]
    assert plan_sections(regions[:1], 3, s(44)) == [(0, s(44))]
    assert len(plan_sections(regions, 4, s(44))) == 4


def test_section_count_follows_windows_and_batch_size():
    settings = LongformSettings(window_s=29.0, windows_per_section=4.0)
    assert section_count([(0, s(100))], settings, batch_size=8) == 1
    assert section_count([(0, s(600))], settings, batch_size=8) == 6
    assert section_count([(0, s(3600))], settings, batch_size=8) == 8
    assert section_count([(0, s(3600))], settings, batch_size=1) == 1


# ----------------------------------------------------------------------------------------- real speech


def lost_utterances(segments: list[dict], names: list[str]) -> list[tuple[str, float]]:
    """Clips of which more than a fifth of the reference words are missing from the whole transcript."""
    refs = [normalize_en(reference(n)).split() for n in names]
    hyp = normalize_en(" ".join(seg["text"] for seg in segments))
    out = jiwer.process_words(" ".join(w for r in refs for w in r), hyp)
    deleted = np.zeros(sum(len(r) for r in refs), dtype=bool)
    for chunk in out.alignments[0]:
        if chunk.type == "delete":
            deleted[chunk.ref_start_idx:chunk.ref_end_idx] = True
    lost, at = [], 0
    for name, words in zip(names, refs):
        share = deleted[at:at + len(words)].mean()
        at += len(words)
        if share > 0.2:
            lost.append((name, round(float(share), 2)))
    return lost


def lost_beyond_plain(segments: list[dict], audio: np.ndarray) -> list[tuple[str, float]]:
    """Utterances the long-audio transcript loses that plain faster-whisper's sequential decode (the agent's
    tiny.en settings) of the same samples keeps."""
    lost_by_plain = {name for name, _ in lost_utterances(list(plain_transcript(audio).segments), CLIPS)}
    return [(name, share) for name, share in lost_utterances(segments, CLIPS) if name not in lost_by_plain]


def check_timeline(segments: list[dict], duration: float) -> None:
    starts = [seg["start"] for seg in segments]
    assert starts == sorted(starts), starts
    for a, b in zip(segments, segments[1:]):
        assert a["end"] <= b["start"] + 1e-3, (a, b)
    assert all(0 <= seg["start"] < seg["end"] <= duration + 1e-3 for seg in segments)


async def test_long_audio_mode_loses_no_utterance_and_streams(worker_factory):
    audio, _ = joined(CLIPS, pause_s=PAUSE_S)
    duration = len(audio) / SR
    assert 55 < duration < 70
    worker = await worker_factory()
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    result = await worker.run_job(
        JobRequest("long", pcm16(audio), format="pcm_s16le", sample_rate=SR, options={"batched": True}),
        on_segment=lambda e: arrivals.append(loop.time()))
    done = loop.time()
    assert result.batched
    assert lost_beyond_plain(result.segments, samples_of_pcm16(pcm16(audio))) == []
    check_timeline(result.segments, duration)
    assert [seg["id"] for seg in result.segments] == list(range(1, len(result.segments) + 1))
    # Three windows: the first window's segments arrive while the later ones are still being decoded.
    assert len(arrivals) == len(result.segments) >= 6
    assert done - arrivals[0] > 0.2, (arrivals[0], done)  # all at the end would be milliseconds apart
    t = result.timings
    assert t["first_segment_s"] < t["total_s"] / 2


def test_sections_decoded_side_by_side_keep_every_utterance_in_order():
    # In-process (this test only): several sections need more audio than the suite can afford per job, so
    # they are forced here with one window per section; the worker path is covered above.
    from faster_whisper import WhisperModel

    from node_agent.model_resolution import resolve_model
    from plugins.asr.longform import LongformTranscriber

    audio = samples_of_pcm16(pcm16(joined(CLIPS, pause_s=PAUSE_S)[0]))  # the worker test's samples
    model = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=2)
    transcriber = LongformTranscriber(model, LongformSettings(windows_per_section=1.0))
    segments, info = transcriber.transcribe(audio, beam_size=5, batch_size=8)
    out = [{"id": seg.id, "start": seg.start, "end": seg.end, "text": seg.text} for seg in segments]
    assert info.sections >= 2 and info.language == "en"
    assert lost_beyond_plain(out, audio) == []
    check_timeline(out, len(audio) / SR)
    assert [seg["id"] for seg in out] == list(range(1, len(out) + 1))
