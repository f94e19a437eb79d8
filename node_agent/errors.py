"""Typed errors. Every job failure carries a ``code`` from ``JobErrorCode``, the one list (docs/protocol.md)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass


class NodeAgentError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(NodeAgentError):
    """The configuration is invalid; the message is one line naming key, value and origin."""


class UsageError(NodeAgentError):
    """A command-line argument is wrong; the message is one line naming the option and the fix."""


class ListenError(NodeAgentError):
    """A server could not bind its address; the message names the address and the settings key to change."""

    def __init__(self, address: str, key: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({key}): {reason}")
        self.address = address
        self.key = key

    @classmethod
    def from_os_error(cls, exc: OSError, host: str, port: int, key: str) -> "ListenError":
        """From what binding raised: asyncio wraps the errno in a long sentence, so the reason is rebuilt."""
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        errno_ = exc.errno
        # socket.gaierror (an unresolvable host) has a negative errno whose os.strerror text is useless.
        reason = os.strerror(errno_) if isinstance(errno_, int) and errno_ > 0 else (exc.strerror or str(exc))
        return cls(shown, key, reason.lower())


class SchedulerUnreachable(NodeAgentError):
    """No connection to the scheduler could be made (nothing listening, wrong host, network down)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the scheduler at {url}: {reason}")
        self.url = url


class WireError(NodeAgentError):
    """A frame between agent and worker was malformed or the stream ended mid-frame."""


class JobErrorCode(enum.StrEnum):
    """Every job error code on the wire, in metric labels and in HTTP status maps; docs/protocol.md explains each."""

    bad_audio = "bad_audio"
    invalid_request = "invalid_request"
    timeout = "timeout"
    stalled = "stalled"
    worker_crashed = "worker_crashed"
    worker_unavailable = "worker_unavailable"
    lease_lost = "lease_lost"
    lease_expired = "lease_expired"
    shutdown = "shutdown"
    no_capable_node = "no_capable_node"
    cancelled = "cancelled"
    failed = "failed"


class JobError(NodeAgentError):
    """A job ended without a transcript. ``code`` is stable and machine-readable."""

    code: JobErrorCode = JobErrorCode.failed
    #: Whether a scheduler may dispatch the job again (the fault was the node's, not the input's).
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


class BadAudio(JobError):
    code = JobErrorCode.bad_audio


class InvalidRequest(JobError):
    code = JobErrorCode.invalid_request


class JobTimeout(JobError):
    code = JobErrorCode.timeout


class JobStalled(JobError):
    code = JobErrorCode.stalled


class WorkerCrashed(JobError):
    code = JobErrorCode.worker_crashed
    retryable = True


class WorkerUnavailable(JobError):
    """No worker can take the job (fatal after repeated start failures, or stopping)."""

    code = JobErrorCode.worker_unavailable
    retryable = True


class LeaseLost(JobError):
    code = JobErrorCode.lease_lost
    retryable = True

    def __init__(self, message: str, reason: str = "rejected") -> None:
        super().__init__(message)
        self.reason = reason  # expired | rejected | self_fenced


class LeaseExpired(JobError):
    """Scheduler side: the job's lease expired on its last allowed attempt."""

    code = JobErrorCode.lease_expired


class JobShutdown(JobError):
    code = JobErrorCode.shutdown
    retryable = True


class NoCapableNode(JobError):
    """Scheduler side: no live node serves what the job asks (its language, or the model it needs); refused at
    submission, or failed after ``scheduler.unservable_after_s`` in the queue without one."""

    code = JobErrorCode.no_capable_node


class JobCancelled(JobError):
    """A client or operator cancelled the job (``DELETE /v1/jobs/{id}``): the scheduler ended it, and a node
    running it stops between two segments, keeps its worker and reports nothing. Never retried."""

    code = JobErrorCode.cancelled


class TranscriptionFailed(JobError):
    code = JobErrorCode.failed


#: code -> class, for turning a worker's or scheduler's error back into a typed error (tests check it is complete).
JOB_ERRORS: dict[JobErrorCode, type[JobError]] = {
    cls.code: cls
    for cls in (
        BadAudio,
        InvalidRequest,
        JobTimeout,
        JobStalled,
        WorkerCrashed,
        WorkerUnavailable,
        LeaseLost,
        LeaseExpired,
        JobShutdown,
        NoCapableNode,
        JobCancelled,
        TranscriptionFailed,
    )
}


def job_error(code: str, message: str) -> JobError:
    """Rebuild a typed error from its wire form; a code outside ``JobErrorCode`` is a ``ValueError`` (a bug)."""
    return JOB_ERRORS[JobErrorCode(code)](message)


@dataclass(frozen=True)
class JobErrorStatus:
    """The HTTP status a synchronous endpoint answers for a job that failed with one code, and why."""

    status: int  # /utterance, and the OpenAI endpoint unless ``openai`` says otherwise
    why: str
    openai: int | None = None
    openai_why: str = ""


_NODE_FAULT = "the node's own failure, nothing the caller can change"
#: The OpenAI endpoint answers its clients' retry logic: 4xx for the request's faults, 504 for its own wait, and 500
#: (OpenAI's server_error) for every other failure, as it always has.
_OPENAI_5XX = "OpenAI clients retry any server_error; this endpoint has always answered it 500"

#: Job error code -> HTTP status, the one table for every endpoint that waits for a job (a test checks it is
#: complete). Where the OpenAI endpoint must differ, its column says so and why.
JOB_ERROR_HTTP: dict[JobErrorCode, JobErrorStatus] = {
    JobErrorCode.bad_audio: JobErrorStatus(400, "the caller's audio cannot be decoded"),
    JobErrorCode.invalid_request: JobErrorStatus(400, "the caller's request is invalid"),
    JobErrorCode.timeout: JobErrorStatus(504, "the time limit passed"),
    JobErrorCode.stalled: JobErrorStatus(504, "the decode made no progress within the limit", 500, _OPENAI_5XX),
    JobErrorCode.shutdown: JobErrorStatus(503, "the node or scheduler is stopping: retry", 500, _OPENAI_5XX),
    JobErrorCode.worker_unavailable: JobErrorStatus(503, "no worker can take jobs now: retry", 500, _OPENAI_5XX),
    JobErrorCode.no_capable_node: JobErrorStatus(
        503, "/utterance already refuses (400) a src_lang its own node cannot serve, so a job that ends without a "
        "capable node lost the node(s) that could run it while queued: retrying later is right",
        422, "the endpoint refuses such a job at submission with 422; one that fails with it later is the same case"),
    JobErrorCode.cancelled: JobErrorStatus(
        409, "a client or operator cancelled the job (DELETE /v1/jobs/{id}) while this request waited for it: "
        "a conflict with another caller's decision, not a failure to retry"),
    JobErrorCode.worker_crashed: JobErrorStatus(500, _NODE_FAULT),
    JobErrorCode.lease_lost: JobErrorStatus(500, _NODE_FAULT),
    JobErrorCode.lease_expired: JobErrorStatus(500, _NODE_FAULT),
    JobErrorCode.failed: JobErrorStatus(500, _NODE_FAULT),
}


def job_error_status(code: str, openai: bool = False) -> int:
    """The status for a job that failed with ``code`` (a plain string from JSON finds its entry too); 500 for a
    code this version does not know."""
    try:
        entry = JOB_ERROR_HTTP[JobErrorCode(code)]
    except ValueError:
        return 500
    return entry.openai if openai and entry.openai is not None else entry.status
