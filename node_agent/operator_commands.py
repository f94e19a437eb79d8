"""``node-agent cordon``, ``uncordon`` and ``drain``: an operator's hold on a node, through the scheduler.

With no NODE they act on this machine's agent: its node id from its ``/status`` (the agent that runs now), else
from its state directory (an agent stopped, or not answering). ``drain`` then waits, saying what still runs, until
no job is left on the node (finished, or handed back to the queue at the deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from .config import Settings, secret
from .errors import UsageError
from .scheduler.schemas import ClusterView, JobList, JobState, NodeView
from .scheduler_client import SchedulerClient
from .statedir import StateDir
from .status_render import AgentUnreachable, default_url, fetch_status
from .submit import scheduler_url

#: How often ``drain`` looks at the node's jobs, and says what still runs (every ``DRAIN_SAY_S``).
DRAIN_POLL_S = 0.25
DRAIN_SAY_S = 10.0
#: The states of a job that holds a node's slot.
HELD = (JobState.ASSIGNED, JobState.RUNNING)


class OperatorClient(SchedulerClient):
    """The scheduler's operator calls, with the failover and errors of every other call."""

    async def hold(self, node_id: str, action: str, deadline_s: float | None = None) -> NodeView:
        """``POST /v1/nodes/{id}/cordon|uncordon|drain``: the node as it is now."""
        body = {"deadline_s": deadline_s} if action == "drain" and deadline_s is not None else None
        status, data, headers = await self._call("POST", f"node_{action}", f"/v1/nodes/{node_id}/{action}",
                                                 body=body)
        if status == 200:
            return self._parse(NodeView, f"node_{action}", status, data)
        raise self._fail(f"node_{action}", status, data, headers)

    async def list_jobs(self, *, states: tuple[str, ...] = (), node_id: str | None = None, limit: int = 500,
                        after: str | None = None) -> JobList:
        """``GET /v1/jobs``: one page, newest first."""
        params: dict[str, Any] = {"limit": str(limit)}
        for key, value in (("state", ",".join(states)), ("node", node_id), ("after", after)):
            if value:
                params[key] = value
        status, data, headers = await self._call("GET", "job_list", "/v1/jobs", params=params)
        if status == 200:
            return self._parse(JobList, "job_list", status, data)
        raise self._fail("job_list", status, data, headers)

    async def cluster(self) -> ClusterView:
        """``GET /v1/cluster``."""
        status, data, headers = await self._call("GET", "cluster", "/v1/cluster")
        if status == 200:
            return self._parse(ClusterView, "cluster", status, data)
        raise self._fail("cluster", status, data, headers)


def operator_client(args: argparse.Namespace, settings: Settings) -> OperatorClient:
    """A client for ``--scheduler`` (or the settings' scheduler) with the settings' token, as ``submit`` has."""
    token = secret(settings.scheduler.token)
    return OperatorClient(scheduler_url(args, settings), token, settings.scheduler.request_timeout_s)


def local_node_id(settings: Settings) -> str:
    """This machine's agent's node id: from its ``/status``, else from its state directory."""
    token = secret(settings.http.token)
    try:
        node_id = (fetch_status(default_url(settings.http.listen), token=token).get("agent") or {}).get("node_id")
    except AgentUnreachable:
        node_id = None
    if not node_id:
        node_id = StateDir(settings.node.state_dir).load_node_id()
    if not node_id:
        raise UsageError(f"no NODE given, and this machine's agent has no node id (not at "
                         f"{default_url(settings.http.listen)}, none in {settings.node.state_dir}): name the node, "
                         "as `node-agent cluster` lists it")
    return str(node_id)


def _said(view: NodeView) -> str:
    hold = "cordoned" if view.cordoned else "schedulable"
    if view.drain_deadline_s is not None:
        hold += f", its jobs handed back in {view.drain_deadline_s:g} s"
    return f"node {view.node_id} ({view.hostname}, {view.state}): {hold}"


async def hold_node(args: argparse.Namespace, settings: Settings) -> int:
    """``cordon`` / ``uncordon`` / ``drain`` (``args.command``): 0 once done (a drain: once the node runs no job)."""
    action = args.command
    node_id = args.node or local_node_id(settings)
    async with operator_client(args, settings) as client:
        view = await client.hold(node_id, action, getattr(args, "deadline", None))
        print(_said(view), flush=True)
        if action != "drain":
            return 0
        return await _wait_drained(client, node_id)


async def _wait_drained(client: OperatorClient, node_id: str) -> int:
    said_at = -DRAIN_SAY_S
    said: list[str] | None = None
    while True:
        jobs = (await client.list_jobs(states=tuple(HELD), node_id=node_id)).jobs
        if not jobs:
            print(f"node {node_id}: drained: no jobs left on it (it stays cordoned until `node-agent uncordon "
                  f"{node_id}`)", flush=True)
            return 0
        running = [j.job_id for j in jobs]
        if running != said or time.monotonic() - said_at >= DRAIN_SAY_S:
            shown = ", ".join(running[:5]) + (f" and {len(running) - 5} more" if len(running) > 5 else "")
            print(f"node {node_id}: waiting for {len(running)} job(s): {shown}", flush=True)
            said, said_at = running, time.monotonic()
        await asyncio.sleep(DRAIN_POLL_S)
