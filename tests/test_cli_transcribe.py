"""`node-agent transcribe` as a user runs it: a subprocess, real worker, real model."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import DATA, PlainTranscript, plain_transcript, wer
from node_agent.config import load_settings


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node_agent", *args], capture_output=True, text=True,
                          timeout=timeout)


def plain_like_the_cli(name: str, model: str | None = None) -> PlainTranscript:
    """Plain faster-whisper with the settings the CLI runs with here (its default config and this environment,
    which the subprocess inherits; ``model`` as ``--model``): device, compute type and threads as its worker
    picks them, since another thread count can change the decode."""
    return plain_transcript(name, asr=load_settings(None).asr, model=model)


def test_transcribe_json_gives_what_plain_faster_whisper_gives():
    out = run_cli("transcribe", "--json", "--model", "tiny.en", str(DATA / "jfk.flac"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    plain = plain_like_the_cli("jfk.flac", model="tiny.en")
    assert wer(plain.text, doc["text"]) == 0.0, (doc["text"], plain.text)
    assert doc["language"] == "en" and abs(doc["duration_s"] - 11.0) < 0.05
    assert doc["segments"] and {"transcribe_call_s", "segments_iteration_s"} <= set(doc["timings"])
    assert "language_probability" in doc


def test_transcribe_human_output_and_errors_do_not_stop_other_files(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF this is not a wave file at all" * 10)
    out = run_cli("transcribe", str(tmp_path / "missing.wav"), str(bad), str(DATA / "jfk.flac"))
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    # One line per segment, as plain faster-whisper segments the same file.
    plain = plain_like_the_cli("jfk.flac")
    shown = [f"[{seg['start']:.2f} -> {seg['end']:.2f}] {seg['text'].strip()}" for seg in plain.segments]
    assert shown and lines[:len(shown)] == shown, (lines, shown)
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


def test_language_that_is_not_a_code_is_one_line():
    out = run_cli("transcribe", "--model", "tiny.en", "--language", "english", str(DATA / "jfk.flac"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == "node-agent: --language english: not a language code; use a code such as en, zh\n"


def test_language_an_english_only_model_cannot_serve_names_the_fix():
    out = run_cli("transcribe", "--model", "tiny.en", "--language", "zh", str(DATA / "jfk.flac"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == ("node-agent: model tiny.en serves English only; for 'zh' use a multilingual model: "
                          "asr.model: base (or --model base)\n")


def test_json_output_is_real_utf8():
    out = subprocess.run([sys.executable, "-m", "node_agent", "transcribe", "--json", "--model", "base",
                          "--language", "zh", str(DATA / "aishell1_BAC009S0724W0121.wav")],
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    raw = out.stdout.strip().splitlines()[-1]
    assert b"\\u" not in raw, raw
    doc = json.loads(raw.decode("utf-8"))
    assert doc["language"] == "zh"
    # Mandarin characters, written as UTF-8 bytes rather than escapes.
    han = [ch for ch in doc["text"] if "\u4e00" <= ch <= "\u9fff"]
    assert han and han[0].encode("utf-8") in raw, doc["text"]
