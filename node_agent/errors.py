"""Typed errors. Every job failure carries a ``code`` from the fixed list in docs/protocol.md."""

from __future__ import annotations


class NodeAgentError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(NodeAgentError):
    """The configuration is invalid; the message is one line naming key, value and origin."""


class WireError(NodeAgentError):
    """A frame between agent and worker was malformed or the stream ended mid-frame."""


class JobError(NodeAgentError):
    """A job ended without a transcript. ``code`` is stable and machine-readable."""

    code = "failed"
    #: Whether a scheduler may dispatch the job again (the fault was the node's, not the input's).
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadAudio(JobError):
    code = "bad_audio"


class InvalidRequest(JobError):
    code = "invalid_request"


class JobTimeout(JobError):
    code = "timeout"


class JobStalled(JobError):
    code = "stalled"


class WorkerCrashed(JobError):
    code = "worker_crashed"
    retryable = True


class WorkerUnavailable(JobError):
    """No worker can take the job (fatal after repeated start failures, or stopping)."""

    code = "worker_unavailable"
    retryable = True


class LeaseLost(JobError):
    code = "lease_lost"
    retryable = True

    def __init__(self, message: str, reason: str = "rejected") -> None:
        super().__init__(message)
        self.reason = reason  # expired | rejected | self_fenced


class LeaseExpired(JobError):
    """Scheduler side: the job's lease expired on its last allowed attempt."""

    code = "lease_expired"


class JobShutdown(JobError):
    code = "shutdown"
    retryable = True


class TranscriptionFailed(JobError):
    code = "failed"


#: code -> class, for turning a worker's or scheduler's error dict back into a typed error.
JOB_ERRORS: dict[str, type[JobError]] = {
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
        TranscriptionFailed,
    )
}


def job_error(code: str, message: str) -> JobError:
    """Rebuild a typed error from its wire form; unknown codes become ``failed``."""
    return JOB_ERRORS.get(code, TranscriptionFailed)(message)
