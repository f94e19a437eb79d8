"""One plugin process and its end of the socket: start it and wait for ``ready``, signal it, stop it.

The supervisor's only seam to the operating system: the life cycle (``worker_lifecycle``) and the job session
(``job_session``) reach the process through this module alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

import psutil

from . import wire
from .errors import WireError
from .plugin_messages import FatalMessage, ReadyMessage, StopMessage, WorkerSpec, parse_from_plugin, to_header

log = logging.getLogger("node_agent.supervisor")

#: After SIGKILL the exit is the kernel's business; a wait longer than this means the exit was not seen.
KILL_WAIT_S = 10.0


class StartFailed(Exception):
    """The process did not come up ready (it said ``fatal``, exited, or stayed silent); the message says which."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class PluginProcess:
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

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def exit_within(self, seconds: float) -> int | None:
        """The exit status if the process ends (or has ended) within ``seconds``; None if it is still running."""
        if self.proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), seconds)
        return self.proc.returncode

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


async def spawn_plugin(command: list[str], spec: WorkerSpec, start_timeout_s: float,
                       stop_grace_s: float) -> PluginProcess:
    """Start ``command`` with ``spec`` and a connected socket, and wait for its ``ready``; ``StartFailed`` (the
    process killed) when it answers anything else or nothing within ``start_timeout_s``. The process gets the
    agent's environment."""
    parent, child = socket.socketpair()
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, "--fd", str(child.fileno()), "--spec", spec.model_dump_json(),
            pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    reader, writer = await asyncio.open_connection(sock=parent)
    p = PluginProcess(proc, reader, writer)
    first: Any = None
    problem = ""
    try:
        frame = await asyncio.wait_for(wire.read_frame(reader), start_timeout_s)
        first = parse_from_plugin(frame[0]) if frame is not None else None
    except asyncio.TimeoutError:
        await p.kill(stop_grace_s)
        raise StartFailed(f"not ready within worker.start_timeout_s = {start_timeout_s:g} s")
    except WireError as exc:
        problem = f"{exc}; "
    if not isinstance(first, ReadyMessage):
        code = await p.kill(stop_grace_s)
        if isinstance(first, FatalMessage):
            raise StartFailed(first.message)
        if first is not None:
            problem = f"{first.type!r} before 'ready'; "
        raise StartFailed(f"{problem}worker {describe_exit(code)} before ready")
    p.info = first.model_dump(exclude={"type"}, exclude_unset=True)
    return p
