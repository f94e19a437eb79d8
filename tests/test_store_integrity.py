"""The SQLite store's file belongs to one scheduler, and a damaged or emptied one is not taken for a store (issue 22,
rows 7 and 8).

- Two schedulers on one ``scheduler.db`` (a standalone ``node-agent scheduler`` on the state dir of an agent with an
  embedded one, two standalone ones on one directory, two engines in one process) would each write it, and neither
  would wake the other's long polls: the second is refused with one line naming the file and the pid that holds
  it (``scheduler.db.lock`` beside it, ``flock``ed for the engine's life, as ``node.state_dir``'s ``lock``).
- A file with damaged pages is refused at start with one line (what ``PRAGMA quick_check`` found, and what to do)
  instead of starting and answering ``503 store_unavailable`` for a fault no retry mends.
- An empty file (what ``: > scheduler.db`` leaves) starts an empty store with a warning naming the file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fake_plugin import command as fake_command
from node_agent.config import SchedulerSettings
from node_agent.scheduler.db import SqliteEngine
from node_agent.scheduler.errors import StoreError
from node_agent.scheduler.store import open_store
from procs import Proc, agent_env, free_port, http_json, wait_for
from test_cluster import ready
from test_cluster import start_scheduler as start_scheduler_process
from test_store import cli

pytestmark = pytest.mark.timeout(180)


def _settings() -> SchedulerSettings:
    return SchedulerSettings(store="sqlite")


async def _open(state_dir: Path):
    return await open_store(_settings(), CollectorRegistry(), state_dir, lambda topic: None)


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _in_use(db: Path, pid: int) -> str:
    return (f"scheduler.store: {db} is in use by another scheduler (pid {pid} holds {db}.lock); "
            "give each scheduler its own store, or share one PostgreSQL store between replicas")


# ------------------------------------------------------------------------------------------- one holder (#7)


async def test_two_engines_on_one_file_the_second_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    db = tmp_path / "scheduler.db"
    first = await _open(tmp_path)
    try:
        # flock locks belong to an open file: two engines conflict within one process as across two.
        with pytest.raises(StoreError) as refused:
            await _open(tmp_path)
        assert str(refused.value) == _in_use(db, os.getpid())
        assert not _lock_is_free(Path(f"{db}.lock"))
        # The refused one took nothing: the first still works.
        assert await first.queue_depth() == 0
    finally:
        await first.close()
    assert _lock_is_free(Path(f"{db}.lock")), "closing the store releases its file"
    second = await _open(tmp_path)
    await second.close()


async def test_stores_in_memory_share_nothing_and_take_no_lock(tmp_path: Path) -> None:
    engines = [SqliteEngine(None), SqliteEngine(None)]
    for engine in engines:
        await engine.open(lambda topic: None)
    for engine in engines:
        await engine.close()
    assert list(tmp_path.iterdir()) == []


async def test_second_standalone_scheduler_on_one_state_dir_exits_with_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"NODE_AGENT_NODE__STATE_DIR": str(state)}
    first, url = await start_scheduler_process(tmp_path, free_port(), "first", **env)
    try:
        rc, _, err = await cli(tmp_path, ["scheduler", "--listen", f"127.0.0.1:{free_port()}"], env)
        assert rc == 1, err
        assert err == f"node-agent: {_in_use(state / 'scheduler.db', first.pid)}\n"
        assert http_json("GET", f"{url}/healthz")[0] == 200, "the first scheduler is unaffected"
    finally:
        assert await first.stop() == 0, first.log()


async def test_standalone_scheduler_on_an_agents_state_dir_exits_with_one_line(tmp_path: Path) -> None:
    """The agent's embedded scheduler holds ``scheduler.db``; a standalone one on that state dir is refused."""
    state = tmp_path / "state"
    port = free_port()
    env = agent_env("embedded", state, port, NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{free_port()}",
                    NODE_AGENT_WORKER__COMMAND=json.dumps(fake_command()))
    agent = await Proc("agent", ["run"], env, tmp_path).start()
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_for(lambda: ready(url), 90, "agent ready")
        rc, _, err = await cli(tmp_path, ["scheduler", "--listen", f"127.0.0.1:{free_port()}"],
                               {"NODE_AGENT_NODE__STATE_DIR": str(state)})
        assert rc == 1, err
        assert err == f"node-agent: {_in_use(state / 'scheduler.db', agent.pid)}\n"
        assert ready(url), "the agent is unaffected"
    finally:
        assert await agent.stop() == 0, agent.log()
    # The agent is gone: so is its hold on the file.
    assert _lock_is_free(state / "scheduler.db.lock")


# ------------------------------------------------------------------------------------------ damaged (#8)


async def _damaged_store(state_dir: Path) -> Path:
    """A store with some jobs' worth of pages, then 20 x 512 B of them overwritten. Page 1 (the header and the
    schema) is left alone, so SQLite opens the file and only a check finds the damage."""
    store = await _open(state_dir)
    await store.close()
    db = state_dir / "scheduler.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE ballast (b BLOB)")
    conn.executemany("INSERT INTO ballast VALUES (?)", [(os.urandom(300),) for _ in range(3000)])
    conn.execute("CREATE INDEX ballast_b ON ballast (b)")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    rnd = random.Random(22)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        for _ in range(20):
            f.seek(rnd.randrange(page, size - 512))
            f.write(rnd.randbytes(512))
    return db


async def test_damaged_file_is_refused_at_start_with_one_line(tmp_path: Path) -> None:
    db = await _damaged_store(tmp_path)
    with pytest.raises(StoreError) as refused:
        await _open(tmp_path)
    message = str(refused.value)
    assert "\n" not in message, message
    # Which of the two SQLite finds first (quick_check's rows, or a corrupt page while opening) depends on where
    # the damage fell in this schema's pages; either is the one line naming the file and what SQLite said.
    assert message.startswith((f"scheduler.store: {db} is damaged (quick_check: ",
                               f"scheduler.store: {db} is damaged (sqlite: ")), message
    assert message.endswith("); restore it from a backup, or move it aside (with its -wal and -shm files) "
                            "to start an empty store"), message
    assert _lock_is_free(Path(f"{db}.lock")), "a refused store holds no lock"

    # The same from the command line: one line, no traceback, nothing listening.
    rc, _, err = await cli(tmp_path, ["scheduler", "--listen", f"127.0.0.1:{free_port()}"],
                           {"NODE_AGENT_NODE__STATE_DIR": str(tmp_path)}, timeout=20)
    assert rc == 1 and err == f"node-agent: {message}\n", err


async def test_empty_file_starts_an_empty_store_with_a_warning(tmp_path: Path, caplog) -> None:
    db = tmp_path / "scheduler.db"
    db.write_bytes(b"")  # : > scheduler.db
    with caplog.at_level(logging.WARNING, logger="node_agent.scheduler.store"):
        store = await _open(tmp_path)
    try:
        assert await store.queue_depth() == 0
    finally:
        await store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"scheduler.store: {db} was an empty file: an empty store begins in it; if it held the "
                        "scheduler's jobs, they are gone (restore it from a backup)"], warnings

    # The store it became is a store: opened again, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="node_agent.scheduler.store"):
        store = await _open(tmp_path)
    await store.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_new_file_is_no_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="node_agent.scheduler.store"):
        store = await _open(tmp_path / "new")
    await store.close()
    assert (tmp_path / "new" / "scheduler.db").stat().st_size > 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
