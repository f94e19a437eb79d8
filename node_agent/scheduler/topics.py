"""What a change wakes: long polls wait on a topic, and a store announces changes by topic after it commits."""

from __future__ import annotations

from .schemas import Priority

#: A job that any poller may take was queued (an interactive one, or one re-queued), or a node registered or was
#: uncordoned: pollers for work re-check.
QUEUE_TOPIC = "queue"
#: A batch job was submitted. Only the pollers that could take it listen: one whose last claim the interactive
#: headroom refused (``rules.batch_allowed``) would be refused again, and under a batch backlog each submit woke
#: such idle nodes for nothing (docs/benchmarks.md, issue 23); it re-checks on ``QUEUE_TOPIC`` and every
#: ``poll_s`` instead.
BATCH_TOPIC = "queue:batch"
#: The topics whose wake-ups go to a few waiters each (``server.QUEUE_WAKE``), not to all: each woken poller claims.
QUEUE_TOPICS = (QUEUE_TOPIC, BATCH_TOPIC)


def submitted_topic(priority: str) -> str:
    """The topic a newly submitted job of ``priority`` announces itself on."""
    return BATCH_TOPIC if priority == Priority.BATCH else QUEUE_TOPIC


def job_topic(job_id: str) -> str:
    """The job got segments or ended (what its long polls wait for; an assignment or a lease wakes nobody: on
    PostgreSQL every notifying commit takes a database-wide lock, so only changes someone waits for notify)."""
    return f"job:{job_id}"


def sections_topic(parent_id: str) -> str:
    """A section child of ``parent_id`` ended or went back to the queue (what the parent's node's follow waits for,
    ``GET /v1/jobs/{id}/sections?wait_s``). pgfast.py's one-statement result builds it in SQL from
    ``sections_topic("")``, the prefix."""
    return f"sections:{parent_id}"
