"""The real-PostgreSQL fixtures (tests/pg.py): a fresh database per test, and a private server a test can stop."""

from __future__ import annotations

import asyncio

import asyncpg
import pg
import pytest


async def test_pg_dsn_is_a_fresh_empty_database(pg_dsn: str, pg_server: pg.PgServer) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == pg_dsn.rsplit("/", 1)[1]
        assert await conn.fetchval("select count(*) from pg_tables where schemaname = 'public'") == 0
        await conn.execute("create table t (x int)")
    finally:
        await conn.close()
    # The password in the DSN is required over TCP: without it the server refuses.
    assert pg.PASSWORD in pg_dsn
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg_server.dsn(pg_dsn.rsplit("/", 1)[1], password=False))


async def test_pg_dsn_databases_are_separate(pg_server: pg.PgServer) -> None:
    first, second = pg_server.create_database("sep_a"), pg_server.create_database("sep_b")
    try:
        conn = await asyncpg.connect(first)
        await conn.execute("create table only_in_a (x int)")
        await conn.close()
        conn = await asyncpg.connect(second)
        assert await conn.fetchval("select to_regclass('only_in_a')") is None
        await conn.close()
    finally:
        pg_server.drop_database("sep_a")
        pg_server.drop_database("sep_b")


async def test_pg_private_stops_and_starts_with_its_data(pg_private: pg.PgServer) -> None:
    dsn = pg_private.create_database("keep")
    conn = await asyncpg.connect(dsn)
    await conn.execute("create table jobs (id text primary key)")
    await conn.execute("insert into jobs values ('j1')")
    await conn.close()
    port, datadir = pg_private.port, pg_private.datadir

    await pg_private.astop()  # immediate: like a crash, yet the committed row must survive
    with pytest.raises(OSError):  # ConnectionRefusedError, or OSError wrapping it (one per address tried)
        await asyncpg.connect(dsn, timeout=5)

    await pg_private.astart()
    assert (pg_private.port, pg_private.datadir) == (port, datadir)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetch("select id from jobs") == [("j1",)]
    finally:
        await conn.close()


async def test_pg_private_pause(pg_private: pg.PgServer) -> None:
    dsn = pg_private.dsn()
    pause = asyncio.create_task(pg_private.pause(2.0))
    refused = False
    while not pause.done():
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except OSError:
            refused = True
        except (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError):
            pass  # caught while the server was shutting down or starting up
        else:
            await conn.close()
        await asyncio.sleep(0.05)
    await pause
    assert refused, "the server never refused a connection while paused"
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("select 1") == 1
    await conn.close()
