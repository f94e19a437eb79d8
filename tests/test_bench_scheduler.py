"""The scheduler benchmark's driver (bench/scheduler.py) on a small cluster, so that it cannot rot unnoticed.

On the default store (SQLite): a real standalone scheduler, 20 fake nodes in their own process, 100 jobs per load;
every job must end exactly once with an accepted result, and the driver's numbers must be there and positive. A
few seconds here. The PostgreSQL configurations share this code but for the store's environment, the server the
driver starts and its replicas; tests/test_scheduler.py covers the store itself on PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from procs import run_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_scheduler_bench_small_cluster(tmp_path):
    raw, md = tmp_path / "scheduler.json", tmp_path / "scheduler.md"
    cmd = [sys.executable, str(ROOT / "bench" / "scheduler.py"), "--stores", "sqlite", "--nodes", "20", "--jobs", "100",
           "--warmup", "0",
           # Renew well inside the 50 ms decode, so the renewal path (node_id + epoch) is exercised too.
           "--renew-every-s", "0.02",
           "--json", str(raw), "--markdown", str(md), "--workdir", str(tmp_path / "logs")]
    run_script(cmd, ROOT, 150)

    res = json.loads(raw.read_text())
    assert [s["store"] for s in res["stores"]] == ["sqlite"]
    (store,) = res["stores"]
    # The row is the store it says: the scheduler logged a SQLite database in the bench's state directory.
    assert store["replicas"] == 1 and store["where"][0].endswith("/sqlite/state/scheduler.db"), store["where"]
    jobs = store["checks"]["jobs"]
    assert len(jobs) == 200  # two loads of 100
    for job_id, job in jobs.items():
        assert job["acks"] == 1 and job["state"] == "succeeded", (job_id, job)
    metrics = store["checks"]["metrics"]
    assert metrics["node_agent_scheduler_jobs_submitted_total"] == 200
    assert metrics["node_agent_scheduler_results_accepted_total"] == 200
    assert metrics["node_agent_scheduler_results_rejected_total"] == 0

    fast, paced = store["phases"]
    assert fast["offered_jobs_per_s"] is None and paced["offered_jobs_per_s"] == 200
    for phase in (fast, paced):
        assert phase["finished"] == phase["jobs"] == 100
        assert phase["wall_s"] > 0 and phase["jobs_per_s"] > 0
        assert 0 < phase["queued_p50_s"] <= phase["queued_p99_s"]
        assert 0 < phase["e2e_p50_s"] <= phase["e2e_p99_s"]
        # queued_s is the scheduler's clock, submit-to-result the driver's and the cluster's: a job cannot wait in
        # the queue longer than it took from submit to result, so neither can the percentiles.
        assert phase["queued_p99_s"] <= phase["e2e_p99_s"]
        assert phase["cores"]["scheduler"] > 0 and phase["cores"]["cluster"] > 0
        assert "database" not in phase["cores"]  # SQLite runs inside the scheduler's process

    stats = store["cluster_stats"]
    assert stats["registrations"] == 20 and stats["errors"] == 0
    assert stats["jobs"] == 200 and stats["renewals"] > 0
    table = md.read_text()
    assert "| sqlite | as fast as possible" in table and "| sqlite | 200 jobs/s offered" in table
    # The per-store summary row, with its verdicts (whichever they are on this machine).
    assert any(line.startswith("| sqlite ") and "throughput " in line and "latency " in line
               for line in table.splitlines())


def test_scheduler_bench_store_names():
    spec = importlib.util.spec_from_file_location("bench_scheduler", ROOT / "bench" / "scheduler.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while being made
    spec.loader.exec_module(bench)
    assert [(s.name, s.kind, s.replicas) for s in bench.parse_stores(bench.DEFAULT_STORES)] == [
        ("memory", "memory", 1), ("sqlite", "sqlite", 1), ("postgresql", "postgresql", 1),
        ("postgresql-2", "postgresql", 2)]
    for stores, message in (("mongo", "expected memory, sqlite, postgresql or postgresql-N"),
                            ("postgresql-x", "expected memory, sqlite, postgresql or postgresql-N"),
                            ("sqlite-2", "replicas need a shared store"),
                            ("sqlite,sqlite", "a store named twice")):
        with pytest.raises(ValueError, match=message):
            bench.parse_stores(stores)


@pytest.mark.timeout(120)
def test_scheduler_bench_priority_load_gives_up_when_no_backlog_builds(tmp_path):
    """The priority load measures interactive jobs behind a kept batch backlog; where the nodes take batch jobs as
    fast as they come, no backlog builds, and the driver says so after --phase-timeout-s instead of waiting for
    ever (it did, on a loaded machine)."""
    raw = tmp_path / "scheduler.json"
    cmd = [sys.executable, str(ROOT / "bench" / "scheduler.py"), "--stores", "sqlite", "--nodes", "5",
           "--loads", "priority", "--warmup", "0", "--interactive-jobs", "5", "--interactive-rate", "50",
           "--backlog", "100000", "--decode-s", "0.05", "--phase-timeout-s", "3",
           "--json", str(raw), "--workdir", str(tmp_path / "logs")]
    run_script(cmd, ROOT, 100, returncode=1)  # a store that failed to run
    (store,) = json.loads(raw.read_text())["stores"]
    assert "the batch backlog reached only" in store["error"] and "of 100000 queued within 3 s" in store["error"]
