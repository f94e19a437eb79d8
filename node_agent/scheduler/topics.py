"""What a change wakes: long polls wait on a topic, and a store announces changes by topic after it commits."""

from __future__ import annotations

#: A job was queued (or re-queued), or a node registered: pollers for work re-check.
QUEUE_TOPIC = "queue"


def job_topic(job_id: str) -> str:
    """The job got segments or ended (what its long polls wait for; an assignment or a lease wakes nobody: on
    PostgreSQL every notifying commit takes a database-wide lock, so only changes someone waits for notify)."""
    return f"job:{job_id}"
