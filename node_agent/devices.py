"""Pure decisions about devices: which device, which compute type, how many threads.

They take the machine's facts as arguments (what ctranslate2 reports is gathered in the plugin), so they are
unit-tested without a GPU or any native library.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError

# Best first. On GPUs float16 keeps Whisper's accuracy at half the memory; int8_float16 trades a little accuracy
# for memory on small cards. On CPUs int8 is several times faster than float32 with no measurable WER change.
_PREFERENCE = {
    "cuda": ("float16", "int8_float16", "bfloat16", "int8", "float32"),
    "cpu": ("int8", "int8_float32", "float32"),
}


def choose_device(requested: str, cuda_device_count: int) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is a config error."""
    if requested == "auto":
        return "cuda" if cuda_device_count > 0 else "cpu"
    if requested == "cuda" and cuda_device_count == 0:
        raise ConfigError("asr.device = 'cuda': ctranslate2 sees no CUDA device on this node")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"asr.device = {requested!r}: must be auto, cpu or cuda")
    return requested


def choose_compute_type(device: str, supported: Iterable[str], requested: str = "auto") -> str:
    """Pick the compute type for ``device`` from ctranslate2's ``get_supported_compute_types(device)``."""
    available = set(supported)
    if requested != "auto":
        if requested not in available:
            raise ConfigError(
                f"asr.compute_type = {requested!r}: not supported on {device} (supported: {', '.join(sorted(available))})"
            )
        return requested
    for candidate in _PREFERENCE.get(device, ("float32",)):
        if candidate in available:
            return candidate
    if not available:
        raise ConfigError(f"asr.compute_type: ctranslate2 reports no compute type for {device}")
    return sorted(available)[0]


def choose_cpu_threads(requested: int, available_cores: int) -> int:
    """0 means one thread per core the process may use, capped at 8 (more threads stop helping Whisper)."""
    if requested > 0:
        return requested
    return max(1, min(8, available_cores))


def resources_for(device: str, device_indexes: list[int]) -> list[str]:
    """Lease resource names, one per worker: ``cpu`` or ``gpu:N``."""
    if device == "cuda":
        return [f"gpu:{i}" for i in device_indexes]
    return ["cpu"]
