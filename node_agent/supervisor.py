"""Supervises ASR plugin processes: start, watch, time-limit, kill, restart.

One ``Worker`` owns one plugin process for one slot of a device and runs one job at a time. It is two rooms:
the process's life cycle (``worker_lifecycle.ProcessLifecycle``: spawn, ready, backoff, restart, fatal, kill,
a supervisor-style state machine over ``worker_process``, the one OS seam) and a per-job session
(``job_session.JobSession``: send the job, stream its segments, hold its deadline, take an abort, hand back its
result). ``Worker`` wires the two and is what the rest of the agent sees: every job handed to ``run_job`` ends in
exactly one ``ResultMessage`` or one ``JobError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .config import AsrSettings, TimeoutSettings, WorkerSettings
from .errors import JobCancelled, JobError, JobShutdown, WorkerUnavailable
from .job_session import JobRequest, JobSession, wait_logged
from .plugin_messages import ResultMessage, WorkerSpec
from .worker_lifecycle import RESTART_REASONS, ProcessLifecycle, WorkerState

__all__ = ["RESTART_REASONS", "JobRequest", "ResultMessage", "Worker", "WorkerObserver", "WorkerSpec",
           "WorkerState", "worker_spec"]

log = logging.getLogger("node_agent.supervisor")


class WorkerObserver:
    """Hooks for metrics and logs; every method is a no-op here. Must not block."""

    def state_changed(self, worker: "Worker", state: WorkerState) -> None: ...
    def worker_ready(self, worker: "Worker", info: dict[str, Any]) -> None: ...
    def worker_restarted(self, worker: "Worker", reason: str) -> None: ...
    def job_started(self, worker: "Worker", job: JobRequest, duration_s: float) -> None: ...
    def segment(self, worker: "Worker", event: dict[str, Any]) -> None: ...
    def job_succeeded(self, worker: "Worker", result: ResultMessage) -> None: ...
    def job_failed(self, worker: "Worker", job: JobRequest, error: JobError) -> None: ...


def worker_spec(asr: AsrSettings, device: str, device_index: int, log_level: str = "INFO",
                cpu_threads: int | None = None) -> WorkerSpec:
    """What the plugin process runs with (it never reads our config file): ``asr`` whole, and the slot.
    ``cpu_threads``: the slot split's threads per worker (default ``asr.cpu_threads``; 0 = the plugin decides)."""
    return WorkerSpec(asr=asr, device=device, device_index=device_index, log_level=log_level,
                      cpu_threads=asr.cpu_threads if cpu_threads is None else cpu_threads)


class Worker:
    """One supervised plugin process: one slot of a device (``resource`` is its lease resource, ``cpu/0`` or
    ``gpu:N/0``; any name in unit tests). The process's life cycle and the running job's session, wired."""

    def __init__(
        self,
        resource: str,
        spec: WorkerSpec,
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
        self.jobs_served_total = 0
        self.life = ProcessLifecycle(
            resource, spec, settings, command or [sys.executable, "-m", "plugins.asr"],
            on_state=lambda state: self.observer.state_changed(self, state),
            on_ready=lambda info: self.observer.worker_ready(self, info),
            on_restart=lambda reason: self.observer.worker_restarted(self, reason),
        )
        self._session: JobSession | None = None
        self._lock = asyncio.Lock()

    # ----- introspection -------------------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        return self.life.state

    @property
    def last_error(self) -> str | None:
        return self.life.last_error

    @property
    def restarts(self) -> Counter[str]:
        return self.life.restarts

    @property
    def fatal_since(self) -> float | None:
        """``time.monotonic()`` when the worker first went fatal since it last started well (stays set through
        failed retries); None otherwise. /healthz reads it."""
        return self.life.fatal_since

    @property
    def current_job(self) -> dict[str, Any] | None:
        return self._session.current if self._session is not None else None

    @property
    def pid(self) -> int | None:
        return self.life.proc.pid if self.life.proc else None

    @property
    def info(self) -> dict[str, Any]:
        return self.life.proc.info if self.life.proc else {}

    @property
    def model(self) -> str:
        return self.spec.asr.model

    def rss_bytes(self) -> int:
        return self.life.proc.rss_bytes() if self.life.proc else 0

    def status_line(self) -> str:
        """``worker R is <state>[: last error]``."""
        return self.life.status_line()

    def snapshot(self) -> dict[str, Any]:
        proc = self.life.proc
        current = self.current_job
        return {
            "resource": self.resource,
            "state": self.state.value,
            "pid": proc.pid if proc and proc.alive else None,
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
            "fatal_retry_in_s": self.life.fatal_retry_in_s(),
            "current_job": dict(current) if current else None,
        }

    def fatal_for_too_long(self) -> bool:
        """Fatal (or retrying after fatal without success) for over ``worker.fatal_unhealthy_after_s``."""
        return self.life.fatal_for_too_long()

    # ----- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin starting the process; returns at once (use ``wait_ready`` to wait)."""
        self.life.start()

    async def wait_ready(self, timeout: float | None = None) -> WorkerState:
        """Wait until ready or fatal; returns the state reached."""
        return await self.life.wait_ready(timeout)

    async def wait_not_fatal(self) -> None:
        """Wait until a fatal worker is retried (or stopped)."""
        await self.life.wait_not_fatal()

    async def stop(self) -> None:
        """Stop the process (a running job should be finished or aborted first) and stay stopped."""
        self.life.stopping = True
        if self._session is not None:
            self._session.abort(JobShutdown("the agent is shutting down"))
        async with self._lock:
            await self.life.stop()

    def abort(self, error: JobError) -> bool:
        """Stop the running job now (lease lost, shutdown): the process is killed and ``run_job`` raises ``error``.

        Killed rather than asked to stop: a fenced job must not go on decoding even until its next segment.
        """
        return self._session is not None and self._session.abort(error)

    def cancel(self, error: JobError) -> bool:
        """Stop the running job between two segments (its client or an operator cancelled it): as at a deadline,
        the plugin is asked to stop and the process is kept; ``run_job`` raises ``error``."""
        return self._session is not None and self._session.stop(error)

    # ----- jobs ----------------------------------------------------------------------------------------------

    async def run_job(
        self, job: JobRequest, on_segment: Callable[[dict[str, Any]], None] | None = None
    ) -> ResultMessage:
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
            await wait_logged(acquire, until, lambda: f"job {job.job_id}: waiting for worker {self.resource} to "
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
        return f"job {job['job_id']}" if job else self.life.state_detail()

    async def _wait_ready_for(self, job: JobRequest, until: float, wait: float) -> None:
        if self.life.is_ready:
            return
        ready = asyncio.get_running_loop().create_task(self.life.wait_ready())
        try:
            await wait_logged(ready, until, lambda: f"job {job.job_id}: waiting for worker {self.resource} to "
                                                    f"be ready ({self.life.state_detail()})")
        finally:
            ready.cancel()
        if not self.life.is_ready:
            raise WorkerUnavailable(
                f"worker {self.resource} not ready within {wait:.1f} s (state {self.state.value})")

    async def _run_locked(self, job: JobRequest, on_segment: Callable[[dict[str, Any]], None] | None, until: float,
                          wait: float) -> ResultMessage:
        await self._wait_ready_for(job, until, wait)
        proc = self.life.take()
        if proc is None:
            raise WorkerUnavailable(self.status_line())

        def segment(event: dict[str, Any]) -> None:
            self.observer.segment(self, event)
            if on_segment is not None:
                on_segment(event)

        session = JobSession(proc, job, self.life, self.timeouts,
                             on_started=lambda duration: self.observer.job_started(self, job, duration),
                             on_segment=segment)
        self._session = session
        failed = False
        try:
            result = await session.run()
        except JobError as exc:
            failed = True
            self.observer.job_failed(self, job, exc)
            log.info("job %s %s on %s: %s: %s", job.job_id, "cancelled" if isinstance(exc, JobCancelled)
                     else "failed", self.resource, exc.code, exc.message)
            raise
        finally:
            session.close()
            self._session = None
            self.life.job_ended(proc, failed=failed)
        self.jobs_served_total += 1
        self.life.served()
        self.observer.job_succeeded(self, result)
        self.life.maybe_recycle(proc)
        return result
