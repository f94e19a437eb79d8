"""Which store holds the scheduler's state (``scheduler.store``), behind one asynchronous interface.

- ``sqlite`` (default; ``scheduler.db`` in ``node.state_dir``) or ``sqlite:////abs/path.db``: ``SqlStore`` on SQLite;
- ``postgresql://...``: ``SqlStore`` on PostgreSQL, shared by any number of replicas;
- ``memory``: the in-memory ``SchedulerState`` (nothing survives a restart; for tests and experiments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Callable, Union

from prometheus_client import CollectorRegistry

from ..config import SchedulerSettings
from .db import PostgresEngine, engine_for
from .metrics import SchedulerMetrics
from .schemas import (
    EventsReport,
    HeartbeatRequest,
    HeartbeatResponse,
    JobAssignment,
    JobSpec,
    JobView,
    LeaseGrant,
    LeaseRequest,
    NodeList,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    RenewResponse,
    ResultAck,
    ResultReport,
)
from .sqlstore import SqlStore, SqlUpload
from .state import SchedulerState


class MemoryUpload:
    """Audio for the in-memory store: it keeps every job's audio in memory anyway."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.data += data
        self.size += len(data)

    async def discard(self) -> None:
        self.data = bytearray()


class MemoryStore:
    """``SchedulerState`` behind the store interface."""

    where = "memory"
    #: Long polls are woken by every change (nothing to query): no periodic re-check needed.
    poll_s: float | None = None
    reap_s = 0.1

    def __init__(self, settings: SchedulerSettings, registry: CollectorRegistry) -> None:
        self.state = SchedulerState(settings, registry=registry)
        self.settings = settings

    async def close(self) -> None:
        pass

    async def register(self, req: RegisterRequest) -> RegisterResponse:
        return self.state.register(req)

    async def heartbeat(self, node_id: str, req: HeartbeatRequest) -> HeartbeatResponse:
        return self.state.heartbeat(node_id, req)

    async def list_nodes(self) -> NodeList:
        return self.state.list_nodes()

    async def begin_upload(self) -> MemoryUpload:
        return MemoryUpload()

    async def submit(self, spec: JobSpec, upload: Any, filename: str | None = None,
                     idempotency_key: str | None = None) -> tuple[str, str, bool]:
        audio = bytes(upload.data)
        replayed = idempotency_key is not None and self.state.submitted(
            idempotency_key, spec, len(audio), filename) is not None
        job = self.state.submit(spec, audio, filename, idempotency_key=idempotency_key)
        return job.job_id, job.state, replayed

    async def view_job(self, job_id: str) -> JobView:
        return self.state.view_job(job_id)

    async def job_settled(self, job_id: str, after_segment: int | None = None) -> bool:
        return self.state.job_settled(job_id, after_segment)

    async def job_audio(self, job_id: str) -> tuple[int, AsyncIterator[bytes]]:
        audio = self.state.job_audio(job_id)

        async def chunks() -> AsyncIterator[bytes]:
            yield audio

        return len(audio), chunks()

    async def assign_next(self, node_id: str, resource: str | None = None,
                          lease_ttl_s: float | None = None) -> JobAssignment | None:
        """(No lease here: the server grants it right after, with nothing in between on this store.)"""
        return self.state.assign_next(node_id, resource)

    async def post_events(self, job_id: str, report: EventsReport) -> None:
        self.state.post_events(job_id, report)

    async def report_result(self, job_id: str, report: ResultReport) -> ResultAck:
        return self.state.report_result(job_id, report)

    async def grant_lease(self, req: LeaseRequest) -> LeaseGrant:
        return self.state.grant_lease(req)

    async def renew_lease(self, lease_id: str, req: RenewRequest) -> RenewResponse:
        return self.state.renew_lease(lease_id, req)

    async def release_lease(self, lease_id: str) -> None:
        self.state.release_lease(lease_id)

    async def lease_state(self, lease_id: str) -> dict[str, Any] | None:
        lease = self.state.lease(lease_id)
        return None if lease is None else dict(vars(lease))

    async def queue_depth(self) -> int:
        return self.state.queue_depth()

    async def reap(self) -> None:
        self.state.tick()

    async def refresh_gauges(self) -> None:
        pass  # read from the state at scrape time


Store = Union[MemoryStore, SqlStore]
Upload = Union[MemoryUpload, SqlUpload]


async def open_store(
    settings: SchedulerSettings,
    registry: CollectorRegistry,
    state_dir: Path | None,
    on_change: Callable[[str], None],
    on_reconnect: Callable[[], None],
) -> Store:
    """Open (and migrate) the store ``settings.store`` names; changes are announced through ``on_change(topic)``.
    A store that cannot be used raises ``StoreError`` (one line)."""
    if settings.store_url == "memory":
        memory = MemoryStore(settings, registry)
        memory.state.add_listener(on_change)
        return memory
    engine = engine_for(settings.store_url, state_dir)
    holder: list[SqlStore] = []
    metrics = SchedulerMetrics(
        registry,
        lambda: (holder[0].queue_depth_seen, holder[0].node_states_seen),
        lambda: holder[0].load_seen,
    )
    store = SqlStore(settings, engine, metrics)
    holder.append(store)
    if isinstance(engine, PostgresEngine):
        await engine.open(on_change, on_reconnect)
    else:
        await engine.open(on_change)
    try:
        await store.open()
    except BaseException:
        await engine.close()
        raise
    return store
