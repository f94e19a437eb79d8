"""Read-aloud stability: the old cluster's acceptance test (domain.md section 4) against the real agent.

Utterances are test clips joined with 0.8 s pauses. Each language gets one in-process agent (module-scoped):
Mandarin on the offline ``base`` model, English on ``tiny.en``.

* One job holding every utterance, judged by the acceptance criteria: each utterance's text is there, in order;
  the first and last characters/words of the recording are there; no segment reaches more than 0.5 s into the
  speech of a neighbouring utterance, so every boundary between utterances lies in the pause between them (the
  0.8 s gap plus the clips' own leading and trailing silence, found with Silero VAD). Whether whisper meets them
  on a given recording depends on the CPU's kernels (the same audio decodes differently on another machine), so
  the yardstick is plain faster-whisper's decode of the same joined audio on the same machine with the agent's
  settings (``helpers.plain_transcript``): the agent meets every criterion it meets, and scores no worse against
  the reference on any utterance. Criteria plain faster-whisper itself misses are printed, not failed.
* A stream of one job per utterance through ``/utterance``, 10 rounds on one worker process: every round scores no
  worse than plain faster-whisper on that clip, nothing changed from round to round (the decode is
  deterministic), no slow-down with the worker's uptime (mean real-time factor of the last 5 rounds within 1.2x
  of the first 5, in worker CPU time: see ``stream``), and ``node_agent_worker_jobs_served``
  counts every round. These are marked ``slow`` (10-30 s each).
* Mandarin script: the ``zh`` agent's output for each clip alone is simplified Chinese and what plain
  faster-whisper gives converted the worker's way; an agent with ``asr.zh_script: traditional`` gives the same
  decode in traditional characters.

What a single decode of one long recording does (measured on one machine with ``base`` on these five Mandarin
clips, same settings as the agent; the details differ on other CPUs; whisper decodes up to 30 s as one window, so
neighbouring sentences change each other's decode):

* Segment timestamps are whisper's own timestamp tokens; ``base`` puts them on whole seconds here, which still
  falls inside the pauses. Whisper also splits a sentence inside itself at a phrase break (paddlespeech after
  就是, where the speaker pauses; funasr after 体验), so a boundary *within* an utterance is allowed; one
  *between* utterances must lie in the pause.
* The result depends on the order of the sentences. ``ZH_ORDER`` met every criterion there (on other CPUs,
  including this project's CI, its 0724 sentence comes out with CER 0.33 against 0.17 alone). In growing-duration
  order (wenetspeech, 0764, 0724, paddlespeech, funasr) the 0724 sentence comes out with CER 0.33 against 0.17
  alone; in the order 0724, 0764, wenetspeech, funasr, paddlespeech the 1.8 s wenetspeech sentence is dropped
  entirely (whisper's timestamps jump over it).
* ``condition_on_previous_text=False`` gives the identical output in all three orders (the effect is inside
  one window, not the prompt). ``vad_filter=True`` is order-dependent too: it recovers the dropped sentence in
  the second order, loses three of five sentences in the growing-duration order, and garbles wenetspeech in
  ``ZH_ORDER``. faster-whisper's ``BatchedInferencePipeline`` merges the speech into chunks of up to 30 s and
  decodes them without timestamps: here one segment for the whole recording, holding two of the five sentences.
* One job per utterance (the stream) has none of these problems.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import pytest_asyncio

from conftest import make_settings
from helpers import (PlainTranscript, cer, decode_clip, joined, normalize_en, normalize_zh, plain_transcript, reference,
                     samples_of_pcm16, wer)
from test_compat import exact_pcm16, post, scraped, utterance_body
from stack import AgentStack, agent_stack

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

PAUSE_S = 0.8
#: How far a segment may reach past its own utterance into the pause and the next utterance.
EDGE_TOLERANCE_S = 0.5
#: Float slack when comparing the agent's score with plain faster-whisper's (the same text scores the same).
SCORE_EPS = 1e-9
#: The first and the last WINDOW rounds are compared for a slow-down; each holds every clip once. Two windows, back
#: to back: the stream was 15 rounds (the windows ten jobs apart), cut to keep make test near 8 minutes; a worker
#: that slows with every job still shows it five jobs later, and Mandarin's ``base`` decodes cost 3 s a round.
ROUNDS = 10
WINDOW = 5
MAX_SLOWDOWN = 1.2

ZH_ORDER = [
    "aishell1_BAC009S0764W0121.wav",
    "aishell1_BAC009S0724W0121.wav",
    "paddlespeech_zh.wav",
    "wenetspeech_TEST_NET_Y0000000000_-KTKHdZ2fb8_S00000.wav",
    "funasr_asr_example_zh.wav",
]
EN_ORDER = [
    "librivox_sense_and_sensibility_01_austen_64kb-0930.wav",
    "librispeech_1272-128104-0000.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0890.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0870.wav",
    "librispeech_1995-1837-0001.wav",
]


@dataclass
class Language:
    code: str
    model: str
    order: list[str]
    score: Callable[[str, str], float]  # CER or WER against a reference
    units: Callable[[str], list[str]]  # characters or words, normalised


ZH = Language("zh", "base", ZH_ORDER, cer, lambda text: list(normalize_zh(text)))
EN = Language("en", "tiny.en", EN_ORDER, wer, lambda text: normalize_en(text).split())


@dataclass
class Reader:
    """An agent for one language, and each utterance transcribed alone through /utterance."""

    lang: Language
    stack: AgentStack
    alone: dict[str, str] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)  # the language each reply names

    async def plain(self, audio: np.ndarray) -> PlainTranscript:
        """Plain faster-whisper on ``audio`` with this agent's settings (in a thread: the agent keeps serving)."""
        return await asyncio.to_thread(plain_transcript, audio, asr=self.stack.settings.asr,
                                       language=self.lang.code)


async def start_reader(stack: AgentStack, lang: Language) -> Reader:
    reader = Reader(lang, stack)
    for name in lang.order:
        status, reply, _ = await post(stack, utterance_body(name, lang.code))
        assert status == 200, (name, reply)
        reader.alone[name] = reply["text"]
        reader.languages[name] = reply["language"]
    return reader


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def zh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Reader]:
    async with agent_stack(tmp_path_factory.mktemp("read-aloud-zh"), asr={"model": ZH.model}) as stack:
        yield await start_reader(stack, ZH)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def en(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Reader]:
    async with agent_stack(tmp_path_factory.mktemp("read-aloud-en"), asr={"model": EN.model}) as stack:
        yield await start_reader(stack, EN)


def overlap(seg: dict[str, Any], span: tuple[float, float]) -> float:
    return min(seg["end"], span[1]) - max(seg["start"], span[0])


def speech_spans(names: list[str], spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Where each utterance's speech starts and ends in the recording (Silero VAD on each clip alone): a clip's
    own leading and trailing silence is part of the pause around it."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    out = []
    for name, (offset, _) in zip(names, spans):
        speech = get_speech_timestamps(decode_clip(name), VadOptions(speech_pad_ms=0, min_silence_duration_ms=100))
        out.append((offset + speech[0]["start"] / 16000, offset + speech[-1]["end"] / 16000))
    return out


@dataclass
class Judged:
    """One decode of the joined recording against the acceptance criteria."""

    failures: set[str]  # criteria missed, named the same way for any decode of the recording
    scores: list[float]  # per utterance, against its reference
    shown: list[tuple[float, float, str]]


def judge(lang: Language, segments: list[dict[str, Any]], spans: list[tuple[float, float]],
          speech: list[tuple[float, float]]) -> Judged:
    failures: set[str] = set()
    # Each segment belongs to the utterance it overlaps most; utterances come in order and none is missing.
    owner = [max(range(len(spans)), key=lambda i: overlap(seg, spans[i])) for seg in segments]
    if owner != sorted(owner):
        failures.add("segments out of order")
    failures |= {f"{lang.order[i]} lost" for i in range(len(spans)) if i not in owner}
    # No segment reaches more than EDGE_TOLERANCE_S into the speech of a neighbouring utterance.
    for seg, k in zip(segments, owner):
        if k > 0 and seg["start"] < speech[k - 1][1] - EDGE_TOLERANCE_S:
            failures.add(f"{lang.order[k]} reaches back into {lang.order[k - 1]}")
        if k < len(spans) - 1 and seg["end"] > speech[k + 1][0] + EDGE_TOLERANCE_S:
            failures.add(f"{lang.order[k]} reaches into {lang.order[k + 1]}")
    texts = ["".join(seg["text"] for seg, k in zip(segments, owner) if k == i) for i in range(len(spans))]
    scores = [lang.score(reference(name), text) for name, text in zip(lang.order, texts)]
    full = lang.units("".join(seg["text"] for seg in segments))
    first, last = lang.units(reference(lang.order[0])), lang.units(reference(lang.order[-1]))
    if not full or full[0] != first[0]:
        failures.add("first character/word missing")
    if not full or full[-1] != last[-1]:
        failures.add("last character/word missing")
    return Judged(failures, scores, [(seg["start"], seg["end"], seg["text"]) for seg in segments])


async def one_job(reader: Reader) -> None:
    lang, s = reader.lang, reader.stack
    audio, spans = joined(lang.order, PAUSE_S)
    sent = exact_pcm16(audio)
    started = time.monotonic()
    job_id = await s.submit_json(sent, format="pcm_s16le", sample_rate=16000, language=lang.code)
    view = await s.wait_job(job_id, timeout=240)
    elapsed = time.monotonic() - started
    assert view["state"] == "succeeded", view
    segments = view["result"]["segments"]

    # The yardstick: plain faster-whisper on the very samples the agent was sent, on this machine.
    plain = await reader.plain(samples_of_pcm16(sent))
    speech = speech_spans(lang.order, spans)
    agent, ref = judge(lang, segments, spans, speech), judge(lang, list(plain.segments), spans, speech)
    assert agent.failures <= ref.failures, (
        f"the agent misses {sorted(agent.failures - ref.failures)} where plain faster-whisper does not; "
        f"agent segments {agent.shown}; plain {ref.shown}")
    worse = [(name, a, p) for name, a, p in zip(lang.order, agent.scores, ref.scores) if a > p + SCORE_EPS]
    assert not worse, (worse, agent.shown, ref.shown)

    duration = len(audio) / 16000
    same = agent.shown == ref.shown
    print(f"\n{lang.code} one job ({lang.model}): {duration:.1f} s of audio in {elapsed:.1f} s, "
          f"{len(segments)} segments at {[(round(a, 2), round(b, 2)) for a, b, _ in agent.shown]}; "
          f"score agent/plain {[(round(a, 3), round(b, 3)) for a, b in zip(agent.scores, ref.scores)]}; "
          f"{'identical to' if same else 'differs from'} plain faster-whisper"
          + (f"; criteria plain faster-whisper itself misses here: {sorted(ref.failures)}" if ref.failures else ""))


@dataclass
class Round:
    name: str
    audio_s: float
    wall_s: float
    cpu_s: float
    text: str


async def stream(reader: Reader) -> None:
    lang, s = reader.lang, reader.stack
    worker = s.agent.workers["cpu/0"]
    pid = worker.pid
    assert pid is not None
    process = psutil.Process(pid)
    served_before = await scraped(s, "node_agent_worker_jobs_served", device="cpu/0")
    assert served_before is not None
    bodies = {name: utterance_body(name, lang.code) for name in lang.order}
    rounds: list[Round] = []
    started = time.monotonic()
    for i in range(ROUNDS):
        name = lang.order[i % len(lang.order)]
        cpu = process.cpu_times()
        t0 = time.perf_counter()
        status, reply, _ = await post(s, bodies[name])
        wall = time.perf_counter() - t0
        after = process.cpu_times()
        assert status == 200, (i, name, reply)
        rounds.append(Round(name, reply["duration"], wall,
                            (after.user + after.system) - (cpu.user + cpu.system), reply["text"]))
    elapsed = time.monotonic() - started

    # No result missing, none garbled: each round scores no worse than plain faster-whisper on the same samples.
    plain = {name: (await reader.plain(samples_of_pcm16(exact_pcm16(decode_clip(name))))).text
             for name in lang.order}
    for i, r in enumerate(rounds):
        score, plain_score = lang.score(reference(r.name), r.text), lang.score(reference(r.name), plain[r.name])
        assert r.text and score <= plain_score + SCORE_EPS, (i, r.name, r.text, plain[r.name])
    # The decode is deterministic on a CPU: any drift would be state leaking from one job into the next.
    changed = [(i, r.name, r.text) for i, r in enumerate(rounds) if r.text != reader.alone[r.name]]
    assert not changed, changed

    # One worker process served every round, and its gauge counted them.
    assert worker.pid == pid and process.is_running()
    assert sum(worker.restarts.values()) == 0, worker.restarts
    served_after = await scraped(s, "node_agent_worker_jobs_served", device="cpu/0")
    assert served_after == served_before + ROUNDS

    # No slow-down with uptime: the first and last WINDOW rounds hold the same clips (ROUNDS % clips == 0).
    def mean_rtf(part: list[Round], attr: str) -> float:
        return statistics.fmean(getattr(r, attr) / r.audio_s for r in part)

    head, tail = rounds[:WINDOW], rounds[-WINDOW:]
    assert [r.name for r in head] == [r.name for r in tail]
    wall_head, wall_tail = mean_rtf(head, "wall_s"), mean_rtf(tail, "wall_s")
    cpu_head, cpu_tail = mean_rtf(head, "cpu_s"), mean_rtf(tail, "cpu_s")
    print(f"\n{lang.code} stream ({lang.model}): {ROUNDS} rounds in {elapsed:.1f} s on worker pid {pid}; "
          f"wall RTF first {WINDOW} {wall_head:.3f}, last {WINDOW} {wall_tail:.3f}; "
          f"worker CPU s per audio s first {cpu_head:.3f}, last {cpu_tail:.3f}")
    # The real-time factor is measured as the worker's CPU seconds per audio second: wall clock on a shared 2-core
    # machine follows whatever else runs there (0.59 -> 0.36 and 0.77 -> 0.92 between the first and last ten
    # rounds in two runs beside other test suites, while CPU time moved under 5%). A worker that slows down with
    # uptime spends more CPU per audio second, so this still catches it; the wall values are printed.
    assert cpu_tail <= MAX_SLOWDOWN * cpu_head, (cpu_head, cpu_tail, wall_head, wall_tail)


async def test_mandarin_read_aloud_as_one_job(zh: Reader) -> None:
    await one_job(zh)


@pytest.mark.slow
async def test_mandarin_read_aloud_as_a_stream_of_utterances(zh: Reader) -> None:
    await stream(zh)


# ----- Mandarin script: simplified by default, traditional on request ------------------------------------------


def plain_faster_whisper(names: list[str], zh_script: str = "simplified") -> dict[str, str]:
    """Plain faster-whisper with the agent's settings (``base``, zh), its output converted to ``zh_script`` per
    segment by the worker's converter, on the very samples the agent is sent (``helpers.plain_transcript``)."""
    asr = make_settings(asr={"model": ZH.model, "zh_script": zh_script}).asr
    return {name: plain_transcript(samples_of_pcm16(exact_pcm16(decode_clip(name))), asr=asr, language="zh").text
            for name in names}


async def test_mandarin_is_simplified_by_default_traditional_on_request_and_as_good_as_plain(
        zh: Reader, tmp_path: Path) -> None:
    """The simplified side is the ``zh`` agent (default settings) and what it gave for each clip alone."""
    import opencc

    clips = ZH.order
    t2s, s2t = opencc.OpenCC("t2s"), opencc.OpenCC("s2t")
    plain = await asyncio.to_thread(plain_faster_whisper, clips)
    plain_traditional = await asyncio.to_thread(plain_faster_whisper, clips, "traditional")
    # Traditional output is checked on the clips whose decode here has characters to convert (e.g. 广州 ->
    # 廣州), at most two: on the others it would repeat the simplified checks. Which clips those are depends on
    # the decode, which depends on the CPU: plain faster-whisper's decode of the same samples is the yardstick.
    converted = [n for n in clips if plain_traditional[n] != plain[n]][:2]
    assert converted, (plain, plain_traditional)
    assert zh.stack.settings.asr.model == "base" and zh.stack.settings.asr.zh_script.value == "simplified"
    simplified = dict(zh.alone)
    assert all(zh.languages[n] == "zh" for n in clips), zh.languages
    traditional = {}
    async with agent_stack(tmp_path / "traditional", asr={"model": ZH.model, "zh_script": "traditional"}) as s:
        for name in converted:
            status, reply, _ = await post(s, utterance_body(name, "zh"))
            assert status == 200 and reply["language"] == "zh", (name, reply)
            traditional[name] = reply["text"]

    for name in clips:
        assert simplified[name] and t2s.convert(simplified[name]) == simplified[name], (name, simplified[name])
    for name in converted:
        assert s2t.convert(traditional[name]) == traditional[name], (name, traditional[name])
        # The same decode in the other script.
        assert normalize_zh(traditional[name]) == normalize_zh(simplified[name]), name
        assert traditional[name] != simplified[name], name
    assert simplified == plain, (simplified, plain)
    assert traditional == {n: plain_traditional[n] for n in converted}, (traditional, plain_traditional)

    agent_cer = {n: cer(reference(n), simplified[n]) for n in clips}
    plain_cer = {n: cer(reference(n), plain[n]) for n in clips}
    mean_agent, mean_plain = statistics.fmean(agent_cer.values()), statistics.fmean(plain_cer.values())
    print(f"\nMandarin CER (normalised, base): agent {mean_agent:.4f}, plain faster-whisper {mean_plain:.4f}; "
          + ", ".join(f"{n[:18]} {agent_cer[n]:.3f}/{plain_cer[n]:.3f}" for n in clips))
    assert mean_agent <= mean_plain + SCORE_EPS, (agent_cer, plain_cer)
    assert all(agent_cer[n] <= plain_cer[n] + SCORE_EPS for n in clips), (agent_cer, plain_cer)


async def test_english_read_aloud_as_one_job(en: Reader) -> None:
    await one_job(en)


@pytest.mark.slow
async def test_english_read_aloud_as_a_stream_of_utterances(en: Reader) -> None:
    await stream(en)
