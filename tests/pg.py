"""A real, throwaway PostgreSQL server for tests: one per test session, or a private one a test may stop.

initdb runs once per session into a template cluster; every server copies it (a fraction of a second) rather than
running initdb again. PostgreSQL refuses to run as root, so under root the binaries run as the ``postgres`` user,
on a data directory in a temporary directory made for that user (pytest's own tmp dirs may not be traversable by
it). Durability is traded for speed (fsync and full-page writes off) but commits stay synchronous: with fsync off a
synchronous commit costs one write(), and it keeps every committed row across an immediate stop, which the tests
that stop PostgreSQL under a running scheduler rely on.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from procs import free_port

USER = "nodeagent"
PASSWORD = "s3cret-pw"
_SERVER_OS_USER = "postgres"
_TIMEOUT_S = 60.0

# A connection over TCP must present the password (scram-sha-256), so a DSN without it fails; the unix socket,
# used only by this module for administration, trusts.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_connections": "off",
}


class PgError(RuntimeError):
    """A PostgreSQL binary failed; carries its output (and the server log's tail)."""


def bindir() -> Path | None:
    """The directory of initdb/pg_ctl: from PATH, else the newest /usr/lib/postgresql/*/bin; None without them."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()]

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name))

    return max(candidates, key=version) if candidates else None


def available() -> bool:
    """Whether PostgreSQL's server binaries are installed."""
    return bindir() is not None


def _as_root() -> bool:
    return os.geteuid() == 0


def _env() -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGPORT, ...) must not redirect the admin commands.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _argv(cmd: list[str]) -> list[str]:
    """cmd as the server's OS user: itself when not root, else through runuser (or su)."""
    if not _as_root():
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", _SERVER_OS_USER, "--", *cmd]
    su = shutil.which("su")
    if su:
        return [su, "-s", "/bin/sh", _SERVER_OS_USER, "-c", shlex.join(cmd)]
    raise PgError("running as root, and neither runuser nor su is available to run PostgreSQL as 'postgres'")


def _run(cmd: list[str], what: str, log: Path | None = None, timeout: float = _TIMEOUT_S) -> str:
    result = subprocess.run(_argv(cmd), capture_output=True, text=True, timeout=timeout, env=_env(),
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = ""
        if log is not None and log.exists():
            tail = "\nserver log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise PgError(f"{what} failed (exit {result.returncode}): {result.stdout}{result.stderr}{tail}")
    return result.stdout


def _private_dir(prefix: str) -> Path:
    """A fresh directory under the system temp dir that the server's OS user owns."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if _as_root():
        entry = pwd.getpwnam(_SERVER_OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o700)
    return path


def _chown_tree(root: Path) -> None:
    if not _as_root():
        return
    entry = pwd.getpwnam(_SERVER_OS_USER)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            os.lchown(name, entry.pw_uid, entry.pw_gid)


_template: Path | None = None


def _template_cluster(bin_dir: Path) -> Path:
    """A data directory initdb made once per process, for servers to copy."""
    global _template
    if _template is None:
        base = _private_dir("node-agent-pg-template-")
        atexit.register(shutil.rmtree, base, True)
        pwfile = base / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        _chown_tree(base)
        data = base / "data"
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust",
              "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"], "initdb")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pg.py\n" + "".join(f"{k} = {v}\n" for k, v in _SETTINGS.items()))
        _template = data
    return _template


class PgServer:
    """One PostgreSQL cluster on 127.0.0.1:port, its data and unix socket in a private temporary directory.

    ``start()`` creates the cluster on first use; ``stop()`` shuts the server down (immediately, like a crash, by
    default) and keeps the data, so ``start()`` brings the same data back on the same port; ``close()`` stops it
    and deletes everything.
    """

    def __init__(self) -> None:
        found = bindir()
        if found is None:
            raise PgError("PostgreSQL (initdb) not found; .ci/run installs the Debian postgresql package")
        self._bin = found
        self._base: Path | None = None
        self.port = free_port()
        self._databases = 0

    @property
    def datadir(self) -> Path:
        assert self._base is not None, "PgServer not started"
        return self._base / "data"

    @property
    def _sockdir(self) -> Path:
        assert self._base is not None, "PgServer not started"
        return self._base / "sock"

    @property
    def log_path(self) -> Path:
        assert self._base is not None, "PgServer not started"
        return self._base / "server.log"

    def _create(self) -> None:
        template = _template_cluster(self._bin)
        self._base = _private_dir("node-agent-pg-")
        # A test that dies before its fixture's teardown must not leave a server running past the session.
        atexit.register(self.close)
        shutil.copytree(template, self.datadir, symlinks=True)
        self._sockdir.mkdir(mode=0o700)
        self.log_path.touch()
        _chown_tree(self._base)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.port}\nunix_socket_directories = '{self._sockdir}'\n")

    def running(self) -> bool:
        if self._base is None:
            return False
        result = subprocess.run(_argv([str(self._bin / "pg_ctl"), "-D", str(self.datadir), "status"]),
                                capture_output=True, env=_env(), timeout=_TIMEOUT_S)
        return result.returncode == 0

    def start(self) -> "PgServer":
        """Start the server (creating the cluster the first time) and wait until it accepts connections."""
        if self._base is None:
            self._create()
        _run([str(self._bin / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log_path), "-w",
              "-t", str(int(_TIMEOUT_S)), "start"], "pg_ctl start", log=self.log_path)
        return self

    def stop(self, mode: str = "immediate") -> None:
        """Shut the server down and keep its data. mode: 'immediate' (as if it crashed), 'fast' or 'smart'."""
        if self._base is None or not self.running():
            return
        _run([str(self._bin / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
              "-t", str(int(_TIMEOUT_S)), "stop"], "pg_ctl stop", log=self.log_path)

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its data directory."""
        if self._base is None:
            return
        try:
            self.stop()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            atexit.unregister(self.close)

    async def astart(self) -> "PgServer":
        return await asyncio.to_thread(self.start)

    async def astop(self, mode: str = "immediate") -> None:
        await asyncio.to_thread(self.stop, mode)

    async def pause(self, seconds: float, mode: str = "immediate") -> None:
        """Stop the server, leave it down for `seconds`, start it again (same port, same data)."""
        await self.astop(mode)
        await asyncio.sleep(seconds)
        await self.astart()

    def dsn(self, dbname: str = "postgres", password: bool = True) -> str:
        """postgresql://nodeagent:s3cret-pw@127.0.0.1:PORT/DBNAME (password=False leaves the password out)."""
        auth = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through the unix socket as the superuser; returns psql's unaligned output."""
        psql = self._bin / "psql"
        return _run([str(psql if psql.exists() else "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                     "-h", str(self._sockdir), "-p", str(self.port), "-U", USER, "-d", dbname, "-c", sql],
                    "psql", log=self.log_path)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (copied from template0); returns its DSN."""
        self._databases += 1
        name = name or f"test_{self._databases}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"{name!r}: use a lower-case identifier of at most 63 characters")
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection still open to it."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
