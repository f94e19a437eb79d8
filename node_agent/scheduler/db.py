"""The two database engines under the scheduler's SQL store: SQLite on one writer thread, PostgreSQL through asyncpg.

The store's operations are written once, as ``async def op(tx)`` against ``Tx`` (``$1``-style parameters, the same SQL
for both engines but for the few ``Dialect`` fragments). ``Engine.run(op)`` runs one operation as one transaction:

- SQLite (stdlib ``sqlite3``, no extra dependency): every transaction runs on one dedicated thread, the only writer,
  so the event loop never waits on the disk and transactions never conflict. ``Tx`` calls there are synchronous, so
  the operation's coroutine is driven to its end on that thread in one step. WAL with ``synchronous=NORMAL``: a
  commit survives ``kill -9`` of the process (it is in the WAL, in the OS's cache) without an fsync per commit.
- PostgreSQL (asyncpg: asyncio-native, the binary protocol, and ``LISTEN``/``NOTIFY`` on a connection): a small pool;
  each operation on one pooled connection in a transaction, retried on a deadlock or serialization failure.
  Connection failures become ``StoreUnavailable`` (HTTP 503 with Retry-After), never a 500.

Both engines have a priority lane: ``run(op, urgent=True)`` (and PostgreSQL's ``statement(..., urgent=True)``) is for
the work a live job waits on, a node's claim and an interactive submission. On SQLite it goes ahead of every queued
operation, in a group of its own, and a group of bulk writes under way commits early for it; on PostgreSQL it is
served first when a pooled connection frees, and ``URGENT_RESERVED`` of the connections are kept from the other
work. Without the lane a claim queued behind a burst of batch submissions (each a transaction on the one writer or
the small pool) and waited for all of them. With it, on a loaded machine, an interactive job's queued_s p99 behind
1,000 batch jobs fell 3-10x; on an idle one the store's queue was no longer where it waited (docs/benchmarks.md,
issue 23). Urgent work is bounded by the nodes (one poll each) and the interactive queue's cap, so it cannot
starve the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Iterable, Mapping, Protocol, Sequence, TypeVar

from ..config import redact_dsn
from ..statedir import LockFailed, LockHeld, hold_lock
from .errors import StoreError, StoreUnavailable

log = logging.getLogger("node_agent.scheduler.store")

T = TypeVar("T")
Row = Mapping[str, Any]

#: PostgreSQL's NOTIFY channel for long-poll wake-ups across replicas.
CHANNEL = "node_agent_scheduler"
#: Transactions retried after a deadlock or serialization failure before the error is the caller's.
CONFLICT_RETRIES = 5
#: How long a request waits for a pooled PostgreSQL connection before answering 503.
ACQUIRE_TIMEOUT_S = 5.0
POOL_MAX = 8
#: Pooled PostgreSQL connections that only urgent work (``run(..., urgent=True)``) may take.
URGENT_RESERVED = 2


@dataclass(frozen=True)
class Dialect:
    name: str
    #: Row lock for a claim: other replicas skip the row instead of waiting for it.
    skip_locked: str
    #: ``column IN (<the strings of a JSON array parameter>)``, with the parameter's place as ``{p}``.
    json_strings: str


SQLITE = Dialect("sqlite", skip_locked="", json_strings="SELECT value FROM json_each({p})")
POSTGRESQL = Dialect(
    "postgresql",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    json_strings="SELECT jsonb_array_elements_text(CAST({p} AS jsonb))",
)


class Tx(Protocol):
    """One transaction. ``notify(topic)`` announces a change once the transaction commits (on every replica)."""

    dialect: Dialect

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def execute(self, sql: str, *args: Any) -> int: ...

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None: ...

    async def now(self) -> float: ...

    async def next_value(self, sequence: str) -> int: ...

    def notify(self, topic: str) -> None: ...


Op = Callable[[Tx], Awaitable[T]]


class Conflict(Exception):
    """A statement met a unique index (another request took the row first): from ``statement``, or from ``run``
    (PostgreSQL: the transaction was rolled back; run again, it sees the row)."""


class Engine(Protocol):
    dialect: Dialect
    where: str  # for messages: the store's location, password removed

    async def open(self, on_notify: Callable[[str], None]) -> None: ...

    async def close(self) -> None: ...

    async def run(self, op: Op[T], *, urgent: bool = False) -> T: ...


async def serialize(tx: Tx, key: int) -> None:
    """Make the transactions that call this with ``key`` run one after another, to their commit (PostgreSQL: a
    transaction-scoped advisory lock; SQLite's one writer runs them one at a time already)."""
    if tx.dialect is POSTGRESQL:
        await tx.execute(f"SELECT pg_advisory_xact_lock({int(key)})")


def sql_list(values: Iterable[str]) -> str:
    """``('a', 'b')``: constant names of this program's own (the states) for an SQL ``IN``."""
    return "(" + ", ".join(f"'{value}'" for value in values) + ")"


# ------------------------------------------------------------------------------------------------ locations


def sqlite_path(store: str, state_dir: Path | None) -> Path:
    """Where ``sqlite`` or ``sqlite:////abs/path.db`` puts the database."""
    if store == "sqlite":
        if state_dir is None:
            raise StoreError("scheduler.store: sqlite needs node.state_dir (or give sqlite:////absolute/path.db)")
        return state_dir / "scheduler.db"
    path = store[len("sqlite://"):]
    if not path.startswith("//"):
        raise StoreError(f"scheduler.store: {store!r}: give an absolute path as sqlite:////absolute/path.db")
    return Path(path[1:])


# --------------------------------------------------------------------------------------------------- SQLite

_DOLLAR = re.compile(r"\$(\d+)")


class _SqliteTx:
    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._clock = clock
        self.topics: list[str] = []

    @staticmethod
    def _sql(sql: str) -> str:
        return _DOLLAR.sub(r"?\1", sql)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(self._sql(sql), args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return self._conn.execute(self._sql(sql), args).fetchone()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._conn.execute(self._sql(sql), args).fetchone()
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any) -> int:
        return self._conn.execute(self._sql(sql), args).rowcount

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(self._sql(sql), args)

    async def now(self) -> float:
        # One process owns a SQLite store, so its wall clock is the store's clock (and survives a restart); tests
        # inject a fake one (SqliteEngine's clock) to drive expiry, reaping and deadlines.
        return self._clock()

    async def next_value(self, sequence: str) -> int:
        return self._conn.execute(
            "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value", (sequence,)
        ).fetchone()[0]

    def notify(self, topic: str) -> None:
        self.topics.append(topic)


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (every SQLite call in it is synchronous) to its end, here and now."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a SQLite store operation awaited something other than the database")


#: Most transactions one SQLite commit carries (each in a savepoint of its own).
GROUP_MAX = 64


@dataclass
class _Pending:
    op: Any
    future: asyncio.Future[Any]


class SqliteEngine:
    """SQLite on one writer thread, with group commit: the operations queued while a commit is under way run
    next, one after another, each in a savepoint of its own, and are committed together. Each operation sees the
    ones before it, as if they ran alone in that order; one that fails is rolled back alone; every answer waits
    for the commit that holds it. Under load this turns many small commits (each rewriting the same pages into
    the WAL) into one, and one hop to the writer thread and back serves the whole group."""

    dialect = SQLITE

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        """``path`` None: a database in memory (``scheduler.store: memory``), gone with the process."""
        self.path = path
        self.where = f"sqlite:///{path}" if path is not None else "memory"
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._on_notify: Callable[[str], None] = lambda topic: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Pending] = []
        self._urgent: list[_Pending] = []  # the priority lane: each group takes these first, and alone
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    def _hold(self) -> None:
        """Take ``scheduler.db.lock`` beside the file for this engine's life (``flock``, as ``node.state_dir``'s
        ``lock``: a crash leaves nothing stale), or raise StoreError naming who holds it. Two schedulers on one file
        would both write it, and neither would wake the long polls of the other."""
        assert self.path is not None
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self._lock_fd = hold_lock(lock)
        except LockHeld as held:
            raise StoreError(f"scheduler.store: {self.path} is in use by another scheduler ({held.holder} holds "
                             f"{lock}); give each scheduler its own store, or share one PostgreSQL store between "
                             "replicas") from None
        except LockFailed as failed:
            raise StoreError(f"scheduler.store: cannot {failed.step} {lock}: {failed.reason}") from None

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _damaged(self, detail: str) -> StoreError:
        return StoreError(f"scheduler.store: {self.path or self.where} is damaged ({detail}); restore it from a "
                          "backup, or move it aside (with its -wal and -shm files) to start an empty store")

    def _connect(self) -> None:
        if self.path is not None:
            self._hold()
        try:
            self._connect_held()
        except BaseException:
            self._release()
            raise

    def _connect_held(self) -> None:
        conn: sqlite3.Connection | None = None
        empty = False
        try:
            if self.path is not None:
                # 0 bytes: what `: > scheduler.db` leaves (SQLite takes it for a new database), or a crash before
                # the first write. A WAL beside it may still hold a store: only no tables after opening is empty.
                with contextlib.suppress(FileNotFoundError):
                    empty = self.path.stat().st_size == 0
            conn = sqlite3.connect(self.path if self.path is not None else ":memory:", isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # After a checkpoint the WAL is cut back to this, so one 200 MB upload does not leave a 200 MB file.
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.execute("PRAGMA busy_timeout=5000")
            # Temporary files on disk, not in memory: a savepoint's sub-journal and a statement journal hold every
            # page a DELETE changes, so dropping a 200 MB upload held ~200 MB of this process for good (issue 22).
            conn.execute("PRAGMA temp_store=FILE")
            # A read of the whole file would be needed to notice a corrupt one later; a quick check now names it,
            # and refuses it: each request that met the damage would answer 503, a fault no retry mends.
            found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(1)")]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] if empty else 1
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
                raise self._damaged(f"sqlite: {exc}") from None
            raise StoreError(f"scheduler.store: cannot open {self.where}: {exc}") from None
        if found != ["ok"]:
            conn.close()
            lines = [line.strip() for text in found for line in text.splitlines()]
            said = "; ".join(line for line in lines if line and not line.startswith("*** in database"))
            raise self._damaged(f"quick_check: {said}")
        if not tables:
            log.warning("scheduler.store: %s was an empty file: an empty store begins in it; if it held the "
                        "scheduler's jobs, they are gone (restore it from a backup)", self.path)
        self._conn = conn

    async def open(self, on_notify: Callable[[str], None]) -> None:
        self._on_notify = on_notify
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._connect)  # the same connection is then used by the writer thread alone
        self._thread = threading.Thread(target=self._writer, name="scheduler-sqlite", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            with self._lock:
                self._closing = True
                self._wake.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._release()  # after the connection: the next holder finds the file closed

    async def run(self, op: Op[T], *, urgent: bool = False) -> T:
        """``op`` as one transaction on the writer thread. ``urgent``: ahead of every operation queued without it,
        and committed in a group of urgent ones only, so it waits at most for the group under way."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closing or self._thread is None:
                raise StoreUnavailable("the scheduler store is closed")
            (self._urgent if urgent else self._pending).append(_Pending(op, future))
            self._wake.set()
        return await future

    def _writer(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                # Urgent work alone: a group shared with bulk writes would hold its answer until all of them ran
                # and committed.
                urgent = bool(self._urgent)
                if urgent:
                    batch, self._urgent = self._urgent[:GROUP_MAX], self._urgent[GROUP_MAX:]
                else:
                    batch, self._pending = self._pending[:GROUP_MAX], self._pending[GROUP_MAX:]
                # Once closing, the event stays set: a close() that came while a batch was queued must still end
                # this loop after that batch (clearing it here left the thread, and close's join, waiting for ever).
                if not self._pending and not self._urgent and not self._closing:
                    self._wake.clear()
                closing = self._closing and not batch
            if closing:
                return
            outcomes = self._commit(batch, urgent)
            if len(outcomes) < len(batch):  # cut short for urgent work: the rest go first among the bulk ones
                with self._lock:
                    self._pending[:0] = batch[len(outcomes):]
                    self._wake.set()
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver, outcomes)

    def _commit(self, batch: list[_Pending], urgent: bool) -> list[tuple[_Pending, Any, BaseException | None,
                                                                            list[str]]]:
        """Run ``batch`` in one transaction and commit it: an outcome per operation run. A bulk group stops early
        when urgent work is queued meanwhile (the operations not run are the caller's to queue again), so urgent
        work waits for one bulk operation and a commit, not for up to ``GROUP_MAX`` of them."""
        conn = self._conn
        assert conn is not None
        outcomes: list[tuple[_Pending, Any, BaseException | None, list[str]]] = []
        cut = len(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for i, item in enumerate(batch):
                if i and not urgent and self._urgent:  # (read without the lock: at worst one operation late)
                    cut = i
                    break
                tx = _SqliteTx(conn, self._clock)
                conn.execute("SAVEPOINT op")
                try:
                    result = _drive(item.op(tx))
                except BaseException as exc:  # noqa: BLE001  (handed to that operation's caller)
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    if isinstance(exc, sqlite3.OperationalError):
                        exc = StoreUnavailable(f"scheduler store {self.where}: {exc}")
                    outcomes.append((item, None, exc, []))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((item, result, None, tx.topics))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # the commit itself failed (disk full, I/O error): nothing of the group holds
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"scheduler store {self.where}: {exc}")
            return [(item, None, failure, []) for item in batch[:cut]]
        return outcomes

    def _deliver(self, outcomes: list[tuple[_Pending, Any, BaseException | None, list[str]]]) -> None:
        for item, result, error, topics in outcomes:
            for topic in topics:
                self._on_notify(topic)
            if item.future.done():  # its caller gave up (cancelled); the work is committed all the same
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)


# ----------------------------------------------------------------------------------------------- PostgreSQL


class _PgTx:
    dialect = POSTGRESQL

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.topics: list[str] = []

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._conn.fetch(sql, *args)  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._conn.fetchrow(sql, *args)  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(sql, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, args)

    async def now(self) -> float:
        # The database's clock, one for every replica: lease expiry never depends on a replica's clock.
        return float(await self._conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))

    async def next_value(self, sequence: str) -> int:
        return int(await self._conn.fetchval(f"SELECT nextval('{sequence}')"))

    def notify(self, topic: str) -> None:
        if topic not in self.topics:
            self.topics.append(topic)


def _pg_transient(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError,
            asyncpg.AdminShutdownError,
            asyncpg.InsufficientResourcesError,
        ),
    )


class Lanes:
    """Who takes the next of ``size`` pooled connections: urgent work before the rest, and ``reserved`` of them
    never taken by the rest, so a burst of bulk writes cannot hold every connection while a claim waits. (asyncpg's
    pool serves its waiters in arrival order, behind everything queued before them.)"""

    def __init__(self, size: int, reserved: int) -> None:
        if not 0 <= reserved < size:
            raise ValueError(f"reserved connections ({reserved}) must be fewer than the pool's ({size})")
        self.size = size
        self.reserved = reserved
        self.busy = 0  # connections taken through these lanes
        self.busy_bulk = 0  # of them, by work that is not urgent
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    def _free(self, urgent: bool) -> bool:
        return self.busy < self.size and (urgent or self.busy_bulk < self.size - self.reserved)

    def _take(self, urgent: bool) -> None:
        self.busy += 1
        if not urgent:
            self.busy_bulk += 1

    def _give_back(self, urgent: bool) -> None:
        self.busy -= 1
        if not urgent:
            self.busy_bulk -= 1
        for lane in (True, False):  # urgent waiters first; a bulk waiter only while no urgent one could go
            queue = self._waiting[lane]
            while queue and self._free(lane):
                turn = queue.popleft()
                if not turn.done():  # (a waiter that gave up)
                    self._take(lane)
                    turn.set_result(None)

    @contextlib.asynccontextmanager
    async def turn(self, urgent: bool, timeout: float) -> Any:
        """Hold a turn (a connection's worth) while the block runs; ``TimeoutError`` after ``timeout`` waiting."""
        ahead = self._waiting[True] or (not urgent and self._waiting[False])
        if not ahead and self._free(urgent):
            self._take(urgent)
        else:
            mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[urgent].append(mine)
            try:
                async with asyncio.timeout(timeout):
                    await mine
            except BaseException:
                if mine.done() and not mine.cancelled():
                    self._give_back(urgent)  # handed a turn just as it gave up: passed on
                elif mine in self._waiting[urgent]:
                    self._waiting[urgent].remove(mine)
                raise
        try:
            yield
        finally:
            self._give_back(urgent)


class PostgresEngine:
    """PostgreSQL through an asyncpg pool (its connections handed out by ``Lanes``), and one listening connection
    for wake-ups from other replicas."""

    dialect = POSTGRESQL

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self._pool: Any = None
        self._listener_task: asyncio.Task[None] | None = None
        self._on_notify: Callable[[str], None] = lambda topic: None
        self._on_reconnect: Callable[[], None] = lambda: None
        self._closing = False
        self._lanes = Lanes(POOL_MAX, URGENT_RESERVED)

    async def open(self, on_notify: Callable[[str], None], on_reconnect: Callable[[], None] | None = None) -> None:
        import asyncpg

        self._on_notify = on_notify
        if on_reconnect is not None:
            self._on_reconnect = on_reconnect
        try:
            # min_size=0: connections are made on demand, so a server that is down costs a 503 per request rather
            # than a pool logging a traceback every few seconds while it tries to keep a floor of connections.
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=0, max_size=POOL_MAX, timeout=ACQUIRE_TIMEOUT_S, command_timeout=30,
                reset=_no_reset,
            )
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:  # reachable now, or one line
                await conn.fetchval("SELECT 1")
        except Exception as exc:  # noqa: BLE001  (any failure to connect is one line naming the store)
            if self._pool is not None:
                self._pool.terminate()
            raise StoreError(f"scheduler.store: cannot connect to {self.where}: {_first_line(exc)}") from None
        self._listener_task = asyncio.create_task(self._listen(), name="scheduler-listen")

    async def close(self) -> None:
        self._closing = True
        if self._listener_task is not None:
            self._listener_task.cancel()
            try:
                await self._listener_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001  (a dead server: terminate instead)
                self._pool.terminate()

    async def _listen(self) -> None:
        """Hold a LISTEN connection; after it is lost, reconnect with backoff and wake every waiter (notifications
        sent meanwhile are gone, so everyone re-checks)."""
        import asyncpg

        delay = 0.2
        while not self._closing:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=ACQUIRE_TIMEOUT_S)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn: lost.set())
                await conn.add_listener(CHANNEL, lambda _c, _pid, _ch, payload: self._on_notify(payload))
                self._on_reconnect()
                delay = 0.2
                while not lost.is_set():
                    # A dead peer does not always close the socket: a cheap query every few seconds finds out.
                    try:
                        await asyncio.wait_for(lost.wait(), 5.0)
                    except asyncio.TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (every failure means: reconnect)
                log.warning("store notifications lost, reconnecting in %.1f s: %s", delay, _first_line(exc))
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def statement(self, sql: str, *args: Any, urgent: bool = False) -> Row | None:
        """One statement in a transaction of its own (no BEGIN or COMMIT round trips): its first row, or None.
        A unique-index violation is ``Conflict`` (the caller takes its general path); store errors and ``urgent``
        as ``run``."""
        import asyncpg

        async def op(conn: Any) -> Row | None:
            try:
                return await conn.fetchrow(sql, *args)  # type: ignore[no-any-return]
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(str(exc)) from None

        return await self._with_retries(op, urgent)

    async def run(self, op: Op[T], *, urgent: bool = False) -> T:
        """``op`` in one transaction; a unique-index violation in it (another transaction took the row first and
        committed) rolls it back and is ``Conflict``, for the caller to run it again and find that row. ``urgent``:
        the priority lane (``Lanes``)."""
        import asyncpg

        async def transaction(conn: Any) -> T:
            await conn.execute("BEGIN")
            try:
                tx = _PgTx(conn)
                result = await op(tx)
                # The wake-ups (delivered to every replica's listener when this commits) and the commit in one
                # round trip, as one simple query; the topics are this program's own ids, quoted.
                await conn.execute("".join(
                    f"SELECT pg_notify('{CHANNEL}', {_literal(t)});" for t in tx.topics) + "COMMIT")
            except BaseException as exc:
                if not conn.is_closed() and conn.is_in_transaction():
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                if isinstance(exc, asyncpg.UniqueViolationError):
                    raise Conflict(str(exc)) from None
                raise
            return result

        return await self._with_retries(transaction, urgent)

    async def _with_retries(self, work: Callable[[Any], Awaitable[T]], urgent: bool) -> T:
        """``work`` on a pooled connection, again after a deadlock or serialization failure; a lost server is
        ``StoreUnavailable``."""
        import asyncpg

        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                async with self._lanes.turn(urgent, ACQUIRE_TIMEOUT_S), \
                        self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                    return await work(conn)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == CONFLICT_RETRIES:
                    raise StoreUnavailable("the scheduler store kept reporting conflicts; retry", 1) from None
                await asyncio.sleep(0.005 * (attempt + 1))
            except Exception as exc:
                if _pg_transient(exc):
                    raise StoreUnavailable(f"scheduler store {self.where} unavailable: {_first_line(exc)}") from None
                raise
        raise AssertionError("unreachable")


async def _no_reset(conn: Any) -> None:
    """A pooled connection needs no reset between transactions: the store never LISTENs on one (the listener has
    its own), sets no session state, and takes only transaction-scoped advisory locks. asyncpg's default reset
    is one more round trip per transaction. Only a transaction left open (a cancelled operation) is rolled back."""
    if not conn.is_closed() and conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def engine_for(store: str, state_dir: Path | None, clock: Callable[[], float] | None = None) -> Engine:
    """The engine ``scheduler.store`` names. ``clock`` (SQLite only; tests) replaces the wall clock as the store's:
    PostgreSQL's clock is the database's own."""
    if store == "memory":
        return SqliteEngine(None, clock or time.time)
    if store == "sqlite" or store.startswith("sqlite:"):
        return SqliteEngine(sqlite_path(store, state_dir), clock or time.time)
    if clock is not None:
        raise ValueError("only a SQLite store takes an injected clock")
    if store.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(store)
    raise StoreError(f"scheduler.store: {store!r} is not sqlite, sqlite:////path.db or postgresql://...")


__all__ = [
    "CHANNEL",
    "Conflict",
    "Dialect",
    "Engine",
    "Lanes",
    "PostgresEngine",
    "Row",
    "SqliteEngine",
    "Tx",
    "engine_for",
    "redact_dsn",
    "serialize",
    "sql_list",
    "sqlite_path",
]
