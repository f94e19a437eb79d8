"""`node-agent transcribe` as a user runs it: a subprocess, real worker, real model."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import DATA, reference, wer


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node_agent", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_transcribe_json_gives_the_reference_sentence():
    out = run_cli("transcribe", "--json", "--model", "tiny.en", str(DATA / "jfk.flac"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert wer(reference("jfk.flac"), doc["text"]) <= 0.05, doc["text"]
    assert doc["language"] == "en" and abs(doc["duration_s"] - 11.0) < 0.05
    assert doc["segments"] and {"transcribe_call_s", "segments_iteration_s"} <= set(doc["timings"])
    assert "language_probability" in doc


def test_transcribe_human_output_and_errors_do_not_stop_other_files(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF this is not a wave file at all" * 10)
    out = run_cli("transcribe", str(tmp_path / "missing.wav"), str(bad), str(DATA / "jfk.flac"))
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("[0.00 -> ") and "fellow Americans" in out.stdout
    assert lines[-1].startswith("jfk.flac: 11.00 s audio in ") and "RTF" in lines[-1]
    err = out.stderr.strip().splitlines()
    assert any("missing.wav: cannot read" in e for e in err)
    assert any("noise.wav: bad_audio: cannot decode audio" in e for e in err)
    assert "Traceback" not in out.stderr


def test_config_mistake_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("asr:\n  beam_size: -1\n")
    out = run_cli("transcribe", "--config", str(cfg), str(DATA / "jfk.flac"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "asr.beam_size = -1" in out.stderr and str(cfg) in out.stderr
