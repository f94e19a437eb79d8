"""The life cycle of one worker's plugin process, as an explicit state machine::

    starting -> ready <-> busy
       |          |        | (crash, stall, abort, unstoppable overrun: kill, then restart)
       v          v        v
    backoff -> starting ...      fatal -> (after worker.fatal_retry_s) starting      stopped

A start that fails, or a process that exits soon after ready, counts as a quick failure: the next start backs
off (full jitter), and ``worker.backoff.max_quick_failures`` of them in a row go ``fatal``, retried after
``worker.fatal_retry_s`` (doubling per fatal, up to an hour). A process that stays up ``worker.backoff.min_uptime_s``
or serves a job has started well, and the failure history is forgotten. Kills mid-job back off like crashes after
the first. Jobs are not this module's business: ``job_session`` runs them and reports kills and crashes here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .config import WorkerSettings
from .errors import JobError, WireError, WorkerCrashed
from .plugin_messages import WorkerSpec
from .retry import jittered_delay
from .worker_process import PluginProcess, StartFailed, describe_exit, spawn_plugin

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
#: How long a worker whose socket broke mid-job is given to be seen exiting, so its error names how it ended.
EXIT_SEEN_S = 0.5


class ProcessLifecycle:
    """Starts, watches, restarts and stops the plugin process of worker ``resource``; ``proc`` is the live one
    (None while there is none). ``on_state``, ``on_ready`` and ``on_restart`` tell the owner what happened."""

    def __init__(
        self,
        resource: str,
        spec: WorkerSpec,
        settings: WorkerSettings,
        command: list[str],
        on_state: Callable[[WorkerState], None],
        on_ready: Callable[[dict[str, Any]], None],
        on_restart: Callable[[str], None],
    ) -> None:
        self.resource = resource
        self.spec = spec
        self.settings = settings
        self.command = command
        self._on_state = on_state
        self._on_ready = on_ready
        self._on_restart = on_restart
        self.state = WorkerState.stopped
        self.last_error: str | None = None
        self.restarts: Counter[str] = Counter()
        self.proc: PluginProcess | None = None
        #: Set once ``stop`` began: nothing starts again.
        self.stopping = False
        self._ready = asyncio.Event()
        self._not_fatal = asyncio.Event()
        self._not_fatal.set()
        self._quick_failures = 0
        self._crash_streak = 0
        self._fatal_count = 0  # fatals since the worker last started well; sets the retry delay
        #: ``time.monotonic()`` when the worker first went fatal since it last started well (stays set through
        #: failed retries); None otherwise.
        self.fatal_since: float | None = None
        self._fatal_retry_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----- state ---------------------------------------------------------------------------------------------

    def set_state(self, state: WorkerState) -> None:
        if state is not self.state:
            log.debug("worker %s: %s -> %s", self.resource, self.state.value, state.value)
            self.state = state
            self._on_state(state)
        if state is WorkerState.ready or state is WorkerState.fatal:
            self._ready.set()
        elif state is not WorkerState.busy:
            self._ready.clear()
        if state is WorkerState.fatal:
            self._not_fatal.clear()
        else:
            self._not_fatal.set()

    def status_line(self) -> str:
        """``worker R is <state>[: last error]``: the one way the worker's state is told to a user."""
        return f"worker {self.resource} is {self.state.value}" + (f": {self.last_error}" if self.last_error else "")

    def state_detail(self) -> str:
        """``state <state>[, last error: ...]``, for lines that name the worker already."""
        return f"state {self.state.value}" + (f", last error: {self.last_error}" if self.last_error else "")

    @property
    def is_ready(self) -> bool:
        """Ready or fatal: what a waiting job may stop waiting for."""
        return self._ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> WorkerState:
        """Wait until ready or fatal; returns the state reached."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        return self.state

    async def wait_not_fatal(self) -> None:
        await self._not_fatal.wait()

    def fatal_for_too_long(self) -> bool:
        return (self.fatal_since is not None and self.state not in (WorkerState.ready, WorkerState.busy)
                and time.monotonic() - self.fatal_since > self.settings.fatal_unhealthy_after_s)

    def fatal_retry_in_s(self) -> float | None:
        if self._fatal_retry_at is None or self.state is not WorkerState.fatal:
            return None
        return round(max(0.0, self._fatal_retry_at - time.monotonic()), 1)

    # ----- owned tasks ---------------------------------------------------------------------------------------

    def _spawn_task(self, coro: Any) -> None:
        # Owned tasks: kept referenced, and failures are logged rather than vanishing.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: internal task failed", self.resource, exc_info=task.exception())

    # ----- starting ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin starting the process; returns at once."""
        self.stopping = False
        self.set_state(WorkerState.starting)
        self._spawn_task(self._start_loop(0.0))

    def _backoff_delay(self, failures: int) -> float:
        # The agent's one jitter (full jitter): workers on many nodes must not restart in step.
        b = self.settings.backoff
        return jittered_delay(max(1, failures), b.initial_s, b.max_s, b.multiplier)

    async def _start_loop(self, delay: float) -> None:
        while not self.stopping:
            if delay > 0:
                self.set_state(WorkerState.backoff)
                await asyncio.sleep(delay)
                if self.stopping:
                    return
            self.set_state(WorkerState.starting)
            try:
                proc = await spawn_plugin(self.command, self.spec, self.settings.start_timeout_s,
                                          self.settings.stop_grace_s)
            except (OSError, WireError, asyncio.TimeoutError, StartFailed) as exc:
                self._quick_failures += 1
                self.last_error = f"start failed: {exc}"
                log.error("worker %s: %s (%d/%d)", self.resource, self.last_error, self._quick_failures,
                          self.settings.backoff.max_quick_failures)
                if self._quick_failures >= self.settings.backoff.max_quick_failures:
                    self._go_fatal(f"{self._quick_failures} failed starts")
                    return
                delay = self._backoff_delay(self._quick_failures)
                continue
            if self.stopping:
                await proc.stop(self.settings.stop_grace_s)
                return
            self.proc = proc
            self.set_state(WorkerState.ready)
            self._on_ready(proc.info)
            log.info("worker %s ready: pid=%d model=%s device=%s compute_type=%s load_s=%.2f",
                     self.resource, proc.pid, self.spec.asr.model, proc.info.get("device"),
                     proc.info.get("compute_type"), proc.info.get("load_s", 0.0))
            self._spawn_task(self._watch_idle_exit(proc))
            self._spawn_task(self._watch_started_well(proc))
            return

    async def _watch_started_well(self, proc: PluginProcess) -> None:
        """After ``min_uptime_s`` up, the quick-failure count and any fatal history are forgotten."""
        await asyncio.sleep(self.settings.backoff.min_uptime_s)
        if self.proc is proc and proc.alive:
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
        self.set_state(WorkerState.fatal)
        log.error("worker %s: fatal after %s: %s; retrying in %.0f s (worker.fatal_retry_s)", self.resource, why,
                  self.last_error, delay)
        self._spawn_task(self._retry_after_fatal(delay))

    async def _retry_after_fatal(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping or self.state is not WorkerState.fatal:
            return
        log.info("worker %s: starting again after fatal (%d so far)", self.resource, self._fatal_count)
        self._quick_failures = 0
        self._fatal_retry_at = None
        self.set_state(WorkerState.starting)
        await self._start_loop(0.0)

    async def _watch_idle_exit(self, proc: PluginProcess) -> None:
        """Notice a process that dies while idle (OOM killer, operator) and replace it."""
        await proc.proc.wait()
        if self.proc is proc and self.state is WorkerState.ready and not self.stopping:
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
        if self.stopping:
            self.set_state(WorkerState.stopped)
            return
        self.restarts[reason] += 1
        self._on_restart(reason)
        self.set_state(WorkerState.backoff if delay > 0 else WorkerState.starting)
        self._spawn_task(self._start_loop(delay))

    # ----- jobs' effects on the process ----------------------------------------------------------------------

    def take(self) -> PluginProcess | None:
        """The ready process, now busy with a job; None when there is none to take."""
        proc = self.proc
        if self.state is not WorkerState.ready or proc is None or self.stopping:
            return None
        self.set_state(WorkerState.busy)
        return proc

    def job_ended(self, proc: PluginProcess, *, failed: bool) -> None:
        """The job on ``proc`` ended: a process still busy is ready again, and one that outlived its job's
        failure (an error answer, or stopped in time) is recycled if it is due."""
        if self.state is WorkerState.busy:
            self.set_state(WorkerState.ready)
            if failed:
                self.maybe_recycle(proc)

    def served(self) -> None:
        """A job succeeded: the process started well, and any streak of kills and crashes is over."""
        self._crash_streak = 0
        self._started_well()

    def maybe_recycle(self, proc: PluginProcess) -> None:
        """Replace ``proc`` (gracefully) once it has served ``worker.max_jobs`` or grown past
        ``worker.max_rss_bytes``."""
        rss = proc.rss_bytes()
        if proc.jobs_served >= self.settings.max_jobs or rss > self.settings.max_rss_bytes:
            why = (f"served {proc.jobs_served} jobs" if proc.jobs_served >= self.settings.max_jobs
                   else f"RSS {rss} bytes > {self.settings.max_rss_bytes}")
            log.info("worker %s: recycling pid %d (%s)", self.resource, proc.pid, why)
            self.proc = None
            self.set_state(WorkerState.starting)
            self._spawn_task(self._replace(proc, "recycle"))

    async def _replace(self, proc: PluginProcess, reason: str) -> None:
        await proc.stop(self.settings.stop_grace_s)
        self._restart(reason)

    def _kill_streak_delay(self) -> float:
        """Count one more kill or crash mid-job; the first restarts at once (most likely that job's audio),
        a streak backs off."""
        self._crash_streak += 1
        return self._backoff_delay(self._crash_streak - 1) if self._crash_streak > 1 else 0.0

    async def killed(self, proc: PluginProcess, reason: str, error: JobError, *,
                     grace_s: float | None = None) -> JobError:
        """Kill the process mid-job (``reason``: one of ``RESTART_REASONS`` or ``shutdown``), schedule its
        replacement, and hand back the job's ``error``."""
        self.proc = None
        # Kills for time limits back off like crashes; lease losses and shutdown are not the worker's fault.
        delay = self._kill_streak_delay() if reason in ("timeout", "stall") else 0.0
        self.set_state(WorkerState.backoff if delay > 0 else WorkerState.starting)
        await proc.kill(self.settings.stop_grace_s if grace_s is None else grace_s)
        self.last_error = f"{error.code}: {error.message}"
        self._restart(reason, delay)
        return error

    async def crashed(self, proc: PluginProcess, job_id: str, detail: str | None) -> JobError:
        """The process died (or broke the protocol) during job ``job_id``: make sure it is gone, restart, and
        hand back the job's ``WorkerCrashed``."""
        self.proc = None
        # A broken socket mostly means the process died: its exit, seen within a moment, is what the error names
        # (killed by SIGKILL), beside the broken send or read that noticed it.
        died = await proc.exit_within(EXIT_SEEN_S) if detail is not None else None
        code = await proc.kill(self.settings.stop_grace_s)
        what = describe_exit(code) if detail is None else (
            f"{detail} ({describe_exit(died)})" if died is not None else detail)
        error = WorkerCrashed(f"worker pid {proc.pid} on {self.resource} died during job {job_id}: {what}")
        self.last_error = f"{error.code}: {error.message}"
        log.error("%s", error.message)
        self._restart("crash", self._kill_streak_delay())
        return error

    # ----- stopping ------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop the process and every task of the life cycle, and stay stopped (``stopping`` is set first)."""
        self.stopping = True
        proc, self.proc = self.proc, None
        if proc is not None:
            await proc.stop(self.settings.stop_grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.fatal_since = self._fatal_retry_at = None
        self.set_state(WorkerState.stopped)
