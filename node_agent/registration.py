"""Registration and heartbeats: this node's place in the cluster.

``Registration.run`` registers (retrying for as long as the agent lives), then waits until told the scheduler
forgot the node (404 ``unknown_node`` from a heartbeat or a poll) and registers again. ``run_heartbeats`` sends
one heartbeat per interval the scheduler asked for, each retried until the next is due. The lease bounds the
scheduler announces are handed to ``on_lease_bounds`` (the lease keepers clamp their requests into them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import psutil

from . import __version__
from .scheduler_client import SchedulerClient, SchedulerError, SchedulerUnavailable, UnknownNode
from .config import AsrSettings
from .metrics import AgentMetrics
from .retry import OutageLog, RetryPolicies, retrying
from .scheduler.schemas import RegisterResponse
from .statedir import StateDir
from .supervisor import Worker

log = logging.getLogger("node_agent.registration")


@dataclass
class NodeIdentity:
    """Who this node is to the scheduler, and whether it is registered right now."""

    node_id: str | None = None
    registered: bool = False
    heartbeat_interval_s: float = 5.0
    last_heartbeat_ok: float | None = None  # event-loop time
    registered_event: asyncio.Event = field(default_factory=asyncio.Event)


class Registration:
    """Registers this node, keeps it registered, and heartbeats; writes what it learns into ``identity``."""

    def __init__(self, client: SchedulerClient, identity: NodeIdentity, *, workers: Mapping[str, Worker],
                 asr: AsrSettings, facts: dict[str, Any], hostname: str, metrics: AgentMetrics,
                 heartbeat_state: Callable[[], dict[str, Any]], state: StateDir | None = None,
                 policies: RetryPolicies | None = None,
                 on_lease_bounds: Callable[[float, float], None] | None = None,
                 labels: Mapping[str, str] | None = None) -> None:
        """``labels``: the node's own (``node.labels``), sent with each registration; the scheduler adds each
        device's automatic ones (device_class, model, compute_type)."""
        self.client = client
        self.labels = dict(labels or {})
        self.identity = identity
        self.workers = workers
        self.asr = asr
        self.facts = facts
        self.hostname = hostname
        self.metrics = metrics
        self.state = state
        self.policies = policies or RetryPolicies()
        self._heartbeat_state = heartbeat_state
        self._on_lease_bounds = on_lease_bounds
        self._reregister = asyncio.Event()
        self._outages = OutageLog(log)

    def restore(self) -> None:
        """Take the node id and node secret kept from an earlier run, so the scheduler sees the same node again
        (and, where it checks tokens, lets it be that node)."""
        if self.state is not None:
            self.identity.node_id = self.state.load_node_id()
            self.client.node_secret = self.state.load_node_secret() if self.identity.node_id else None

    def body(self) -> dict[str, Any]:
        """The registration request: this node, its hardware and one device entry per worker (slot)."""
        devices = []
        for resource, worker in self.workers.items():
            info = worker.info
            devices.append({
                "resource": resource,  # a slot: cpu/0, gpu:0/1; each is leased on its own
                "device": resource.partition("/")[0],  # the physical device the slot runs on
                "plugin": "asr",
                "model": self.asr.model,
                "compute_type": info.get("compute_type") or self.asr.compute_type,
                "languages": info.get("languages", ["en"] if self.asr.model.endswith(".en") else None),
            })
        return {
            "node_id": self.identity.node_id,
            "agent_version": __version__,
            "hostname": self.hostname,
            "hardware": {
                "cpu_cores": psutil.cpu_count() or 0,
                "memory_bytes": psutil.virtual_memory().total,
                "gpus": self.facts.get("gpus", []),
            },
            "devices": devices,
            "labels": self.labels,
        }

    def reregister(self) -> None:
        """The scheduler no longer knows this node: register again."""
        self._reregister.set()

    async def run(self) -> None:
        """Register, stay registered, register again when asked; for the agent's life."""
        while True:
            reply = await self._register()
            self._adopt(reply)
            self._reregister.clear()
            await self._reregister.wait()
            self.identity.registered = False
            self.identity.registered_event.clear()
            self.metrics.registered.set(0)

    async def _register(self) -> RegisterResponse:
        # No total: registering is all a node can do. One line per distinct failure, not per retry.
        reply = await retrying(self.policies.register, "register", lambda: self.client.register(self.body()),
                               retry_if=SchedulerError, on_retry=self.metrics.count_retry,
                               on_error=lambda exc, _wait: self._outages.failed("registration", exc))
        self._outages.recovered("registration")
        return reply

    def _adopt(self, reply: RegisterResponse) -> None:
        ident = self.identity
        ident.node_id = reply.node_id
        ident.heartbeat_interval_s = reply.heartbeat_interval_s
        ident.registered = True
        ident.last_heartbeat_ok = asyncio.get_running_loop().time()
        if self._on_lease_bounds is not None:
            self._on_lease_bounds(reply.lease.min_ttl_s, reply.lease.max_ttl_s)
        if reply.node_secret is not None and self.state is not None:
            # (The client sends it from now on.) Saved before the id: an id on disk without its secret is a node
            # this agent can no longer be.
            self.state.save_node_secret(reply.node_secret)
        ident.registered_event.set()
        if self.state is not None:
            self.state.save_node_id(reply.node_id)
        self.metrics.registered.set(1)
        self.metrics.heartbeat_last_success.set(time.time())
        self.metrics.set_node(reply.node_id, self.hostname, [g.get("uuid") for g in self.facts.get("gpus", [])])
        log.info("registered with %s as %s (heartbeat every %.0f s)", self.client.base_url, reply.node_id,
                 reply.heartbeat_interval_s)

    async def run_heartbeats(self) -> None:
        """One heartbeat per interval while registered; for the agent's life."""
        while True:
            await self.identity.registered_event.wait()
            await asyncio.sleep(self.identity.heartbeat_interval_s)
            await self._beat()

    async def _beat(self) -> None:
        """One heartbeat, retried through a blip until the next one is due."""
        policy = self.policies.heartbeat
        interval = self.identity.heartbeat_interval_s
        policy = replace(policy, max_total_s=min(policy.max_total_s or interval, interval))
        with contextlib.suppress(SchedulerUnavailable):  # logged by _heartbeat_once; the next beat tries again
            await retrying(policy, "heartbeat", self._heartbeat_once, retry_if=SchedulerUnavailable,
                           on_retry=self.metrics.count_retry)

    async def heartbeat(self) -> None:
        """One heartbeat now, not retried (the node is draining: its state changed)."""
        with contextlib.suppress(SchedulerUnavailable):
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        """Send one heartbeat; raises ``SchedulerUnavailable`` when a retry may get through (any other failure is
        logged and left to the next beat)."""
        ident = self.identity
        if not ident.registered or ident.node_id is None:
            return
        mem = psutil.virtual_memory()
        body = {**self._heartbeat_state(), "cpu_percent": psutil.cpu_percent(interval=None),
                "memory_used_bytes": mem.total - mem.available, "memory_total_bytes": mem.total}
        try:
            await self.client.heartbeat(ident.node_id, body)
        except UnknownNode:
            log.warning("scheduler does not know node %s any more: registering again", ident.node_id)
            self.reregister()
            return
        except SchedulerError as exc:
            self._outages.failed("heartbeat", exc)
            # Only a scheduler that may answer differently soon is worth a retry; a refusal waits for the next beat.
            if isinstance(exc, SchedulerUnavailable):
                raise
            return
        self._outages.recovered("heartbeat")
        ident.last_heartbeat_ok = asyncio.get_running_loop().time()
        self.metrics.heartbeat_last_success.set(time.time())
