"""Shared fixtures. Tests use the real plugin process and the real tiny.en model."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from node_agent.config import Settings, load_settings
from node_agent.supervisor import Worker, WorkerObserver, WorkerState, worker_spec
import pg


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Defaults (no file, no environment) with test-friendly timings, then the given overrides."""
    data: dict[str, Any] = {
        "worker": {"stop_grace_s": 0.5, "start_timeout_s": 60,
                   "backoff": {"initial_s": 0.1, "max_s": 1.0, "min_uptime_s": 0}},
        # One worker (slot cpu/0) with 2 threads: tests that watch the worker or count its jobs stay the same on a
        # many-core machine, where auto would run several; tests/test_slots.py sets workers_per_device itself.
        "asr": {"model": "tiny.en", "device": "cpu", "cpu_threads": 2, "workers_per_device": 1},
        "log": {"level": "DEBUG"},
    }
    return Settings.model_validate(_merge(_merge(load_settings(None, {}).model_dump(), data), sections))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class RecordingObserver(WorkerObserver):
    """Records what the supervisor reports, and lets a test wait for a job to be under way."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.started = asyncio.Event()
        self.first_segment = asyncio.Event()

    def state_changed(self, worker, state):
        self.events.append(("state", state))

    def worker_restarted(self, worker, reason):
        self.events.append(("restart", reason))

    def job_started(self, worker, job, duration_s):
        self.events.append(("started", duration_s))
        self.started.set()

    def segment(self, worker, event):
        self.events.append(("segment", event))
        self.first_segment.set()


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture
async def worker_factory() -> AsyncIterator[Callable[..., Any]]:
    workers: list[Worker] = []

    async def make(settings: Settings | None = None, observer: WorkerObserver | None = None,
                   wait: bool = True) -> Worker:
        s = settings or make_settings()
        w = Worker("cpu", worker_spec(s.asr, "cpu", 0, log_level="WARNING"), s.worker, s.asr.timeout,
                   observer=observer)
        workers.append(w)
        await w.start()
        if wait:
            assert await w.wait_ready(90) is WorkerState.ready, w.last_error
        return w

    yield make
    for w in workers:
        await w.stop()


def _require_postgresql() -> None:
    if pg.available():
        return
    message = "PostgreSQL (initdb) not found; .ci/run installs the Debian postgresql package"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


_pg_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PgServer]:
    """One real PostgreSQL for the session (skipped without one, a failure under CI). Do not stop it."""
    _require_postgresql()
    with pg.PgServer() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: pg.PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN (with password) of a fresh empty database on the session's server, dropped after the test."""
    dbname = f"t{next(_pg_databases)}_" + re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    yield pg_server.create_database(dbname)
    pg_server.drop_database(dbname)


@pytest.fixture
def pg_private() -> Iterator[pg.PgServer]:
    """A started PostgreSQL of the test's own, which it may stop and start; deleted after the test."""
    _require_postgresql()
    with pg.PgServer() as server:
        yield server
