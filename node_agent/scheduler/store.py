"""The scheduler's store: the interface the HTTP face calls (``Store``), and the one that opens it from
``scheduler.store``.

There is one store, ``SqlStore``, on one of three locations:
- ``sqlite`` (default; ``scheduler.db`` in ``node.state_dir``) or ``sqlite:////abs/path.db``: a SQLite file;
- ``postgresql://...``: PostgreSQL, shared by any number of replicas;
- ``memory``: SQLite in memory (nothing survives a restart; for tests and experiments), the same code as the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from prometheus_client import CollectorRegistry

from ..config import SchedulerSettings
from .db import PostgresEngine, engine_for
from .metrics import SchedulerMetrics
from .schemas import (
    ClusterView,
    JobList,
    JobState,
    NodeView,
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
    SectionSummary,
    SectionView,
)
from .sqlstore import SqlStore


class Upload(Protocol):
    """Audio being received for a job not yet submitted."""

    size: int

    async def write(self, data: bytes) -> None: ...

    async def discard(self) -> None: ...


class Store(Protocol):
    """What the scheduler's HTTP face asks of its state. Each call is one transaction; refusals are typed errors
    (``scheduler.errors``) that the server turns into statuses."""

    #: Where the state lives, for messages (a PostgreSQL password removed).
    where: str
    #: How often the server runs ``reap``.
    reap_s: float
    #: How often a long poll re-checks without a wake-up.
    poll_s: float | None

    async def close(self) -> None: ...

    async def register(self, req: RegisterRequest, secret: str | None = None, *,
                       fenced: bool = False) -> RegisterResponse: ...

    async def node_secret(self, *, node_id: str | None = None, lease_id: str | None = None,
                          job_id: str | None = None) -> tuple[str | None, str | None]: ...

    async def job_client(self, job_id: str) -> str | None: ...

    async def heartbeat(self, node_id: str, req: HeartbeatRequest) -> HeartbeatResponse: ...

    async def list_nodes(self, limit: int = ..., after: str | None = None) -> NodeList: ...

    async def begin_upload(self) -> Upload: ...

    async def submit(self, spec: JobSpec, upload: Any, filename: str | None = None,
                     idempotency_key: str | None = None) -> tuple[str, str, bool]: ...

    async def view_job(self, job_id: str) -> JobView: ...

    async def cancel_job(self, job_id: str, by: str, client: str | None = None) -> str | None: ...

    async def job_settled(self, job_id: str, after_segment: int | None = None) -> bool: ...

    async def job_audio(self, job_id: str) -> tuple[int, AsyncIterator[bytes]]: ...

    async def assign_next(self, node_id: str, resource: str | None = None, lease_ttl_s: float | None = None,
                          on_held_back: Callable[[], None] | None = None) -> JobAssignment | None: ...

    async def post_events(self, job_id: str, report: EventsReport) -> None: ...

    async def report_result(self, job_id: str, report: ResultReport) -> ResultAck: ...

    async def grant_lease(self, req: LeaseRequest) -> LeaseGrant: ...

    async def renew_lease(self, lease_id: str, req: RenewRequest) -> RenewResponse: ...

    async def release_lease(self, lease_id: str) -> None: ...

    async def lease_state(self, lease_id: str) -> dict[str, Any] | None: ...

    async def queue_depth(self) -> int: ...

    async def reap(self) -> None: ...

    async def refresh_gauges(self) -> None: ...

    async def cordon(self, node_id: str) -> NodeView: ...

    async def uncordon(self, node_id: str) -> NodeView: ...

    async def drain(self, node_id: str, deadline_s: float | None) -> NodeView: ...

    async def list_jobs(self, *, states: Sequence[JobState] | None = None, node_id: str | None = None,
                        client: str | None = None, limit: int = ..., after: str | None = None) -> JobList: ...

    async def cluster(self, scheduler: str) -> ClusterView: ...

    async def job_capacity(self, job_id: str, lease_id: str) -> int: ...

    async def create_section(self, job_id: str, *, lease_id: str, lease_epoch: int, index: int, offset_s: float,
                             duration_s: float, sample_rate: int, upload: Any,
                             language: str | None = None) -> tuple[SectionSummary, bool]: ...

    async def job_sections(self, job_id: str, *, lease_id: str | None = None, client: str | None = None,
                           from_index: int = 0) -> list[SectionView]: ...


async def open_store(
    settings: SchedulerSettings,
    registry: CollectorRegistry,
    state_dir: Path | None,
    on_change: Callable[[str], None],
    on_reconnect: Callable[[], None] = lambda: None,
    *,
    clock: Callable[[], float] | None = None,
    single_statements: bool = True,
) -> SqlStore:
    """Open (and migrate) the store ``settings.store`` names; changes are announced through ``on_change(topic)``.
    ``clock`` (SQLite only; tests) is the store's clock instead of the wall clock; ``single_statements`` False
    turns off PostgreSQL's one-statement forms of the hot operations (tests run both paths). A store that cannot
    be used raises ``StoreError`` (one line)."""
    engine = engine_for(settings.store_url, state_dir, clock)
    holder: list[SqlStore] = []
    metrics = SchedulerMetrics(
        registry,
        lambda: (holder[0].replica.queue_depth_seen, holder[0].replica.node_states_seen),
        lambda: holder[0].replica.load_seen,
    )
    store = SqlStore(settings, engine, metrics, single_statements=single_statements)
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


__all__ = ["Store", "Upload", "open_store"]
