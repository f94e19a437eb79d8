"""The scheduler benchmark's driver (bench/scheduler.py) on a small cluster, so that it cannot rot unnoticed.

A real standalone scheduler, 20 fake nodes in their own process, 100 jobs per load: every job must end exactly
once with an accepted result, and the driver's numbers must be there and positive. A few seconds here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_scheduler_bench_small_cluster(tmp_path):
    raw, md = tmp_path / "scheduler.json", tmp_path / "scheduler.md"
    cmd = [sys.executable, str(ROOT / "bench" / "scheduler.py"), "--nodes", "20", "--jobs", "100", "--warmup", "0",
           # Renew well inside the 50 ms decode, so the renewal path (node_id + epoch) is exercised too.
           "--renew-every-s", "0.02",
           "--json", str(raw), "--markdown", str(md), "--workdir", str(tmp_path / "logs")]
    # A session of its own: if the driver hangs, its scheduler and cluster go with it.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"bench/scheduler.py did not finish in 150 s:\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out}\n{err[-3000:]}"

    res = json.loads(raw.read_text())
    jobs = res["checks"]["jobs"]
    assert len(jobs) == 200  # two loads of 100
    for job_id, job in jobs.items():
        assert job["acks"] == 1 and job["state"] == "succeeded", (job_id, job)
    metrics = res["checks"]["metrics"]
    assert metrics["node_agent_scheduler_jobs_submitted_total"] == 200
    assert metrics["node_agent_scheduler_results_accepted_total"] == 200
    assert metrics["node_agent_scheduler_results_rejected_total"] == 0

    fast, paced = res["phases"]
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

    stats = res["cluster_stats"]
    assert stats["registrations"] == 20 and stats["errors"] == 0
    assert stats["jobs"] == 200 and stats["renewals"] > 0
    table = md.read_text()
    assert "| in-memory | as fast as possible" in table and "| in-memory | 200 jobs/s offered" in table
