"""A real Prometheus scrapes a real agent and its embedded scheduler after a real job.

Needs the ``prometheus`` binary (Debian package ``prometheus``): skipped when it is missing on a developer
machine, a failure when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from helpers import clip
from stack import agent_stack
from procs import free_port

pytestmark = pytest.mark.timeout(90)

#: How long Prometheus gets to start and scrape what we look for.
SCRAPE_WAIT_S = 30.0


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK)
                                           else None)
    if found is None:
        reason = "the prometheus binary is not installed (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure")
        pytest.skip(reason)
    return found



def target(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def scrape_config(agent_url: str, scheduler_url: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "node-agent", "static_configs": [{"targets": [target(agent_url)]}]},
            {"job_name": "node-scheduler", "static_configs": [{"targets": [target(scheduler_url)]}]},
        ],
    }


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    """Instant query; [] while Prometheus is not up yet or has nothing."""
    try:
        async with session.get(base + "/api/v1/query", params={"query": promql},
                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
            if resp.status != 200:
                return []
            body = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return []
    assert body.get("status") == "success", body
    return list(body["data"]["result"])


def value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_scrapes_agent_and_scheduler(tmp_path: Path) -> None:
    binary = prometheus_binary()
    async with agent_stack(tmp_path, log={"level": "INFO"}) as s:
        job_id = await s.submit_file(clip("jfk.flac"), filename="jfk.flac")
        view = await s.wait_job(job_id, timeout=60)
        assert view["state"] == "succeeded", view
        await s.wait_counted("succeeded")

        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(s.http.url, s.scheduler.url)))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            async with aiohttp.ClientSession() as session:
                loop = asyncio.get_running_loop()
                give_up = loop.time() + SCRAPE_WAIT_S

                async def until(promql: str, ok: Any) -> list[dict[str, Any]]:
                    """Query until ``ok(result)``; both targets are scraped on their own schedules."""
                    result: list[dict[str, Any]] = []
                    while loop.time() < give_up:
                        assert proc.returncode is None, f"prometheus exited: {log_path.read_text()[-2000:]}"
                        result = await query(session, base, promql)
                        if result and ok(result):
                            return result
                        await asyncio.sleep(0.5)
                    raise AssertionError(f"{promql}: not as expected within {SCRAPE_WAIT_S:g} s (last {result}); "
                                         f"prometheus log: {log_path.read_text()[-2000:]}")

                result = await until("node_agent_asr_segment_conversion_seconds_count", lambda r: value(r) >= 1)
                assert result[0]["metric"]["job"] == "node-agent"
                assert result[0]["metric"]["model"] == "tiny.en" and result[0]["metric"]["device"] == "cpu/0"
                await until('up{job="node-agent"}', lambda r: value(r) == 1.0)
                await until('up{job="node-scheduler"}', lambda r: value(r) == 1.0)
                scheduler_jobs = await until('node_agent_scheduler_jobs_total{job="node-scheduler"}', bool)
                by_outcome = {r["metric"]["outcome"]: float(r["value"][1]) for r in scheduler_jobs}
                assert by_outcome.get("succeeded") == 1.0, by_outcome
                assert value(await query(
                    session, base, 'node_agent_jobs_total{job="node-agent",outcome="succeeded"}')) == 1.0
                assert value(await query(
                    session, base, 'node_agent_jobs_total{job="node-agent",outcome="timeout"}')) == 0.0
                # Histogram buckets survive the trip, so quantiles work on the server side.
                quantile = await query(session, base, "histogram_quantile(0.5, sum by (le) "
                                                      "(node_agent_asr_realtime_factor_bucket))")
                assert quantile and 0 < float(quantile[0]["value"][1]) < 10, quantile
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
