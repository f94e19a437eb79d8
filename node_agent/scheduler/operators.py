"""Operators' hold on nodes (cordon, uncordon, drain with a deadline) and their read-only views of the cluster (the
job listing, the cluster summary), over the store.

The hold lives in the store (``nodes.cordoned``, ``nodes.drain_deadline``), so a scheduler restart or a replica
failover keeps it, and registering again does not clear it. Dispatch skips a cordoned node; the reaping pass
(``hand_back_drained``) hands a drained node's jobs back to the queue once its deadline passes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Callable, Sequence

from .db import Row, Tx, sql_list
from .errors import InvalidInput, NodeNotFound
from .migrations import jobs_in
from .nodes import node_view
from .schemas import (
    ClusterNode,
    ClusterView,
    JobList,
    JobSummary,
    NodeState,
    NodeView,
    Priority,
    QueueSummary,
    ReplicaInfo,
    RunningJob,
    SectionSummary,
    SlotView,
    stored_devices,
)
from .schemas import JobState as J
from .schemas import LeaseState as L
from .topics import QUEUE_TOPIC
from .transitions import StorePart, Transitions, section_summaries

log = logging.getLogger("node_agent.scheduler")

#: Nodes one cluster summary shows (by node id); its counts cover every node.
CLUSTER_NODES_MAX = 500
#: Running and assigned jobs one cluster summary shows (a node runs at most one per slot).
CLUSTER_JOBS_MAX = 5000
#: Models the queue's breakdown names (the busiest); the rest are summed up as ``other``.
QUEUE_MODELS_MAX = 50
#: The window of the summary's finished jobs.
FINISHED_WINDOW_S = 3600.0
#: Drained nodes one reaping pass hands back; the rest wait for the next pass.
DRAINS_PER_PASS = 50
#: The queue breakdown's name for jobs that asked for no model.
ANY_MODEL = "any"
OTHER_MODELS = "other"

_HELD = (J.ASSIGNED, J.RUNNING)


def _unknown(node_id: str) -> NodeNotFound:
    return NodeNotFound(f"node {node_id} is not known (never registered, or gone and forgotten)")


async def queue_groups(tx: Tx, now: float) -> list[tuple[str, str, int, float]]:
    """Queued jobs grouped as (priority, model or ``any``, count, oldest wait in seconds), the busiest models first,
    at most ``QUEUE_MODELS_MAX`` models (the rest as ``other``): the cluster summary's queue and the queue gauges."""
    rows = await tx.fetch(
        f"SELECT priority, model, COUNT(*) AS n, MIN(queued_at) AS oldest FROM jobs WHERE state = '{J.QUEUED}' "
        "GROUP BY priority, model")
    per_model: dict[str, int] = {}
    for r in rows:
        per_model[r["model"] or ANY_MODEL] = per_model.get(r["model"] or ANY_MODEL, 0) + int(r["n"])
    shown = set(sorted(per_model, key=lambda m: -per_model[m])[:QUEUE_MODELS_MAX])
    groups: dict[tuple[str, str], tuple[int, float]] = {}
    for r in rows:
        model = r["model"] or ANY_MODEL
        key = (str(r["priority"]), model if model in shown else OTHER_MODELS)
        count, wait = groups.get(key, (0, 0.0))
        groups[key] = (count + int(r["n"]), max(wait, now - r["oldest"]))
    return [(priority, model, count, round(wait, 3)) for (priority, model), (count, wait) in sorted(groups.items())]


async def hand_back_drained(tx: Tx, tr: Transitions, now: float) -> None:
    """Nodes whose drain deadline passed: their assigned and running jobs go back to the queue as their next
    attempt (the leases end, so the old holder's renewals and reports are refused), and the deadline is cleared;
    the node stays cordoned until an operator uncordons it."""
    for node in await tx.fetch(
        f"SELECT node_id FROM nodes WHERE drain_deadline <= $1 LIMIT {DRAINS_PER_PASS}{tx.dialect.skip_locked}", now
    ):
        node_id = node["node_id"]
        jobs = await tx.fetch(f"SELECT * FROM jobs WHERE node_id = $1 AND {jobs_in(_HELD)}", node_id)
        for job in jobs:
            await tr.requeue_or_fail(tx, job, now, "drained", "worker_unavailable",
                                     f"node {node_id} was drained: its drain deadline passed while the job ran")
        await tx.execute("UPDATE nodes SET drain_deadline = NULL WHERE node_id = $1", node_id)
        log.info("node drain deadline passed node_id=%s jobs_handed_back=%d", node_id, len(jobs))


class Operators(StorePart):
    """What an operator asks of the store (see the module's docstring)."""

    async def cordon(self, node_id: str) -> NodeView:
        """No new jobs for the node; what it runs goes on. A drain's deadline stays as it was."""
        return await self._hold(node_id, "cordoned = 1", lambda now: ())

    async def uncordon(self, node_id: str) -> NodeView:
        """Take the node back: no cordon, no drain deadline."""
        return await self._hold(node_id, "cordoned = 0, drain_deadline = NULL", lambda now: ())

    async def drain(self, node_id: str, deadline_s: float | None) -> NodeView:
        """Cordon the node, and hand back what still runs on it ``deadline_s`` from now (None: never; it runs to
        its end). A later drain replaces the deadline."""
        return await self._hold(node_id, "cordoned = 1, drain_deadline = $2",
                                lambda now: (now + deadline_s if deadline_s is not None else None,))

    async def _hold(self, node_id: str, assignments: str,
                    args: Callable[[float], tuple[float | None, ...]]) -> NodeView:
        async def op(tx: Tx) -> tuple[float, Row]:
            now = await tx.now()
            row = await tx.fetchrow(f"UPDATE nodes SET {assignments} WHERE node_id = $1 RETURNING *", node_id,
                                    *args(now))
            if row is None:
                raise _unknown(node_id)
            tx.notify(QUEUE_TOPIC)  # uncordoned: its polls may take queued jobs now
            return now, row

        now, row = await self.engine.run(op)
        self.replica.forget_served()
        view = node_view(row, now)
        log.info("node hold changed node_id=%s cordoned=%s drain_deadline_s=%s", node_id, view.cordoned,
                 view.drain_deadline_s)
        return view

    async def list_jobs(self, *, states: Sequence[J] | None = None, node_id: str | None = None,
                        client: str | None = None, limit: int = 500, after: str | None = None) -> JobList:
        """Up to ``limit`` jobs, newest first (by submission order), those submitted before job ``after`` when
        given; only ``client``'s when given (a client sees its own jobs alone)."""
        async def op(tx: Tx) -> tuple[float, list[Row], dict[str, list[SectionSummary]]]:
            where = ["1 = 1"]
            params: list[object] = []

            def param(value: object) -> str:
                params.append(value)
                return f"${len(params)}"

            if client is not None:
                where.append(f"client = {param(client)}")
            if after is not None:
                seq = await tx.fetchval("SELECT seq FROM jobs WHERE job_id = $1"
                                        + (" AND client = $2" if client is not None else ""),
                                        after, *([client] if client is not None else []))
                if seq is None:
                    raise InvalidInput(f"after: job {after} is not known (finished and forgotten?); list again "
                                       "without after", param="after")
                where.append(f"seq < {param(seq)}")
            if states:
                where.append(f"state IN {sql_list(states)}")  # JobState values: this program's own constants
            if node_id is not None:
                where.append(f"node_id = {param(node_id)}")
            rows = await tx.fetch(
                "SELECT job_id, state, priority, model, language, node_id, resource, attempt, filename, created_at, "
                "finished_at, error, parent_id, section, offset_s, sections_made FROM jobs "
                f"WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT {param(limit + 1)}",
                *params)
            return await tx.now(), rows, await section_summaries(tx, rows[:limit])

        now, rows, sections = await self.engine.run(op)
        more = len(rows) > limit
        rows = rows[:limit]
        return JobList(next_after=rows[-1]["job_id"] if more else None, jobs=[
            JobSummary(
                job_id=r["job_id"], state=r["state"], priority=r["priority"], model=r["model"],
                language=r["language"], node_id=r["node_id"], resource=r["resource"], attempt=r["attempt"],
                filename=r["filename"], created_age_s=round(now - r["created_at"], 3),
                finished_age_s=round(now - r["finished_at"], 3) if r["finished_at"] is not None else None,
                error_code=json.loads(r["error"]).get("code") if r["error"] else None,
                sections=sections.get(r["job_id"], []), parent_id=r["parent_id"], section=r["section"],
                offset_s=r["offset_s"],
            )
            for r in rows
        ])

    async def cluster(self, scheduler: str) -> ClusterView:
        """The cluster at a glance (``ClusterView``); ``scheduler`` is the URL this replica was reached at."""
        async def op(tx: Tx) -> tuple[float, list[Row], list[Row], list[Row], list[tuple[str, str, int, float]],
                                      list[Row]]:
            now = await tx.now()
            nodes = await tx.fetch("SELECT node_id, hostname, state, cordoned, drain_deadline, labels, devices, "
                                   f"last_heartbeat FROM nodes ORDER BY node_id LIMIT {CLUSTER_NODES_MAX}")
            counts = await tx.fetch("SELECT state, COUNT(*) AS n, SUM(cordoned) AS cordoned FROM nodes GROUP BY state")
            held = await tx.fetch(
                "SELECT j.job_id, j.node_id, j.state, j.resource, j.attempt, j.priority, j.assigned_at, "
                "l.granted_at, l.expires_at FROM jobs j "
                f"LEFT JOIN leases l ON l.lease_id = j.lease_id AND l.state = '{L.ACTIVE}' "
                f"WHERE {jobs_in(_HELD, 'j')} ORDER BY j.node_id, j.seq LIMIT {CLUSTER_JOBS_MAX}")
            finished = await tx.fetch("SELECT state, COUNT(*) AS n FROM jobs WHERE finished_at >= $1 GROUP BY state",
                                      now - FINISHED_WINDOW_S)
            return now, nodes, counts, held, await queue_groups(tx, now), finished

        now, nodes, counts, held, groups, finished = await self.engine.run(op)
        by_node: dict[str, list[Row]] = {}
        for job in held:
            by_node.setdefault(job["node_id"], []).append(job)
        oldest: dict[str, float] = {}
        by_model: dict[str, int] = {}
        per_priority = {p.value: 0 for p in Priority}
        for priority, model, count, wait in groups:
            per_priority[priority] = per_priority.get(priority, 0) + count
            by_model[model] = by_model.get(model, 0) + count
            oldest[priority] = max(oldest.get(priority, 0.0), wait)
        return ClusterView(
            scheduler=scheduler,
            replica=ReplicaInfo(hostname=socket.gethostname(), pid=os.getpid(), listen=self.settings.listen),
            nodes=[self._node(n, by_node.get(n["node_id"], []), now) for n in nodes],
            nodes_total=sum(int(c["n"]) for c in counts),
            nodes_by_state={str(c["state"]): int(c["n"]) for c in counts},
            nodes_cordoned=sum(int(c["cordoned"] or 0) for c in counts if c["state"] != NodeState.GONE),
            queue=QueueSummary(interactive=per_priority[Priority.INTERACTIVE], batch=per_priority[Priority.BATCH],
                               by_model=by_model, oldest_wait_s=max(oldest.values()) if oldest else None,
                               oldest_wait_s_by_priority=oldest),
            finished_last_hour={str(r["state"]): int(r["n"]) for r in finished},
            batch_max_wait_s=self.settings.batch_max_wait_s,
        )

    @staticmethod
    def _node(n: Row, jobs: list[Row], now: float) -> ClusterNode:
        busy = {j["resource"] for j in jobs if j["resource"] is not None}
        return ClusterNode(
            node_id=n["node_id"], hostname=n["hostname"], state=n["state"], cordoned=bool(n["cordoned"]),
            drain_deadline_s=round(max(0.0, n["drain_deadline"] - now), 3) if n["drain_deadline"] is not None
            else None,
            labels=json.loads(n["labels"]),
            slots=[SlotView(resource=d.resource, model=d.model, busy=d.resource in busy)
                   for d in stored_devices(n["devices"])],
            running_jobs=[RunningJob(
                job_id=j["job_id"], state=j["state"], resource=j["resource"], attempt=j["attempt"],
                priority=j["priority"],
                lease_age_s=round(now - (j["granted_at"] if j["granted_at"] is not None else j["assigned_at"]), 3),
                lease_expires_in_s=round(j["expires_at"] - now, 3) if j["expires_at"] is not None else None,
            ) for j in jobs],
            last_heartbeat_age_s=round(now - n["last_heartbeat"], 3),
        )
