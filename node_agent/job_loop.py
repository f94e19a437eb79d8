"""The job loop of one device: long-poll the scheduler while its worker can take a job, run it, repeat.

Each job runs in a task of its own (``JobLoop.job``) so that cancelling the loop (the agent draining) stops the
polling and never the job; the composition root waits for that task within the shutdown grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .scheduler_client import SchedulerClient, SchedulerError, UnknownNode
from .job_runner import JobOutcome, JobRunner
from .metrics import AgentMetrics
from .registration import NodeIdentity
from .retry import OutageLog, RetryPolicies, retrying
from .scheduler.schemas import JobAssignment
from .supervisor import Worker, WorkerState

log = logging.getLogger("node_agent.jobs")

#: Long-poll wait per request; the scheduler caps it too.
POLL_WAIT_S = 20.0


class JobLoop:
    """Polls for one device's jobs and hands each to its ``JobRunner``; one job at a time."""

    def __init__(self, client: SchedulerClient, worker: Worker, runner: JobRunner, identity: NodeIdentity, *,
                 metrics: AgentMetrics, reregister: Callable[[], None], policies: RetryPolicies | None = None,
                 wait_s: float = POLL_WAIT_S) -> None:
        self.client = client
        self.worker = worker
        self.runner = runner
        self.identity = identity
        self.metrics = metrics
        self.policies = policies or RetryPolicies()
        self.wait_s = wait_s
        self._reregister = reregister
        self._outages = OutageLog(log)
        #: The job in flight, if any (its own task: see the module docstring).
        self.job: asyncio.Task[JobOutcome] | None = None

    @property
    def resource(self) -> str:
        return self.worker.resource

    async def run(self) -> None:
        """Poll and run jobs until cancelled."""
        what = f"polling for jobs on {self.resource}"
        while True:
            # A fresh retry sequence per answer: the next outage begins with short waits again. No total: polling
            # lasts as long as the agent.
            assignment, polled_at = await retrying(
                self.policies.poll, "poll", self._poll, retry_if=SchedulerError, on_retry=self.metrics.count_retry,
                on_error=lambda exc, _wait: self._outages.failed(what, exc))
            self._outages.recovered(what)
            if assignment is None:
                continue
            self.job = asyncio.get_running_loop().create_task(self.runner.run(assignment, polled_at),
                                                              name=f"job-{assignment.job_id}")
            await asyncio.shield(self.job)

    async def _poll(self) -> tuple[JobAssignment | None, float]:
        """Once registered and the worker is ready, one long poll: its answer, and when it was sent (loop time)."""
        resource, worker = self.resource, self.worker
        while True:
            await self.identity.registered_event.wait()
            if worker.state is WorkerState.fatal:
                log.error("worker %s is fatal (%s): not taking jobs on it until it is retried", resource,
                          worker.last_error)
                await worker.wait_not_fatal()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await worker.wait_ready(5.0)
            if worker.state is not WorkerState.ready:
                continue
            node_id = self.identity.node_id
            assert node_id is not None
            polled_at = asyncio.get_running_loop().time()
            try:
                return await self.client.next_job(node_id, self.wait_s, resource,
                                                  lease_ttl_s=self.runner.keeper.requested_ttl()), polled_at
            except UnknownNode:
                self._reregister()
                await asyncio.sleep(0.2)  # the registered event clears at once; this only yields
