"""Long-audio mode: faster-whisper's sequential algorithm on VAD-packed windows, batched across sections.

Why not ``BatchedInferencePipeline`` as it is: it decodes each VAD chunk once, without timestamps and without
the previous text as prompt. On this project's long clips that costs words two ways (docs/benchmarks.md):
Whisper ends a chunk early after a pause and the rest of that chunk is never decoded (whole sentences lost),
and without the previous text tiny.en writes out a stuttering speaker's disfluencies. Sequential decoding has
neither problem: it decodes with timestamps, continues from the last timestamp when a window ends early, and
prompts each window with the text before it. This module keeps exactly that and saves work elsewhere:

* Silero VAD finds the speech. A window is up to ``window_s`` of it, built from whole speech regions with
  ``pad_s`` of context each side (pauses longer than ``2 * pad_s`` are shortened to that), so it ends in a pause
  and holds as much speech as fits. On CPU the encoder (a fixed 30 s per window) dominates, so fewer windows
  is most of the gain; language detection reuses the first window's encoder output instead of its own pass.
* Long audio is split at its longest pauses into sections that are decoded side by side, one window of each
  section per CTranslate2 batch, each prompted with its own previous text and continued from its own last
  timestamp. A section's first window borrows the text of the section before it as prompt.
* The first batch is the first window alone (first segments early, and a measure of seconds per window); a
  batch then holds as many windows as fit in ``round_budget_s``, earliest sections first, so a slow model
  still streams. Segments come out in time order: the first open section's as each batch finishes, a later
  section's once every earlier one is done.

Temperature fallback, the no-speech skip and word timestamps follow faster-whisper's sequential code. The
faster-whisper internals used (``get_prompt``, ``_split_segments_by_timestamps``, ``add_word_timestamps``)
are those of the pinned 1.2.1. Planning (``speech_pieces``, ``next_window``, ``plan_sections``) is pure.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
HOP = 160  # samples per mel frame
FRAMES_PER_SECOND = SAMPLE_RATE // HOP
MAX_FRAMES = 3000  # Whisper's 30 s input


@dataclass(frozen=True)
class LongformSettings:
    """How long audio is cut into windows and sections. Times are seconds."""

    #: Context kept on each side of speech; a longer pause is shortened to twice this inside a window.
    pad_s: float = 0.5
    #: Fill a window up to this much audio (Whisper reads 30 s).
    window_s: float = 29.0
    #: Windows per section: sections (and so batching) start where audio needs more windows than this.
    #: Each section's first window has only borrowed context, so fewer, longer sections keep accuracy; on a
    #: 2-core CPU a batch saves only 10-20 % of decoder time (docs/benchmarks.md).
    windows_per_section: float = 4.0
    #: Silero VAD speech threshold (faster-whisper's default).
    vad_threshold: float = 0.5
    #: Pauses shorter than this do not separate speech regions.
    min_silence_ms: int = 100
    #: Previous-text prompt, at most this many tokens (faster-whisper's sequential mode: 223).
    prompt_tokens: int = 223
    #: A batch holds no more windows than the last batch's seconds per window say fit in this time, so that a
    #: slow model still sends segments often (the supervisor fails a job that is silent for asr.timeout.stall_s).
    round_budget_s: float = 20.0


# ------------------------------------------------------------------------------------------ planning (pure)


@dataclass
class Window:
    """Up to 30 s of audio: ``spans`` (sample ranges of the original audio) joined in order."""

    spans: list[tuple[int, int]]

    @property
    def samples(self) -> int:
        return sum(e - s for s, e in self.spans)

    @property
    def start(self) -> int:
        return self.spans[0][0]

    @property
    def end(self) -> int:
        return self.spans[-1][1]

    def to_original(self, t: float, is_end: bool = False) -> float:
        """Window time -> original time (seconds). An end time on a join stays in the earlier span."""
        offset = 0.0
        for i, (s, e) in enumerate(self.spans):
            length = (e - s) / SAMPLE_RATE
            if t < offset + length or (is_end and t <= offset + length) or i == len(self.spans) - 1:
                return min(s / SAMPLE_RATE + max(0.0, t - offset), e / SAMPLE_RATE)
            offset += length
        return self.end / SAMPLE_RATE


def speech_pieces(regions: Sequence[tuple[int, int]], total: int, pad: int) -> list[tuple[int, int]]:
    """One piece per speech region (samples): the region with ``pad`` of context on each side.

    Where two regions are closer than ``2 * pad`` their pieces meet in the middle of the pause, so a window
    made of consecutive pieces is plain contiguous audio that can end in any pause. Overlapping regions merge.
    """
    merged: list[list[int]] = []
    for start, end in sorted(regions):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        elif end > start:
            merged.append([start, end])
    pieces: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(merged):
        lo = max(0, start - pad)
        hi = min(total, end + pad)
        if i and start - merged[i - 1][1] < 2 * pad:
            lo = (merged[i - 1][1] + start) // 2
        if i + 1 < len(merged) and merged[i + 1][0] - end < 2 * pad:
            hi = (end + merged[i + 1][0]) // 2
        pieces.append((lo, hi))
    return pieces


def next_window(pieces: Sequence[tuple[int, int]], seek: int, window: int) -> Window | None:
    """The window from ``seek``: whole pieces while they fit, so it ends in a pause; None when nothing is left.

    A piece longer than a window (speech with no pause of ``min_silence_ms``) is cut at the window's length;
    the continuation from the last timestamp then re-decodes the cut word, as sequential mode does at every
    window edge.
    """
    taken: list[list[int]] = []
    used = 0
    for s, e in pieces:
        if e <= seek:
            continue
        s = max(s, seek)
        if used + (e - s) > window:
            if not taken:
                taken.append([s, s + window])
            break
        if taken and taken[-1][1] == s:
            taken[-1][1] = e  # contiguous: one span
        else:
            taken.append([s, e])
        used += e - s
    return Window([(s, e) for s, e in taken]) if taken else None


def plan_sections(regions: Sequence[tuple[int, int]], count: int, total: int) -> list[tuple[int, int]]:
    """Split ``[0, total)`` into at most ``count`` sections of about equal speech, each cut in a long pause.

    ``regions`` are the speech regions (samples, sorted). A cut is the middle of the longest pause within a
    quarter of a section's speech of its ideal place, else of the pause nearest to that place.
    """
    if count <= 1 or len(regions) < 2:
        return [(0, total)]
    speech = np.cumsum([e - s for s, e in regions])  # speech up to and including region i
    per = speech[-1] / count
    pauses = [(i, regions[i + 1][0] - regions[i][1]) for i in range(len(regions) - 1)]  # pause after region i
    cuts: list[int] = []
    for k in range(1, count):
        target = k * per
        free = [(i, g) for i, g in pauses if not cuts or i > cuts[-1]]
        if not free:
            break
        near = [(i, g) for i, g in free if abs(speech[i] - target) <= per / 4]
        if near:
            cuts.append(max(near, key=lambda ig: (ig[1], -abs(speech[ig[0]] - target)))[0])
        else:
            cuts.append(min(free, key=lambda ig: abs(speech[ig[0]] - target))[0])
    bounds = [0] + [(regions[i][1] + regions[i + 1][0]) // 2 for i in cuts] + [total]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def section_count(pieces: Sequence[tuple[int, int]], settings: LongformSettings, batch_size: int) -> int:
    """Sections for this much speech: one per ``windows_per_section`` windows, at most ``batch_size``."""
    windows = sum(e - s for s, e in pieces) / (settings.window_s * SAMPLE_RATE)
    return max(1, min(batch_size, math.ceil(windows / settings.windows_per_section)))


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class LongformInfo:
    """What ``transcribe`` returns next to the segments (the worker reads ``language`` and its probability)."""

    language: str
    language_probability: float
    duration: float
    duration_after_vad: float
    sections: int
    windows: int = 0


@dataclass
class _Section:
    index: int
    start: int
    end: int
    spans: list[tuple[int, int]]
    seek: int
    tokens: list[int] = field(default_factory=list)
    prompt_from: int = 0
    segments: list[Any] = field(default_factory=list)
    done: bool = False


@dataclass
class _Options:
    beam_size: int = 5
    best_of: int = 5
    patience: float = 1.0
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | None = None
    hotwords: str | None = None
    word_timestamps: bool = False
    suppress_tokens: list[int] | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "_Options":
        known = {f for f in cls.__dataclass_fields__ if f != "temperatures"}
        unknown = set(kwargs) - known - {"temperature", "vad_filter", "language"}
        if unknown:
            raise TypeError(f"unexpected decode options for long-audio mode: {', '.join(sorted(unknown))}")
        opts = cls(**{k: v for k, v in kwargs.items() if k in known})
        t = kwargs.get("temperature")
        if t is not None:
            opts.temperatures = tuple(t) if isinstance(t, (list, tuple)) else (float(t),)
        if opts.beam_size < 1 or opts.best_of < 1 or not opts.temperatures:
            raise ValueError("beam_size and best_of must be at least 1 and temperature not empty")
        return opts


def speech_regions(audio: np.ndarray, settings: LongformSettings) -> list[tuple[int, int]]:
    """Silero VAD speech regions (samples, unpadded); long regions are split at their last short pause."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    vad = VadOptions(threshold=settings.vad_threshold, min_silence_duration_ms=settings.min_silence_ms,
                     speech_pad_ms=0, max_speech_duration_s=settings.window_s - 2 * settings.pad_s)
    return [(r["start"], r["end"]) for r in get_speech_timestamps(audio, vad)]


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


class LongformTranscriber:
    """Decodes long audio with one loaded ``WhisperModel``; ``transcribe`` mirrors ``WhisperModel.transcribe``."""

    def __init__(self, model: Any, settings: LongformSettings = LongformSettings()) -> None:
        self.model = model
        self.settings = settings

    def transcribe(self, audio: np.ndarray, language: str | None = None, batch_size: int = 8,
                   check: Callable[[], None] | None = None, **kwargs: Any) -> tuple[Iterator[Any], LongformInfo]:
        """Plan sections and windows and decode the first batch (language detection included); returns
        ``(segments, info)``. The remaining batches are decoded as ``segments`` is iterated. ``check`` is called
        before every batch and may raise to stop the decode there (the caller's cancel)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        run = _Run(self.model, self.settings, audio, language, batch_size, _Options.from_kwargs(kwargs), check)
        run.decode_round()
        return run.segments(), run.info


class _Run:
    """One long-audio transcription: its sections, their progress, and the decoding rounds."""

    def __init__(self, model: Any, settings: LongformSettings, audio: np.ndarray, language: str | None,
                 batch_size: int, opts: _Options, check: Callable[[], None] | None = None) -> None:
        self.model = model
        # A batch can take round_budget_s; segments may not come out between batches, so look for a cancel here.
        self.check = check or (lambda: None)
        self.settings = settings
        self.audio = audio
        self.opts = opts
        self.multilingual = bool(model.model.is_multilingual)
        if not self.multilingual and language not in (None, "en"):
            raise ValueError(f"the model is English-only; language {language!r} requested")
        self.language = language if self.multilingual else "en"
        self.window = int(settings.window_s * SAMPLE_RATE)
        regions = speech_regions(audio, settings)
        pieces = speech_pieces(regions, len(audio), int(settings.pad_s * SAMPLE_RATE))
        bounds = plan_sections(regions, section_count(pieces, settings, batch_size), len(audio))
        self.sections = [
            _Section(i, a, b, [(max(s, a), min(e, b)) for s, e in pieces if e > a and s < b], a)
            for i, (a, b) in enumerate(bounds)
        ]
        self.info = LongformInfo(self.language or "en", 1.0, len(audio) / SAMPLE_RATE,
                                 sum(e - s for s, e in pieces) / SAMPLE_RATE, len(self.sections))
        self.tokenizer: Any = None
        self.suppress: list[int] | None = None
        self.last_speech = 0.0
        self.batch_size = batch_size
        self.window_cost: float | None = None  # seconds per window in the last batch

    def _setup_tokenizer(self, encoder_output: Any) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        if self.language is None:  # detected on the first window of the first section, as sequential mode does
            token, prob = self.model.model.detect_language(encoder_output)[0][0]
            self.language = token[2:-2]
            self.info.language, self.info.language_probability = self.language, float(prob)
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual, task="transcribe",
                                   language=self.language)
        suppress = self.opts.suppress_tokens if self.opts.suppress_tokens is not None else [-1]
        self.suppress = get_suppressed_tokens(self.tokenizer, suppress) if suppress else suppress
        if self.opts.initial_prompt:
            initial = self.tokenizer.encode(" " + self.opts.initial_prompt.strip())
            for sec in self.sections:
                sec.tokens = list(initial)
        return self.tokenizer

    def segments(self) -> Iterator[Any]:
        """Segments in time order: the first open section's as they are decoded, later ones once it is done."""
        n = 0
        emitted = 0  # sections whose segments are all out
        shown = 0  # segments of section ``emitted`` already out
        while True:
            while emitted < len(self.sections):
                sec = self.sections[emitted]
                for segment in sec.segments[shown:]:
                    n += 1
                    segment.id = n
                    yield segment
                shown = len(sec.segments)
                if not sec.done:
                    break
                emitted, shown = emitted + 1, 0
            if emitted == len(self.sections):
                return
            self.decode_round()

    def decode_round(self) -> None:
        """Decode the next window of every open section, as one batch (two where prompts differ)."""
        from faster_whisper.audio import pad_or_trim

        # The first batch is the first window alone: the first segments come after one window, its text prompts
        # the other sections' first windows, and its time tells how many windows fit in the next batches.
        # Earlier sections go first, so the transcript streams from the start.
        limit = 1
        if self.window_cost is not None:
            limit = max(1, min(self.batch_size, int(self.settings.round_budget_s / max(self.window_cost, 1e-3))))
        items: list[tuple[_Section, Window]] = []
        for sec in self.sections:
            if len(items) >= limit:
                break
            window = None if sec.done else next_window(sec.spans, sec.seek, self.window)
            if window is None:
                sec.done = True
            else:
                items.append((sec, window))
        if not items:
            return
        self.check()
        started = time.perf_counter()
        self.info.windows += len(items)
        features = np.stack([
            pad_or_trim(self.model.feature_extractor(
                np.concatenate([self.audio[s:e] for s, e in window.spans]))[..., :-1])
            for _, window in items
        ])
        # CTranslate2 wants <|startoftranscript|> at the same position in every prompt of a batch: items with
        # a previous-text prompt and items without one are two batches.
        groups: dict[bool, list[int]] = {}
        for k, (sec, _) in enumerate(items):
            groups.setdefault(bool(self._previous(sec)), []).append(k)
        for n, with_prompt in enumerate(sorted(groups, reverse=True)):
            if n:
                self.check()
            self._decode([items[k] for k in groups[with_prompt]], features[groups[with_prompt]])
        self.window_cost = (time.perf_counter() - started) / len(items)
        for sec, _ in items:
            if next_window(sec.spans, sec.seek, self.window) is None:
                sec.done = True

    def _previous(self, sec: _Section) -> list[int]:
        """Prompt tokens for ``sec``'s next window: its own text; before it has any, the nearest earlier
        section's (its tail when that section is done, which is then exactly the text before this one)."""
        own = sec.tokens[sec.prompt_from:]
        if sec.segments or not self.opts.condition_on_previous_text:
            return own
        donor = next((d for d in reversed(self.sections[:sec.index]) if d.segments), None)
        return own + donor.tokens[donor.prompt_from:] if donor else own

    def _decode(self, items: list[tuple[_Section, Window]], features: np.ndarray) -> None:
        model, opts = self.model, self.opts
        encoder_output = model.encode(features)
        tokenizer = self._setup_tokenizer(encoder_output)
        previous = [self._previous(sec) for sec, _ in items]
        keep = min(min(len(p) for p in previous), self.settings.prompt_tokens)
        prompts = [model.get_prompt(tokenizer, p[len(p) - keep:] if keep else [], without_timestamps=False,
                                    hotwords=opts.hotwords) for p in previous]
        decoded = []
        for (sec, window), (result, avg_logprob, temperature, ratio) in zip(
                items, self._generate(encoder_output, features, prompts, tokenizer)):
            frames = min(MAX_FRAMES, math.ceil(window.samples / HOP))
            silent = (opts.no_speech_threshold is not None and result.no_speech_prob > opts.no_speech_threshold
                      and not (opts.log_prob_threshold is not None and avg_logprob > opts.log_prob_threshold))
            current: list[dict] = []
            seek_frames = frames
            if not silent:
                current, seek_frames, _ = model._split_segments_by_timestamps(
                    tokenizer=tokenizer, tokens=result.sequences_ids[0], time_offset=0.0, segment_size=frames,
                    segment_duration=frames / FRAMES_PER_SECOND, seek=0)
            decoded.append((sec, window, current, result, avg_logprob, temperature, ratio, seek_frames, frames))
        spoken = [k for k, d in enumerate(decoded) if d[2]]
        if opts.word_timestamps and spoken:
            # Alignment needs the encoder output of exactly the items that have text.
            output = encoder_output if len(spoken) == len(decoded) else model.encode(features[spoken])
            self.last_speech = model.add_word_timestamps(
                [decoded[k][2] for k in spoken], tokenizer, output, [decoded[k][8] for k in spoken],
                "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、", self.last_speech) or self.last_speech
        for d in decoded:
            self._collect(*d)

    def _collect(self, sec: _Section, window: Window, current: list[dict], result: Any, avg_logprob: float,
                 temperature: float, ratio: float, seek_frames: int, frames: int) -> None:
        from faster_whisper.transcribe import Segment, Word

        for seg in current:
            text = self.tokenizer.decode(seg["tokens"])
            if seg["start"] == seg["end"] or not text.strip():
                continue
            sec.tokens.extend(seg["tokens"])
            words = None
            if self.opts.word_timestamps:
                words = [Word(start=round(window.to_original(w["start"]), 3),
                              end=round(window.to_original(w["end"], is_end=True), 3),
                              word=w["word"], probability=w["probability"]) for w in seg.get("words") or []]
            sec.segments.append(Segment(
                id=0, seek=window.start // HOP, start=round(window.to_original(seg["start"]), 3),
                end=round(window.to_original(seg["end"], is_end=True), 3), text=text, tokens=seg["tokens"],
                avg_logprob=avg_logprob, compression_ratio=ratio, no_speech_prob=result.no_speech_prob,
                words=words, temperature=temperature))
        if not self.opts.condition_on_previous_text or temperature > self.opts.prompt_reset_on_temperature:
            sec.prompt_from = len(sec.tokens)
        if seek_frames < frames:
            # Whisper stopped before the window's end: go on from its last timestamp, as sequential mode does.
            resumed = int(window.to_original(seek_frames / FRAMES_PER_SECOND) * SAMPLE_RATE)
            sec.seek = resumed if resumed > sec.seek else window.end
        else:
            sec.seek = window.end

    def _generate(self, encoder_output: Any, features: np.ndarray, prompts: list[list[int]],
                  tokenizer: Any) -> list[tuple[Any, float, float, float]]:
        """Beam search for the batch; items failing the quality checks are decoded again at the next temperature
        (faster-whisper's ``generate_with_fallback``, item by item)."""
        model, opts = self.model, self.opts
        n = len(prompts)
        best: list[Any] = [None] * n
        tried: list[list[tuple[Any, float, float, float]]] = [[] for _ in range(n)]
        todo = list(range(n))
        out = encoder_output
        for i, temperature in enumerate(opts.temperatures):
            if not todo:
                break
            if i and len(todo) != n:
                out = model.encode(features[todo])
            kwargs: dict[str, Any] = (
                {"beam_size": 1, "num_hypotheses": opts.best_of, "sampling_topk": 0,
                 "sampling_temperature": temperature} if temperature > 0
                else {"beam_size": opts.beam_size, "patience": opts.patience})
            results = model.model.generate(
                out, [prompts[k] for k in todo], max_length=model.max_length, return_scores=True,
                return_no_speech_prob=True, suppress_blank=True, suppress_tokens=self.suppress,
                max_initial_timestamp_index=50, **kwargs)
            failed = []
            for k, result in zip(todo, results):
                tokens = result.sequences_ids[0]
                avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
                ratio = _compression_ratio(tokenizer.decode(tokens).strip())
                entry = (result, avg_logprob, temperature, ratio)
                tried[k].append(entry)
                repetitive = opts.compression_ratio_threshold is not None and ratio > opts.compression_ratio_threshold
                unlikely = opts.log_prob_threshold is not None and avg_logprob < opts.log_prob_threshold
                silence = (opts.no_speech_threshold is not None
                           and result.no_speech_prob > opts.no_speech_threshold and unlikely)
                if (repetitive or unlikely) and not silence:
                    failed.append(k)
                else:
                    best[k] = entry
            todo = failed
        for k in todo:  # every temperature failed: the most likely result, as faster-whisper picks it
            fine = [e for e in tried[k] if opts.compression_ratio_threshold is None
                    or e[3] <= opts.compression_ratio_threshold] or tried[k]
            result, avg_logprob, _, ratio = max(fine, key=lambda e: e[1])
            best[k] = (result, avg_logprob, opts.temperatures[-1], ratio)
        return best
