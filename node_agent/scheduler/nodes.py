"""Nodes in the store: registered (again), heartbeating, listed."""

from __future__ import annotations

import json
import logging
import secrets

from .db import Row, Tx
from .schemas import (
    NODES_PAGE_MAX,
    Hardware,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseBounds,
    NodeList,
    NodeView,
    RegisterRequest,
    RegisterResponse,
)
from .schemas import NodeState as N
from .identity import check_registration, issue_secret
from .topics import QUEUE_TOPIC
from .transitions import StorePart, devices_of, doc

log = logging.getLogger("node_agent.scheduler")


class Nodes(StorePart):
    """The nodes' side of the store that is not about jobs."""

    async def register(self, req: RegisterRequest, secret: str | None = None, *,
                       fenced: bool = False) -> RegisterResponse:
        """Register (again): ``secret`` is the node secret the request came with; where ``fenced`` (the scheduler
        checks tokens), a node that has one is refused without it. The answer carries a new secret on a node's
        first registration."""
        node_id = req.node_id or f"node-{secrets.token_hex(6)}"
        issued: list[str] = []
        devices = json.dumps([d.model_dump(mode="json") for d in req.devices])
        labels = json.dumps(req.labels, sort_keys=True)  # as the single statements compare it

        async def op(tx: Tx) -> bool:
            now = await tx.now()
            issued.clear()  # the op may run again (a conflict): only its last run's secret was kept
            await check_registration(tx, node_id, secret, fenced)
            known = await tx.fetchval("SELECT state FROM nodes WHERE node_id = $1", node_id)
            if known is not None and known != N.GONE:
                # A live node registering again is a new agent process (an agent registers once at start, and
                # after a 404 for a node that went gone): what its previous process held is void now, rather than
                # blocking its devices until the TTL runs out.
                await self.tr.release_node(tx, node_id, now, "restarted")
            await tx.execute(
                f"""INSERT INTO nodes (node_id, hostname, agent_version, hardware, devices, registered_at,
                       last_heartbeat, state, running_jobs, cpu_percent, memory_used_bytes, memory_total_bytes, gone_at,
                       labels)
                   VALUES ($1, $2, $3, $4, $5, $6, $6, '{N.READY}', '[]', 0, 0, 0, NULL, $7)
                   ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,
                       agent_version = excluded.agent_version, hardware = excluded.hardware,
                       devices = excluded.devices, labels = excluded.labels, registered_at = excluded.registered_at,
                       last_heartbeat = excluded.last_heartbeat, state = '{N.READY}', running_jobs = '[]',
                       gone_at = NULL""",
                node_id, req.hostname, req.agent_version, doc(req.hardware), devices, now, labels,
            )
            if (fresh := await issue_secret(tx, node_id, secret, fenced)) is not None:
                issued.append(fresh)
            tx.notify(QUEUE_TOPIC)  # new capacity: queued jobs it serves may go now
            return known is not None

        known = await self.engine.run(op)
        self.replica.forget_served()
        self.replica.remember_devices(node_id, devices, labels)
        self.metrics.node_seen(node_id)
        log.info("node registered node_id=%s hostname=%s devices=%s%s", node_id, req.hostname,
                 ",".join(d.resource for d in req.devices) or "-", " (again)" if known else "")
        s = self.settings
        return RegisterResponse(
            node_id=node_id,
            heartbeat_interval_s=s.heartbeat_interval_s,
            lease=LeaseBounds(min_ttl_s=s.lease_min_ttl_s, max_ttl_s=s.lease_max_ttl_s),
            node_secret=issued[0] if issued else None,
        )

    async def heartbeat(self, node_id: str, req: HeartbeatRequest) -> HeartbeatResponse:
        if self._fast is not None and await self._fast.heartbeat(
                node_id, req.state, json.dumps(req.running_jobs), float(req.cpu_percent), req.memory_used_bytes,
                req.memory_total_bytes):
            return HeartbeatResponse(heartbeat_interval_s=self.settings.heartbeat_interval_s)

        async def op(tx: Tx) -> None:
            now = await tx.now()
            changed = await tx.execute(
                f"""UPDATE nodes SET last_heartbeat = $2, state = $3, running_jobs = $4, cpu_percent = $5,
                       memory_used_bytes = $6, memory_total_bytes = $7
                   WHERE node_id = $1 AND state <> '{N.GONE}'""",
                node_id, now, req.state, json.dumps(req.running_jobs), float(req.cpu_percent),
                req.memory_used_bytes, req.memory_total_bytes,
            )
            if not changed:
                await self.tr.live_node(tx, node_id)  # raises, naming why

        await self.engine.run(op)
        return HeartbeatResponse(heartbeat_interval_s=self.settings.heartbeat_interval_s)

    async def list_nodes(self, limit: int = NODES_PAGE_MAX, after: str | None = None) -> NodeList:
        """Up to ``limit`` nodes in node id order, those after node id ``after``; ``next_after`` when more follow.
        (Keyset paging: a page costs the same however many nodes come before it.)"""
        async def op(tx: Tx) -> tuple[float, list[Row]]:
            rows = await tx.fetch("SELECT * FROM nodes WHERE node_id > $1 ORDER BY node_id LIMIT $2", after or "",
                                  limit + 1)
            return await tx.now(), rows

        now, rows = await self.engine.run(op)
        more = len(rows) > limit
        rows = rows[:limit]
        return NodeList(next_after=rows[-1]["node_id"] if more else None, nodes=[node_view(r, now) for r in rows])


def node_view(r: Row, now: float) -> NodeView:
    """A node's row as ``GET /v1/nodes`` (and the operators' cordon and drain) answer it."""
    return NodeView(
        node_id=r["node_id"],
        hostname=r["hostname"],
        agent_version=r["agent_version"],
        state=r["state"],
        hardware=Hardware.model_validate(json.loads(r["hardware"])),
        devices=devices_of(r["devices"]),
        labels=json.loads(r["labels"]),
        running_jobs=json.loads(r["running_jobs"]),
        last_heartbeat_age_s=round(now - r["last_heartbeat"], 3),
        registered_age_s=round(now - r["registered_at"], 3),
        cordoned=bool(r["cordoned"]),
        drain_deadline_s=round(max(0.0, r["drain_deadline"] - now), 3) if r["drain_deadline"] is not None else None,
    )
