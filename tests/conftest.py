"""Shared fixtures. Tests use the real plugin process and the real tiny.en model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

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


@contextlib.asynccontextmanager
async def _real_workers() -> AsyncIterator[Callable[..., Any]]:
    """make(settings, observer, wait) starts a real plugin worker (slot cpu/0); all are stopped on the way out."""
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

    try:
        yield make
    finally:
        for w in workers:
            await w.stop()


@pytest.fixture
async def worker_factory() -> AsyncIterator[Callable[..., Any]]:
    async with _real_workers() as make:
        yield make


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def module_worker_factory() -> AsyncIterator[Callable[..., Any]]:
    """``worker_factory`` for workers a module's tests share (each started once; the tests that use them run on
    the module's event loop: ``@pytest.mark.asyncio(loop_scope="module")``)."""
    async with _real_workers() as make:
        yield make


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


# ----- timing under load -------------------------------------------------------------------------------------------

#: Seconds a core of the reference machine (the 2-core CI kind, idle) takes for _spin(): the best of many runs there.
_SPIN_REFERENCE_S = 0.009
#: A deadline is stretched at most this much: a test that would pass only past it fails, however loaded the machine.
MAX_SLOWDOWN = 6.0


def _spin() -> float:
    started = time.perf_counter()
    x = 0
    for i in range(200_000):
        x += i * i
    return time.perf_counter() - started


def machine_slowdown() -> float:
    """How many times slower than the idle reference machine this one runs *now*, between 1 and MAX_SLOWDOWN.

    Measured, not configured: the larger of (a) a fixed piece of CPU work timed now (median of 5) against its time
    on the reference machine, which catches a slower CPU and runnable threads outnumbering the cores right now, and
    (b) the last minute's load average per core, which catches load that came and went while the test waited
    (the other test workers under ``make test``'s ``-n 3`` decoding, say). A test multiplies the part of a bound that
    is the machine's (scheduling and process start, not the protocol's own seconds) by it; on an idle reference
    machine that is 1, the bound as written.
    """
    spun = statistics.median(_spin() for _ in range(5)) / _SPIN_REFERENCE_S
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    loaded = os.getloadavg()[0] / cores
    return min(MAX_SLOWDOWN, max(1.0, spun, loaded))


# ----- order and grouping under pytest-xdist (make test: -n 3 --dist loadgroup) --------------------------------

#: Seconds the longest tests take under `make test` (-n 2 on a 2-core machine; -n 3 since 2026-12-08 stretches
#: them alike, so their order holds), by name (parameters included),
#: from --durations; any other is taken as OTHER_S. Under xdist the longest start first, so the run does not end
#: with one long test on one worker while the other idles. A test missing here (renamed, new) only starts later;
#: refresh the table from `make test`'s --durations when the longest tests change.
OTHER_S = 1.0
ESTIMATED_S: dict[str, float] = {
    "test_each_endpoint_in_turn_fails_every_way_and_the_agent_recovers": 60,
    "test_throughput_bench_tiny_run": 38,
    "test_sixty_jobs_four_clients_two_worker_kills": 33,
    "test_mandarin_read_aloud_as_a_stream_of_utterances": 24,
    "test_two_agents_twenty_jobs_exactly_one_result_each": 22,
    "test_partition_mid_job_self_fences_within_the_renew_deadline": 22,
    "test_kill9_of_the_embedded_scheduler_loses_and_doubles_no_job": 20,
    "test_english_read_aloud_as_a_stream_of_utterances": 12,
    "test_two_jobs_run_at_once_on_two_slots_each_with_its_own_lease": 16,
    "test_scheduler_restarted_mid_job_keeps_the_lease_and_the_job_finishes": 16,
    "test_sigusr1_reports_memory_and_the_agent_keeps_serving": 16,
    "test_postgresql_stopped_10_s_mid_job_costs_nothing": 16,
    "test_paused_holder_is_fenced_and_the_job_completes_elsewhere": 15,
    "test_a_long_healthy_job_keeps_its_lease_with_the_cap_below_and_above_the_request": 15,
    "test_retention_reaping_4_jobs_of_100_mb_stays_within_a_fixed_memory_bound": 15,
    "test_mandarin_is_simplified_by_default_traditional_on_request_and_as_good_as_plain": 15,
    "test_worker_that_never_becomes_ready_is_fatal_and_the_node_degraded": 14,
    "test_batched_jobs_match_faster_whispers_pipeline_stream_and_keep_absolute_times": 12,
    "test_sigterm_during_a_job_drains_releases_and_exits_zero[30-finishes]": 11,
    "test_busy_is_503_and_over_time_is_504_with_the_decode_stopped": 8,
    "test_kill9_of_one_postgresql_replica_mid_run_loses_and_doubles_no_job": 13,
    "test_stalled_multipart_upload_gets_408_and_its_partial_upload_is_discarded": 13,
    "test_stalled_json_bodies_get_408_in_time_and_are_dropped": 13,
    "test_json_output_is_real_utf8": 13,
    "test_scheduler_down_at_agent_start_registers_once_it_is_up": 12,
    "test_a_slots_worker_killed_fails_only_its_own_job": 12,
    "test_mandarin_read_aloud_as_one_job": 12,
    "test_english_read_aloud_as_one_job": 12,
    "test_token_required_sent_and_never_shown": 12,
    "test_a_200_mb_upload_and_download_stay_within_a_fixed_memory_bound": 12,
    "test_transcribe_prints_one_bad_audio_line": 11,
    "test_a_job_past_its_deadline_is_stopped_and_counted_as_a_timeout_not_a_restart": 6,
    "test_short_ttl_lease_is_renewed_through_a_long_job": 10,
    "test_scheduler_restart_agent_registers_again_and_keeps_serving": 10,
    "test_two_replica_processes_never_give_a_job_to_two_nodes": 9,
    "test_segments_stream_before_the_final_message": 9,
    "test_quick_failures_go_fatal_and_are_retried_with_a_doubling_delay": 9,
    "test_status_shows_the_running_job_and_its_lease": 5,
    "test_a_job_past_its_deadline_stops_between_segments_and_the_worker_stays": 9,
    "test_status_of_a_healthy_agent": 5,
    "test_per_audio_timeout_applies_after_the_audio_length_is_known": 9,
    "test_run_with_embedded_scheduler_submit_and_openai_endpoint": 8,
    "test_truncated_audio_through_every_entry_point": 8,
    "test_batched_false_overrides_the_threshold": 7,
    "test_idle_and_trickling_bodies_hold_no_place_and_get_408": 6,
    "test_status_of_an_agent_with_a_fatal_worker": 6,
    "test_the_agent_refuses_to_start_workers_that_cannot_fit": 6,
    "test_bad_files_through_transcribe": 6,
    "test_kills_back_off_like_crashes_and_a_success_resets_the_streak": 6,
    "test_a_worker_dying_soon_after_ready_goes_fatal_and_stays_fatal_through_retries": 6,
    "test_second_sigterm_exits_at_once": 6,
    "test_status_when_nothing_listens": 6,
    "test_a_running_job_keeps_its_lease_across_a_failover_between_replicas": 5,
    "test_bad_audio_fails_the_job_not_the_worker": 5,
    "test_a_short_jobs_segments_come_with_its_result_and_events_faults_never_meet_it": 5,
    "test_bad_audio_through_the_job_api_and_openai_endpoint": 5,
    "test_sigterm_during_a_job_drains_releases_and_exits_zero[0.5-shutdown]": 5,
    "test_a_job_waiting_for_a_restarting_worker_says_what_it_waits_for": 5,
    "test_second_agent_on_the_same_state_dir_exits_at_once": 5,
    "test_the_renew_deadline_stands_still_only_while_the_store_is_paused[store_unavailable-False]": 5,
    # tests/test_sections.py (issue 24), estimated from runs under load (not yet from make test's --durations)
    "test_a_long_job_is_split_over_two_slots_and_reads_as_one_decode": 14,
    "test_the_sections_of_a_job_without_a_language_decode_in_the_one_section_0_found": 15,
    "test_the_parents_deadline_ends_the_following": 12,
    "test_a_section_the_scheduler_refuses_is_decoded_on_the_parents_slot": 10,
    "test_a_section_lost_with_its_node_is_run_again_and_the_parent_completes": 8,
    "test_cancelling_the_parent_stops_following_its_sections": 8,
    "test_a_full_cluster_does_not_split": 8,
    "test_a_section_failed_for_good_fails_the_parent_naming_it": 6,
    "test_the_plugin_cuts_at_a_pause_and_decodes_section_0": 6,
    # tests/test_slots.py's lone-job worker (issue 24), from make test's --durations on fresh clones
    "test_a_lone_job_decodes_on_every_core_and_a_job_beside_it_on_its_slot": 14,
    "test_the_lone_job_worker_killed_costs_its_one_job_and_comes_back": 10,
}


def _wide_fixtures(item: pytest.Item) -> tuple[str, ...]:
    """The module-, class- or package-scoped fixtures an item uses (not session ones: those are per worker)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return ()
    return tuple(sorted({name for name, defs in info.name2fixturedefs.items() for d in defs
                         if d.scope in ("module", "class", "package")}))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (a worker: PYTEST_XDIST_WORKER set): the tests that share a module-scoped fixture (an agent, a
    loaded model) form one xdist_group, run together on one worker, set up once; and the work units, groups and
    single tests, are ordered longest first. Every worker computes the same order (xdist checks), and with
    ``--dist loadgroup --no-loadscope-reorder`` the controller hands them out in it. A run without xdist keeps
    the files' order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        wide = _wide_fixtures(item)
        if wide:
            group = item.nodeid.split("::")[0] + ":" + ",".join(wide)
            item.add_marker(pytest.mark.xdist_group(group))
            units.setdefault(group, []).append(item)
        else:
            units[item.nodeid] = [item]

    def estimate(unit: list[pytest.Item]) -> float:
        return sum(ESTIMATED_S.get(item.name, OTHER_S) for item in unit)

    ordered = sorted(units.values(), key=estimate, reverse=True)  # stable: ties keep the collection order
    items[:] = [item for unit in ordered for item in unit]
