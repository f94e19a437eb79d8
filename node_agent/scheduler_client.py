"""HTTP client for the scheduler protocol v1 (docs/protocol.md), seen from a node.

Each call maps the scheduler's answer to a typed outcome: a validated reply, or one of the errors below. Transport
failures, timeouts, 5xx and unparseable bodies all become ``SchedulerUnavailable`` (retry later); 4xx answers
that mean something specific get their own type. Retry loops live with the callers, which know their deadlines.
The node calls need a node id; the job calls (``submit_job``, ``get_job``) do not, so ``node-agent submit`` and
``/utterance`` use this client too. Bodies are the scheduler's own models (``scheduler.schemas``: the shapes it
reads), built here or handed in, and sent with only the fields set; a body the model refuses is ``BadRequest``
before anything is sent. Importing this module loads none of the scheduler's server code.

A client may be given several scheduler URLs (replicas on one store). It calls one, the current, and moves to the
next when a call to it fails in transport or answers 5xx, so the caller's next try (under its retry policy) goes to
a scheduler that may answer. A refused connection (nothing was sent) moves on within the same call.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from .contracts import DecodeOptions, error_key, one_line
from .errors import NodeAgentError
from .metrics import AgentMetrics
from .scheduler.schemas import (
    NODE_SECRET_HEADER,
    SECTION_SAMPLE_RATE,
    Capacity,
    EventsReport,
    HeartbeatRequest,
    HeartbeatResponse,
    JobAssignment,
    JobSubmitted,
    JobView,
    LeaseGrant,
    LeaseRequest,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    RenewResponse,
    ResultAck,
    ResultReport,
    SectionList,
    SectionView,
)

log = logging.getLogger("node_agent.scheduler_client")
T = TypeVar("T", bound=BaseModel)


class SchedulerError(NodeAgentError):
    """Base of client-side scheduler errors: ``status``, and for an error answer the scheduler's ``code``,
    its own one-line ``detail`` and the request field at fault (``param``) where it names one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, *,
                 detail: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail if detail is not None else message
        self.param = param


class SchedulerUnavailable(SchedulerError):
    """Transport failure, timeout, 5xx or a reply that is not the protocol: try again later."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, status, code)
        self.retry_after = retry_after


class ConnectFailed(SchedulerUnavailable):
    """No connection could be made at all (nothing listening, unknown host, network down); ``reason`` is the
    operating system's one-line reason, e.g. ``connection refused``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownNode(SchedulerError):
    """404 unknown_node: the scheduler forgot us; register again."""


class LeaseHeld(SchedulerError):
    """409 resource_held: someone holds the device; try after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, 409, "resource_held")
        self.retry_after = retry_after


class Gone(SchedulerError):
    """410: the lease or job assignment no longer exists (expired, superseded, re-queued)."""


class Rejected(SchedulerError):
    """409 on events or results: stale attempt or epoch, or already completed. Definitive: do not retry."""


class BadRequest(SchedulerError):
    """Another 4xx: our request was wrong. Definitive."""


class NotFound(BadRequest):
    """404 other than unknown_node: the job (or audio) named does not exist there. Definitive."""


class UnknownJob(NotFound):
    """404 unknown_job. For a job this client submitted, the scheduler lost it (a restart of one that keeps its
    state in memory, or the job outlived ``job_retention_s``): say ``lost_job_line`` once, never retry."""


def lost_job_line(job_id: str) -> str:
    """The one line for a job a client submitted that its scheduler no longer knows."""
    return f"job {job_id} is unknown to the scheduler (it restarted and lost it?)"


def new_idempotency_key() -> str:
    """A fresh ``Idempotency-Key`` for one submission; every retry of that submission sends the same key."""
    return uuid.uuid4().hex


class SchedulerClient:
    """One aiohttp session to a scheduler, failing over between ``base_url``'s URLs (a comma list or a sequence;
    see the module docstring); every call is bounded by ``request_timeout_s``."""

    def __init__(self, base_url: str | Sequence[str], token: str | None, request_timeout_s: float,
                 metrics: AgentMetrics | None = None) -> None:
        listed = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        #: Every scheduler URL this client may call, in the order they are tried.
        self.urls: tuple[str, ...] = tuple(u.strip().rstrip("/") for u in listed if u.strip())
        if not self.urls:
            raise ValueError("no scheduler URL")
        self._current = 0
        self._switch_logged: set[int] = set()  # URLs a failover moved to, logged since the last success
        self._token = token
        #: This node's secret (``X-Node-Secret``), sent on the node calls once registration gave or restored it.
        self.node_secret: str | None = None
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        if metrics is not None:
            metrics.scheduler_url_index.set(0)

    @property
    def base_url(self) -> str:
        """The scheduler URL calls go to now."""
        return self.urls[self._current]

    def _failed_over(self, index: int, reason: str) -> None:
        """The URL at ``index`` failed: move to the next, unless a concurrent call has already moved on."""
        if len(self.urls) == 1 or index != self._current:
            return
        self._current = (index + 1) % len(self.urls)
        if self.metrics is not None:
            self.metrics.scheduler_url_index.set(self._current)
        # One line per URL moved to during an outage, not one per retry while every scheduler is down.
        if self._current not in self._switch_logged:
            self._switch_logged.add(self._current)
            log.warning("scheduler %s failed (%s): switching to %s", self.urls[index], reason, self.base_url)

    def _answered(self, index: int) -> None:
        if self._switch_logged and index == self._current:
            self._switch_logged.clear()

    async def __aenter__(self) -> "SchedulerClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": "node-agent"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, endpoint: str, path: str, *, body: Any = None,
                    params: dict[str, Any] | None = None, timeout: float | None = None,
                    raw: bool = False, form: Callable[[], aiohttp.FormData] | None = None,
                    headers: Mapping[str, str] | None = None,
                    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        """One HTTP exchange (a JSON ``body``, or a multipart body that ``form()`` builds afresh for each try);
        returns (status, parsed JSON or bytes, the answer's headers). Records metrics. A refused connection is tried on each other URL in turn, all within
        ``timeout``; any other failure moves to the next URL for the caller's next try."""
        timeout = timeout if timeout is not None else self.request_timeout_s
        give_up = time.monotonic() + timeout
        refused: list[str] = []
        while True:
            index = self._current
            url = self.urls[index]
            started = time.perf_counter()
            code = "error"
            try:
                async with self._http().request(
                    method, url + path, json=body, data=form() if form is not None else None, params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=max(0.001, give_up - time.monotonic())),
                ) as resp:
                    code = str(resp.status)
                    data = await resp.read()
                    answer = resp.headers
                    status = resp.status
                break
            except aiohttp.ClientConnectorError as exc:
                reason = _os_reason(exc)
                self._failed_over(index, reason)
                refused.append(url)
                # Nothing reached that scheduler, so the request may go to the next one now, once each.
                if len(refused) < len(self.urls) and time.monotonic() < give_up:
                    continue
                where = ", ".join(dict.fromkeys(refused))
                raise ConnectFailed(f"{endpoint}: cannot connect to {where}: {reason}", reason) from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc or 'timed out'}"
                self._failed_over(index, reason)
                raise SchedulerUnavailable(f"{endpoint}: {reason}") from None
            finally:
                if self.metrics is not None:
                    self.metrics.scheduler_requests.labels(endpoint, code).inc()
                    self.metrics.scheduler_request_duration.labels(endpoint).observe(time.perf_counter() - started)
        if status >= 500:
            self._failed_over(index, f"answered {status}")
            # The code tells "the store is paused" (store_unavailable: nothing changes meanwhile) from a crash.
            try:
                code_, message, _ = self._error(status, json.loads(data) if data else None)
            except (ValueError, UnicodeDecodeError):
                code_, message = "", ""
            detail = f" {code_}: {message}" if code_ else ""
            raise SchedulerUnavailable(f"{endpoint}: scheduler answered {status}{detail}", status,
                                       _retry_after(answer), code=code_ or None)
        self._answered(index)
        if raw and status < 300:
            return status, data, answer
        parsed: Any = None
        if data:
            try:
                parsed = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                raise SchedulerUnavailable(f"{endpoint}: scheduler answered {status} with a body that is not "
                                           f"JSON ({data[:60]!r})", status) from None
        return status, parsed, answer

    @staticmethod
    def _parse(model: type[T], endpoint: str, status: int, data: Any) -> T:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise SchedulerUnavailable(f"{endpoint}: scheduler answered {status} with an invalid reply "
                                       f"({one_line(exc, top='body', more=False)})", status) from None

    @staticmethod
    def _error(status: int, data: Any) -> tuple[str, str, str | None]:
        """(code, message, param) of an error answer; the message alone when the body is not the protocol's."""
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            param = err.get("param")
            return (str(err.get("code", "")), str(err.get("message", ""))[:300],
                    param if isinstance(param, str) else None)
        return "", f"HTTP {status}", None

    def _fail(self, endpoint: str, status: int, data: Any, headers: Any) -> SchedulerError:
        code, message, param = self._error(status, data)
        text = f"{endpoint}: {status} {code}: {message}".rstrip(": ")
        if status == 404 and code == "unknown_node":
            return UnknownNode(text, status, code, detail=message)
        if status == 409 and code == "resource_held":
            return LeaseHeld(text, _retry_after(headers) or 1.0)
        if status == 410:
            return Gone(text, status, code, detail=message)
        if status == 409:
            return Rejected(text, status, code, detail=message)
        if status in (408, 429):
            return SchedulerUnavailable(text, status, _retry_after(headers))
        if status == 404 and code == "unknown_job":
            return UnknownJob(text, status, code, detail=message, param=param)
        if status == 404:
            return NotFound(text, status, code, detail=message, param=param)
        return BadRequest(text, status, code, detail=message, param=param)

    # ----- calls -------------------------------------------------------------------------------------------------

    def _node_headers(self) -> dict[str, str] | None:
        """What proves this node's identity on a node call (none before the scheduler gave a secret)."""
        return {NODE_SECRET_HEADER: self.node_secret} if self.node_secret else None

    @staticmethod
    def _body(model: type[T], endpoint: str, value: T | Mapping[str, Any]) -> dict[str, Any]:
        """``value`` as the scheduler reads it (``model``), in JSON form with only the fields set; ``BadRequest``
        naming the field when the model refuses it, as the scheduler would have."""
        try:
            message = value if isinstance(value, model) else model.model_validate(value)
        except ValidationError as exc:
            detail = one_line(exc, top="body")
            raise BadRequest(f"{endpoint}: invalid request: {detail}", None, "invalid_request", detail=detail,
                             param=error_key(exc)) from None
        return message.model_dump(mode="json", exclude_unset=True)

    async def register(self, request: RegisterRequest | Mapping[str, Any]) -> RegisterResponse:
        body = self._body(RegisterRequest, "register", request)
        status, data, headers = await self._call("POST", "register", "/v1/nodes", body=body,
                                                 headers=self._node_headers())
        if status in (200, 201):
            reply = self._parse(RegisterResponse, "register", status, data)
            if reply.node_secret is not None:  # the first registration: from now on, this client is that node
                self.node_secret = reply.node_secret
            return reply
        raise self._fail("register", status, data, headers)

    async def heartbeat(self, node_id: str, request: HeartbeatRequest | Mapping[str, Any]) -> HeartbeatResponse:
        body = self._body(HeartbeatRequest, "heartbeat", request)
        status, data, headers = await self._call("PUT", "heartbeat", f"/v1/nodes/{node_id}/heartbeat", body=body,
                                                 headers=self._node_headers())
        if status == 200:
            return self._parse(HeartbeatResponse, "heartbeat", status, data)
        raise self._fail("heartbeat", status, data, headers)

    async def next_job(self, node_id: str, wait_s: float, resource: str | None = None,
                       lease_ttl_s: float | None = None) -> JobAssignment | None:
        """The next job for ``resource``; with ``lease_ttl_s``, its lease too when the scheduler can grant it
        with the assignment (``JobAssignment.lease``; a scheduler that cannot ignores the parameter)."""
        params: dict[str, Any] = {"wait_s": f"{wait_s:g}"}
        if resource:
            params["resource"] = resource
        if lease_ttl_s is not None:
            params["lease_ttl_s"] = f"{lease_ttl_s:g}"
        status, data, headers = await self._call(
            "GET", "next_job", f"/v1/nodes/{node_id}/jobs/next", params=params,
            timeout=wait_s + self.request_timeout_s, headers=self._node_headers())
        if status == 204:
            return None
        if status == 200:
            return self._parse(JobAssignment, "next_job", status, data)
        raise self._fail("next_job", status, data, headers)

    async def fetch_audio(self, url: str) -> bytes:
        path = url if url.startswith("/") else "/" + url
        status, data, headers = await self._call("GET", "audio", path, raw=True,
                                                 timeout=max(60.0, self.request_timeout_s),
                                                 headers=self._node_headers())
        if status == 200:
            return data
        raise self._fail("audio", status, data, headers)

    async def acquire_lease(self, node_id: str, job_id: str, resource: str, ttl_s: float) -> LeaseGrant:
        status, data, headers = await self._call(
            "POST", "lease_acquire", "/v1/leases",
            body=self._body(LeaseRequest, "lease_acquire",
                            {"node_id": node_id, "job_id": job_id, "resource": resource, "ttl_s": ttl_s}),
            headers=self._node_headers())
        if status in (200, 201):
            return self._parse(LeaseGrant, "lease_acquire", status, data)
        raise self._fail("lease_acquire", status, data, headers)

    async def renew_lease(self, lease_id: str, epoch: int, node_id: str,
                          timeout: float | None = None) -> RenewResponse:
        """Renew as the lease's holder: the scheduler checks the node and epoch against the lease."""
        body = self._body(RenewRequest, "lease_renew", {"node_id": node_id, "epoch": epoch})
        status, data, headers = await self._call("POST", "lease_renew", f"/v1/leases/{lease_id}/renew",
                                                 body=body, timeout=timeout, headers=self._node_headers())
        if status == 200:
            return self._parse(RenewResponse, "lease_renew", status, data)
        raise self._fail("lease_renew", status, data, headers)

    async def release_lease(self, lease_id: str) -> None:
        status, data, headers = await self._call("DELETE", "lease_release", f"/v1/leases/{lease_id}",
                                                 headers=self._node_headers())
        if status not in (200, 204, 404, 410):
            raise self._fail("lease_release", status, data, headers)

    async def post_events(self, job_id: str, node_id: str, lease_id: str, attempt: int, epoch: int,
                          events: list[dict[str, Any]]) -> None:
        """Stream segments as the job's holder: (attempt, lease_id, epoch, node_id) must name its live lease."""
        body = self._body(EventsReport, "events", {"node_id": node_id, "lease_id": lease_id, "attempt": attempt,
                                                   "lease_epoch": epoch, "events": events})
        status, data, headers = await self._call("POST", "events", f"/v1/jobs/{job_id}/events", body=body,
                                                 headers=self._node_headers())
        if status not in (200, 202, 204):
            raise self._fail("events", status, data, headers)

    async def report_result(self, job_id: str, report: ResultReport | Mapping[str, Any]) -> ResultAck:
        body = self._body(ResultReport, "result", report)
        status, data, headers = await self._call("POST", "result", f"/v1/jobs/{job_id}/result", body=body,
                                                 headers=self._node_headers())
        if status in (200, 201):
            return self._parse(ResultAck, "result", status, data)
        raise self._fail("result", status, data, headers)

    # ----- section jobs (issue 24): the parent's holder asks, makes and follows them --------------------------

    async def job_capacity(self, job_id: str, lease_id: str) -> int:
        """``GET /v1/jobs/{id}/capacity``: how many sections of the job (held under ``lease_id``) the scheduler
        would dispatch at once now (0: none; a section is never split again). A lost lease is ``Rejected``
        (``lease_lost``, or ``job_cancelled``)."""
        status, data, headers = await self._call("GET", "job_capacity", f"/v1/jobs/{job_id}/capacity",
                                                 params={"lease_id": lease_id}, headers=self._node_headers())
        if status == 200:
            return self._parse(Capacity, "job_capacity", status, data).free_slots
        raise self._fail("job_capacity", status, data, headers)

    async def create_section(self, job_id: str, *, lease_id: str, lease_epoch: int, index: int, offset_s: float,
                             duration_s: float, audio: bytes, sample_rate: int = SECTION_SAMPLE_RATE,
                             language: str | None = None) -> str:
        """``POST /v1/jobs/{id}/sections``: section ``index`` (1..) of the job's current attempt, its raw
        pcm_s16le ``audio`` starting ``offset_s`` into the parent's, decoded in ``language`` (for a job that named
        none; None: the parent's); the child job's id. Idempotent per (job, attempt, index): a retry after a lost
        answer gets the same child. A lost lease is ``Rejected``; an index, offset, duration or language the
        scheduler refuses is ``BadRequest`` (422 ``section_refused``, or ``no_capable_node`` for a language no
        live node serves)."""
        fields = {"lease_id": lease_id, "lease_epoch": str(lease_epoch), "index": str(index),
                  "offset_s": repr(float(offset_s)), "duration_s": repr(float(duration_s)),
                  "sample_rate": str(sample_rate)}
        if language is not None:
            fields["language"] = language

        def form() -> aiohttp.FormData:
            body = aiohttp.FormData()
            for name, value in fields.items():
                body.add_field(name, value)
            body.add_field("audio", io.BytesIO(audio), filename=f"section-{index}.pcm",
                           content_type="application/octet-stream")
            return body

        status, data, headers = await self._call("POST", "section_create", f"/v1/jobs/{job_id}/sections", form=form,
                                                 timeout=max(60.0, self.request_timeout_s),
                                                 headers=self._node_headers())
        if status in (200, 201):
            return self._parse(JobView, "section_create", status, data).job_id
        raise self._fail("section_create", status, data, headers)

    async def job_sections(self, job_id: str, lease_id: str, *, from_index: int = 0,
                           wait_s: float = 0.0) -> list[SectionView]:
        """``GET /v1/jobs/{id}/sections``: the sections of the job's current attempt by index, results from
        ``from_index`` on; with ``wait_s`` (the scheduler holds at most 30 s) a long poll that answers once the
        section ``from_index`` waits for has ended, a later one failed, or any section's state changed."""
        params = {"lease_id": lease_id, "from": str(from_index), "wait_s": f"{max(0.0, wait_s):.2f}"}
        status, data, headers = await self._call("GET", "job_sections", f"/v1/jobs/{job_id}/sections",
                                                 params=params, timeout=wait_s + self.request_timeout_s,
                                                 headers=self._node_headers())
        if status == 200:
            return self._parse(SectionList, "job_sections", status, data).sections
        raise self._fail("job_sections", status, data, headers)

    # ----- the job API (a client's calls; no node identity) ------------------------------------------------------

    async def submit_job(self, audio: bytes, *, filename: str = "audio", format: str | None = None,
                         sample_rate: int | None = None, language: str | None = None,
                         options: DecodeOptions | Mapping[str, Any] | None = None, deadline_s: float | None = None,
                         allow_truncated: bool = False, idempotency_key: str | None = None,
                         model: str | None = None, labels: Mapping[str, str] | None = None,
                         priority: str | None = None) -> JobSubmitted:
        """``POST /v1/jobs`` as multipart with the raw audio; fields left None are not sent (scheduler defaults).
        Retries of one submission pass the same ``idempotency_key``, so the scheduler answers them with the job
        the first one created (a POST whose answer was lost creates no second job)."""
        fields: dict[str, str] = {}
        if format is not None:
            fields["format"] = format
        if sample_rate is not None:
            fields["sample_rate"] = str(sample_rate)
        if language is not None:
            fields["language"] = language
        if isinstance(options, DecodeOptions):
            options = options.wire()
        if options:
            fields["options"] = json.dumps(dict(options))
        if deadline_s is not None:
            fields["deadline_s"] = f"{deadline_s:.3f}"
        if allow_truncated:
            fields["allow_truncated"] = "true"
        if model is not None:
            fields["model"] = model
        if labels:
            fields["labels"] = json.dumps(dict(labels))
        if priority is not None:
            fields["priority"] = priority

        def form() -> aiohttp.FormData:
            body = aiohttp.FormData()
            for name, value in fields.items():
                body.add_field(name, value)
            # A BytesIO shares the bytes' buffer and aiohttp sends it in small chunks: no second copy of the
            # audio is built, neither as base64 text nor in the socket's send buffer.
            body.add_field("file", io.BytesIO(audio), filename=filename, content_type="application/octet-stream")
            return body

        status, data, headers = await self._call(
            "POST", "job_submit", "/v1/jobs", form=form, timeout=max(60.0, self.request_timeout_s),
            headers={"Idempotency-Key": idempotency_key} if idempotency_key else None)
        if status in (200, 201, 202):
            return self._parse(JobSubmitted, "job_submit", status, data)
        raise self._fail("job_submit", status, data, headers)

    async def get_job(self, job_id: str, wait_s: float = 0.0, after_segment: int | None = None) -> JobView:
        """``GET /v1/jobs/{id}``: with ``wait_s`` a long poll that answers early once the job finished or (with
        ``after_segment``) has more segments than that."""
        params: dict[str, Any] = {"wait_s": f"{max(0.0, wait_s):.2f}"}
        if after_segment is not None:
            params["after_segment"] = str(after_segment)
        status, data, headers = await self._call("GET", "job_view", f"/v1/jobs/{job_id}", params=params,
                                                 timeout=wait_s + self.request_timeout_s)
        if status == 200:
            return self._parse(JobView, "job_view", status, data)
        raise self._fail("job_view", status, data, headers)

    async def cancel_job(self, job_id: str) -> JobView:
        """``DELETE /v1/jobs/{id}``: cancel the job (one that has ended is left as it is); its view after."""
        status, data, headers = await self._call("DELETE", "job_cancel", f"/v1/jobs/{job_id}")
        if status == 200:
            return self._parse(JobView, "job_cancel", status, data)
        raise self._fail("job_cancel", status, data, headers)


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """The operating system's reason a connection failed, as a user reads it (``connection refused``)."""
    errno_ = exc.os_error.errno
    if isinstance(errno_, int) and errno_ > 0:
        return os.strerror(errno_).lower()
    return str(exc.os_error or exc)


def _retry_after(headers: Any) -> float | None:
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return max(0.0, min(value, 300.0))
