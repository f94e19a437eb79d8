"""The store engines' priority lane (db.py): a node's claim and an interactive submission go ahead of bulk writes.

Order of service, not timing: each test holds the engine's capacity (SQLite's one writer thread, PostgreSQL's pooled
connections) with transactions of its own, queues bulk and urgent work behind them, lets go, and reads the order.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from node_agent.scheduler.db import POOL_MAX, URGENT_RESERVED, Lanes, PostgresEngine, SqliteEngine


async def test_sqlite_urgent_operations_run_before_bulk_ones_queued_earlier(tmp_path: Path) -> None:
    engine = SqliteEngine(tmp_path / "s.db")
    await engine.open(lambda topic: None)
    held, release = threading.Event(), threading.Event()
    ran: list[str] = []

    async def hold(tx: Any) -> None:
        held.set()
        release.wait(10)  # the writer thread is busy with this transaction until the test lets go

    def op(name: str) -> Any:
        async def run(tx: Any) -> str:
            ran.append(name)
            return str(await tx.fetchval("SELECT $1", name))
        return run

    try:
        holding = asyncio.create_task(engine.run(hold))
        assert await asyncio.to_thread(held.wait, 10)
        queued = [asyncio.create_task(engine.run(op(name), urgent=name.startswith("claim")))
                  for name in ("submit-1", "submit-2", "claim-1", "submit-3", "claim-2")]
        await asyncio.sleep(0)  # every one is in the writer's queues, in this order
        release.set()
        answers = await asyncio.gather(holding, *queued)
    finally:
        release.set()
        await engine.close()
    assert answers[1:] == ["submit-1", "submit-2", "claim-1", "submit-3", "claim-2"]  # each answered its own
    assert ran == ["claim-1", "claim-2", "submit-1", "submit-2", "submit-3"]  # urgent first, each lane in order


async def test_sqlite_a_group_of_bulk_writes_under_way_commits_early_for_urgent_work(tmp_path: Path) -> None:
    engine = SqliteEngine(tmp_path / "s.db")
    await engine.open(lambda topic: None)
    gates = {name: threading.Event() for name in ("first", "second")}
    running = {name: threading.Event() for name in gates}
    ran: list[str] = []

    def op(name: str) -> Any:
        async def run(tx: Any) -> str:
            ran.append(name)
            if name in gates:  # holds the writer thread until the test lets go
                running[name].set()
                gates[name].wait(10)
            return name
        return run

    try:
        first = asyncio.create_task(engine.run(op("first")))
        assert await asyncio.to_thread(running["first"].wait, 10)
        # Queued while the writer is busy: the next group, started by "second".
        bulk = [asyncio.create_task(engine.run(op(name))) for name in ("second", "submit-1", "submit-2")]
        await asyncio.sleep(0)
        gates["first"].set()
        assert await asyncio.to_thread(running["second"].wait, 10)
        claim = asyncio.create_task(engine.run(op("claim"), urgent=True))  # arrives while that group runs
        await asyncio.sleep(0)
        gates["second"].set()
        answers = await asyncio.gather(first, *bulk, claim)
    finally:
        for gate in gates.values():
            gate.set()
        await engine.close()
    assert answers == ["first", "second", "submit-1", "submit-2", "claim"]
    assert ran == ["first", "second", "claim", "submit-1", "submit-2"]  # the group stopped after "second"


async def test_lanes_serve_urgent_waiters_first_and_keep_reserved_turns_from_bulk_work() -> None:
    lanes = Lanes(size=3, reserved=1)
    order: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    async def work(name: str, urgent: bool) -> None:
        gates[name] = asyncio.Event()
        async with lanes.turn(urgent, timeout=10):
            order.append(name)
            await gates[name].wait()

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    tasks = {name: asyncio.create_task(work(name, urgent)) for name, urgent in
             (("bulk-1", False), ("bulk-2", False), ("bulk-3", False))}
    await settle()
    assert order == ["bulk-1", "bulk-2"]  # the third turn is reserved: bulk-3 waits with one turn free
    tasks["claim-1"] = asyncio.create_task(work("claim-1", True))
    await settle()
    assert order[-1] == "claim-1" and lanes.busy == 3  # urgent work takes the reserved turn at once
    tasks["bulk-4"] = asyncio.create_task(work("bulk-4", False))
    tasks["claim-2"] = asyncio.create_task(work("claim-2", True))
    await settle()
    gates["bulk-1"].set()
    await settle()
    assert order[-1] == "claim-2"  # queued after bulk-3 and bulk-4, served before them
    gates["claim-1"].set()
    await settle()
    assert order[-1] == "bulk-3"  # bulk waiters in their order, once bulk work holds fewer than size - reserved
    gates["claim-2"].set()
    await settle()
    assert order[-1] == "bulk-3" and lanes.busy == 2  # a turn is free, but it is the reserved one: bulk-4 waits
    gates["bulk-2"].set()
    await settle()
    assert order == ["bulk-1", "bulk-2", "claim-1", "claim-2", "bulk-3", "bulk-4"]
    for name in ("bulk-3", "bulk-4"):
        gates[name].set()
    await asyncio.gather(*tasks.values())
    assert lanes.busy == lanes.busy_bulk == 0


async def test_lanes_a_waiter_that_gives_up_leaves_no_turn_taken() -> None:
    lanes = Lanes(size=1, reserved=0)
    release = asyncio.Event()

    async def hold() -> None:
        async with lanes.turn(False, timeout=10):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with lanes.turn(True, timeout=0.01):
            pytest.fail("given a turn that was held")
    cancelled = asyncio.create_task(hold())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await holder
    assert lanes.busy == 0
    async with lanes.turn(False, timeout=1):  # the turn is free again, nobody left queued for it
        assert lanes.busy == 1


async def test_postgresql_an_urgent_statement_runs_while_bulk_work_holds_every_other_connection(pg_dsn: str) -> None:
    engine = PostgresEngine(pg_dsn)
    await engine.open(lambda topic: None)
    bulk_may_end = asyncio.Event()
    started: list[int] = []

    async def bulk(tx: Any, i: int) -> None:
        started.append(i)
        await tx.fetchval("SELECT 1")
        await bulk_may_end.wait()  # holds its pooled connection, as a slow submit does

    try:
        holding = [asyncio.create_task(engine.run(lambda tx, i=i: bulk(tx, i)))
                   for i in range(POOL_MAX - URGENT_RESERVED + 1)]
        for _ in range(200):
            if len(started) == POOL_MAX - URGENT_RESERVED:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(started) == POOL_MAX - URGENT_RESERVED  # the last bulk transaction waits for a connection
        row = await asyncio.wait_for(engine.statement("SELECT 42 AS answer", urgent=True), 10)
        assert row is not None and row["answer"] == 42
        assert len(started) == POOL_MAX - URGENT_RESERVED  # bulk work still held, the waiting one still waiting
        bulk_may_end.set()
        await asyncio.gather(*holding)
        assert sorted(started) == list(range(POOL_MAX - URGENT_RESERVED + 1))
    finally:
        bulk_may_end.set()
        await engine.close()
