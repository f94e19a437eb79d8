"""The cluster split benchmark (bench/sections_cluster.py) small: 10 minutes of audio on 2 fake nodes x 2 slots.

A real standalone scheduler on SQLite and fake nodes that run the agent's own parent-side code (SchedulerClient,
LeaseKeeper, SectionSplit); only the decode is a sleep. The split must spread: 4 sections (the parent's slot and
the 3 the capacity call finds idle), one on each of the 4 slots, on both nodes, decoding at the same time, so that
the recording ends in well under one slot's time. Seconds here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import machine_slowdown
from procs import run_script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sections_cluster  # noqa: E402

AUDIO_S = 600.0


def test_fake_result_covers_the_audio():
    result = sections_cluster.fake_result("j", 75.0, 0.5)
    assert [(s["id"], s["start"], s["end"]) for s in result.segments] == [(1, 0.0, 30.0), (2, 30.0, 60.0),
                                                                           (3, 60.0, 75.0)]
    assert result.duration_s == 75.0 and result.segments_count == 3 and result.timings["total_s"] == 0.5


@pytest.mark.timeout(120)
def test_an_idle_cluster_shares_a_long_recording(tmp_path):
    # The decode's share of the time grows with the machine's slowdown, so the protocol's own seconds (uploads,
    # polls) keep the share they have on an idle machine: section 0 decodes for 1.5 s there.
    rtf = 0.01 * machine_slowdown()
    raw = tmp_path / "sections.json"
    run_script([sys.executable, str(ROOT / "bench" / "sections_cluster.py"), "--stores", "sqlite",
                "--audio-s", f"{AUDIO_S:g}", "--nodes", "2", "--slots", "2", "--rtf", f"{rtf:.4f}",
                "--repeat", "1", "--skip-one-slot", "--json", str(raw), "--workdir", str(tmp_path / "logs")], ROOT, 100)

    (store,) = json.loads(raw.read_text())["stores"]
    (run,) = store["runs"]
    assert run["state"] == "succeeded" and not run["problems"], run["problems"]
    assert run["where"].endswith("scheduler.db")
    # 600 s on 4 idle slots: 4 sections of 150 s, one per slot, two per node (the parent's node's other slot too).
    assert run["sections"] == 4
    assert run["distinct_slots"] == 4 and run["per_node"] == {"0": 2, "1": 2}, run["per_node"]
    parent, *children = run["decodes"]
    assert parent["parent_id"] is None and parent["sections"] == 4
    assert [c["audio_s"] for c in children] == [150.0] * 3
    assert {c["parent_id"] for c in children} == {run["job_id"]}
    # In parallel: every child began before section 0 ended, so the wall time is far below one slot's decode.
    assert max(run["child_start_after_s"]) < run["section0_s"], (run["child_start_after_s"], run["section0_s"])
    one_slot_s = AUDIO_S * rtf
    assert run["accepted_to_done_s"] < 0.75 * one_slot_s, (run["accepted_to_done_s"], one_slot_s)
    # The merged result: a segment per 30 s window of every section, in time order, to the audio's end.
    assert run["segments"] == 4 * 5
