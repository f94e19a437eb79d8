"""HTTP face of the scheduler (protocol version 1, docs/protocol.md): maps requests onto the store.

Long polls wait on per-topic wake-ups that the store announces after each change it commits (on PostgreSQL, from
every replica through LISTEN/NOTIFY), and re-check the store now and then besides; a background task reaps what fell
due (expired leases, vanished nodes, deadlines) so waiters wake even when no request arrives. Uploads are streamed
into the store as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from ..config import SchedulerSettings, host_port
from ..errors import ListenError, job_error_status
from ..jsonio import json_response
from .errors import (
    ApiError,
    InvalidInput,
    JobNotAssigned,
    LeaseUnusable,
    NodeNotFound,
    QueueFull,
    ReportRejected,
    ResourceHeld,
    SectionRefused,
    ShuttingDown,
    StoreUnavailable,
    TooLarge,
    Unauthorized,
    Forbidden,
    UnknownJob,
    Unservable,
    WaitTimeout,
)
from . import auth
from .bodies import (BODY_TIMEOUT_KEY, THREAD_PARSE_BYTES, BodyTimeout, FilePart, decode_b64,
                     memoize_multipart_dispositions, parse_json, read_json, read_multipart, validate)
from .formats import RESPONSE_FORMATS, to_srt, to_verbose_json, to_vtt
from .schemas import (
    ID_MAX_CHARS,
    ID_PATTERN,
    JOBS_PAGE_MAX,
    NODES_PAGE_MAX,
    DrainRequest,
    JobState,
    RESOURCE_PATTERN,
    EventsReport,
    HeartbeatRequest,
    JobOptions,
    JobSpec,
    JobSubmission,
    JobSubmitted,
    LeaseRequest,
    Priority,
    RegisterRequest,
    RenewRequest,
    ResultReport,
    SECTION_SAMPLE_RATE,
    SECTIONS_WAIT_MAX_S,
    Capacity,
    SectionList,
    SectionView,
)
from .store import Store, open_store
from .topics import BATCH_TOPIC, QUEUE_TOPIC, QUEUE_TOPICS, job_topic, sections_topic

log = logging.getLogger("node_agent.scheduler")

#: A queue change wakes this many of the nodes waiting for work (each then claims from the store); waking all of
#: them would cost a store transaction per waiting node per job.
QUEUE_WAKE = 2
#: JSON bodies are parsed whole, so they are bounded well below max_body_bytes; larger audio goes as multipart,
#: which is streamed into the store.
MAX_JSON_BODY_BYTES = 64 * 1024 * 1024
#: The longest the OpenAI-compatible endpoint waits for its job (it has no deadline field).
OPENAI_WAIT_S = 600.0
#: How long stopping the server waits for requests still in flight (long polls are woken at once).
SHUTDOWN_TIMEOUT_S = 5.0
OPENAI_PATH = "/v1/audio/transcriptions"
#: How often a synchronous request (the OpenAI endpoint) checks that its client is still connected: aiohttp does
#: not cancel a handler whose client went away, so a job nobody waits for any more is cancelled within this long.
DISCONNECT_CHECK_S = 0.25

T = TypeVar("T")


class _Waiter:
    """One round of a long poll's wait: set by the first topic that wakes it (named in ``woken_by``)."""

    __slots__ = ("event", "woken_by")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.woken_by: str | None = None


class Notifier:
    """Wake-ups by topic. Waiters re-check their (asynchronous) condition after each wake-up, and every ``poll_s``
    besides when given. A wake-up on a queue topic goes to ``queue_wake`` waiters only (each then claims)."""

    def __init__(self, poll_s: float | None = None, queue_wake: int | None = None) -> None:
        self._waiters: dict[str, list[_Waiter]] = {}
        self.poll_s = poll_s
        self.queue_wake = queue_wake
        self.closed = False

    def notify(self, topic: str) -> None:
        waiters = self._waiters.get(topic)
        if not waiters:
            return
        limit = self.queue_wake if topic in QUEUE_TOPICS else None
        # One woken by another of its topics already is on its way to re-check: this wake-up goes to the next, and
        # it stays listed (it unlists itself; a poll that drops the batch topic may go on waiting for this one).
        kept: list[_Waiter] = []
        woken = seen = 0
        while seen < len(waiters) and (limit is None or woken < limit):
            waiter = waiters[seen]
            seen += 1
            if waiter.event.is_set():
                kept.append(waiter)
                continue
            waiter.woken_by = topic if limit is not None else None
            waiter.event.set()
            woken += 1
        waiters[:seen] = kept

    def wake_all(self) -> None:
        """Every waiter re-checks (wake-ups may have been missed: a store connection was lost)."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()
            waiters.clear()

    def close(self) -> None:
        """Wake every waiter for good (server shutdown)."""
        self.closed = True
        self.wake_all()

    async def wait_for(self, topic: str, check: Callable[[], Awaitable[T | None]], timeout: float, *,
                       also: str | None = None, also_while: Callable[[], bool] = lambda: True) -> T | None:
        """Return ``check()``'s first non-None value, re-checking on each wake-up; None after ``timeout``. ``also``:
        a second topic, waited on after a check only while ``also_while()`` holds (the long poll for work drops
        batch submissions while the headroom refuses it batch work)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        topics = (topic,) if also is None else (topic, also)
        while True:
            # Listen before checking: a change committed during the check wakes this round.
            waiter = _Waiter()
            for name in topics:
                self._waiters.setdefault(name, []).append(waiter)
            leaving = True
            try:
                result = await check()
                remaining = deadline - loop.time()
                if result is not None or remaining <= 0 or self.closed:
                    return result
                if also is not None and not also_while():
                    self._unlisten(also, waiter)
                    if waiter.woken_by == also:
                        # Woken during the check by what it would be refused: passed on, and this round goes on
                        # waiting for its own topic.
                        waiter.event.clear()
                        waiter.woken_by = None
                        self.notify(also)
                wait = remaining if self.poll_s is None else min(remaining, self.poll_s * (0.5 + random.random()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), wait)
                leaving = False  # a wake-up, if any, is the next round's check's
            finally:
                for name in topics:
                    self._unlisten(name, waiter)
                if leaving and waiter.woken_by is not None and not self.closed:
                    # Woken for a job while leaving (answered, gave up, hung up): another waiter claims it.
                    self.notify(waiter.woken_by)

    def _unlisten(self, topic: str, waiter: _Waiter) -> None:
        waiters = self._waiters.get(topic)
        if waiters is None:
            return
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            del self._waiters[topic]


STORE_KEY = web.AppKey("scheduler_store", object)
SETTINGS_KEY = web.AppKey("scheduler_settings", SchedulerSettings)
REGISTRY_KEY = web.AppKey("scheduler_registry", CollectorRegistry)
NOTIFIER_KEY = web.AppKey("scheduler_notifier", Notifier)
FENCE_KEY = web.AppKey("scheduler_node_fence", auth.NodeFence)

# Refusals (typed errors) -> HTTP statuses. A job's own failure, answered by the synchronous OpenAI endpoint, gets
# its status from the one table of job error codes (node_agent/errors.py, JOB_ERROR_HTTP).
_HTTP_STATUS: dict[type[ApiError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    BodyTimeout: 408,
    NodeNotFound: 404,
    UnknownJob: 404,
    ResourceHeld: 409,
    ReportRejected: 409,
    JobNotAssigned: 410,
    LeaseUnusable: 410,
    TooLarge: 413,
    Unservable: 422,
    SectionRefused: 422,
    QueueFull: 429,
    ShuttingDown: 503,
    StoreUnavailable: 503,
    WaitTimeout: 504,
}


def _status_of(exc: ApiError) -> int:
    for cls in type(exc).__mro__:
        if cls in _HTTP_STATUS:
            return _HTTP_STATUS[cls]  # type: ignore[index]
    return 500


def _error_response(
    status: int, code: str, message: str, param: str | None = None, openai: bool = False
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if openai:
        # OpenAI's shape is a superset of ours: clients of either read code and message.
        error.update(type="invalid_request_error" if status < 500 else "server_error", param=param)
    return json_response({"error": error}, status=status)


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    openai = request.path == OPENAI_PATH
    try:
        return await handler(request)
    except ApiError as exc:
        response = _error_response(_status_of(exc), exc.code, exc.message, exc.param, openai)
        if isinstance(exc, StoreUnavailable):
            _log_store_unavailable(request, exc)
        if isinstance(exc, (ResourceHeld, QueueFull, StoreUnavailable)):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, BodyTimeout):
            response.force_close()  # the rest of the body is not wanted: no keep-alive after it
        return response
    except web.HTTPRequestEntityTooLarge:
        return _error_response(
            413, "too_large", f"JSON request body is over the limit of {MAX_JSON_BODY_BYTES} bytes; send large audio "
            "as multipart/form-data (a 'file' part), which is streamed", None, openai)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = re.sub(r"[^a-z]+", "_", (exc.reason or "error").lower()).strip("_")
        message = f"{request.method} {request.path}: {exc.reason}"
        response = _error_response(exc.status, code, message, None, openai)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("scheduler error handling %s %s", request.method, request.path)
        return _error_response(500, "internal", "internal scheduler error; see the scheduler log", None, openai)


#: While the store is down every request fails the same way: one line per this many seconds says so.
STORE_LOG_EVERY_S = 10.0
_store_logged = [-math.inf]


def _log_store_unavailable(request: web.Request, exc: StoreUnavailable) -> None:
    now = time.monotonic()
    if now - _store_logged[0] >= STORE_LOG_EVERY_S:
        _store_logged[0] = now
        log.warning("%s %s answered 503: %s (logged once per %g s while it lasts)", request.method, request.path,
                    exc.message, STORE_LOG_EVERY_S)


@web.middleware
async def _path_ids_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every id in a path (node_id, job_id, lease_id) has the shape of one (``schemas.Id``, as in bodies): one that
    never could be (a NUL, which PostgreSQL's text refuses; 5000 characters) is 400 naming it, before any lookup."""
    for name, value in request.match_info.items():
        _check_id(name, value)
    return await handler(request)


def _check_id(name: str, value: str) -> None:
    if len(value) > ID_MAX_CHARS or not re.fullmatch(ID_PATTERN, value):
        raise InvalidInput(f"{name}: {value[:20]!r} is not an id (1-{ID_MAX_CHARS} letters, digits, '.', '_', "
                           "':' or '-')", param=name)


# ------------------------------------------------------------------------------------------ helpers


def _json(model: BaseModel, status: int = 200, **kwargs: Any) -> web.Response:
    return json_response(model.model_dump(mode="json", **kwargs), status=status)


def _query_float(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name}: not a number: {raw[:20]!r}", param=name) from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name}: must be a finite number", param=name)
    return min(max(value, low), high)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# ----------------------------------------------------------------------------------------- handlers


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def _metrics(request: web.Request) -> web.Response:
    with contextlib.suppress(StoreUnavailable):  # the counters are still worth a scrape
        await _store(request).refresh_gauges()
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _store(request: web.Request) -> Store:
    return request.app[STORE_KEY]  # type: ignore[return-value]


async def _register(request: web.Request) -> web.Response:
    req = await read_json(request, RegisterRequest)
    fence = request.app[FENCE_KEY]
    return _json(await _store(request).register(req, auth.presented_secret(request), fenced=fence.enabled),
                 status=201)


async def _list_nodes(request: web.Request) -> web.Response:
    limit = int(_query_float(request, "limit", NODES_PAGE_MAX, 1, NODES_PAGE_MAX))
    after = request.query.get("after") or None
    if after is not None:
        _check_id("after", after)
    return _json(await _store(request).list_nodes(limit, after))


async def _cordon(request: web.Request) -> web.Response:
    return _json(await _store(request).cordon(request.match_info["node_id"]))


async def _uncordon(request: web.Request) -> web.Response:
    return _json(await _store(request).uncordon(request.match_info["node_id"]))


async def _drain(request: web.Request) -> web.Response:
    # The body is optional: a drain without one waits for the node's jobs however long they take.
    body = await read_json(request, DrainRequest) if request.body_exists else DrainRequest()
    return _json(await _store(request).drain(request.match_info["node_id"], body.deadline_s))


def _job_states(raw: str | None) -> list[JobState] | None:
    """``state=queued`` or a comma list (``assigned,running``); None: every state."""
    if not raw:
        return None
    states = []
    for name in raw.split(",")[:len(JobState)]:
        try:
            states.append(JobState(name.strip()))
        except ValueError:
            raise InvalidInput(f"state: {name.strip()[:20]!r} is not one of {', '.join(JobState)}",
                               param="state") from None
    return states


async def _list_jobs(request: web.Request) -> web.Response:
    limit = int(_query_float(request, "limit", JOBS_PAGE_MAX, 1, JOBS_PAGE_MAX))
    after = request.query.get("after") or None
    node = request.query.get("node") or None
    for name, value in (("after", after), ("node", node)):
        if value is not None:
            _check_id(name, value)
    jobs = await _store(request).list_jobs(states=_job_states(request.query.get("state")), node_id=node,
                                           client=auth.client_scope(request), limit=limit, after=after)
    return _json(jobs)


async def _cluster(request: web.Request) -> web.Response:
    # The URL this replica was reached at (its Host header, bounded): behind a balancer, `replica` says which one.
    return _json(await _store(request).cluster(f"{request.scheme}://{request.host[:255]}"))


async def _heartbeat(request: web.Request) -> web.Response:
    req = await read_json(request, HeartbeatRequest)
    await request.app[FENCE_KEY].check(request, node_id=request.match_info["node_id"])
    return _json(await _store(request).heartbeat(request.match_info["node_id"], req))


async def _next_job(request: web.Request) -> web.StreamResponse:
    store = _store(request)
    settings = request.app[SETTINGS_KEY]
    node_id = request.match_info["node_id"]
    wait_s = _query_float(request, "wait_s", 0.0, 0.0, settings.max_wait_s)
    resource = request.query.get("resource") or None
    if resource is not None and not re.fullmatch(RESOURCE_PATTERN, resource):
        raise InvalidInput(f"resource: {resource[:20]!r} is not cpu, gpu:N or a slot of one (cpu/0, gpu:0/1)",
                           param="resource")
    raw_ttl = request.query.get("lease_ttl_s")
    lease_ttl_s = _query_float(request, "lease_ttl_s", 0.0, 0.0, math.inf) if raw_ttl else None
    if lease_ttl_s is not None and lease_ttl_s <= 0:
        raise InvalidInput("lease_ttl_s: must be above 0", param="lease_ttl_s")
    await request.app[FENCE_KEY].check(request, node_id=node_id)
    gone = object()
    started = asyncio.get_running_loop().time()
    # Whether the last claim found only batch work that the interactive headroom kept from this node: until a
    # claim finds otherwise, batch submissions do not wake it (they would be refused too). Interactive submissions,
    # re-queued jobs, new capacity and the periodic re-check (poll_s: a slot freed, a batch job aged) still do.
    held_back = False

    def hold_back() -> None:
        nonlocal held_back
        held_back = True

    async def check() -> Any:
        nonlocal held_back
        # A poller that hung up must not be handed a job it will never see.
        if _client_gone(request):
            return gone
        # Read before the claim: no later than the lease's grant, whichever way it is granted.
        held = asyncio.get_running_loop().time() - started
        held_back = False
        assignment = await store.assign_next(node_id, resource, lease_ttl_s, on_held_back=hold_back)
        if assignment is None:
            return None
        assignment.poll_held_s = round(held, 6)
        return assignment

    assignment = await request.app[NOTIFIER_KEY].wait_for(QUEUE_TOPIC, check, wait_s, also=BATCH_TOPIC,
                                                         also_while=lambda: not held_back)
    if assignment is None or assignment is gone:
        return web.Response(status=204)
    return _json(assignment)


async def _job_audio(request: web.Request) -> web.StreamResponse:
    await request.app[FENCE_KEY].check(request, job_id=request.match_info["job_id"])
    size, chunks = await _store(request).job_audio(request.match_info["job_id"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    async for chunk in chunks:  # one chunk in memory at a time, however long the audio
        await response.write(chunk)
    await response.write_eof()
    return response


async def _grant_lease(request: web.Request) -> web.Response:
    req = await read_json(request, LeaseRequest)
    await request.app[FENCE_KEY].check(request, node_id=req.node_id)
    return _json(await _store(request).grant_lease(req), status=201)


async def _renew_lease(request: web.Request) -> web.Response:
    req = await read_json(request, RenewRequest)
    # The store's fence checks that this node holds the lease; this one, that the request is that node.
    await request.app[FENCE_KEY].check(request, node_id=req.node_id)
    return _json(await _store(request).renew_lease(request.match_info["lease_id"], req))


async def _release_lease(request: web.Request) -> web.Response:
    await request.app[FENCE_KEY].check(request, lease_id=request.match_info["lease_id"])
    await _store(request).release_lease(request.match_info["lease_id"])
    return web.Response(status=204)


async def _post_events(request: web.Request) -> web.Response:
    report = await read_json(request, EventsReport)
    await request.app[FENCE_KEY].check(request, node_id=report.node_id)
    await _store(request).post_events(request.match_info["job_id"], report)
    return json_response({"accepted": True}, status=202)


async def _post_result(request: web.Request) -> web.Response:
    report = await read_json(request, ResultReport)
    await request.app[FENCE_KEY].check(request, node_id=report.node_id)
    return _json(await _store(request).report_result(request.match_info["job_id"], report))


# ------------------------------------------------------------------------------- sections (issue 24)


def _lease_param(request: web.Request, required: bool) -> str | None:
    lease_id = request.query.get("lease_id") or None
    if lease_id is None:
        if required:
            raise InvalidInput("lease_id: required (the caller's live lease on the job)", param="lease_id")
        return None
    _check_id("lease_id", lease_id)
    return lease_id


async def _job_capacity(request: web.Request) -> web.Response:
    """``GET /v1/jobs/{id}/capacity?lease_id=L``: how many sections of the job would be dispatched at once now."""
    lease_id = _lease_param(request, required=True)
    assert lease_id is not None
    await request.app[FENCE_KEY].check(request, lease_id=lease_id)
    free = await _store(request).job_capacity(request.match_info["job_id"], lease_id)
    return _json(Capacity(free_slots=free))


def _form_number(fields: Mapping[str, str], name: str, kind: type[int] | type[float], low: float, high: float,
                 default: float | None = None) -> Any:
    """A numeric form field within [low, high] (400 naming it otherwise); ``default`` when absent (None: required)."""
    raw = fields.get(name, "").strip()
    if not raw:
        if default is None:
            raise InvalidInput(f"{name}: required", param=name)
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidInput(f"{name}: not {'an integer' if kind is int else 'a number'}: {raw[:20]!r}",
                           param=name) from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name}: must be a finite number", param=name)
    if not low <= value <= high:
        shown = f"{int(low)}..{int(high)}" if kind is int else f"{low:g}..{high:g}"
        raise InvalidInput(f"{name}: {raw[:20]} is not within {shown}", param=name)
    return value


async def _create_section(request: web.Request) -> web.Response:
    """``POST /v1/jobs/{id}/sections``: a section of the job's current attempt, as a child job (201; a retry of
    the same index answers the child made first, 200)."""
    store = _store(request)
    if request.content_type != "multipart/form-data":
        raise InvalidInput("expected a multipart/form-data body with an 'audio' part", param="audio")
    fields, part = await read_multipart(request, request.app[SETTINGS_KEY].max_body_bytes, store.begin_upload,
                                        file_field="audio")
    try:
        lease_id = fields.get("lease_id", "").strip()
        if not lease_id:
            raise InvalidInput("lease_id: required (the holder's live lease on the parent job)", param="lease_id")
        _check_id("lease_id", lease_id)
        lease_epoch = _form_number(fields, "lease_epoch", int, 1, 2**63 - 1)
        index = _form_number(fields, "index", int, -(2**31), 2**31 - 1)
        offset_s = _form_number(fields, "offset_s", float, -math.inf, math.inf)
        duration_s = _form_number(fields, "duration_s", float, -math.inf, math.inf)
        sample_rate = _form_number(fields, "sample_rate", int, 1000, 384_000, default=SECTION_SAMPLE_RATE)
        if part is None:
            raise InvalidInput("audio: a part named 'audio' with the section's pcm_s16le audio is required",
                               param="audio")
        # ``language`` (optional) checked as a submission's is: a Whisper code, auto or empty meaning none.
        section = validate(JobSpec, {"format": "pcm_s16le", "sample_rate": sample_rate,
                                     "language": fields.get("language") or None})
        _check_audio(section, part.upload.size, "audio")
        await request.app[FENCE_KEY].check(request, lease_id=lease_id)
    except BaseException:
        if part is not None:
            await part.upload.discard()
        raise
    summary, made = await store.create_section(
        request.match_info["job_id"], lease_id=lease_id, lease_epoch=lease_epoch, index=index, offset_s=offset_s,
        duration_s=duration_s, sample_rate=sample_rate, upload=part.upload, language=section.language)
    return _json(await store.view_job(summary.job_id), status=201 if made else 200)


def _sections_news(sections: list[SectionView], from_index: int) -> bool:
    """Whether a follower reading from ``from_index`` has something to act on now: the first section it waits for
    has ended, or a later one failed or was cancelled (which fails the parent)."""
    waiting = [s for s in sections if s.index >= from_index]
    if not waiting:
        return False
    ended = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
    return waiting[0].state in ended or any(s.state in (JobState.FAILED, JobState.CANCELLED) for s in waiting)


async def _job_sections(request: web.Request) -> web.Response:
    """``GET /v1/jobs/{id}/sections?lease_id=L&from=K&wait_s=S``: the sections of the job's current attempt. A node
    reads them as the holder of the job's live lease; the job's client and operators without one. With ``wait_s``
    (at most ``SECTIONS_WAIT_MAX_S``) it answers at once when there is news for the follower (``_sections_news``),
    else when any section's state changes, or when the time passes."""
    store = _store(request)
    job_id = request.match_info["job_id"]
    lease_id = _lease_param(request, required=False)
    caller = auth.caller_of(request)
    if lease_id is None and caller is not None and caller.role is auth.Role.NODE:
        raise InvalidInput("lease_id: a node reads a job's sections as the holder of its live lease",
                           param="lease_id")
    from_index = int(_form_number(request.query, "from", int, 0, 2**31 - 1, default=0))
    wait_s = _query_float(request, "wait_s", 0.0, 0.0, min(SECTIONS_WAIT_MAX_S, request.app[SETTINGS_KEY].max_wait_s))
    if lease_id is not None:
        await request.app[FENCE_KEY].check(request, lease_id=lease_id)
    client = auth.client_scope(request)

    async def read() -> list[SectionView]:
        return await store.job_sections(job_id, lease_id=lease_id, client=client, from_index=from_index)

    sections = await read()
    if wait_s > 0 and not _sections_news(sections, from_index):
        first = [(s.index, s.job_id, s.state, s.attempt) for s in sections]

        async def changed() -> list[SectionView] | None:
            now = await read()
            return now if [(s.index, s.job_id, s.state, s.attempt) for s in now] != first else None

        sections = await request.app[NOTIFIER_KEY].wait_for(sections_topic(job_id), changed, wait_s) or await read()
    return _json(SectionList(sections=sections))


def _form_flag(fields: Mapping[str, str], name: str) -> bool | None:
    """A true/false form field (also 1/0); None when absent or empty."""
    raw = fields.get(name, "").strip().lower()
    if raw in ("true", "1"):
        return True
    if raw in ("false", "0"):
        return False
    if raw:
        raise InvalidInput(f"{name}: expected true or false, got {raw[:20]!r}", param=name)
    return None


def _form_spec(fields: Mapping[str, str]) -> JobSpec:
    data: dict[str, Any] = {k: v for k, v in fields.items() if v != "" and k != "allow_truncated"}
    if "options" in data:
        data["options"] = parse_json(data["options"], what="options", param="options")
    if "labels" in data:  # a JSON object, as in a JSON body
        data["labels"] = parse_json(data["labels"], what="labels", param="labels")
    # A plain form field for the one option a curl user most needs; it lands among the decode options.
    allow_truncated = _form_flag(fields, "allow_truncated")
    if allow_truncated is not None and isinstance(data.get("options", {}), dict):
        data["options"] = {**data.get("options", {}), "allow_truncated": allow_truncated}
    return validate(JobSpec, data)


async def _submit_job(request: web.Request) -> web.Response:
    store = _store(request)
    key = _idempotency_key(request)
    if request.content_type == "multipart/form-data":
        fields, part = await read_multipart(request, request.app[SETTINGS_KEY].max_body_bytes,
                                            _store(request).begin_upload)
        try:
            spec = _form_spec(fields)
            if part is None:
                raise InvalidInput("file: a multipart part named 'file' with the audio is required", param="file")
        except BaseException:
            if part is not None:
                await part.upload.discard()
            raise
        upload, filename, param = part.upload, part.filename, "file"
    else:
        submission = await read_json(request, JobSubmission)
        text = submission.audio_b64
        audio = await asyncio.to_thread(decode_b64, text) if len(text) > THREAD_PARSE_BYTES else decode_b64(text)
        spec = JobSpec.model_validate(submission.model_dump(exclude={"audio_b64"}))
        del submission, text
        filename, param = None, "audio_b64"
        upload = await store.begin_upload()
        await upload.write(audio)
        del audio
    try:
        _check_audio(spec, upload.size, param)
    except BaseException:
        await upload.discard()
        raise
    job_id, state, replayed = await store.submit(spec, upload, filename, idempotency_key=key,
                                                 client=auth.client_scope(request))
    # A replay answers as the first try did, with the job as it is now; the header tells the client it was one.
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    submitted = JobSubmitted(job_id=job_id, state=state)  # type: ignore[arg-type]
    return json_response(submitted.model_dump(mode="json"), status=202, headers=headers)


#: An ``Idempotency-Key`` is 1-255 visible ASCII characters (a UUID is what clients send).
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _idempotency_key(request: web.Request) -> str | None:
    """The submission's ``Idempotency-Key`` header, if it has one (IETF draft-ietf-httpapi-idempotency-key)."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip().strip('"')
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput("Idempotency-Key: must be 1-255 visible ASCII characters, e.g. a UUID",
                           param="Idempotency-Key")
    return key


def _check_audio(spec: JobSpec, size: int, param: str) -> None:
    if not size:
        raise InvalidInput(f"{param}: audio is empty", param=param)
    if spec.format == "pcm_s16le" and size % 2 and not spec.options.allow_truncated:
        # bad_audio like every other cut audio (the plugin refuses it too); allow_truncated drops the half sample.
        raise InvalidInput(f"{param}: audio truncated: pcm_s16le audio must be a whole number of 16-bit samples; "
                           f"got {size} bytes", code="bad_audio", param=param)


async def _get_job(request: web.Request) -> web.Response:
    store = _store(request)
    job_id = request.match_info["job_id"]
    wait_s = _query_float(request, "wait_s", 0.0, 0.0, request.app[SETTINGS_KEY].max_wait_s)
    raw_after = request.query.get("after_segment")
    after: int | None = None
    if raw_after not in (None, ""):
        try:
            after = int(raw_after)  # type: ignore[arg-type]
        except ValueError:
            raise InvalidInput(f"after_segment: not an integer: {raw_after[:20]!r}", param="after_segment") from None
        if after < 0:
            raise InvalidInput("after_segment: must be >= 0", param="after_segment")
    scope = auth.client_scope(request)
    if scope is not None and await store.job_client(job_id) != scope:
        raise UnknownJob(f"job {job_id} is not known (never submitted, or finished and forgotten)")  # as unknown
    if wait_s > 0:
        async def settled() -> bool | None:
            return True if await store.job_settled(job_id, after) else None

        await request.app[NOTIFIER_KEY].wait_for(job_topic(job_id), settled, wait_s)
    return _json(await store.view_job(job_id))


def _canceller(request: web.Request) -> str:
    """Who cancels, as the job's error and ``cancelled_by`` say it: the caller's role and token name, or ``client``
    on a scheduler without per-role tokens."""
    caller = auth.caller_of(request)
    return f"{caller.role} {caller.name}" if caller is not None else "client"


async def _cancel_job(request: web.Request) -> web.Response:
    """``DELETE /v1/jobs/{id}``: cancel the job (a finished one is left as it is) and answer its view. A client
    may cancel only its own jobs: another's is 404, as an unknown one."""
    store = _store(request)
    job_id = request.match_info["job_id"]
    await store.cancel_job(job_id, _canceller(request), client=auth.client_scope(request))
    return _json(await store.view_job(job_id))


async def _until_disconnected(request: web.Request) -> None:
    while not _client_gone(request):
        await asyncio.sleep(DISCONNECT_CHECK_S)


async def _cancel_abandoned(request: web.Request, job_id: str) -> None:
    """The client of a synchronous request went away before its answer: cancel its job, so no node decodes for
    nobody. Best effort (the job is otherwise left to end as it would)."""
    try:
        await _store(request).cancel_job(job_id, f"{_canceller(request)} (disconnected)",
                                         client=auth.client_scope(request))
    except ApiError as exc:
        log.warning("job %s: its client disconnected, and cancelling it failed: %s", job_id, exc.message)


async def _openai_transcriptions(request: web.Request) -> web.Response:
    store = _store(request)
    if request.content_type != "multipart/form-data":
        raise InvalidInput("expected a multipart/form-data body with a 'file' part", param="file")
    fields, part = await read_multipart(request, request.app[SETTINGS_KEY].max_body_bytes,
                                            _store(request).begin_upload)
    try:
        job_id = await _openai_submit(store, fields, part, auth.client_scope(request))
    except BaseException:
        if part is not None:
            await part.upload.discard()
        raise
    notifier = request.app[NOTIFIER_KEY]

    async def settled() -> bool | None:
        return True if await store.job_settled(job_id) else None

    # A little past the job's own deadline, so a job that timed out in the queue is reported as such.
    waiting = asyncio.ensure_future(notifier.wait_for(job_topic(job_id), settled, OPENAI_WAIT_S + 1.0))
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # (a server that cancels handlers when their client goes away)
        await asyncio.shield(_cancel_abandoned(request, job_id))
        raise
    finally:
        for task in (waiting, gone):
            task.cancel()
    if not waiting.done():  # the client went away first
        await _cancel_abandoned(request, job_id)
        return _error_response(499, "cancelled", f"job {job_id} cancelled: the client disconnected", None,
                               openai=True)  # (nobody reads it)
    waiting.result()  # (its error, if the wait failed)
    view = await store.view_job(job_id)
    if view.state in (JobState.FAILED, JobState.CANCELLED):
        error = view.error
        code, message = (error.code, error.message) if error is not None else ("failed", "transcription failed")
        return _error_response(job_error_status(code, openai=True), code, message,
                               "file" if code == "bad_audio" else None, openai=True)
    if view.state != JobState.SUCCEEDED:
        if notifier.closed:
            raise ShuttingDown("the scheduler is shutting down")
        raise WaitTimeout(f"job {job_id} did not finish within {OPENAI_WAIT_S:g} s")
    result = view.result or {}
    segments = view.segments
    response_format = fields.get("response_format") or "json"
    if response_format == "json":
        return json_response({"text": result.get("text", "")})
    if response_format == "text":
        return web.Response(text=result.get("text", ""), content_type="text/plain")
    if response_format == "verbose_json":
        return json_response(to_verbose_json(result, segments))
    if response_format == "srt":
        return web.Response(text=to_srt(segments), content_type="application/x-subrip")
    return web.Response(text=to_vtt(segments), content_type="text/vtt")


async def _openai_submit(store: Store, fields: Mapping[str, str], part: FilePart | None,
                         client: str | None = None) -> str:
    """Check an OpenAI-style form and queue its job: the job id."""
    if part is None or not part.upload.size:
        raise InvalidInput("file: a non-empty 'file' part with the audio is required", param="file")
    response_format = fields.get("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidInput(
            f"response_format: {response_format[:20]!r} is not one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    options: dict[str, Any] = {}
    if fields.get("prompt"):
        options["initial_prompt"] = fields["prompt"]
    if fields.get("temperature"):
        try:
            options["temperature"] = float(fields["temperature"])
        except ValueError:
            raise InvalidInput("temperature: not a number", param="temperature") from None
    if (allow_truncated := _form_flag(fields, "allow_truncated")) is not None:
        options["allow_truncated"] = allow_truncated
    # Other OpenAI fields (timestamp_granularities[], ...) are accepted and ignored. A client waits on the answer:
    # interactive; its model is the job's (whisper-1 or none: any node's).
    spec = validate(
        JobSpec,
        {
            "language": fields.get("language") or None,
            "options": validate(JobOptions, options, prefix="").wire(),
            "deadline_s": OPENAI_WAIT_S,
            "model": fields.get("model") or None,
            "priority": Priority.INTERACTIVE,
        },
    )
    job_id, _, _ = await store.submit(spec, part.upload, part.filename, client=client)
    return job_id


# ------------------------------------------------------------------------------------------ the app


async def _reaper(app: web.Application) -> AsyncIterator[None]:
    store: Store = app[STORE_KEY]  # type: ignore[assignment]

    async def run() -> None:
        failing = False
        while True:
            await asyncio.sleep(store.reap_s)
            try:
                await store.reap()
            except StoreUnavailable as exc:  # logged once per outage; requests answer 503 meanwhile
                if not failing:
                    log.warning("store unavailable, reaping paused: %s", exc.message)
                failing = True
                continue
            except Exception:  # one bad pass must not stop expiry for good
                log.exception("scheduler reaping failed")
                continue
            if failing:
                log.info("store available again, reaping resumed")
                failing = False

    task = asyncio.create_task(run(), name="scheduler-reaper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _wake_waiters(app: web.Application) -> None:
    app[NOTIFIER_KEY].close()


async def _close_store(app: web.Application) -> None:
    await app[STORE_KEY].close()  # type: ignore[attr-defined]


async def create_app(
    settings: SchedulerSettings, registry: CollectorRegistry | None = None, state_dir: Path | None = None, *,
    single_statements: bool = True,
) -> web.Application:
    """The scheduler as an aiohttp application, its store open (at ``app[STORE_KEY]``). A store that cannot be
    used raises ``StoreError``. ``single_statements``: see ``open_store``."""
    registry = registry if registry is not None else CollectorRegistry()
    notifier = Notifier()
    store = await open_store(settings, registry, state_dir, notifier.notify, notifier.wake_all,
                             single_statements=single_statements)
    notifier.poll_s = store.poll_s
    notifier.queue_wake = QUEUE_WAKE if store.poll_s is not None else None
    memoize_multipart_dispositions()
    middlewares: list[Any] = [_error_middleware]
    credentials = auth.Credentials.from_settings(settings)
    auth.warn_single_token(settings)
    if credentials is not None:
        middlewares.append(auth.auth_middleware(credentials))
    middlewares.append(_path_ids_middleware)
    app = web.Application(client_max_size=min(settings.max_body_bytes, MAX_JSON_BODY_BYTES), middlewares=middlewares)
    app[STORE_KEY] = store
    app[SETTINGS_KEY] = settings
    app[BODY_TIMEOUT_KEY] = settings.body_timeout_s
    app[REGISTRY_KEY] = registry
    app[NOTIFIER_KEY] = notifier
    # Nodes prove who they are where callers prove anything: without tokens, anyone may do everything anyway.
    app[FENCE_KEY] = auth.NodeFence(store.node_secret, enabled=credentials is not None)
    app.cleanup_ctx.append(_reaper)
    app.on_shutdown.append(_wake_waiters)
    app.on_cleanup.append(_close_store)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/nodes", _register)
    app.router.add_get("/v1/nodes", _list_nodes)
    app.router.add_put("/v1/nodes/{node_id}/heartbeat", _heartbeat)
    app.router.add_post("/v1/nodes/{node_id}/cordon", _cordon)
    app.router.add_post("/v1/nodes/{node_id}/uncordon", _uncordon)
    app.router.add_post("/v1/nodes/{node_id}/drain", _drain)
    app.router.add_get("/v1/cluster", _cluster)
    app.router.add_get("/v1/nodes/{node_id}/jobs/next", _next_job)
    app.router.add_post("/v1/leases", _grant_lease)
    app.router.add_post("/v1/leases/{lease_id}/renew", _renew_lease)
    app.router.add_delete("/v1/leases/{lease_id}", _release_lease)
    app.router.add_post("/v1/jobs", _submit_job)
    app.router.add_get("/v1/jobs", _list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", _get_job)
    app.router.add_delete("/v1/jobs/{job_id}", _cancel_job)
    app.router.add_get("/v1/jobs/{job_id}/audio", _job_audio)
    app.router.add_post("/v1/jobs/{job_id}/events", _post_events)
    app.router.add_post("/v1/jobs/{job_id}/result", _post_result)
    app.router.add_get("/v1/jobs/{job_id}/capacity", _job_capacity)
    app.router.add_post("/v1/jobs/{job_id}/sections", _create_section)
    app.router.add_get("/v1/jobs/{job_id}/sections", _job_sections)
    app.router.add_post(OPENAI_PATH, _openai_transcriptions)
    return app


@dataclass
class Running:
    """A scheduler serving on ``url`` until ``stop()``."""

    url: str
    store: Store
    app: web.Application
    runner: web.AppRunner
    _stopped: bool = False

    async def stop(self) -> None:
        """Stop serving: long polls answer at once, the reaper ends, the store closes. Safe to call twice."""
        if not self._stopped:
            self._stopped = True
            await self.runner.cleanup()


async def start_scheduler(
    settings: SchedulerSettings,
    registry: CollectorRegistry | None = None,
    host: str | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    *,
    single_statements: bool = True,
) -> Running:
    """Serve the scheduler on ``host:port`` (default ``settings.listen``; port 0 picks a free one). ``state_dir``
    holds the default SQLite store."""
    default_host, default_port = host_port(settings.listen)
    host = default_host if host is None else host
    port = default_port if port is None else port
    # The port first: a port in use is one line about scheduler.listen, before the store is touched.
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=False)
    except OSError as exc:
        raise ListenError.from_os_error(exc, host, port, "scheduler.listen") from None
    try:
        app = await create_app(settings, registry, state_dir, single_statements=single_statements)
    except BaseException:
        sock.close()
        raise
    # auto_decompress off: a Content-Encoding is refused (400), so a gzip bomb is never expanded while it arrives.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, auto_decompress=False)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return Running(url=f"http://{shown}:{bound_port}", store=app[STORE_KEY], app=app,  # type: ignore[arg-type]
                   runner=runner)


async def serve(settings: SchedulerSettings, state_dir: Path | None = None) -> None:
    """Run a standalone scheduler until SIGTERM or SIGINT."""
    auth.refuse_exposed(settings, host_port(settings.listen)[0])
    running = await start_scheduler(settings, state_dir=state_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    log.info("scheduler listening on %s (store: %s)", running.url, running.store.where)
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await running.stop()
        log.info("scheduler stopped after %.1f s", time.monotonic() - started)
