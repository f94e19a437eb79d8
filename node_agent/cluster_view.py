"""``node-agent cluster``: the scheduler's ``GET /v1/cluster`` as a page (or ``--json``), and its health as the exit
status: 0 healthy, 1 degraded (a node gone or cordoned, no live node, a queue waiting past its bound), 2 the
scheduler could not be asked.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from .config import Settings
from .jsonio import dumps
from .operator_commands import operator_client
from .scheduler.schemas import ClusterNode, ClusterView, NodeState
from .scheduler_client import SchedulerError
from .status_render import terminal_width, duration, pack

EXIT_HEALTHY, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 2
#: Running jobs listed under one node on the page (all are in --json).
JOBS_SHOWN = 8


def health(view: ClusterView) -> list[str]:
    """Why the cluster is degraded, one line each; empty when healthy."""
    reasons: list[str] = []
    gone = view.nodes_by_state.get(NodeState.GONE, 0)
    live = view.nodes_total - gone
    if gone:
        reasons.append(f"{gone} node(s) gone (missed their heartbeats)")
    if view.nodes_cordoned:
        named = [n.node_id for n in view.nodes if n.cordoned and n.state != NodeState.GONE][:5]
        reasons.append(f"{view.nodes_cordoned} node(s) cordoned: {', '.join(named)}")
    if not live:
        reasons.append("no live node: nothing can run a job")
    wait = view.queue.oldest_wait_s
    if wait is not None and wait > view.batch_max_wait_s:
        reasons.append(f"the oldest queued job has waited {duration(wait)}, past scheduler.batch_max_wait_s "
                       f"({duration(view.batch_max_wait_s)})")
    return reasons


def _node_lines(n: ClusterNode, width: int) -> list[str]:
    hold = "cordoned" if n.cordoned else ""
    if n.drain_deadline_s is not None:
        hold += f", drain hands back in {duration(n.drain_deadline_s)}"
    busy = sum(1 for s in n.slots if s.busy)
    models = sorted({s.model for s in n.slots})
    head = [n.node_id, n.hostname, n.state.value.upper() if n.state == NodeState.GONE else n.state.value]
    head += [hold] if hold else []
    head += [f"slots {busy}/{len(n.slots)} busy", "model " + ", ".join(models) if models else "no slots"]
    if n.labels:
        head.append("labels " + ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())))
    out = pack(head, width, first="  ", indent="      ", max_lines=3)
    for job in n.running_jobs[:JOBS_SHOWN]:
        expires = f", expires in {duration(job.lease_expires_in_s)}" if job.lease_expires_in_s is not None else ""
        out.append(f"      {job.job_id} {job.resource or '-'} {job.state.value} attempt {job.attempt} "
                   f"{job.priority.value}, lease {duration(job.lease_age_s)} old{expires}")
    if len(n.running_jobs) > JOBS_SHOWN:
        out.append(f"      ... and {len(n.running_jobs) - JOBS_SHOWN} more")
    return out


def render(view: ClusterView, reasons: list[str], width: int) -> str:
    label = "%-10s "
    r = view.replica
    out = [label % "scheduler" + f"{view.scheduler} (answered by {r.hostname}, pid {r.pid}, listen {r.listen})"]
    states = ", ".join(f"{state} {count}" for state, count in sorted(view.nodes_by_state.items()))
    out.append(label % "nodes" + f"{view.nodes_total}" + (f" ({states})" if states else "")
               + (f", {view.nodes_cordoned} cordoned" if view.nodes_cordoned else ""))
    for n in view.nodes:
        out.extend(_node_lines(n, width))
    if len(view.nodes) < view.nodes_total:
        out.append(f"  ... and {view.nodes_total - len(view.nodes)} more (GET /v1/nodes pages through them all)")
    q = view.queue
    wait = f", oldest waiting {duration(q.oldest_wait_s)}" if q.oldest_wait_s is not None else ""
    models = ", ".join(f"{m} {c}" for m, c in sorted(q.by_model.items(), key=lambda mc: -mc[1]))
    out.append(label % "queue" + f"interactive {q.interactive}, batch {q.batch}{wait}"
               + (f"; by model: {models}" if models else ""))
    done = ", ".join(f"{state} {count}" for state, count in sorted(view.finished_last_hour.items())) or "none"
    out.append(label % "last hour" + done)
    out.append(label % "health" + ("healthy" if not reasons else "DEGRADED"))
    out.extend(f"{' ' * 11}- {reason}" for reason in reasons)
    return "\n".join(out) + "\n"


async def _fetch(args: argparse.Namespace, settings: Settings) -> tuple[str, ClusterView]:
    async with operator_client(args, settings) as client:
        view = await client.cluster()
        return client.base_url, view


def cluster_command(args: argparse.Namespace, settings: Settings, run: Any) -> int:
    """``node-agent cluster [--scheduler URL] [--json]``; ``run`` runs a coroutine to its end (the CLI's loop)."""
    try:
        url, view = run(_fetch(args, settings))
    except SchedulerError as exc:  # refused, unreachable, or an answer that is not a cluster view
        # No view to judge the cluster by, whatever the reason: the status is "unreachable", the line says which.
        what = "the scheduler refused its cluster view" if exc.status is not None else \
            "cannot reach the scheduler for its cluster view"
        print(f"node-agent: {what}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    # The URL this command used: the replica that answered (of a --scheduler list, the one failed over to).
    view.scheduler = url
    reasons = health(view)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    if args.json:
        doc: dict[str, Any] = view.model_dump(mode="json")
        doc["health"] = {"status": "degraded" if reasons else "healthy", "reasons": reasons}
        print(dumps(doc, indent=2))
    else:
        sys.stdout.write(render(view, reasons, terminal_width()))
    sys.stdout.flush()
    return EXIT_DEGRADED if reasons else EXIT_HEALTHY
