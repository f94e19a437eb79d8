"""The throughput benchmark (bench/throughput.py) on a tiny batch, so that it cannot rot unnoticed.

A real agent and real plain faster-whisper processes (tiny.en), 4 clips from 1 client and one plain split: the
code path and the report's shape, not the numbers (this machine is shared). Under a minute here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from procs import run_script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import throughput  # noqa: E402


def test_splits_and_clips():
    assert throughput.all_combos(1) == [(1, 1)]
    assert throughput.all_combos(2) == [(1, 1), (1, 2), (2, 1)]
    assert all(p * t <= 8 for p, t in throughput.all_combos(8)) and (8, 1) in throughput.all_combos(8)
    assert len(throughput.all_combos(8)) == 20
    assert throughput.parse_combos("all", 2) == throughput.all_combos(2)
    assert throughput.parse_combos(" 2x1, 1X2 ,2x1", 2) == [(2, 1), (1, 2)]
    for bad in ("2", "0x1", "ax1", "2x", "2*1"):
        with pytest.raises(ValueError, match="expected PxT"):
            throughput.parse_combos(bad, 2)
    assert throughput.clip_batch(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert throughput.clip_batch(["a", "b"], 1) == ["a"]
    with pytest.raises(ValueError):
        throughput.clip_batch([], 3)
    assert [throughput.rotated([1, 2, 3], r) for r in range(4)] == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]


@pytest.mark.timeout(300)
def test_throughput_bench_tiny_run(tmp_path):
    raw, md = tmp_path / "throughput.json", tmp_path / "throughput.md"
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--clips", "4", "--clients", "1", "--combos", "1x1",
           "--reps", "1", "--grid-reps", "1", "--single-reps", "1",
           "--json", str(raw), "--markdown", str(md), "--workdir", str(tmp_path / "work")]
    out = run_script(cmd, ROOT, 270)

    res = json.loads(raw.read_text())
    cfg = res["config"]
    assert cfg["clips"] == 4 and cfg["clients"] == 1 and cfg["combos"] == [[1, 1]]
    assert cfg["clip_names"] and all(not n.endswith("_long.wav") for n in cfg["clip_names"])
    assert res["settings"]["model"] == "tiny.en" and res["settings"]["decode"]["beam_size"] >= 1
    assert res["machine"]["cpu"] and res["machine"]["usable_cores"] >= 1

    (tried,) = res["grid"]
    assert (tried["processes"], tried["threads"]) == (1, 1) and len(tried["runs"]) == 1 and tried["jobs_per_s"] > 0
    assert res["agent"]["workers"] >= 1
    assert (res["plain_default"]["processes"], res["plain_default"]["threads"]) == (1, 0)
    assert (res["plain_best"]["processes"], res["plain_best"]["threads"], res["plain_best"]["of_tried"]) == (1, 1, 1)
    for side in ("agent", "plain_default", "plain_best"):
        assert len(res[side]["runs"]) == 1 and res[side]["jobs_per_s"] > 0, side
        assert len(res[side]["single_s"]) == 1 and res[side]["single_median_s"] > 0, side
        assert res[side]["cpu_s_per_job"] > 0, side  # the processes' own CPU, read while they decoded
    # The lone job's reference: one plain process with every core (not among the splits tried here, so its own).
    all_cores = res["plain_all"]
    assert (all_cores["processes"], all_cores["threads"]) == (1, res["config"]["usable_cores"])
    assert len(all_cores["single_s"]) == 1 and all_cores["single_median_s"] > 0
    assert res["ratios"]["lone_agent_over_plain_all"] == res["agent"]["single_median_s"] / all_cores["single_median_s"]
    assert res["agent"]["openmp"] == throughput.openmp_text(dict(os.environ)) != ""  # how its workers' threads wait
    assert set(res["ratios"]) >= set(throughput.TARGETS) and all(v > 0 for v in res["ratios"].values())

    acc = res["accuracy"]
    assert acc["clips"] == 4
    for plain in ("plain_default", "plain_best"):
        differing = [d for d in acc["differences"] if d["against"] == plain]
        assert acc[f"equal_{plain}"] + len(differing) == 4, acc
    assert set(acc["wer_vs_reference"]) == {"agent", "plain_default", "plain_best"}

    assert len(res["rows"]) == 5 + 1 and all(len(r) == 6 and r[0] == "4" for r in res["rows"])
    report = md.read_text()
    assert report in out  # printed too
    assert "Machine: " in report and "| 1 x 1 | " in report
    for measure in ("jobs/s over plain as a service", "jobs/s over the best plain split", "lone jfk.flac job"):
        (line,) = [x for x in report.splitlines() if x.startswith(f"| {measure}")]
        assert line.endswith(("| met |", "| NOT met |")), line
