"""Section ``split`` of bench/run.py: long recordings cut into sections on an idle 2-slot node (issue 24).

    .venv/bin/python bench/run.py --only split     # or: make bench SECTIONS=split

A real ``node-agent run`` with two slots (``asr.workers_per_device: 2``, the rest its defaults, ``split_min_s``
60 included) and its embedded scheduler, beside plain faster-whisper decoding the whole file sequentially with
every core (``bench/run.py``'s plain process), same model, same machine, one run:
- words kept: WER (English, tiny.en) / CER (Mandarin, base) of the split result and of plain's, against the
  clip's reference where it has one (``lucier_i_am_sitting_in_a_room_long``, a joined ~5-minute English clip,
  a joined 62 s Mandarin clip), and against plain's own transcript where it has none
  (``funasr_vad_example_zh_long``: the split result's CER against plain's, i.e. what the split changed);
- time: the 100 s clip's wall time through the agent (submit to result, split) over plain's (target <= 0.75x).
Every job's view must show it was split (its sections), or the figure would be an unsplit decode's.

Run from bench/run.py (``run(b, kit)``: the bench and bench/run.py's module, whose Agent, plain processes and
helpers this reuses).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

from helpers import cer, joined, references, wav_bytes, wer

#: About 5 minutes of English with a reference: the Lucier reading and every short English clip, twice over.
LONG_JOINED = "en_joined_5min.wav"


def _en_joined_order() -> list[str]:
    rows = references()
    short = sorted(n for n, r in rows.items() if r["language"] == "en" and float(r["duration_s"]) < 15)
    return ["lucier_i_am_sitting_in_a_room_long.wav", *short, "lucier_i_am_sitting_in_a_room_long.wav",
            *short[::-1]]


def _run_split(agent: Any, data: bytes, filename: str) -> dict[str, Any]:
    """Submit to the result (client-side seconds), with the job's sections."""
    t0 = time.perf_counter()
    job_id = agent.submit(data, filename)
    view = agent.wait(job_id)
    total = time.perf_counter() - t0
    if view["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} failed: {view.get('error')}")
    return {"total_s": total, "text": view["result"]["text"], "sections": len(view["sections"]) + 1,
            "timings": view["result"].get("timings", {})}


def run(b: Any, kit: ModuleType) -> None:
    """The section: rows into ``b`` (``b.row``), raw figures into ``b.results["sections"]["split"]``."""
    out: dict[str, Any] = {}
    kit.OUT.mkdir(exist_ok=True)
    refs = {name: row["reference_text"] for name, row in references().items()}
    en_order = _en_joined_order()
    en_path = kit.OUT / LONG_JOINED
    en_path.write_bytes(wav_bytes(joined(en_order)[0]))
    refs[str(en_path)] = " ".join(refs[n] for n in en_order)
    zh_path = kit.OUT / kit.ZH_JOINED
    zh_path.write_bytes(wav_bytes(joined(kit.ZH_JOINED_ORDER)[0]))
    refs[str(zh_path)] = "".join(refs[n] for n in kit.ZH_JOINED_ORDER)

    agents: dict[str, Any] = {}

    def agent(model: str) -> Any:
        if model not in agents:
            a = kit.Agent(f"split-{model}", b.tmp, model, NODE_AGENT_ASR__WORKERS_PER_DEVICE="2")
            kit.log(f"split: starting node-agent run ({model}, 2 slots)")
            a.start()
            agents[model] = a
        return agents[model]

    try:
        for name, model in ((kit.LONG_EN, "tiny.en"), (str(en_path), "tiny.en"), (kit.LONG_ZH, "base"),
                            (str(zh_path), "base")):
            score, metric = (wer, "WER") if model == "tiny.en" else (cer, "CER")
            a, plain = agent(model), b.plain(model)
            data = (kit.DATA / name).read_bytes()
            short = Path(name).name
            timed = name == kit.LONG_EN
            n = b.reps(3, 1) if timed else 1
            kit.log(f"split: {short} ({model}), {n} run(s) per side")
            _run_split(a, data, short), plain.run(name)  # warm
            a_runs, p_runs = kit.alternate(n, lambda: _run_split(a, data, short), lambda: plain.run(name))
            if any(r["sections"] < 2 for r in a_runs):
                raise RuntimeError(f"split: {short} was not split ({[r['sections'] for r in a_runs]} sections); "
                                   f"see {a.log_path}")
            split_text, plain_text = a_runs[-1]["text"], p_runs[-1]["text"]
            ref = refs.get(name) or ""
            res = {
                "model": model, "metric": metric, "sections": a_runs[-1]["sections"], "runs": n,
                "reference": "reference" if ref else "plain's own transcript",
                "score_split": score(ref or plain_text, split_text),
                "score_plain": score(ref, plain_text) if ref else 0.0,
                "split_vs_plain": score(plain_text, split_text),
                "split_s": kit.median([r["total_s"] for r in a_runs]),
                "plain_s": kit.median([r["total_s"] for r in p_runs]),
                "split_timings": a_runs[-1]["timings"],
                "texts": {"split": split_text, "plain": plain_text},
            }
            out[short] = res
            delta = res["score_split"] - res["score_plain"]
            limit = 0.01 if model == "tiny.en" else 0.02
            b.row("5", f"split {short[:28]} ({model}, {res['sections']} sections): {metric} vs {res['reference']}",
                  f"{res['score_split']:.3f}", f"{res['score_plain']:.3f}", f"+{delta:.3f}" if delta >= 0
                  else f"{delta:.3f}", f"<= +{limit}")
            if timed:
                res["ratio"] = res["split_s"] / res["plain_s"]
                b.row("5", f"split {short[:28]}: wall time, idle 2-slot node / plain (all cores)",
                      kit.fmt(res["split_s"]), kit.fmt(res["plain_s"]),
                      kit.ratio([r["total_s"] for r in a_runs], [r["total_s"] for r in p_runs]), "<= 0.75")
    finally:
        for a in agents.values():
            a.stop()
    b.results["sections"]["split"] = out
