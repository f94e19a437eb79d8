"""Typed scheduler errors. Each carries a stable ``code``; server.py maps the classes to HTTP statuses."""

from __future__ import annotations

from ..errors import NodeAgentError


class SchedulerError(NodeAgentError):
    """A request the scheduler refuses; ``code`` is the machine-readable reason on the wire."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: The request field the error is about, when there is one.
        self.param = param


class InvalidInput(SchedulerError):
    code = "invalid_request"


class Unauthorized(SchedulerError):
    code = "unauthorized"


class TooLarge(SchedulerError):
    code = "too_large"


class UnknownNode(SchedulerError):
    """The node id is not registered (never was, forgotten, or gone): the agent registers again."""

    code = "unknown_node"


class UnknownJob(SchedulerError):
    code = "unknown_job"


class JobNotAssigned(SchedulerError):
    """A lease was asked for a job this node does not currently hold an assignment for."""

    code = "job_not_assigned"


class LeaseUnusable(SchedulerError):
    """A renewal of a lease that is no longer live; code: lease_expired | lease_released |
    lease_superseded | stale_epoch | unknown_lease."""

    code = "unknown_lease"


class ResourceHeld(SchedulerError):
    """Another live lease holds the resource; the caller may retry after ``retry_after_s``."""

    code = "resource_held"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReportRejected(SchedulerError):
    """A result or events report not from the job's current holder; code: stale_attempt |
    stale_epoch | already_completed."""

    code = "stale_attempt"


class ShuttingDown(SchedulerError):
    code = "shutting_down"


class WaitTimeout(SchedulerError):
    """A synchronous request gave up waiting for its job."""

    code = "timeout"
