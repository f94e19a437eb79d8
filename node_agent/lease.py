"""Device leases: acquire (waiting politely on 409), renew every TTL/3 while a job runs, fence ourselves.

The holder cannot trust itself to notice expiry (a paused process keeps acting), so two rules apply:
the scheduler rejects results carrying a stale epoch, and the keeper here stops the job as soon as no
renewal has succeeded for the renew deadline (2/3 TTL by default), before the scheduler's TTL runs out.
All timing uses the event loop's monotonic clock; the TTL on the wire is relative seconds. Every retry (acquire,
renewal, release) goes through ``retry.retrying``: full jitter, capped waits, a total (for a renewal, the fence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from .scheduler_client import Gone, LeaseHeld, SchedulerClient, SchedulerError, SchedulerUnavailable
from .config import LeaseSettings
from .errors import JobCancelled, LeaseLost
from .metrics import AgentMetrics
from .retry import Backoff, RetryPolicies, RetryPolicy, policy_wait, retrying
from .scheduler.schemas import LeaseGrant, RenewResponse

#: The code of a scheduler's 503 while its store cannot be reached (docs/protocol.md, "The store").
STORE_PAUSED = "store_unavailable"

log = logging.getLogger("node_agent.lease")

#: How long the end of a job waits for its renewals to stop before it says so (and cancels them again).
RELEASE_WAIT_S = 2.0
#: The code of a renewal refused because a client or operator cancelled the job (docs/protocol.md).
JOB_CANCELLED = "job_cancelled"


class _Released(Exception):
    """The job ended (its lease is being let go) while a renewal was under way: stop renewing, quietly."""


class LeaseUnavailable(Exception):
    """The lease could not be had: the device stayed held, or the job is no longer ours."""

    def __init__(self, message: str, *, job_gone: bool = False) -> None:
        super().__init__(message)
        self.job_gone = job_gone


@dataclass
class Lease:
    lease_id: str
    epoch: int
    ttl_s: float
    resource: str
    job_id: str
    #: The node id the lease was granted to: renewals, events and results name it (the scheduler checks).
    node_id: str
    acquired_at: float
    #: When the last successful renewal (or the grant) was *sent*: the scheduler's expiry is at least this + TTL.
    renewed_at: float
    renewals: int = 0
    last_margin_s: float | None = None
    lost: LeaseLost | None = field(default=None, repr=False)
    #: Set when a renewal was refused because the job was cancelled: the lease ended with the job, nothing is lost.
    cancelled: JobCancelled | None = field(default=None, repr=False)

    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s


class LeaseKeeper:
    """Acquires, renews and releases leases for one device."""

    def __init__(self, client: SchedulerClient, settings: LeaseSettings, metrics: AgentMetrics | None,
                 device: str, policies: RetryPolicies | None = None) -> None:
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.device = device
        self.policies = policies or RetryPolicies()
        self._on_retry = metrics.count_retry if metrics is not None else None
        self.current: Lease | None = None
        #: The TTL range the scheduler grants (from registration); requests are clamped into it.
        self.bounds: tuple[float, float] | None = None
        self._clamp_logged: float | None = None

    def set_bounds(self, min_ttl_s: float, max_ttl_s: float) -> None:
        """Adopt the scheduler's TTL range, as announced at registration."""
        self.bounds = (min_ttl_s, max_ttl_s)

    def requested_ttl(self) -> float:
        """``lease.ttl_s`` clamped into the scheduler's bounds (logged once per distinct clamp)."""
        ttl = self.settings.ttl_s
        if self.bounds is not None:
            low, high = self.bounds
            clamped = min(max(ttl, low), high)
            if clamped != ttl and self._clamp_logged != clamped:
                log.warning("lease.ttl_s = %g is outside the scheduler's range %g..%g s: asking for %g s",
                            ttl, low, high, clamped)
                self._clamp_logged = clamped
            ttl = clamped
        return ttl

    async def acquire(self, node_id: str, job_id: str) -> Lease:
        """Get the lease for ``job_id`` on this device; waits on 409 up to ``lease.acquire_timeout_s``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        policy = replace(self.policies.lease_acquire, max_total_s=self.settings.acquire_timeout_s)

        async def ask() -> tuple[LeaseGrant, float]:
            sent = loop.time()
            return await self.client.acquire_lease(node_id, job_id, self.device, self.requested_ttl()), sent

        try:
            # A held device's Retry-After is the scheduler's estimate, so it is waited out (up to the cap per wait).
            grant, sent = await retrying(policy, "lease_acquire", ask, retry_if=(LeaseHeld, SchedulerUnavailable),
                                         on_retry=self._on_retry, clock=loop.time)
        except (LeaseHeld, SchedulerUnavailable) as exc:
            reason = f"{self.device} is held (retry after {exc.retry_after:g} s)" if isinstance(exc, LeaseHeld) \
                else str(exc)
            raise LeaseUnavailable(f"no lease for job {job_id} within lease.acquire_timeout_s = "
                                   f"{self.settings.acquire_timeout_s:g} s: {reason}") from None
        except Gone as exc:
            raise LeaseUnavailable(f"job {job_id} is no longer assigned to this node: {exc}", job_gone=True) from None
        except SchedulerError as exc:
            raise LeaseUnavailable(f"lease for job {job_id} refused: {exc}", job_gone=True) from None
        return self._take(node_id, job_id, grant, sent, waited_s=loop.time() - started)

    def adopt(self, node_id: str, job_id: str, grant: LeaseGrant, granted_after: float) -> Lease:
        """Take on a lease the scheduler granted with the job's assignment. ``granted_after`` (loop time) is no
        later than the grant (the poll's sending plus the time the scheduler held it), so the expiry reckoned from
        it is never later than the scheduler's."""
        return self._take(node_id, job_id, grant, granted_after, waited_s=0.0)

    def _take(self, node_id: str, job_id: str, grant: LeaseGrant, sent: float, waited_s: float) -> Lease:
        """Hold ``grant`` from now on; ``sent``: no later than the grant (its expiry is reckoned from there)."""
        now = asyncio.get_running_loop().time()
        if self.metrics is not None:
            self.metrics.lease_acquire_duration.labels(self.device).observe(waited_s)
            self.metrics.leases_held.labels(self.device).inc()
        lease = Lease(grant.lease_id, grant.epoch, grant.ttl_s, self.device, job_id, node_id, now, min(sent, now))
        self.current = lease
        log.info("lease %s granted for job %s on %s: epoch=%d ttl=%.1fs", lease.lease_id, job_id, self.device,
                 lease.epoch, lease.ttl_s)
        return lease

    @contextlib.asynccontextmanager
    async def hold(self, lease: Lease, on_lost: Callable[[LeaseLost], None],
                   on_cancelled: Callable[[JobCancelled], None] | None = None) -> AsyncIterator[Lease]:
        """Renew ``lease`` in the background for the duration of the block; ``on_lost`` fires at most once, or
        ``on_cancelled`` (once) when a renewal says the job was cancelled (``lease.cancelled`` says so besides)."""
        released = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._renew_loop(lease, on_lost, on_cancelled, released))
        try:
            yield lease
        finally:
            # The flag, not the cancel alone, is what ends the loop for sure: Python 3.11's wait_for (in aiohttp,
            # say) swallows a cancel that lands as its awaitable finishes (gh-86296), and a loop that lost its
            # cancel renewed the lease for ever while this block waited on it, silently.
            released.set()
            task.cancel()
            waited = 0.0
            while not task.done():
                await asyncio.wait({task}, timeout=RELEASE_WAIT_S)
                if not task.done():
                    waited += RELEASE_WAIT_S
                    log.warning("lease %s: renewals still running %.0f s after job %s ended; cancelling again",
                                lease.lease_id, waited, lease.job_id)
                    task.cancel()

    async def _renew_loop(self, lease: Lease, on_lost: Callable[[LeaseLost], None],
                          on_cancelled: Callable[[JobCancelled], None] | None, released: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        # Timed by the TTL the scheduler granted (and re-granted on each renewal), never by our request alone.
        next_at = lease.renewed_at + self.settings.timing(lease.ttl_s)[0]
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if released.is_set():
                return
            deadline_s = self.settings.timing(lease.ttl_s)[1]
            try:
                reply, sent = await self._renew(lease, released)
            except _Released:
                return
            except Gone as exc:
                if exc.code == JOB_CANCELLED:
                    self._cancelled(lease, on_cancelled, exc)
                    return
                reason = "expired" if exc.code == "lease_expired" else "rejected"
                self._lost(lease, on_lost, LeaseLost(
                    f"lease {lease.lease_id} for job {lease.job_id} is gone ({exc.code or exc.status}); "
                    f"stopping the job", reason=reason))
                return
            except (SchedulerError, asyncio.TimeoutError):  # the renew deadline came with no renewal through
                if released.is_set():
                    return
                self._lost(lease, on_lost, LeaseLost(
                    f"lease {lease.lease_id} for job {lease.job_id}: no renewal succeeded for "
                    f"{loop.time() - lease.renewed_at:.1f} s (renew deadline {deadline_s:g} s); stopping the job",
                    reason="self_fenced"))
                return
            done = loop.time()
            margin = lease.expires_at() - done
            lease.renewed_at = sent
            lease.ttl_s = reply.ttl_s
            lease.renewals += 1
            lease.last_margin_s = margin
            self._count("ok", done - sent)
            if self.metrics is not None:
                self.metrics.lease_margin.labels(self.device).observe(max(0.0, margin))
            next_at = sent + self.settings.timing(lease.ttl_s)[0]

    async def _renew(self, lease: Lease, released: asyncio.Event) -> tuple[RenewResponse, float]:
        """One renewal (the answer, and when it was sent), retried until the fence (``renewed_at`` + the renew
        deadline), where its last error surfaces (``TimeoutError`` when no try was made); ``Gone`` at once;
        ``_Released`` as soon as the job has ended."""
        loop = asyncio.get_running_loop()
        interval, deadline_s = self.settings.timing(lease.ttl_s)
        paused_at: float | None = None  # when the last "store unavailable" answer came (see below)

        def fence() -> float:
            return lease.renewed_at + deadline_s

        async def renew() -> tuple[RenewResponse, float]:
            nonlocal paused_at
            if released.is_set():
                raise _Released
            sent = loop.time()
            left = fence() - sent
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the block's cancel (see ``hold``).
                async with asyncio.timeout(left):
                    reply = await self.client.renew_lease(lease.lease_id, lease.epoch, lease.node_id, timeout=left)
            except (SchedulerError, asyncio.TimeoutError) as exc:
                if released.is_set():
                    raise _Released from None
                self._count("failed", loop.time() - sent)
                if isinstance(exc, Gone):
                    raise
                now = loop.time()
                if isinstance(exc, SchedulerUnavailable) and exc.code == STORE_PAUSED:
                    # The scheduler is up but its store is not: nobody can take the lease meanwhile, and the
                    # scheduler gives leases back the time its store was unreachable. So that time does not count
                    # against our renew deadline either (counted only between two such answers: never more than
                    # the store's own pause).
                    if paused_at is not None:
                        lease.renewed_at += now - paused_at
                    paused_at = now
                else:
                    paused_at = None
                log.warning("lease %s: renewal failed (%s); %.1f s left before self-fencing", lease.lease_id,
                            exc or "timed out", fence() - loop.time())
                raise
            if released.is_set():
                raise _Released
            return reply, sent

        def wait(retries: Backoff, exc: Exception) -> float:
            # The policy's wait, but none past the fence: with the budget spent, the next turn is at the fence,
            # which fences.
            delay = policy_wait(retries, exc)
            now = loop.time()
            wait_s = fence() - now if delay is None else min(delay, fence() - now)
            if paused_at is not None:
                # Paused time counts only between two answers, so ask again well before the fence.
                wait_s = min(wait_s, max(0.05, (fence() - now) / 2))
            return max(0.0, wait_s)

        def again(exc: Exception) -> bool:
            return isinstance(exc, (SchedulerError, asyncio.TimeoutError)) and not isinstance(exc, Gone)

        policy = self.renew_retry_policy(interval, deadline_s, fence() - loop.time())
        return await retrying(policy, "lease_renew", renew, retry_if=again, on_retry=self._on_retry, deadline=fence,
                              wait=wait, clock=loop.time)

    @staticmethod
    def renew_retry_policy(interval_s: float, deadline_s: float, left_s: float) -> RetryPolicy:
        """Retries after a failed renewal: several fit before the renew deadline (client-go: RetryPeriod 2 s
        within a RenewDeadline of 10 s), so one lost request or a brief 5xx never costs the job; the total is
        the time left before self-fencing."""
        first = max(0.05, min(interval_s / 2, deadline_s / 8))
        return RetryPolicy(initial_s=first, max_wait_s=max(first, interval_s / 2), max_total_s=max(0.0, left_s))

    def _count(self, result: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.lease_renewals.labels(self.device, result).inc()
            self.metrics.lease_renew_duration.labels(self.device).observe(seconds)

    def _lost(self, lease: Lease, on_lost: Callable[[LeaseLost], None], error: LeaseLost) -> None:
        lease.lost = error
        log.error("%s", error.message)
        if self.metrics is not None:
            self.metrics.lease_lost.labels(self.device, error.reason).inc()
        on_lost(error)

    def _cancelled(self, lease: Lease, on_cancelled: Callable[[JobCancelled], None] | None, exc: Gone) -> None:
        """The job was cancelled: its lease ended with it on the scheduler. Not a loss (no lease_lost count)."""
        lease.cancelled = JobCancelled(exc.detail or f"job {lease.job_id} was cancelled")
        log.info("lease %s ended: job %s was cancelled (%s)", lease.lease_id, lease.job_id, exc.detail)
        self._forget(lease)  # the scheduler released it with the job: nothing to give back
        if on_cancelled is not None:
            on_cancelled(lease.cancelled)

    def released_by_result(self, lease: Lease) -> None:
        """The lease ended with its job's accepted result (the scheduler released it then): forget it here."""
        self._forget(lease)
        log.info("lease %s released with the accepted result (job %s)", lease.lease_id, lease.job_id)

    def _forget(self, lease: Lease) -> None:
        if self.current is lease:
            self.current = None
            if self.metrics is not None:
                self.metrics.leases_held.labels(self.device).dec()

    async def release(self, lease: Lease) -> None:
        """Best effort: an unreleased lease expires on its own after its TTL."""
        self._forget(lease)

        def failed(exc: SchedulerUnavailable, _wait: float | None) -> None:
            log.warning("lease %s: release failed (%s)", lease.lease_id, exc)

        try:
            await retrying(self.policies.lease_release, "lease_release",
                           lambda: self.client.release_lease(lease.lease_id), retry_if=SchedulerUnavailable,
                           on_retry=self._on_retry, on_error=failed)
        except SchedulerError:  # given up, or refused: either way the lease expires on its own
            return
        log.info("lease %s released (job %s)", lease.lease_id, lease.job_id)
