"""Supervises ASR plugin processes: start, watch, time-limit, kill, restart.

One ``Worker`` owns one plugin process for one device at a time and runs one job at a time. Its life cycle is
an explicit state machine::

    starting -> ready <-> busy
       |          |        | (crash, stall, abort, unstoppable overrun: kill, then restart)
       v          v        v
    backoff -> starting ...      fatal -> (after worker.fatal_retry_s) starting      stopped

Time limits are enforced here, one level above the decode. A job past its deadline is asked to stop (a
``cancel`` frame): the plugin stops at its next segment boundary, answers ``stopped`` and stays loaded, and the
job fails ``timeout``. Only a process that does not stop within ``worker.stop_grace_s``, or that is silent for
``asr.timeout.stall_s``, is killed: the only way to end a native decode stuck inside one segment. Kills back off
like crashes. Every job handed to ``run_job`` ends in exactly one ``JobResult`` or one ``JobError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import wire
from .config import AsrSettings, TimeoutSettings, WorkerSettings
from .contracts import DecodeOptions, parse_options
from .errors import (
    JobError,
    JobStalled,
    JobTimeout,
    WireError,
    WorkerCrashed,
    WorkerUnavailable,
    job_error,
)
from .plugin_messages import (
    CancelMessage,
    ErrorMessage,
    FatalMessage,
    JobMessage,
    ReadyMessage,
    ResultMessage,
    SegmentMessage,
    StartedMessage,
    StopMessage,
    StoppedMessage,
    parse_from_plugin,
    to_header,
)
from .retry import jittered_delay

log = logging.getLogger("node_agent.supervisor")


class WorkerState(str, enum.Enum):
    starting = "starting"
    ready = "ready"
    busy = "busy"
    backoff = "backoff"
    fatal = "fatal"
    stopped = "stopped"


#: Why a worker process was replaced; fixed so metrics can export every reason from the start. ``timeout``
#: counts only kills (a job that stopped at its deadline costs no restart); retries of a fatal worker are starts,
#: not replacements, and are not counted.
RESTART_REASONS = ("crash", "timeout", "stall", "recycle", "lease_lost")

#: Longest wait between retries of a fatal worker (``worker.fatal_retry_s`` doubles up to this).
FATAL_RETRY_MAX_S = 3600.0

#: A wait in a job's path (for the worker, for the plugin to take the job) longer than this is logged, and again
#: every this long: no wait there may be both long and silent.
WAIT_LOG_S = 5.0

#: After SIGKILL the exit is the kernel's business; a wait longer than this means the exit was not seen.
KILL_WAIT_S = 10.0


async def _wait_logged(task: "asyncio.Future[Any]", until: float, what: Callable[[], str],
                       also: "asyncio.Future[Any] | None" = None) -> None:
    """Wait for ``task`` (or ``also``, if given, to finish first) until loop time ``until``; say what is waited for
    every ``WAIT_LOG_S``. Returns on time-out with both still pending: the caller decides what that means."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    waits = {task} if also is None else {task, also}
    while True:
        left = until - loop.time()
        if left <= 0:
            return
        done, _ = await asyncio.wait(waits, timeout=min(left, WAIT_LOG_S), return_when=asyncio.FIRST_COMPLETED)
        if done:
            return
        if loop.time() < until:
            log.warning("%s for %.0f s (%.0f s left)", what(), loop.time() - started, until - loop.time())


@dataclass
class JobRequest:
    """One transcription job as the supervisor sees it."""

    job_id: str
    audio: bytes
    format: str = "auto"
    sample_rate: int | None = None
    language: str | None = None
    #: A mapping (the wire form) is checked into ``DecodeOptions`` here: ``InvalidRequest`` if it is not valid.
    options: DecodeOptions = field(default_factory=DecodeOptions)
    #: Absolute deadline on the event loop's monotonic clock, if the caller has one.
    deadline: float | None = None

    def __post_init__(self) -> None:
        self.options = parse_options(self.options)


@dataclass
class JobResult:
    job_id: str
    text: str
    language: str
    language_probability: float
    duration_s: float
    segments: list[dict[str, Any]]
    timings: dict[str, Any]
    fallback_segments: int
    batched: bool
    worker_pid: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "language": self.language,
            "language_probability": self.language_probability,
            "duration_s": self.duration_s,
            "segments": self.segments,
            "timings": self.timings,
            "fallback_segments": self.fallback_segments,
            "batched": self.batched,
        }


class WorkerObserver:
    """Hooks for metrics and logs; every method is a no-op here. Must not block."""

    def state_changed(self, worker: "Worker", state: WorkerState) -> None: ...
    def worker_ready(self, worker: "Worker", info: dict[str, Any]) -> None: ...
    def worker_restarted(self, worker: "Worker", reason: str) -> None: ...
    def job_started(self, worker: "Worker", job: JobRequest, duration_s: float) -> None: ...
    def segment(self, worker: "Worker", event: dict[str, Any]) -> None: ...
    def job_succeeded(self, worker: "Worker", result: JobResult) -> None: ...
    def job_failed(self, worker: "Worker", job: JobRequest, error: JobError) -> None: ...


def worker_spec(asr: AsrSettings, device: str, device_index: int, log_level: str = "INFO",
                cpu_threads: int | None = None) -> dict[str, Any]:
    """What the plugin process needs to know, as JSON-able data (it never reads our config file).
    ``cpu_threads``: the slot split's threads per worker (default ``asr.cpu_threads``; 0 = the plugin decides)."""
    return {
        "model": asr.model,
        "device": device,
        "device_index": device_index,
        "compute_type": asr.compute_type,
        "cpu_threads": asr.cpu_threads if cpu_threads is None else cpu_threads,
        "max_audio_s": asr.max_audio_s,
        "zh_script": asr.zh_script.value,
        "batched_min_audio_s": asr.batched_min_audio_s,
        "batch_size": asr.batch_size,
        "log_level": log_level,
        "defaults": {
            "beam_size": asr.beam_size,
            "language": asr.language,
            "vad_filter": asr.vad_filter,
            "condition_on_previous_text": asr.condition_on_previous_text,
        },
    }


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Process:
    """A running plugin process and its end of the socket."""

    def __init__(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.pid = proc.pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.jobs_served = 0
        self.info: dict[str, Any] = {}

    def rss_bytes(self) -> int:
        try:
            return psutil.Process(self.pid).memory_info().rss
        except (psutil.Error, OSError):
            return 0

    def _signal(self, sig: int) -> None:
        # os.kill, not Popen.send_signal: the latter polls first, and polling reaps a process that just died,
        # so asyncio's child watcher would lose its exit status and report 255 instead of the signal.
        # The pid cannot be reused before the watcher reaps it, and then returncode is set and we stop.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def kill(self, grace_s: float) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit status."""
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except asyncio.TimeoutError:
                self._signal(signal.SIGKILL)
                waiter = asyncio.ensure_future(self.proc.wait())
                done, _ = await asyncio.wait({waiter}, timeout=KILL_WAIT_S)
                if not done:
                    waiter.cancel()
                    log.error("worker pid %d: no exit seen %g s after SIGKILL; going on without it", self.pid,
                              KILL_WAIT_S)
        self.close()
        return self.proc.returncode

    async def stop(self, grace_s: float) -> None:
        """Ask politely (a stop frame between jobs), then kill."""
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError, WireError):
                # Without draining: a plugin that does not read its socket must not hold up its own stop.
                self.writer.writelines(wire.encode(to_header(StopMessage())))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), max(grace_s, 0.1))
        await self.kill(grace_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Worker:
    """One supervised plugin process: one slot of a device (``resource`` is its lease resource, ``cpu/0`` or
    ``gpu:N/0``; any name in unit tests)."""

    def __init__(
        self,
        resource: str,
        spec: dict[str, Any],
        settings: WorkerSettings,
        timeouts: TimeoutSettings,
        observer: WorkerObserver | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.resource = resource
        self.spec = spec
        self.settings = settings
        self.timeouts = timeouts
        self.observer = observer or WorkerObserver()
        self._command = command or [sys.executable, "-m", "plugins.asr"]
        self.state = WorkerState.stopped
        self.last_error: str | None = None
        self.restarts: Counter[str] = Counter()
        self.jobs_served_total = 0
        self.current_job: dict[str, Any] | None = None
        self._proc: _Process | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._abort: asyncio.Future[JobError] | None = None
        self._stopping = False
        self._quick_failures = 0
        self._crash_streak = 0
        self._fatal_count = 0  # fatals since the worker last started well; sets the retry delay
        #: ``time.monotonic()`` when the worker first went fatal since it last started well (stays set through
        #: failed retries); None otherwise. /healthz reads it.
        self.fatal_since: float | None = None
        self._fatal_retry_at: float | None = None
        self._not_fatal = asyncio.Event()
        self._not_fatal.set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----- introspection -------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def info(self) -> dict[str, Any]:
        return self._proc.info if self._proc else {}

    @property
    def model(self) -> str:
        return str(self.spec.get("model"))

    def rss_bytes(self) -> int:
        return self._proc.rss_bytes() if self._proc else 0

    def snapshot(self) -> dict[str, Any]:
        proc = self._proc
        return {
            "resource": self.resource,
            "state": self.state.value,
            "pid": proc.pid if proc and proc.proc.returncode is None else None,
            "model": self.model,
            "device": self.info.get("device"),
            "compute_type": self.info.get("compute_type"),
            "rss_bytes": self.rss_bytes() if proc else 0,
            "jobs_served": proc.jobs_served if proc else 0,
            "jobs_served_total": self.jobs_served_total,
            "restarts": dict(self.restarts),
            "uptime_s": round(time.monotonic() - proc.started, 1) if proc and self.state in (
                WorkerState.ready, WorkerState.busy) else None,
            "model_load_s": self.info.get("load_s"),
            "last_error": self.last_error,
            "fatal_retry_in_s": round(max(0.0, self._fatal_retry_at - time.monotonic()), 1)
            if self._fatal_retry_at is not None and self.state is WorkerState.fatal else None,
            "current_job": dict(self.current_job) if self.current_job else None,
        }

    def fatal_for_too_long(self) -> bool:
        """Fatal (or retrying after fatal without success) for over ``worker.fatal_unhealthy_after_s``."""
        return (self.fatal_since is not None and self.state not in (WorkerState.ready, WorkerState.busy)
                and time.monotonic() - self.fatal_since > self.settings.fatal_unhealthy_after_s)

    def _set_state(self, state: WorkerState) -> None:
        if state is not self.state:
            log.debug("worker %s: %s -> %s", self.resource, self.state.value, state.value)
            self.state = state
            self.observer.state_changed(self, state)
        if state is WorkerState.ready or state is WorkerState.fatal:
            self._ready.set()
        elif state is not WorkerState.busy:
            self._ready.clear()
        if state is WorkerState.fatal:
            self._not_fatal.clear()
        else:
            self._not_fatal.set()

    def _spawn_task(self, coro: Any) -> None:
        # Owned tasks: kept referenced, and failures are logged rather than vanishing.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: internal task failed", self.resource, exc_info=task.exception())

    # ----- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin starting the process; returns at once (use ``wait_ready`` to wait)."""
        self._stopping = False
        self._set_state(WorkerState.starting)
        self._spawn_task(self._start_loop(0.0))

    async def wait_ready(self, timeout: float | None = None) -> WorkerState:
        """Wait until ready or fatal; returns the state reached."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        return self.state

    async def wait_not_fatal(self) -> None:
        """Wait until a fatal worker is retried (or stopped)."""
        await self._not_fatal.wait()

    def _backoff_delay(self, failures: int) -> float:
        # The agent's one jitter (full jitter): workers on many nodes must not restart in step.
        b = self.settings.backoff
        return jittered_delay(max(1, failures), b.initial_s, b.max_s, b.multiplier)

    async def _start_loop(self, delay: float) -> None:
        while not self._stopping:
            if delay > 0:
                self._set_state(WorkerState.backoff)
                await asyncio.sleep(delay)
                if self._stopping:
                    return
            self._set_state(WorkerState.starting)
            try:
                proc = await self._spawn()
            except (OSError, WireError, asyncio.TimeoutError, _StartFailed) as exc:
                self._quick_failures += 1
                self.last_error = f"start failed: {exc}"
                log.error("worker %s: %s (%d/%d)", self.resource, self.last_error, self._quick_failures,
                          self.settings.backoff.max_quick_failures)
                if self._quick_failures >= self.settings.backoff.max_quick_failures:
                    self._go_fatal(f"{self._quick_failures} failed starts")
                    return
                delay = self._backoff_delay(self._quick_failures)
                continue
            if self._stopping:
                await proc.stop(self.settings.stop_grace_s)
                return
            self._proc = proc
            self._set_state(WorkerState.ready)
            self.observer.worker_ready(self, proc.info)
            log.info("worker %s ready: pid=%d model=%s device=%s compute_type=%s load_s=%.2f",
                     self.resource, proc.pid, self.model, proc.info.get("device"),
                     proc.info.get("compute_type"), proc.info.get("load_s", 0.0))
            self._spawn_task(self._watch_idle_exit(proc))
            self._spawn_task(self._watch_started_well(proc))
            return

    async def _watch_started_well(self, proc: _Process) -> None:
        """After ``min_uptime_s`` up, the quick-failure count and any fatal history are forgotten."""
        await asyncio.sleep(self.settings.backoff.min_uptime_s)
        if self._proc is proc and proc.proc.returncode is None:
            self._started_well()

    def _started_well(self) -> None:
        self._quick_failures = 0
        self._fatal_count = 0
        self.fatal_since = None
        self._fatal_retry_at = None

    def _go_fatal(self, why: str) -> None:
        """Give up for now; start again after ``worker.fatal_retry_s``, doubling per fatal up to an hour."""
        now = time.monotonic()
        if self.fatal_since is None:
            self.fatal_since = now
        self._fatal_count += 1
        s = self.settings
        cap = max(FATAL_RETRY_MAX_S, s.fatal_retry_s)
        delay = min(cap, s.fatal_retry_s * 2 ** (self._fatal_count - 1)) * random.uniform(0.9, 1.1)
        self._fatal_retry_at = now + delay
        self._set_state(WorkerState.fatal)
        log.error("worker %s: fatal after %s: %s; retrying in %.0f s (worker.fatal_retry_s)", self.resource, why,
                  self.last_error, delay)
        self._spawn_task(self._retry_after_fatal(delay))

    async def _retry_after_fatal(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping or self.state is not WorkerState.fatal:
            return
        log.info("worker %s: starting again after fatal (%d so far)", self.resource, self._fatal_count)
        self._quick_failures = 0
        self._fatal_retry_at = None
        self._set_state(WorkerState.starting)
        await self._start_loop(0.0)

    async def _spawn(self) -> _Process:
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command, "--fd", str(child.fileno()), "--spec", json.dumps(self.spec),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        p = _Process(proc, reader, writer)
        first: Any = None
        problem = ""
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), self.settings.start_timeout_s)
            first = parse_from_plugin(frame[0]) if frame is not None else None
        except asyncio.TimeoutError:
            await p.kill(self.settings.stop_grace_s)
            raise _StartFailed(f"not ready within worker.start_timeout_s = {self.settings.start_timeout_s:g} s")
        except WireError as exc:
            problem = f"{exc}; "
        if not isinstance(first, ReadyMessage):
            code = await p.kill(self.settings.stop_grace_s)
            if isinstance(first, FatalMessage):
                raise _StartFailed(first.message)
            if first is not None:
                problem = f"{first.type!r} before 'ready'; "
            raise _StartFailed(f"{problem}worker {describe_exit(code)} before ready")
        p.info = first.model_dump(exclude={"type"}, exclude_unset=True)
        return p

    async def _watch_idle_exit(self, proc: _Process) -> None:
        """Notice a process that dies while idle (OOM killer, operator) and replace it."""
        await proc.proc.wait()
        if self._proc is proc and self.state is WorkerState.ready and not self._stopping:
            self.last_error = f"worker pid {proc.pid} {describe_exit(proc.proc.returncode)} while idle"
            log.warning("worker %s: %s; restarting", self.resource, self.last_error)
            proc.close()
            uptime = time.monotonic() - proc.started
            if uptime < self.settings.backoff.min_uptime_s:
                self._quick_failures += 1
            if self._quick_failures >= self.settings.backoff.max_quick_failures:
                self._go_fatal(f"{self._quick_failures} exits within worker.backoff.min_uptime_s of ready")
                return
            self._restart("crash", self._backoff_delay(max(1, self._quick_failures)))

    def _restart(self, reason: str, delay: float = 0.0) -> None:
        if self._stopping:
            self._set_state(WorkerState.stopped)
            return
        self.restarts[reason] += 1
        self.observer.worker_restarted(self, reason)
        self._set_state(WorkerState.backoff if delay > 0 else WorkerState.starting)
        self._spawn_task(self._start_loop(delay))

    async def _replace(self, proc: _Process, reason: str, *, graceful: bool) -> None:
        if graceful:
            await proc.stop(self.settings.stop_grace_s)
        else:
            await proc.kill(self.settings.stop_grace_s)
        self._restart(reason)

    async def stop(self) -> None:
        """Stop the process (a running job should be finished or aborted first) and stay stopped."""
        self._stopping = True
        if self._abort is not None and not self._abort.done():
            from .errors import JobShutdown

            self._abort.set_result(JobShutdown("the agent is shutting down"))
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                await proc.stop(self.settings.stop_grace_s)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.fatal_since = self._fatal_retry_at = None
            self._set_state(WorkerState.stopped)

    def abort(self, error: JobError) -> bool:
        """Stop the running job now (lease lost, shutdown): the process is killed and ``run_job`` raises ``error``.

        Killed rather than asked to stop: a fenced job must not go on decoding even until its next segment.
        """
        if self._abort is not None and not self._abort.done():
            self._abort.set_result(error)
            return True
        return False

    # ----- jobs ----------------------------------------------------------------------------------------------

    async def run_job(
        self, job: JobRequest, on_segment: Callable[[dict[str, Any]], None] | None = None
    ) -> JobResult:
        """Run ``job`` on this worker; returns its result or raises a ``JobError``."""
        loop = asyncio.get_running_loop()
        wait = self.settings.start_timeout_s + self.settings.backoff.max_s
        if job.deadline is not None:
            wait = min(wait, max(0.0, job.deadline - loop.time()))
        until = loop.time() + wait
        await self._acquire(job, until, wait)
        try:
            return await self._run_locked(job, on_segment, until, wait)
        finally:
            self._lock.release()

    async def _acquire(self, job: JobRequest, until: float, wait: float) -> None:
        """Take the worker for ``job`` by loop time ``until`` (``WorkerUnavailable`` if not), saying why it waits."""
        if not self._lock.locked():
            await self._lock.acquire()  # free: taken without suspending
            return
        acquire = asyncio.ensure_future(self._lock.acquire())
        try:
            await _wait_logged(acquire, until, lambda: f"job {job.job_id}: waiting for worker {self.resource} to "
                                                       f"finish another job ({self._busy_with()})")
        finally:
            if not acquire.done():
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
        if acquire.cancelled():  # else the lock is ours, even when it came just as the wait ran out
            raise WorkerUnavailable(f"worker {self.resource} still busy after {wait:.1f} s ({self._busy_with()})")

    def _busy_with(self) -> str:
        job = self.current_job
        return f"job {job['job_id']}" if job else self._state_line()

    def _state_line(self) -> str:
        return f"state {self.state.value}" + (f", last error: {self.last_error}" if self.last_error else "")

    async def _run_locked(self, job: JobRequest, on_segment: Callable[[dict[str, Any]], None] | None, until: float,
                          wait: float) -> JobResult:
        loop = asyncio.get_running_loop()
        if not self._ready.is_set():
            ready = loop.create_task(self._ready.wait())
            try:
                await _wait_logged(ready, until, lambda: f"job {job.job_id}: waiting for worker {self.resource} to "
                                                         f"be ready ({self._state_line()})")
            finally:
                ready.cancel()
            if not self._ready.is_set():
                raise WorkerUnavailable(
                    f"worker {self.resource} not ready within {wait:.1f} s (state {self.state.value})")
        proc = self._proc
        if self.state is not WorkerState.ready or proc is None or self._stopping:
            raise WorkerUnavailable(
                f"worker {self.resource} is {self.state.value}" + (f": {self.last_error}" if self.last_error else "")
            )
        self._abort = loop.create_future()
        self._set_state(WorkerState.busy)
        self.current_job = {"job_id": job.job_id, "audio_s": None, "segments": 0,
                            "started": time.monotonic(), "last_segment": None}
        failed = False
        try:
            result = await self._drive(proc, job, on_segment)
        except JobError as exc:
            failed = True
            self.observer.job_failed(self, job, exc)
            log.info("job %s failed on %s: %s: %s", job.job_id, self.resource, exc.code, exc.message)
            raise
        finally:
            self.current_job = None
            self._abort = None
            if self.state is WorkerState.busy:
                self._set_state(WorkerState.ready)
                if failed:  # the process outlived its job's failure (an error answer, or stopped in time)
                    self._maybe_recycle(proc)
        self.jobs_served_total += 1
        self._crash_streak = 0
        self._started_well()
        self.observer.job_succeeded(self, result)
        self._maybe_recycle(proc)
        return result

    def _maybe_recycle(self, proc: _Process) -> None:
        rss = proc.rss_bytes()
        if proc.jobs_served >= self.settings.max_jobs or rss > self.settings.max_rss_bytes:
            why = (f"served {proc.jobs_served} jobs" if proc.jobs_served >= self.settings.max_jobs
                   else f"RSS {rss} bytes > {self.settings.max_rss_bytes}")
            log.info("worker %s: recycling pid %d (%s)", self.resource, proc.pid, why)
            self._proc = None
            self._set_state(WorkerState.starting)
            self._spawn_task(self._replace(proc, "recycle", graceful=True))

    def _kill_streak_delay(self) -> float:
        """Count one more kill or crash mid-job; the first restarts at once (most likely that job's audio),
        a streak backs off."""
        self._crash_streak += 1
        return self._backoff_delay(self._crash_streak - 1) if self._crash_streak > 1 else 0.0

    async def _fail(self, proc: _Process, reason: str, error: JobError, *, grace_s: float | None = None) -> JobError:
        """Kill the process mid-job, schedule its replacement, and hand back the job's error."""
        self._proc = None
        # Kills for time limits back off like crashes; lease losses and shutdown are not the worker's fault.
        delay = self._kill_streak_delay() if reason in ("timeout", "stall") else 0.0
        self._set_state(WorkerState.backoff if delay > 0 else WorkerState.starting)
        await proc.kill(self.settings.stop_grace_s if grace_s is None else grace_s)
        self.last_error = f"{error.code}: {error.message}"
        self._restart(reason, delay)
        return error

    async def _drive(
        self, proc: _Process, job: JobRequest, on_segment: Callable[[dict[str, Any]], None] | None
    ) -> JobResult:
        loop = asyncio.get_running_loop()
        assert self._abort is not None
        abort = self._abort
        t0 = loop.time()
        t = self.timeouts
        # Until the plugin has decoded the audio we do not know its length; min_s bounds that phase.
        deadline = t0 + t.min_s
        if job.deadline is not None:
            deadline = min(deadline, job.deadline)
        stall_at = t0 + t.stall_s
        #: Once the deadline passed: the cancel is out and the plugin has until then to answer ``stopped``.
        stop_by: float | None = None
        overrun = ""  # what the deadline was, for the error message
        segments: list[dict[str, Any]] = []
        header = to_header(JobMessage(job_id=job.job_id, format=job.format, sample_rate=job.sample_rate,
                                      language=job.language, options=job.options.wire()))
        # A plugin that does not read its socket (stuck, or blocked writing to us) would hold the drain for ever:
        # it has until the first limit to take the job, as it has to answer.
        late = min(deadline, stall_at)
        await self._send(proc, job, abort, header, job.audio, "the job", late, lambda: self._fail(
            proc, "stall", JobStalled(f"job {job.job_id}: worker pid {proc.pid} did not take the job within "
                                      f"{late - t0:.1f} s; worker killed")))

        read: asyncio.Task[Any] | None = None
        try:
            while True:
                if read is None:
                    read = loop.create_task(wire.read_frame(proc.reader))
                now = loop.time()
                limit = (stop_by if stop_by is not None else min(deadline, stall_at)) - now
                done, _ = await asyncio.wait({read, abort}, timeout=max(0.0, limit),
                                             return_when=asyncio.FIRST_COMPLETED)
                if abort in done:
                    raise await self._aborted(proc, job, abort)
                if read not in done:
                    now = loop.time()
                    if stop_by is not None:
                        # Stuck inside one segment (or ignoring us): only a kill ends a native decode. The grace
                        # is spent already, so no second one before SIGKILL.
                        raise await self._fail(proc, "timeout", JobTimeout(
                            f"{overrun}; worker pid {proc.pid} did not stop within worker.stop_grace_s = "
                            f"{self.settings.stop_grace_s:g} s and was killed"), grace_s=0.0)
                    if now >= deadline:
                        overrun = f"job {job.job_id} exceeded its deadline of {deadline - t0:.1f} s on {self.resource}"
                        stop_by = now + self.settings.stop_grace_s
                        log.info("%s: asking worker pid %d to stop it", overrun, proc.pid)
                        await self._send(proc, job, abort, to_header(CancelMessage(job_id=job.job_id)), b"",
                                         "the cancel", stop_by, lambda: self._fail(proc, "timeout", JobTimeout(
                                             f"{overrun}; worker pid {proc.pid} did not take the cancel within "
                                             f"worker.stop_grace_s and was killed"), grace_s=0.0))
                        continue
                    raise await self._fail(proc, "stall", JobStalled(
                        f"job {job.job_id}: no progress from worker pid {proc.pid} for "
                        f"{t.stall_s:g} s (asr.timeout.stall_s); worker killed"))
                try:
                    frame = read.result()
                    msg = parse_from_plugin(frame[0]) if frame is not None else None
                except WireError as exc:
                    raise await self._crashed(proc, job, f"protocol error: {exc}")
                except (ConnectionError, OSError) as exc:
                    raise await self._crashed(proc, job, f"connection lost: {exc}")
                finally:
                    read = None
                if msg is None:
                    raise await self._crashed(proc, job, None)
                msg_job = getattr(msg, "job_id", job.job_id)
                if msg_job != job.job_id:
                    log.warning("job %s: dropping a stale %r for job %s from worker pid %d", job.job_id, msg.type,
                                msg_job, proc.pid)
                    continue
                now = loop.time()
                stall_at = now + t.stall_s
                if isinstance(msg, StartedMessage):
                    duration = msg.duration_s
                    budget = max(t.min_s, t.per_audio_s * duration)
                    if stop_by is None:
                        deadline = t0 + budget if job.deadline is None else min(t0 + budget, job.deadline)
                    if self.current_job is not None:
                        self.current_job["audio_s"] = duration
                    self.observer.job_started(self, job, duration)
                elif isinstance(msg, SegmentMessage):
                    event = msg.event()
                    segments.append(event)
                    if self.current_job is not None:
                        self.current_job["segments"] = len(segments)
                        self.current_job["last_segment"] = time.monotonic()
                    self.observer.segment(self, event)
                    if on_segment is not None:
                        on_segment(event)
                elif isinstance(msg, StoppedMessage) and stop_by is not None:
                    proc.jobs_served += 1
                    log.info("job %s: stopped after %d segments in %.2f s; worker pid %d kept", job.job_id,
                             len(segments), now - (stop_by - self.settings.stop_grace_s), proc.pid)
                    raise JobTimeout(f"{overrun}; stopped after {len(segments)} segments, worker pid {proc.pid} kept")
                elif isinstance(msg, ResultMessage):
                    proc.jobs_served += 1
                    if stop_by is not None:
                        # Finished as the cancel went out; the plugin drops that cancel. The deadline still holds.
                        raise JobTimeout(f"{overrun} (finished just after it); worker pid {proc.pid} kept")
                    return JobResult(
                        job_id=job.job_id,
                        text=msg.text,
                        language=msg.language,
                        language_probability=msg.language_probability,
                        duration_s=msg.duration_s,
                        segments=segments,
                        timings=dict(msg.timings),
                        fallback_segments=msg.fallback_segments,
                        batched=msg.batched,
                        worker_pid=proc.pid,
                    )
                elif isinstance(msg, ErrorMessage):
                    # Also after a cancel went out: the job failed on its own first, and that error says why.
                    proc.jobs_served += 1
                    raise job_error(msg.code, msg.message)
                else:
                    raise await self._crashed(proc, job, f"unexpected message {msg.type!r}")
        finally:
            if read is not None and not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read

    async def _aborted(self, proc: _Process, job: JobRequest, abort: "asyncio.Future[JobError]") -> JobError:
        error = abort.result()
        reason = "lease_lost" if error.code == "lease_lost" else "shutdown"
        log.warning("job %s: aborting on %s (%s): killing worker pid %d", job.job_id, self.resource, error.code,
                    proc.pid)
        return await self._fail(proc, reason, error)

    async def _send(self, proc: _Process, job: JobRequest, abort: "asyncio.Future[JobError]",
                    header: dict[str, Any], payload: bytes, what: str, until: float,
                    late: Callable[[], Awaitable[JobError]]) -> None:
        """Hand ``what`` to the plugin by loop time ``until``, or raise: ``late()``'s error past it, the abort's
        error if one comes first, ``WorkerCrashed`` if the connection is gone."""
        try:
            proc.writer.writelines(wire.encode(header, payload))
        except (ConnectionError, RuntimeError) as exc:
            raise await self._crashed(proc, job, f"could not send {what}: {exc}")
        if proc.writer.transport.get_write_buffer_size() == 0:
            return  # all in the socket already: nothing to wait for
        drain = asyncio.ensure_future(proc.writer.drain())
        try:
            await _wait_logged(drain, until, lambda: f"job {job.job_id}: worker pid {proc.pid} on {self.resource} "
                                                     f"has not taken {what} yet", also=abort)
        finally:
            if not drain.done():
                drain.cancel()
        if abort.done():
            if drain.done() and not drain.cancelled():
                drain.exception()  # seen: the abort's error is the job's
            raise await self._aborted(proc, job, abort)
        if not drain.done():
            raise await late()
        try:
            drain.result()
        except (ConnectionError, RuntimeError) as exc:
            raise await self._crashed(proc, job, f"could not send {what}: {exc}")

    async def _crashed(self, proc: _Process, job: JobRequest, detail: str | None) -> JobError:
        self._proc = None
        code = await proc.kill(self.settings.stop_grace_s)
        what = detail or describe_exit(code)
        error = WorkerCrashed(f"worker pid {proc.pid} on {self.resource} died during job {job.job_id}: {what}")
        self.last_error = f"{error.code}: {error.message}"
        log.error("%s", error.message)
        self._restart("crash", self._kill_streak_delay())
        return error


class _StartFailed(Exception):
    pass
