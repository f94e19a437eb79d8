"""Cancelling a job (``DELETE /v1/jobs/{id}``): it ends ``cancelled`` at once, whatever open state it is in.

A queued or assigned job simply ends. A running one ends too, and its live lease with it (released), so its
resource is free for the next job at once; the node holding it learns at its next renewal (``410 job_cancelled``;
its events and result are ``409 job_cancelled``) and stops the decode between two segments. The segments the job
had stay in its view. Its audio is dropped as for any finished job (unless ``scheduler.keep_audio``). Cancelling a
job that has ended already changes nothing (the call is idempotent).
"""

from __future__ import annotations

import logging

from .db import Tx
from .schemas import TERMINAL_JOB_STATES, JobErrorInfo
from .transitions import StorePart, unknown_job

log = logging.getLogger("node_agent.scheduler")


class Cancels(StorePart):
    """Jobs ended by a client or operator (see the module's docstring)."""

    async def cancel_job(self, job_id: str, by: str, client: str | None = None) -> str | None:
        """Cancel ``job_id`` on behalf of ``by`` (who, for the job's error and ``cancelled_by``): the state it was
        cancelled from, or None when it had ended already. ``client``: the only client whose job this caller may
        cancel (None: any job); another client's job is ``UnknownJob``, as if it did not exist."""

        async def op(tx: Tx) -> str | None:
            job = await self.tr.job(tx, job_id, lock=True)
            if client is not None and job["client"] != client:
                raise unknown_job(job_id)  # not "forbidden": a client may not learn that another's job exists
            if job["state"] in TERMINAL_JOB_STATES:
                return None
            now = await tx.now()
            error = JobErrorInfo(code="cancelled", message=f"cancelled by {by} while {job['state']}")
            if not await self.tr.finish(tx, job, now, error, cancelled_by=by):
                return None  # (cannot happen under the row lock; kept so a lost race is never counted)
            return str(job["state"])

        cancelled_from = await self.engine.run(op)
        if cancelled_from is not None:
            self.metrics.jobs_cancelled.labels(cancelled_from).inc()
            log.info("job cancelled job_id=%s by=%s state=%s", job_id, by, cancelled_from)
        return cancelled_from
