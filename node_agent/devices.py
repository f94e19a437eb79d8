"""Pure decisions about devices: which device, which compute type, how many workers (slots) and threads.

They take the machine's facts as arguments (what ctranslate2 reports is gathered in the plugin), so they are
unit-tested without a GPU or any native library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


# ----- slots: how many workers per device, how many threads each --------------------------------------------------

#: ``auto`` never runs more CPU workers than this on one node, whatever the cores (see ``choose_slots``).
MAX_AUTO_CPU_WORKERS = 16
#: Resident memory of a loaded worker besides its model: Python, ctranslate2, PyAV, the plugin, buffers.
#: Measured on this project's 2-core machines (faster-whisper 1.2.1, int8, cpu_threads=1): the RSS of a
#: supervised worker after model load, warm-up and one decode of tests/data/jfk.flac (Worker.rss_bytes(), psutil)
#: was 234.6 MB with tiny.en (78.1 MB on disk) and 285.8 MB with base (147.9 MB on disk): a line with slope 0.73
#: and intercept 177.5 MB (169 MiB), rounded up here.
WORKER_BASELINE_BYTES = 192 * 2**20
#: Worker memory per byte of the model directory on disk. The measured slope is 0.73 (int8 on CPU halves the
#: float16 weights; load-time copies add back); 1.0 leaves room for int8_float16 and float16. float32 on a
#: CPU doubles the weights: ``model_memory_factor`` says 2.0 for it.
MODEL_MEMORY_FACTOR = 1.0
#: About the size of faster-whisper's hub models (CTranslate2 float16 ``model.bin``, MB as the hub lists them),
#: for a name not on disk yet. A name known nowhere counts as the largest, so ``auto`` errs towards fewer workers.
KNOWN_MODEL_BYTES = {name: mb * 10**6 for name, mb in {
    "tiny": 75, "tiny.en": 75, "base": 145, "base.en": 145, "small": 484, "small.en": 484,
    "medium": 1530, "medium.en": 1530, "large-v1": 3090, "large-v2": 3090, "large-v3": 3090, "large": 3090,
    "distil-large-v2": 1510, "distil-large-v3": 1510, "large-v3-turbo": 1620, "turbo": 1620,
}.items()}
UNKNOWN_MODEL_BYTES = max(KNOWN_MODEL_BYTES.values())


@dataclass(frozen=True)
class SlotPlan:
    """How a node splits each device into slots: ``workers`` per device, ``threads`` per worker."""

    workers: int
    threads: int
    workers_auto: bool
    threads_auto: bool
    #: The memory estimate per worker the split was checked against (bytes).
    worker_bytes: int
    #: Threads of the device's lone-job worker (every core), lent to a job that finds the other slots idle; 0: none.
    lone_threads: int = 0

    def describe(self) -> str:
        """``2 workers x 1 thread per device, lone jobs 2 threads (auto)``: what ``node-agent status`` shows."""
        how = "auto" if self.workers_auto and self.threads_auto else \
            "workers auto" if self.workers_auto else "threads auto" if self.threads_auto else "set"
        lone = f", lone jobs {self.lone_threads} threads" if self.lone_threads else ""
        return (f"{self.workers} worker{'s' if self.workers != 1 else ''} x {self.threads} "
                f"thread{'s' if self.threads != 1 else ''} per device{lone} ({how})")

    def view(self) -> dict[str, Any]:
        return {"workers_per_device": self.workers, "cpu_threads": self.threads, "workers_auto": self.workers_auto,
                "threads_auto": self.threads_auto, "lone_threads": self.lone_threads,
                "worker_bytes_estimate": self.worker_bytes, "text": self.describe()}


def model_memory_factor(device: str, compute_type: str) -> float:
    """Worker memory per byte of model on disk (see ``MODEL_MEMORY_FACTOR``)."""
    return 2.0 if device == "cpu" and compute_type == "float32" else MODEL_MEMORY_FACTOR


def worker_memory_bytes(model_bytes: int, device: str, compute_type: str = "auto") -> int:
    """Host memory one worker needs. On a GPU the weights live in GPU memory; the host keeps the baseline and a
    copy of the file while loading (assumed: not measured here, no GPU was lent)."""
    factor = model_memory_factor(device, compute_type) if device == "cpu" else 1.0
    return WORKER_BASELINE_BYTES + int(model_bytes * factor)


def choose_slots(device: str, requested_workers: int | None, requested_threads: int, cores: int,
                 memory_available_bytes: int, model_bytes: int, *, devices: int = 1, compute_type: str = "auto",
                 gpu_memory_bytes: int | None = None) -> SlotPlan:
    """Workers per device and threads per worker. ``requested_workers`` None is ``auto``, ``requested_threads``
    0 is ``auto``; ``devices`` is how many physical devices (GPUs) get that many workers each.

    CPU, threads ``auto``: the cores shared between the workers (issue 15: on 2 cores 2 processes x 1 thread
    carried the most jobs/s), and, when that leaves a worker fewer threads than cores and memory holds one more
    worker, a lone-job worker with every core as threads (at most 8; ``lone_threads``): a job that finds the
    other slots of its device idle decodes on it, as fast as one process with the whole CPU (``lone_worker``).
    The cores are never oversubscribed but while a lone job that began alone still runs. Measured on 2 cores
    (docs/benchmarks.md, five runs): a full queue at 0.92-1.01x the best split's jobs/s, a lone job at 0.97-1.06x
    plain's all-core time; before, with every worker holding every core and passive OpenMP threads, 0.91-0.95x
    and 1.09-1.13x. Workers ``auto``: one per core, at most
    ``MAX_AUTO_CPU_WORKERS``. Assumed, not measured: that this holds on bigger CPUs. Threads set: no lone-job
    worker (the operator's split, as set); workers ``auto``: as many as the cores hold at that many threads each.
    GPU: ``auto`` is 1 worker per GPU; threads (its CPU-side work): the cores shared between its workers.

    Memory: every worker must fit (``worker_memory_bytes`` x workers x devices within
    ``memory_available_bytes``, and on a GPU the model x workers within ``gpu_memory_bytes``); ``auto`` chooses
    no more workers than fit, and a split that cannot fit raises ConfigError with one line naming the numbers.
    """
    cores = max(1, cores)
    devices = max(1, devices)
    per_worker = worker_memory_bytes(model_bytes, device, compute_type)
    host_fit = memory_available_bytes // (per_worker * devices)
    gpu_fit = None if device == "cpu" or not gpu_memory_bytes else gpu_memory_bytes // max(1, model_bytes)
    fit = host_fit if gpu_fit is None else min(host_fit, gpu_fit)
    if requested_workers is not None:
        workers = requested_workers
    elif device == "cpu":
        want = cores // requested_threads if requested_threads > 0 else min(cores, MAX_AUTO_CPU_WORKERS)
        workers = max(1, min(want, MAX_AUTO_CPU_WORKERS, fit))
    else:
        workers = 1
    if workers > fit:
        raise ConfigError(_no_fit(device, workers, devices, per_worker, memory_available_bytes, model_bytes,
                                  gpu_memory_bytes, fit, requested_workers is None))
    lone_threads = 0
    if requested_threads > 0:
        threads = requested_threads
    else:
        threads = max(1, min(8, cores // workers))
        every_core = choose_cpu_threads(0, cores)
        if device == "cpu" and every_core > threads and workers + 1 <= fit:
            lone_threads = every_core
    return SlotPlan(workers, threads, requested_workers is None, requested_threads == 0, per_worker, lone_threads)


def _no_fit(device: str, workers: int, devices: int, per_worker: int, available: int, model_bytes: int,
            gpu_memory: int | None, fit: int, auto: bool) -> str:
    mib = 2**20
    what = "asr.workers_per_device = auto (1 worker)" if auto else f"asr.workers_per_device = {workers}"
    total = workers * devices
    if gpu_memory and device != "cpu" and workers * model_bytes > gpu_memory:
        need = f"{workers} x {model_bytes / mib:.0f} MiB of model > {gpu_memory / mib:.0f} MiB of GPU memory"
    else:
        need = (f"{total} worker{'s' if total != 1 else ''} x {per_worker / mib:.0f} MiB (model and process) = "
                f"{total * per_worker / mib:.0f} MiB > {available / mib:.0f} MiB available")
    fix = f"set asr.workers_per_device to {fit} or less" if fit >= 1 else "free memory"
    return f"{what} cannot fit in memory: {need}; {fix}, or a smaller asr.model"


@dataclass(frozen=True)
class Slot:
    """One worker's place on a device: what its lease locks and which physical device it runs on."""

    resource: str  # cpu/0, gpu:0/1: the lease resource, one per worker
    device: str  # cpu, gpu:0: the physical device
    device_index: int  # the GPU index (0 on a CPU)


def resources_for(device: str, device_indexes: list[int], workers_per_device: int = 1) -> list[Slot]:
    """The slots, ``workers_per_device`` per device: ``cpu/0``, ``cpu/1``, ... or ``gpu:0/0``, ``gpu:0/1``, ..."""
    if device == "cuda":
        return [Slot(f"gpu:{i}/{n}", f"gpu:{i}", i) for i in device_indexes for n in range(workers_per_device)]
    return [Slot(f"cpu/{n}", "cpu", 0) for n in range(workers_per_device)]
