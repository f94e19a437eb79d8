"""What nodes do with jobs in the store: take the next one they serve (with its lease when the resource is free),
lease, renew and release, and report segments and the one result, each write fenced by the holder's lease."""

from __future__ import annotations

import json
import logging
import math
import secrets
from typing import Any, Callable

from .db import Row, Tx
from .errors import InvalidInput, JobNotAssigned, LeaseUnusable, ResourceHeld
from .pgfast import BUSY_SLOTS, ask_served_sql, fence, offers_of, renewal
from .rules import Ask, batch_allowed, clamp_ttl, dispatch_class, headroom_slots, pick_device
from .schemas import (
    JOB_ERROR_CODES,
    RETRYABLE_ERROR_CODES,
    AudioRef,
    EventsReport,
    JobAssignment,
    JobErrorInfo,
    JobSpec,
    LeaseGrant,
    LeaseRequest,
    RenewRequest,
    RenewResponse,
    ResultAck,
    ResultReport,
)
from .schemas import JobState as J
from .schemas import LeaseState as L
from .schemas import NodeState as N
from .schemas import Priority as P
from .topics import job_topic
from .transitions import StorePart, devices_of, doc

log = logging.getLogger("node_agent.scheduler")


class _HeldBack:
    """The general path's answer when the headroom held back the one job the node could take."""


_HELD_BACK = _HeldBack()


class Dispatch(StorePart):
    """Jobs as nodes see them (see the module's docstring)."""

    #: The fence: the job's current attempt, live lease (unexpired on the store's clock), epoch and node.
    _FENCE = fence("$6")

    async def assign_next(self, node_id: str, resource: str | None = None, lease_ttl_s: float | None = None,
                          on_held_back: Callable[[], None] | None = None) -> JobAssignment | None:
        """Hand the node the first queued job one of its devices serves (``rules.serves``: language, model,
        labels), in the dispatch order (``rules.dispatch_class``: interactive jobs, and batch jobs queued past
        ``scheduler.batch_max_wait_s``, before the other batch jobs; each class by submission), or None; nothing to
        a cordoned or draining node. A batch job of the second class waits while taking a slot would leave fewer
        idle than ``scheduler.interactive_headroom`` keeps (``rules.batch_allowed``). With ``lease_ttl_s``, the
        job's lease is granted in the same transaction when its resource is free on that node
        (``assignment.lease``); else the node asks with ``grant_lease``, which names the holder. None with
        ``on_held_back()`` called: the one job to take was such a batch job (the long poll then stops listening
        for batch submissions, which would only be refused again)."""
        # A node's devices and labels are remembered only where the single statements run (PostgreSQL).
        devices_text, labels_text = self.replica.devices_of(node_id), self.replica.labels_of(node_id)
        offers = offers_of(devices_text, labels_text, resource) \
            if devices_text is not None and labels_text is not None else None
        if offers is not None:
            assert self._fast is not None and devices_text is not None and labels_text is not None
            ttl = clamp_ttl(self.settings, lease_ttl_s) if lease_ttl_s is not None else None
            lease_id = f"lease-{secrets.token_hex(8)}" if ttl is not None else None
            slots, headroom = await self._headroom()
            node_as_known, row, held_back = await self._fast.claim(
                node_id, devices_text, labels_text, offers, self.settings.batch_max_wait_s, lease_id, ttl, slots,
                headroom)
            if node_as_known:
                if row is None:
                    if held_back and on_held_back is not None:
                        on_held_back()
                    return None
                self._assigned_log(row["job_id"], node_id, row["resource"], row["attempt"], row["waited"],
                                   row["priority"], row["model"])
                assignment = self._assignment(row, row["resource"], row["now"], row["waited"])
                if row["lease_epoch"] is not None:
                    assert lease_id is not None and ttl is not None
                    assignment.lease = self._granted(lease_id, node_id, row["resource"], row["lease_epoch"],
                                                     row["job_id"], row["attempt"], ttl)
                return assignment
            # Gone, draining, cordoned, or registered again with other devices or labels: the general path reads
            # it and says which.

        ttl = clamp_ttl(self.settings, lease_ttl_s) if lease_ttl_s is not None else None

        async def op(tx: Tx) -> tuple[JobAssignment, tuple[str, int] | None, str, str | None] | _HeldBack | None:
            now = await tx.now()
            node = await self.tr.live_node(tx, node_id)
            node_labels = await tx.fetchrow("SELECT labels, cordoned FROM nodes WHERE node_id = $1", node_id)
            assert node_labels is not None  # live_node found it in this transaction
            self.replica.remember_devices(node_id, node["devices"], node_labels["labels"])
            devices = [d for d in devices_of(node["devices"])
                       if d.plugin == "asr" and (resource is None or d.resource == resource)]
            if resource is not None and not devices:
                raise InvalidInput(f"resource {resource} is not a registered device of node {node_id}",
                                   param="resource")
            if node["state"] == N.DRAINING or node_labels["cordoned"] or not devices:
                return None
            offers = offers_of(node["devices"], node_labels["labels"], resource)
            # The head of each class this node serves (the jobs_queue_priority index, one row each); which of the
            # two goes first is rules.dispatch_class's to say.
            served = ask_served_sql(tx.dialect.name, "$2", some_offer=True)
            heads = [await tx.fetchrow(
                f"SELECT * FROM jobs WHERE state = '{J.QUEUED}' AND priority = $1 AND {served} "
                "ORDER BY priority, seq LIMIT 1" + tx.dialect.skip_locked, str(priority), offers)
                for priority in (P.INTERACTIVE, P.BATCH)]
            interactive, batch = heads
            if batch is not None and interactive is None and self.settings.interactive_headroom > 0 \
                    and dispatch_class(batch["priority"], batch["queued_at"], now, self.settings) == 1:
                # Slots from the replica's summary (up to a second old), busy ones counted in this transaction:
                # two replicas deciding at once may both see the last slot above the headroom and overshoot it by
                # one each, which a soft reserve tolerates (the next dispatches hold back until jobs finish).
                slots = (await self.replica.served(tx)).slots
                headroom = headroom_slots(slots, self.settings.interactive_headroom)
                if headroom > 0 and not batch_allowed(slots, await tx.fetchval(BUSY_SLOTS), headroom):
                    return _HELD_BACK
            waiting = [h for h in heads if h is not None]
            if not waiting:
                return None
            job = min(waiting, key=lambda h: (dispatch_class(h["priority"], h["queued_at"], now, self.settings),
                                              h["seq"]))
            device = pick_device(devices, json.loads(node_labels["labels"]),
                                 Ask.of(job["language"], job["model"], job["labels"]))
            assert device is not None  # the query chose a job these devices serve
            waited = now - job["queued_at"]
            await tx.execute(
                f"""UPDATE jobs SET state = '{J.ASSIGNED}', node_id = $2, resource = $3, assigned_at = $4,
                       lease_id = NULL, lease_epoch = NULL, queued_total_s = queued_total_s + $5,
                       unservable_since = NULL
                   WHERE job_id = $1""",
                job["job_id"], node_id, device.resource, now, waited,
            )
            if job["attempt"] > 1:  # a new attempt starts from scratch: an earlier one's segments are not its output
                await tx.execute("DELETE FROM segments WHERE job_id = $1", job["job_id"])
            lease = None
            if ttl is not None and await self.tr.resource_holder(tx, node_id, device.resource) is None:
                lease = await self.tr.lease(tx, now, node_id, job, device.resource, ttl)
            return self._assignment(job, device.resource, now, waited), lease, job["priority"], job["model"]

        done = await self.engine.run(op, urgent=True)  # a node waits on it (db: the priority lane)
        if isinstance(done, _HeldBack):
            if on_held_back is not None:
                on_held_back()
            return None
        if done is None:
            return None
        assignment, lease, priority, model = done
        # Logged once committed (the transaction may have run more than once).
        assert assignment.resource is not None and assignment.queued_s is not None
        self._assigned_log(assignment.job_id, node_id, assignment.resource, assignment.attempt, assignment.queued_s,
                           priority, model)
        if lease is not None:
            assert ttl is not None
            assignment.lease = self._granted(lease[0], node_id, assignment.resource, lease[1], assignment.job_id,
                                             assignment.attempt, ttl)
        return assignment

    async def _headroom(self) -> tuple[int, int]:
        """(slots of the live nodes taking jobs, the idle ones kept for interactive work) for the single
        statement's claim, from the replica's summary (read again when over a second old). Soft: see
        assign_next's general path."""
        if self.settings.interactive_headroom <= 0:
            return 0, 0
        served = self.replica.served_recently()
        if served is None:
            served = await self.engine.run(self.replica.served, urgent=True)  # part of a claim
        return served.slots, headroom_slots(served.slots, self.settings.interactive_headroom)

    def _assigned_log(self, job_id: str, node_id: str, resource: str, attempt: int, waited: float, priority: str,
                      model: str | None) -> None:
        """A committed assignment: logged, and its wait observed (both paths come here once per assignment)."""
        log.info("job assigned job_id=%s node_id=%s resource=%s attempt=%d queued_s=%.3f", job_id, node_id, resource,
                 attempt, waited)
        self.metrics.queue_wait.labels(priority, model or "").observe(max(0.0, waited))

    @staticmethod
    def _assignment(job: Row, resource: str, now: float, waited: float) -> JobAssignment:
        spec = JobSpec.model_validate(json.loads(job["spec"]))
        return JobAssignment(
            job_id=job["job_id"],
            attempt=job["attempt"],
            language=spec.language,
            options=spec.options,
            audio=AudioRef(format=spec.format, sample_rate=spec.sample_rate, bytes=job["audio_bytes"],
                           url=f"/v1/jobs/{job['job_id']}/audio"),
            deadline_s=max(0.0, job["deadline_at"] - now) if job["deadline_at"] is not None else None,
            queued_s=round(waited, 6),
            resource=resource,
            parent_id=job["parent_id"],
        )

    async def post_events(self, job_id: str, report: EventsReport) -> None:
        """Store streamed segments from the job's current holder (a segment id seen before is replaced)."""
        ids = [seg.id for seg in report.events]
        if self._fast is not None and self.replica.fresh_reap() and len(set(ids)) == len(ids) and \
                await self._fast.events((job_id, report.attempt, report.lease_id, report.lease_epoch,
                                         report.node_id), ids, [doc(seg) for seg in report.events]):
            return  # (a refusal, a repeated segment id in one report, or a pending store pause: the general path)

        async def op(tx: Tx) -> None:
            now = await tx.now()
            await self.tr.resume_if_paused(tx, now)
            held = await tx.execute(
                "UPDATE jobs SET state = state WHERE " + self._FENCE,
                job_id, report.attempt, report.lease_id, report.lease_epoch, report.node_id, now,
            )
            if not held:
                exc = await self.tr.why_rejected(tx, job_id, report.attempt, report.lease_id, report.lease_epoch,
                                               report.node_id, now)
                log.info("events rejected job_id=%s node_id=%s lease_id=%s attempt=%d lease_epoch=%d reason=%s",
                         job_id, report.node_id, report.lease_id, report.attempt, report.lease_epoch, exc.code)
                raise exc
            if report.events:
                await tx.executemany(
                    """INSERT INTO segments (job_id, seg_id, data) VALUES ($1, $2, $3)
                       ON CONFLICT (job_id, seg_id) DO UPDATE SET data = excluded.data""",
                    [(job_id, s.id, doc(s)) for s in report.events],
                )
                tx.notify(job_topic(job_id))

        await self.engine.run(op)

    async def report_result(self, job_id: str, report: ResultReport) -> ResultAck:
        """Accept the one final result of a job from its current holder."""
        holder_key = (job_id, report.attempt, report.lease_id, report.lease_epoch, report.node_id)
        outcome: dict[str, Any] = {}
        if self._fast is not None and report.outcome == "succeeded" and self.replica.fresh_reap():
            assert report.result is not None  # ResultReport guarantees it
            ids = [seg.id for seg in report.result.segments]
            if len(set(ids)) == len(ids):
                ack = ResultAck()
                done = await self._fast.succeed(
                    holder_key, doc(report.result), json.dumps(report.timings), doc(ack), ids,
                    [doc(seg) for seg in report.result.segments], not self.settings.keep_audio)
                if done is not None:
                    self.tr.finished_log(done, done["now"], None)
                    self.metrics.results_accepted.inc()
                    return ack
            # Not the holder, a repeated report, a pending store pause: the general path decides and says why.

        async def op(tx: Tx) -> ResultAck:
            now = await tx.now()
            await self.tr.resume_if_paused(tx, now)
            previous = await tx.fetchval(
                "SELECT ack FROM reports WHERE job_id = $1 AND attempt = $2 AND lease_id = $3 AND epoch = $4 "
                "AND node_id = $5", *holder_key,
            )
            if previous is not None:
                # The accepted holder retrying (its answer was lost): the same answer again, nothing changes.
                return ResultAck.model_validate_json(previous).model_copy(update={"duplicate": True})
            job = await tx.fetchrow("UPDATE jobs SET state = state WHERE " + self._FENCE + " RETURNING *",
                                    *holder_key, now)
            if job is None:
                exc = await self.tr.why_rejected(tx, *holder_key, now)
                log.info("result rejected job_id=%s node_id=%s lease_id=%s attempt=%d lease_epoch=%d reason=%s",
                         job_id, report.node_id, report.lease_id, report.attempt, report.lease_epoch, exc.code)
                outcome["rejected"] = exc.code
                raise exc
            timings = json.dumps(report.timings)
            if report.outcome == "succeeded":
                assert report.result is not None  # ResultReport guarantees it
                if report.result.segments:
                    await tx.execute("DELETE FROM segments WHERE job_id = $1", job_id)
                    await tx.executemany(
                        "INSERT INTO segments (job_id, seg_id, data) VALUES ($1, $2, $3)",
                        [(job_id, s.id, doc(s)) for s in report.result.segments],
                    )
                ack = ResultAck()
                await self.tr.finish(tx, job, now, None, result=doc(report.result), timings=timings)
            else:
                error = report.error or JobErrorInfo(code="failed", message="the node reported a failure")
                if error.code not in JOB_ERROR_CODES:
                    error = JobErrorInfo(code="failed", message=f"{error.code}: {error.message}")
                if error.code in RETRYABLE_ERROR_CODES and job["attempt"] < self.settings.max_attempts:
                    ack = ResultAck(requeued=True)
                    await tx.execute("UPDATE jobs SET node_timings = $2 WHERE job_id = $1", job_id, timings)
                    await self.tr.requeue_or_fail(tx, job, now, "retryable_error", error.code, error.message)
                else:
                    ack = ResultAck()
                    await self.tr.finish(tx, job, now, error, timings=timings)
            await tx.execute(
                "INSERT INTO reports (job_id, attempt, lease_id, epoch, node_id, ack) VALUES ($1, $2, $3, $4, $5, $6)",
                *holder_key, doc(ack),
            )
            outcome["accepted"] = True
            return ack

        try:
            return await self.engine.run(op)
        finally:
            if "rejected" in outcome:
                self.metrics.results_rejected.labels(outcome["rejected"]).inc()
            elif outcome.get("accepted"):
                self.metrics.results_accepted.inc()

    async def grant_lease(self, req: LeaseRequest) -> LeaseGrant:
        """Grant a fenced lease on (node, resource) for a job assigned to that node."""
        ttl = clamp_ttl(self.settings, req.ttl_s)
        devices_text = self.replica.devices_of(req.node_id)  # (PostgreSQL only, as in assign_next)
        if devices_text is not None and any(d.resource == req.resource for d in devices_of(devices_text)):
            assert self._fast is not None
            lease_id = f"lease-{secrets.token_hex(8)}"
            row = await self._fast.grant(req.node_id, devices_text, req.job_id, req.resource, lease_id, ttl)
            if row is not None:
                return self._granted(lease_id, req.node_id, req.resource, row["epoch"], req.job_id, row["attempt"],
                                     ttl)
            # A refusal, a repeated request, a resource still held: the general path decides and says why.

        async def op(tx: Tx) -> tuple[str, int, str, int]:
            now = await tx.now()
            node = await self.tr.live_node(tx, req.node_id)
            self.replica.remember_devices(req.node_id, node["devices"])
            if not any(d.resource == req.resource for d in devices_of(node["devices"])):
                raise InvalidInput(f"resource {req.resource} is not a registered device of node {req.node_id}",
                                   param="resource")
            job = await tx.fetchrow(
                "SELECT * FROM jobs WHERE job_id = $1" + (" FOR UPDATE" if tx.dialect.skip_locked else ""),
                req.job_id,
            )
            if job is None or job["node_id"] != req.node_id or job["state"] not in (J.ASSIGNED, J.RUNNING):
                state = "unknown" if job is None else f"{job['state']} on node {job['node_id'] or 'none'}"
                raise JobNotAssigned(f"job {req.job_id} is not assigned to node {req.node_id} (it is {state})")
            holder = await self.tr.resource_holder(tx, req.node_id, req.resource)
            if holder is not None and holder["job_id"] != job["job_id"]:
                raise ResourceHeld(
                    f"{req.resource} on node {req.node_id} is held by lease {holder['lease_id']} "
                    f"(job {holder['job_id']})",
                    retry_after_s=max(1, math.ceil(holder["expires_at"] - now)),
                )
            lease_id, epoch = await self.tr.lease(tx, now, req.node_id, job, req.resource, ttl)
            return lease_id, epoch, job["job_id"], job["attempt"]

        lease_id, epoch, job_id, attempt = await self.engine.run(op)
        return self._granted(lease_id, req.node_id, req.resource, epoch, job_id, attempt, ttl)

    def _granted(self, lease_id: str, node_id: str, resource: str, epoch: int, job_id: str, attempt: int,
                 ttl: float) -> LeaseGrant:
        """A committed grant, logged and counted once (the transaction may have run more than once)."""
        log.info("lease granted lease_id=%s node_id=%s resource=%s epoch=%d job_id=%s attempt=%d ttl_s=%g",
                 lease_id, node_id, resource, epoch, job_id, attempt, ttl)
        self.metrics.leases_granted.labels(node_id).inc()
        return LeaseGrant(lease_id=lease_id, epoch=epoch, ttl_s=ttl, resource=resource)

    async def renew_lease(self, lease_id: str, req: RenewRequest) -> RenewResponse:
        ttl = clamp_ttl(self.settings, req.ttl_s) if req.ttl_s is not None else None
        if self._fast is not None and self.replica.fresh_reap():
            row = await self._fast.renew(lease_id, req.epoch, req.node_id, ttl)
            if row is not None:
                self.metrics.leases_renewed.labels(row["node_id"]).inc()
                return RenewResponse(lease_id=lease_id, epoch=row["epoch"], ttl_s=row["ttl_s"])

        async def op(tx: Tx) -> tuple[str, RenewResponse]:
            now = await tx.now()
            await self.tr.resume_if_paused(tx, now)
            row = await tx.fetchrow(renewal("$5"), lease_id, req.epoch, req.node_id, ttl, now)
            if row is not None:
                return row["node_id"], RenewResponse(lease_id=lease_id, epoch=row["epoch"], ttl_s=row["ttl_s"])
            lease = await tx.fetchrow("SELECT * FROM leases WHERE lease_id = $1", lease_id)
            if lease is None:
                raise LeaseUnusable(f"lease {lease_id} is not known", code="unknown_lease")
            if lease["state"] != L.ACTIVE:
                if (cancelled := await self.tr.cancelled(tx, lease["job_id"])) is not None:
                    raise LeaseUnusable(cancelled.message, code=cancelled.code)
                raise LeaseUnusable(f"lease {lease_id} is {lease['state']}", code=f"lease_{lease['state']}")
            if lease["expires_at"] <= now:
                raise LeaseUnusable(f"lease {lease_id} is expired", code="lease_expired")
            exc = await self.tr.why_rejected(tx, lease["job_id"], lease["attempt"], lease_id, req.epoch, req.node_id,
                                           now)
            log.info("renewal rejected lease_id=%s node_id=%s epoch=%d reason=%s", lease_id, req.node_id, req.epoch,
                     exc.code)
            raise LeaseUnusable(exc.message, code=exc.code)

        node_id, response = await self.engine.run(op)
        self.metrics.leases_renewed.labels(node_id).inc()
        return response

    async def release_lease(self, lease_id: str) -> None:
        """Give a lease back (idempotent). A job without an accepted result goes back to the queue."""
        async def op(tx: Tx) -> None:
            now = await tx.now()
            lease = await tx.fetchrow(
                f"UPDATE leases SET state = '{L.RELEASED}', ended_at = $2 WHERE lease_id = $1 AND state = '{L.ACTIVE}' "
                "RETURNING node_id, job_id", lease_id, now,
            )
            if lease is None:
                return
            log.info("lease released lease_id=%s node_id=%s job_id=%s", lease_id, lease["node_id"], lease["job_id"])
            job = await tx.fetchrow("SELECT * FROM jobs WHERE job_id = $1", lease["job_id"])
            if job is not None and job["lease_id"] == lease_id and job["state"] == J.RUNNING:
                await self.tr.requeue_or_fail(tx, job, now, "released", "lease_lost",
                                            f"node {lease['node_id']} released the lease without a result")

        await self.engine.run(op)

    async def lease_state(self, lease_id: str) -> dict[str, Any] | None:
        """A lease's row (tests and status pages)."""
        row = await self.engine.run(lambda tx: tx.fetchrow("SELECT * FROM leases WHERE lease_id = $1", lease_id))
        return dict(row) if row is not None else None
