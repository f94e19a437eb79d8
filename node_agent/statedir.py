"""The node's state directory: the persisted node id and node secret, and the lock that gives the directory to
one agent.

Two agents on one directory would read the same node id and register as one node, each overwriting the other's
devices and fighting over its leases. ``flock`` on a ``lock`` file is released by the kernel when the process
ends however it ends, so a crash leaves no stale lock behind (the file and its old pid stay; only the lock counts).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("node_agent.statedir")

LOCK_FILE = "lock"
NODE_ID_FILE = "node-id"
#: The secret the scheduler gave this node at its first registration (it keeps only a hash): readable by this user
#: alone, since whoever holds it may act as this node.
NODE_SECRET_FILE = "node-secret"


class StateDir:
    """``node.state_dir``: lock it once per process (``lock``), then read and write the node id in it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def lock(self) -> None:
        """Take the directory for this process, or raise ConfigError naming the pid that holds it."""
        if self._fd is not None:
            return
        try:
            self._fd = hold_lock(self.path / LOCK_FILE)
        except LockHeld as held:
            raise ConfigError(
                f"node.state_dir {self.path} is in use by another node-agent ({held.holder}); "
                "give each agent its own node.state_dir"
            ) from None
        except LockFailed as failed:
            where = f"create {LOCK_FILE!r} in it" if failed.step == "create" else f"lock {LOCK_FILE!r}"
            raise ConfigError(f"node.state_dir {self.path}: cannot {where}: {failed.reason}") from None

    def unlock(self) -> None:
        """Release the lock (closing the descriptor does it). The file stays: unlinking it would let a third
        agent lock a new file while a second still waits on the old one."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def load_node_id(self) -> str | None:
        try:
            value = (self.path / NODE_ID_FILE).read_text().strip()
        except OSError:
            return None
        return value or None

    def load_node_secret(self) -> str | None:
        try:
            value = (self.path / NODE_SECRET_FILE).read_text().strip()
        except OSError:
            return None
        return value or None

    def save_node_secret(self, secret: str) -> None:
        """Keep the node secret (mode 0600, replaced atomically). A failure is logged, not raised: the agent works
        on, and is told what to do when it next registers without the secret."""
        path = self.path / NODE_SECRET_FILE
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created 0600: never readable by others, not even between a write and a chmod.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # an old .tmp left with other bits keeps them through O_CREAT
                os.write(fd, (secret + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep the node secret in %s: %s (the scheduler will refuse this node id after a "
                        "restart)", path, exc.strerror or exc)

    def save_node_id(self, node_id: str) -> None:
        path = self.path / NODE_ID_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(node_id + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot persist node id in %s: %s", path, exc)


class LockHeld(Exception):
    """Another open file holds the lock, in this process or another: ``holder`` says who ('pid N')."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class LockFailed(Exception):
    """The lock file could not be created (``step`` 'create') or locked ('lock'): ``reason``, the OS's words."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"cannot {step}: {reason}")
        self.step = step
        self.reason = reason


def hold_lock(path: Path) -> int:
    """Create ``path`` (and its directory), lock it for this process (exclusive, not waiting) and write this pid
    into it: the descriptor, which holds the lock until it is closed. Raises LockHeld or LockFailed. The state
    directory's ``lock``, and the SQLite store's ``scheduler.db.lock``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Python opens it non-inheritable: worker processes never hold the lock after the agent is gone.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LockFailed("create", exc.strerror or str(exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise LockHeld(holder) from None
    except OSError as exc:
        os.close(fd)
        raise LockFailed("lock", exc.strerror or str(exc)) from None
    # Truncate only once locked: before that the file holds the current holder's pid.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """'pid N' from the lock file, or 'pid unknown' while the holder has not written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
