"""Operators steer nodes (issue 23): cordon, uncordon and drain kept in the store, a drain's deadline handing the
node's jobs back, the job listing, the cluster summary and ``node-agent cluster`` / ``cordon`` / ``drain`` over a
real scheduler on loopback, and the queue and cordon metrics.

The deadline's timing runs on the fake clock (SQLite in memory, reaped as the server does); what must hold on
every store (kept across a reopen, handed back and fenced, listed and paged) runs over HTTP on SQLite and both
PostgreSQL paths.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from node_agent import cli, cluster_view
from node_agent.scheduler.errors import InvalidInput, NodeNotFound, ReportRejected
from node_agent.scheduler.schemas import ClusterView, JobSpec
from node_agent.statedir import NODE_ID_FILE
from test_scheduler import GPU_ANY, Harness, clocked, register, report, take
from test_store import close, serve, store  # noqa: F401  (store: the fixture, on every engine)

pytestmark = pytest.mark.timeout(60)

#: Fake nodes send no heartbeats: with this interval none of them goes gone during a test.
QUIET = {"heartbeat_interval_s": 120.0}


# ------------------------------------------------------------------------------- the store, on the fake clock


async def test_a_drain_hands_the_running_job_back_at_its_deadline_and_fences_the_old_holder() -> None:
    async with clocked(**QUIET) as (state, clock, registry):
        node = await register(state)
        job = (await state.submit(JobSpec(language="en"))).job_id
        _, grant = await take(state, node, ttl_s=120)
        view = await state.drain(node, 30.0)
        assert view.cordoned and view.drain_deadline_s == 30.0
        await state.advance(29)
        assert (await state.view_job(job)).state == "running"  # the deadline is not yet
        await state.advance(2)
        again = await state.view_job(job)
        assert (again.state, again.attempt, again.node_id) == ("queued", 2, None)
        assert await state.lease_is(grant.lease_id) == "released"
        with pytest.raises(ReportRejected):  # the old holder's result is refused: the lease ended with the drain
            await state.report_result(job, report(node, 1, grant))
        assert registry.get_sample_value("node_agent_scheduler_jobs_requeued_total", {"reason": "drained"}) == 1
        listed = (await state.list_nodes()).nodes[0]
        assert listed.cordoned and listed.drain_deadline_s is None  # handed back once; still cordoned
        # Registering again (a restarted agent) does not take the node back; uncordon does.
        await register(state, node_id=node)
        assert (await state.list_nodes()).nodes[0].cordoned
        view = await state.uncordon(node)
        assert not view.cordoned and view.drain_deadline_s is None


async def test_a_drain_without_a_deadline_lets_the_job_finish_and_cordon_keeps_a_deadline() -> None:
    async with clocked(**QUIET) as (state, clock, registry):
        node = await register(state)
        job = (await state.submit(JobSpec(language="en"))).job_id
        assignment, grant = await take(state, node, ttl_s=300)
        await state.drain(node, None)
        await state.advance(100)
        await state.report_result(job, report(node, assignment.attempt, grant))
        assert (await state.view_job(job)).state == "succeeded"
        # A cordon on a draining node keeps the drain's deadline; a later drain replaces it.
        await state.drain(node, 50.0)
        assert (await state.cordon(node)).drain_deadline_s == 50.0
        assert (await state.drain(node, 10.0)).drain_deadline_s == 10.0
        with pytest.raises(NodeNotFound):
            await state.cordon("node-000000000000")


async def test_a_client_lists_only_its_own_jobs() -> None:
    async with clocked(**QUIET) as (state, clock, registry):
        await register(state)
        mine: list[str] = []
        for client in ("app1", "app2", "app1"):
            upload = await state.store.begin_upload()
            await upload.write(b"audio")
            job_id, _, _ = await state.store.submit(JobSpec(language="en"), upload, client=client)
            if client == "app1":
                mine.append(job_id)
        assert [j.job_id for j in (await state.list_jobs(client="app1")).jobs] == mine[::-1]
        assert len((await state.list_jobs()).jobs) == 3  # an operator (no client scope) sees all
        others = [j.job_id for j in (await state.list_jobs()).jobs if j.job_id not in mine]
        with pytest.raises(InvalidInput):  # another client's job is no place to page from
            await state.list_jobs(client="app1", after=others[0])


def _view(**changes: Any) -> ClusterView:
    view = {"scheduler": "http://s:8470", "replica": {"hostname": "s", "pid": 1, "listen": "0.0.0.0:8470"},
            "nodes": [], "nodes_total": 2, "nodes_by_state": {"ready": 2}, "nodes_cordoned": 0,
            "queue": {"interactive": 0, "batch": 3, "by_model": {"any": 3}, "oldest_wait_s": 30.0,
                      "oldest_wait_s_by_priority": {"batch": 30.0}},
            "finished_last_hour": {}, "batch_max_wait_s": 600.0}
    return ClusterView.model_validate({**view, **changes})


@pytest.mark.parametrize("changes, degraded", [
    ({}, None),
    ({"nodes_by_state": {"ready": 1, "gone": 1}}, "1 node(s) gone"),
    ({"nodes_cordoned": 1}, "1 node(s) cordoned"),
    ({"nodes_total": 0, "nodes_by_state": {}}, "no live node"),
    ({"queue": {"interactive": 1, "batch": 0, "by_model": {"any": 1}, "oldest_wait_s": 601.0,
                "oldest_wait_s_by_priority": {"interactive": 601.0}}}, "past scheduler.batch_max_wait_s"),
])
def test_cluster_health(changes: dict[str, Any], degraded: str | None) -> None:
    reasons = cluster_view.health(_view(**changes))
    assert (reasons == []) if degraded is None else (len(reasons) == 1 and degraded in reasons[0]), reasons


# ------------------------------------------------------------------------------------- every store, over HTTP


async def _take(h: Harness, node: str, ttl_s: float = 60) -> dict[str, Any]:
    status, body, _ = await h.call("GET", f"/v1/nodes/{node}/jobs/next",
                                   params={"wait_s": 0, "lease_ttl_s": ttl_s})
    assert status == 200 and body["lease"] is not None, body
    return body


async def test_a_cordon_survives_a_restart_and_a_drain_hands_back_on_every_store(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path, **QUIET)
    try:
        node = await h.register()
        status, body, _ = await h.call("POST", f"/v1/nodes/{node}/cordon")
        assert status == 200 and body["cordoned"] is True and body["node_id"] == node, body
        status, body, _ = await h.call("POST", "/v1/nodes/node-nosuchnode/cordon")
        assert (status, body["error"]["code"]) == (404, "unknown_node")
        status, body, _ = await h.call("POST", f"/v1/nodes/{node}/drain", json={"deadline_s": -1})
        assert (status, body["error"]["code"]) == (400, "invalid_request") and "deadline_s" in body["error"]["message"]
    finally:
        await close(h)
    h = await serve(store, tmp_path, **QUIET)  # the same store, opened again: the cordon is kept
    try:
        status, body, _ = await h.call("GET", "/v1/nodes")
        assert body["nodes"][0]["cordoned"] is True, body
        await h.call("POST", f"/v1/nodes/{node}/uncordon")
        job = await h.submit()
        assignment = await _take(h, node)
        status, body, _ = await h.call("POST", f"/v1/nodes/{node}/drain", json={"deadline_s": 0})
        assert status == 200 and body["cordoned"] is True, body
        for _ in range(100):  # the next reaping pass (every 0.25 s) hands it back
            status, view, _ = await h.call("GET", f"/v1/jobs/{job}")
            if view["state"] == "queued":
                break
            await asyncio.sleep(0.05)
        assert (view["state"], view["attempt"]) == ("queued", 2), view
        status, _ = await h.result(job, node, 1, assignment["lease"])
        assert status in (409, 410)  # fenced: the drain ended its lease
    finally:
        await close(h)


async def test_the_job_listing_pages_newest_first_and_filters(store: str, tmp_path: Path) -> None:
    h = await serve(store, tmp_path, **QUIET)
    try:
        node = await h.register()
        jobs = [await h.submit() for _ in range(5)]
        await _take(h, node)  # the oldest job runs on the node
        seen: list[str] = []
        after = None
        for _ in range(3):
            params = {"limit": 2, **({"after": after} if after else {})}
            status, page, _ = await h.call("GET", "/v1/jobs", params=params)
            assert status == 200, page
            seen += [j["job_id"] for j in page["jobs"]]
            after = page["next_after"]
        assert seen == jobs[::-1] and after is None
        status, page, _ = await h.call("GET", "/v1/jobs", params={"state": "assigned,running", "node": node})
        assert [(j["job_id"], j["node_id"], j["priority"]) for j in page["jobs"]] == [(jobs[0], node, "batch")]
        status, page, _ = await h.call("GET", "/v1/jobs", params={"state": "queued"})
        assert [j["job_id"] for j in page["jobs"]] == jobs[:0:-1]
        for params, field in (({"state": "done"}, "state"), ({"limit": "x"}, "limit"),
                              ({"after": "job-gone-forgotten"}, "after"), ({"node": "a b"}, "node")):
            status, body, _ = await h.call("GET", "/v1/jobs", params=params)
            assert (status, body["error"]["code"]) == (400, "invalid_request") and field in body["error"]["message"]
    finally:
        await close(h)


async def test_the_cluster_summary_and_the_queue_metrics(tmp_path: Path) -> None:
    h = await serve(f"sqlite:///{tmp_path / 'scheduler.db'}", tmp_path, **QUIET)
    try:
        cpu = await h.register()
        gpu = await h.register(devices=[{**GPU_ANY, "resource": "gpu:0/0"}, {**GPU_ANY, "resource": "gpu:0/1"}])
        running = await h.submit(language="en")
        await _take(h, cpu)
        await h.submit(priority="interactive")
        await h.submit()
        await h.call("POST", f"/v1/nodes/{gpu}/drain", json={"deadline_s": 600})
        status, view, _ = await h.call("GET", "/v1/cluster")
        assert status == 200, view
        assert view["scheduler"] == h.url and view["replica"]["hostname"] == socket.gethostname()
        nodes = {n["node_id"]: n for n in view["nodes"]}
        assert nodes[cpu]["slots"] == [{"resource": "cpu", "model": "tiny.en", "busy": True}]
        assert [j["job_id"] for j in nodes[cpu]["running_jobs"]] == [running]
        assert nodes[cpu]["running_jobs"][0]["lease_age_s"] >= 0
        assert nodes[gpu]["cordoned"] and 590 < nodes[gpu]["drain_deadline_s"] <= 600
        assert [s["busy"] for s in nodes[gpu]["slots"]] == [False, False]
        queue = view["queue"]
        assert (queue["interactive"], queue["batch"], queue["by_model"]) == (1, 1, {"any": 2})
        assert queue["oldest_wait_s"] >= 0 and view["nodes_cordoned"] == 1 and view["nodes_total"] == 2
        status, text, _ = await h.call("GET", "/metrics")
        assert 'node_agent_scheduler_queued_jobs{model="any",priority="interactive"} 1.0' in text
        assert "node_agent_scheduler_nodes_cordoned 1.0" in text
        assert 'node_agent_scheduler_queue_oldest_wait_seconds{model="any",priority="batch"}' in text
    finally:
        await close(h)


# ---------------------------------------------------------------------------------------------------- the CLI


def _cli(args: list[str]) -> tuple[int, str, str]:
    """``node-agent ARGS`` in this process (its own event loop, on the caller's thread)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(args)
    return code, out.getvalue(), err.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cluster_cordon_and_drain_commands_and_their_exit_codes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node-agent.yaml"
    # No agent answers at http.listen: a command without NODE takes the node id from the state directory.
    config.write_text(f"node:\n  state_dir: {tmp_path / 'state'}\nhttp:\n  listen: 127.0.0.1:{_closed_port()}\n")
    monkeypatch.setenv("NODE_AGENT_CONFIG", str(config))
    h = await serve(f"sqlite:///{tmp_path / 'scheduler.db'}", tmp_path, **QUIET)
    try:
        node = await h.register()
        code, out, err = await asyncio.to_thread(_cli, ["cluster", "--scheduler", h.url, "--json"])
        assert code == 0, err
        doc = json.loads(out)
        assert doc["scheduler"] == h.url and doc["queue"] == {**doc["queue"], "interactive": 0, "batch": 0}
        assert [(n["node_id"], n["state"], n["cordoned"], n["running_jobs"]) for n in doc["nodes"]] == \
            [(node, "ready", False, [])]
        assert doc["nodes"][0]["slots"] == [{"resource": "cpu", "model": "tiny.en", "busy": False}]

        code, out, err = await asyncio.to_thread(_cli, ["cordon", node, "--scheduler", h.url])
        assert code == 0 and node in out and "cordoned" in out, (out, err)
        code, out, err = await asyncio.to_thread(_cli, ["cluster", "--scheduler", h.url])
        assert code == 1 and "cordoned" in out and h.url in out, (out, err)
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / NODE_ID_FILE).write_text(node + "\n")
        code, out, err = await asyncio.to_thread(_cli, ["uncordon", "--scheduler", h.url])
        assert code == 0 and f"node {node} (host-a, ready): schedulable" in out, (out, err)

        # A drain waits for the node's running job: handed back at its deadline, then it exits 0.
        job = await h.submit()
        await _take(h, node)
        code, out, err = await asyncio.to_thread(_cli, ["drain", node, "--deadline", "0.5", "--scheduler", h.url])
        assert code == 0 and "waiting for 1 job(s)" in out and "drained: no jobs left" in out, (out, err)
        status, view, _ = await h.call("GET", f"/v1/jobs/{job}")
        assert (view["state"], view["attempt"]) == ("queued", 2), view

        code, out, err = await asyncio.to_thread(_cli, ["cordon", "node-nosuchnode", "--scheduler", h.url])
        assert code == 1 and "unknown_node" in err and "\n" not in err.strip(), err
    finally:
        await close(h)
    code, out, err = await asyncio.to_thread(_cli, ["cluster", "--scheduler", f"127.0.0.1:{_closed_port()}"])
    assert code == 2 and "cannot reach" in err, (out, err)


def test_status_names_the_scheduler_replica_in_use() -> None:
    from node_agent import status_render
    from test_status_cli import healthy_doc

    doc = healthy_doc()
    doc["agent"].update(scheduler_url="http://10.0.0.5:8470,http://10.0.0.6:8470",
                        scheduler_in_use="http://10.0.0.6:8470")
    text = status_render.render(doc, 120)
    assert "scheduler  http://10.0.0.6:8470 (in use), of http://10.0.0.5:8470,http://10.0.0.6:8470" in text, text
    doc["agent"].update(scheduler_url="http://10.0.0.5:8470", scheduler_in_use="http://10.0.0.5:8470")
    assert "scheduler  http://10.0.0.5:8470 (in use)\n" in status_render.render(doc, 120)
