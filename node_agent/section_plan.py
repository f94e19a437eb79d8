"""How a long recording is cut into sections: how many, and where. Pure functions of the facts, for both sides.

The agent decides how many sections (``sections_for``: the free slots the scheduler reported, bounded by the
audio's length and the maximum); the plugin decides where to cut (``cut_at`` per boundary, from the speech that
faster-whisper's VAD found in a window around it; ``bounds`` turns the cuts into sections). Nothing here imports
a native library, so both sides share it and the tables in tests/test_sections.py check it without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The VAD counts a silence this long as one (faster-whisper's default wants 2 s before it ends a speech span).
MIN_GAP_S = 0.3
#: Silences within this of the window's longest count as equally long (cut at the nearest of them).
LENGTH_TIE_S = 0.25
#: Of the silence at a cut, each side keeps this much (the VAD's own padding of speech comes on top).
KEEP_SILENCE_S = 0.2
#: Each boundary looks for silence this far either side of its equal-duration target (at most a quarter of a
#: section, so two windows never overlap). VAD runs over these windows only: VAD of a whole hour costs time plain
#: decoding does not pay.
CUT_WINDOW_S = 8.0
#: A section shorter than this is not worth a job of its own (a cut that lands this close to another is dropped).
MIN_SECTION_S = 1.0

Span = tuple[float, float]


def sections_for(duration_s: float, free_slots: int, *, section_min_s: float, max_sections: int) -> int:
    """How many sections to cut ``duration_s`` of audio into: the parent's own slot plus ``free_slots``, no more
    sections than the audio holds of ``section_min_s`` each, no more than ``max_sections``; 1 means no split."""
    if duration_s <= 0 or free_slots <= 0:
        return 1
    by_length = int(duration_s // section_min_s) if section_min_s > 0 else max_sections
    return max(1, min(1 + free_slots, by_length, max_sections))


def targets(duration_s: float, n: int) -> list[float]:
    """The equal-duration boundaries of ``n`` sections (n - 1 of them)."""
    return [duration_s * i / n for i in range(1, n)]


def window(target_s: float, duration_s: float, n: int) -> Span:
    """Where to look for silence around ``target_s``: ``CUT_WINDOW_S`` either side, at most a quarter section."""
    half = min(CUT_WINDOW_S, duration_s / n / 4)
    return max(0.0, target_s - half), min(duration_s, target_s + half)


def silences(speech: Sequence[Span], lo: float, hi: float) -> list[Span]:
    """The gaps between ``speech`` spans (sorted, absolute seconds) inside ``[lo, hi]``."""
    gaps: list[Span] = []
    at = lo
    for start, end in sorted(speech):
        if start > at:
            gaps.append((at, min(start, hi)))
        at = max(at, end)
        if at >= hi:
            break
    if at < hi:
        gaps.append((at, hi))
    return [(a, b) for a, b in gaps if b > a]


def cut_at(target_s: float, win: Span, speech: Sequence[Span]) -> Span:
    """Where to cut near ``target_s``, as (where the section before ends, where the next begins): around the
    longest silence in ``win`` (the silences within ``LENGTH_TIE_S`` of the longest count as long: the nearest of
    them to the target), keeping ``KEEP_SILENCE_S`` of it on each side and dropping the rest; at the target
    itself when the window is all speech.

    The longest pause rather than the nearest: a speaker's longest pause is most often between sentences, and a
    section that starts mid-sentence loses the words around the cut (measured on the Lucier reading, whose
    speaker pauses inside sentences too: the nearest pause cost WER +0.019 against a whole decode). The silence
    dropped rather than shared: a section that ends in a second or more of silence invites Whisper to fill it
    (tiny.en repeated an earlier sentence there: WER 0.34 against 0.02 with the pause trimmed)."""
    gaps = silences(speech, *win)
    if not gaps:
        return target_s, target_s
    longest = max(b - a for a, b in gaps)
    a, b = min((g for g in gaps if g[1] - g[0] >= longest - LENGTH_TIE_S),
               key=lambda g: abs((g[0] + g[1]) / 2 - target_s))
    if b - a <= 2 * KEEP_SILENCE_S:
        return (a + b) / 2, (a + b) / 2
    return a + KEEP_SILENCE_S, b - KEEP_SILENCE_S


def bounds(duration_s: float, cuts: Sequence[Span]) -> list[Span]:
    """Sections as (offset_s, duration_s) from the cuts ((end, start) pairs, in order); a cut that would leave a
    section shorter than ``MIN_SECTION_S`` is dropped, so there may be fewer sections than cuts + 1. The first
    section starts at 0 and the last ends at ``duration_s``; what lies between a section's end and the next one's
    start is silence nobody decodes."""
    sections: list[Span] = []
    start = 0.0
    for end, nxt in sorted(cuts):
        if end - start >= MIN_SECTION_S and duration_s - nxt >= MIN_SECTION_S and nxt >= end:
            sections.append((start, end - start))
            start = nxt
    sections.append((start, duration_s - start))
    return sections
