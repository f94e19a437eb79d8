"""No statement the scheduler runs on SQLite reads a whole table that grows with the jobs kept.

Finished jobs stay for ``scheduler.job_retention_s`` (with their segments, reports and leases), so a statement that
scans ``jobs`` costs more the longer the scheduler runs, and on SQLite it holds the store's one writer meanwhile:
the reaping pass's assignment check scanned every job four times a second (2.8 ms a pass with 2,300 kept, in the
way of every claim; bench/scheduler.py's priority load found it). SQLite takes a partial index only for a query
that repeats the index's WHERE as written (``migrations.jobs_in``), which is easy to miss when writing one.

One run through every operation (nodes, claims, leases, events, results, re-queues, cancels, sections, operators'
views and commands, reaping passes) under SQLite's statement trace; each statement's plan is then asked for.
``nodes`` and ``store_clock`` may be read whole: they hold a row per node and one row.
"""

from __future__ import annotations

import base64
import re
import sqlite3
from pathlib import Path

from test_scheduler import HARDWARE
from test_sections_scheduler import SECOND, SLOTS, client_of, make, register, take
from test_store import close, serve

#: Tables whose rows come and go with jobs (kept for the retention time).
GROWING = ("jobs", "leases", "segments", "reports", "uploads", "audio_chunks")


def full_scans(db: sqlite3.Connection, statement: str) -> list[str]:
    """The plan's lines that read a growing table whole (no index, no rowid search)."""
    plan = db.execute("EXPLAIN QUERY PLAN " + statement).fetchall()
    # Aliases (``FROM jobs j``): the plan names a table by the name the query gave it.
    aliases = {alias: table for table, alias in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)\s+(?:AS\s+)?(\w+)", statement,
                                                            re.IGNORECASE)}
    bad = []
    for row in plan:
        detail = row[-1]
        m = re.fullmatch(r"SCAN (\w+)(?: AS \w+)?", detail)
        if m and aliases.get(m.group(1), m.group(1)) in GROWING:
            bad.append(detail)
    return bad


async def test_no_statement_scans_a_table_that_grows_with_the_jobs_kept(tmp_path: Path) -> None:
    h = await serve(f"sqlite:///{tmp_path / 'scheduler.db'}", tmp_path, job_retention_s=1.0)
    statements: list[str] = []
    store = h.running.store
    store.engine._conn.set_trace_callback(statements.append)
    client = client_of(h)
    try:
        a = await register(h, "node-a", labels={"rack": "1"})
        b = await register(h, "node-b", devices=SLOTS[:1])
        beat = {"state": "busy", "running_jobs": [], "cpu_percent": 1.0, "memory_used_bytes": 1,
                "memory_total_bytes": 2}
        assert (await h.call("PUT", f"/v1/nodes/{a}/heartbeat", json=beat))[0] == 200

        # Jobs of every kind (batch, interactive, asking for a model and labels), through both submission forms.
        done = await h.submit(SECOND)
        await h.submit(SECOND, priority="interactive")
        await h.submit(SECOND, labels={"rack": "1"}, model="tiny.en")
        status, body, _ = await h.call("POST", "/v1/jobs", json={
            "audio_b64": base64.b64encode(SECOND).decode(), "format": "pcm_s16le", "sample_rate": 16000},
            headers={"Idempotency-Key": "plans-1"})
        assert status == 202, body
        queued_cancel = await h.submit(SECOND)

        # A claim with its lease, renewed, events, a result; a failure that re-queues; a cancel while running.
        first, grant = await take(h, a, "cpu/0")
        lease = grant["lease"]
        assert (await h.renew(lease["lease_id"], a, lease["epoch"]))[0] == 200
        assert (await h.events(first, a, 1, lease, {"id": 1, "start": 0.0, "end": 1.0, "text": " a"}))[0] == 202
        assert (await h.result(first, a, 1, lease))[0] == 200
        second, grant2 = await take(h, a, "cpu/1")
        status, body = await h.result(second, a, 1, grant2["lease"], outcome="failed",
                                      error={"code": "worker_crashed", "message": "killed"})
        assert status == 200 and body["requeued"], body
        third, grant3 = await take(h, b, "cpu/0")
        # A section of the running job, its follow, then the running job cancelled (its sections with it).
        await make(client, third, grant3["lease"], 1)
        assert (await h.call("GET", f"/v1/jobs/{third}/sections", params={"wait_s": 0}))[0] == 200
        assert (await h.call("GET", f"/v1/jobs/{third}/capacity", params={"lease_id": grant3["lease"]["lease_id"]}))[0] == 200
        assert (await h.call("DELETE", f"/v1/jobs/{third}"))[0] == 200
        assert (await h.call("DELETE", f"/v1/jobs/{queued_cancel}"))[0] == 200
        status, body, _ = await h.call("DELETE", f"/v1/leases/{grant3['lease']['lease_id']}",
                                       json={"node_id": b, "epoch": grant3["lease"]["epoch"]})
        assert status in (204, 409), body

        # What clients and operators read; cordon, uncordon, a drain whose deadline passes.
        waiting = await h.submit(SECOND)
        for path, params in (("/v1/jobs", {}), ("/v1/jobs", {"state": "queued", "limit": 2}),
                             ("/v1/jobs", {"node": a, "state": "succeeded"}), (f"/v1/jobs/{done}", {}),
                             (f"/v1/jobs/{waiting}/audio", {}), ("/v1/cluster", {}), ("/v1/nodes", {}),
                             ("/metrics", {})):
            status, body, _ = await h.call("GET", path, params=params)
            assert status == 200, (path, body)
        for verb, body in (("cordon", None), ("uncordon", None), ("drain", {"deadline_s": 0})):
            status, reply, _ = await h.call("POST", f"/v1/nodes/{a}/{verb}", json=body)
            assert status == 200, (verb, reply)
        # A node registering again with its id (its assignments re-queued), then reaping passes: due leases and
        # assignments, the drain handed back, unservable marks, retention of the finished jobs.
        status, reply, _ = await h.call("POST", "/v1/nodes", json={
            "node_id": b, "agent_version": "0.1.0", "hostname": b, "hardware": HARDWARE, "devices": SLOTS})
        assert status == 201, reply
        for _ in range(3):
            await store.reap()
        store.engine._conn.set_trace_callback(None)

        with sqlite3.connect(tmp_path / "scheduler.db") as db:
            seen: dict[str, list[str]] = {}
            for statement in statements:
                head = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
                if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
                    continue
                bad = full_scans(db, statement)  # every statement can be planned (none is skipped unplanned)
                if bad:
                    seen[statement[:300]] = bad
        assert len(statements) > 100 and any("FROM jobs" in s for s in statements)
        assert not seen, "\n".join(f"{plan}: {sql}" for sql, plan in seen.items())
    finally:
        store.engine._conn.set_trace_callback(None)
        await client.close()
        await close(h)
