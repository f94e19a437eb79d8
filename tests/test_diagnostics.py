"""Memory diagnostics (SIGUSR1 report) and the agent's allocator setting."""

from __future__ import annotations

import logging
import platform
import re
import signal
import tracemalloc

import pytest

from helpers import clip
from node_agent.mmap_tuning import pin_mmap_threshold
from node_agent.diagnostics import MemoryReport
from procs import free_port, http_json, job, submit, wait_for
from test_cluster import start_agent, start_scheduler

_kept: list[bytes] = []


def _grow() -> None:
    _kept.extend(bytes(1000) + bytes([i % 256]) for i in range(2000))  # ~2 MB retained at this line


def test_report_names_the_site_that_grew(caplog):
    report = MemoryReport()
    tracemalloc.start()
    try:
        with caplog.at_level(logging.INFO, logger="node_agent.diagnostics"):
            report()
            assert "baseline recorded" in caplog.text
            caplog.clear()
            _grow()
            report()
    finally:
        tracemalloc.stop()
        _kept.clear()
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory growth")]
    assert len(reports) == 1, reports
    top = reports[0].splitlines()[1]  # the site that grew most
    assert "test_diagnostics.py" in top, reports[0]
    grown_kib = float(re.search(r"\(\+([\d.]+) KiB\)", top).group(1))
    assert grown_kib > 1800, top


def test_report_without_tracing_says_how_to_turn_it_on(caplog):
    assert not tracemalloc.is_tracing()
    with caplog.at_level(logging.INFO, logger="node_agent.diagnostics"):
        MemoryReport()()
    assert "PYTHONTRACEMALLOC=1" in caplog.text and "gc objects" in caplog.text


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_mmap_threshold_is_pinned_on_glibc():
    assert pin_mmap_threshold() is True


async def test_sigusr1_reports_memory_and_the_agent_keeps_serving(tmp_path):
    sched, scheduler = await start_scheduler(tmp_path, free_port())
    agent = None
    try:
        # Tracing in the agent only: PYTHONTRACEMALLOC would also slow its plugin process several-fold.
        agent, url = await start_agent(tmp_path, "agent", scheduler, python_opts=("-X", "tracemalloc"))
        agent.signal(signal.SIGUSR1)
        await wait_for(lambda: "baseline recorded" in agent.log(), 30, "baseline")
        job_id = submit(scheduler, clip("jfk.flac"))
        await wait_for(lambda: job(scheduler, job_id)["state"] == "succeeded", 60, "job done")
        agent.signal(signal.SIGUSR1)
        await wait_for(lambda: "memory growth since the baseline" in agent.log(), 30, "growth report")
        # Ready at once on an idle machine; at load 11 one read answered 503 (its cause was not caught), so wait.
        await wait_for(lambda: http_json("GET", f"{url}/readyz")[0] == 200, 30, "ready after the report")
        assert agent.proc.returncode is None
    finally:
        if agent is not None:
            await agent.stop()
        await sched.stop()
