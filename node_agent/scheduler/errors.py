"""Typed scheduler errors. Each carries a stable ``code``; server.py maps the classes to HTTP statuses."""

from __future__ import annotations

from ..errors import NodeAgentError


class ApiError(NodeAgentError):
    """A request the scheduler refuses; ``code`` is the machine-readable reason on the wire. (A client sees it
    as one of the errors in ``node_agent/scheduler_client.py``.)"""

    code = "internal"

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: The request field the error is about, when there is one.
        self.param = param


class InvalidInput(ApiError):
    code = "invalid_request"


class Unauthorized(ApiError):
    code = "unauthorized"


class Forbidden(ApiError):
    """A caller whose token is valid but whose role may not do this, or a node request without that node's secret:
    403, nothing changed."""

    code = "forbidden"


class TooLarge(ApiError):
    code = "too_large"


class NodeNotFound(ApiError):
    """The node id is not registered (never was, forgotten, or gone): the agent registers again."""

    code = "unknown_node"


class UnknownJob(ApiError):
    code = "unknown_job"


class JobNotAssigned(ApiError):
    """A lease was asked for a job this node does not currently hold an assignment for."""

    code = "job_not_assigned"


class LeaseUnusable(ApiError):
    """A renewal of a lease that is no longer live; code: lease_expired | lease_released |
    lease_superseded | stale_epoch | unknown_lease."""

    code = "unknown_lease"


class ResourceHeld(ApiError):
    """Another live lease holds the resource; the caller may retry after ``retry_after_s``."""

    code = "resource_held"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReportRejected(ApiError):
    """A result or events report not from the job's current holder; code: stale_attempt |
    stale_epoch | already_completed."""

    code = "stale_attempt"


class ShuttingDown(ApiError):
    code = "shutting_down"


class WaitTimeout(ApiError):
    """A synchronous request gave up waiting for its job."""

    code = "timeout"


class QueueFull(ApiError):
    """A submission past ``scheduler.max_queued_jobs`` or ``max_queued_bytes``; retry after ``retry_after_s``."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unservable(ApiError):
    """A submission no live node can serve (``JobErrorCode.no_capable_node``): the message names what was asked,
    what the live nodes serve, and what to change."""

    code = "no_capable_node"


class StoreUnavailable(ApiError):
    """The store (PostgreSQL) cannot be reached or answered with a transient error: 503 with Retry-After. Nothing was
    changed, so the caller retries the same request."""

    code = "store_unavailable"

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreError(NodeAgentError):
    """The store cannot be used at all (a path that cannot be opened, a newer schema, a bad DSN): the scheduler does
    not start, and says why in one line."""


class SectionRefused(ApiError):
    """A section job the scheduler will not make (issue 24): an index past ``scheduler.max_sections_per_job``, an
    offset or duration that cannot be, or a parent that is itself a section: 422, nothing made."""

    code = "section_refused"
