"""HTTP face of the scheduler (protocol version 1, docs/protocol.md): maps requests onto SchedulerState.

Long polls wait on per-topic asyncio events that the state machine fires on change; a background
task ticks the state so leases expire and waiters wake even when no request arrives.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import re
import signal
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from ..config import SchedulerSettings, host_port
from ..contracts import UNKNOWN_OPTION, error_key, error_loc, one_line
from ..errors import ListenError
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
    ShuttingDown,
    TooLarge,
    Unauthorized,
    UnknownJob,
    Unservable,
    WaitTimeout,
)
from .formats import RESPONSE_FORMATS, to_srt, to_verbose_json, to_vtt
from .schemas import (
    RESOURCE_PATTERN,
    EventsReport,
    HeartbeatRequest,
    JobOptions,
    JobSpec,
    JobSubmission,
    JobSubmitted,
    LeaseRequest,
    RegisterRequest,
    RenewRequest,
    ResultReport,
)
from .state import QUEUE_TOPIC, SchedulerState, job_topic

log = logging.getLogger("node_agent.scheduler")

#: How often leases, heartbeats and assignments are checked for expiry.
TICK_S = 0.1
#: The longest the OpenAI-compatible endpoint waits for its job (it has no deadline field).
OPENAI_WAIT_S = 600.0
#: Bodies above this are parsed / decoded in a thread so the event loop keeps serving heartbeats.
THREAD_PARSE_BYTES = 1024 * 1024
#: How long stopping the server waits for requests still in flight (long polls are woken at once).
SHUTDOWN_TIMEOUT_S = 5.0
OPENAI_PATH = "/v1/audio/transcriptions"
MAX_FILENAME_CHARS = 100
#: Deepest nesting a JSON body (or the multipart ``options`` field) may have. The protocol's own shapes need
#: under 10 levels; far deeper input only exists to exhaust the parser's or a serializer's recursion.
MAX_JSON_DEPTH = 32

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class Notifier:
    """Broadcast wake-ups by topic; waiters re-check their condition after each one."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self.closed = False

    def notify(self, topic: str) -> None:
        event = self._events.pop(topic, None)
        if event is not None:
            event.set()

    def close(self) -> None:
        """Wake every waiter for good (server shutdown)."""
        self.closed = True
        for event in self._events.values():
            event.set()
        self._events.clear()

    async def wait_for(self, topic: str, check: Callable[[], T | None], timeout: float) -> T | None:
        """Return ``check()``'s first non-None value, re-checking on each notify; None after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiters[topic] = self._waiters.get(topic, 0) + 1
        try:
            while True:
                # Take the event before checking: a change made after the check sets this event.
                event = self._events.setdefault(topic, asyncio.Event())
                result = check()
                remaining = deadline - loop.time()
                if result is not None or remaining <= 0 or self.closed:
                    return result
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            self._waiters[topic] -= 1
            if not self._waiters[topic]:
                del self._waiters[topic]
                self._events.pop(topic, None)


STATE_KEY = web.AppKey("scheduler_state", SchedulerState)
SETTINGS_KEY = web.AppKey("scheduler_settings", SchedulerSettings)
REGISTRY_KEY = web.AppKey("scheduler_registry", CollectorRegistry)
NOTIFIER_KEY = web.AppKey("scheduler_notifier", Notifier)

# The one place typed errors become HTTP statuses.
_HTTP_STATUS: dict[type[ApiError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    NodeNotFound: 404,
    UnknownJob: 404,
    ResourceHeld: 409,
    ReportRejected: 409,
    JobNotAssigned: 410,
    LeaseUnusable: 410,
    TooLarge: 413,
    Unservable: 422,
    QueueFull: 429,
    ShuttingDown: 503,
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
        if isinstance(exc, (ResourceHeld, QueueFull)):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS_KEY].max_body_bytes
        return _error_response(413, "too_large", f"request body is over the limit of {limit} bytes", None, openai)
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


def _auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode()

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/v1" or request.path.startswith("/v1/"):
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
                raise Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        return await handler(request)

    return auth


# ------------------------------------------------------------------------------------------ helpers


def _describe(exc: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    """One line naming the first bad field, and that field's name."""
    loc = ".".join(error_loc(exc))
    if loc.startswith("options.") or prefix.startswith("options"):
        unknown = UNKNOWN_OPTION
    else:
        unknown = "unknown field"
    return one_line(exc, prefix=prefix, unknown=unknown), error_key(exc, prefix)


def _validate(model: type[M], data: Any, prefix: str = "") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = _describe(exc, prefix)
        raise InvalidInput(message, param=field) from None


def _nested_deeper_than(data: Any, limit: int) -> bool:
    """Whether ``data`` (parsed JSON) nests lists/objects more than ``limit`` levels; iterative, so no recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def parse_json(text: bytes | str, what: str = "request body", param: str | None = None) -> Any:
    """``text`` as JSON, or ``InvalidInput`` (400) when it is not JSON or nests deeper than ``MAX_JSON_DEPTH``.

    The one parser of every JSON the scheduler receives."""
    too_deep = InvalidInput(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", param=param)
    try:
        data = json.loads(text)
    except RecursionError:  # far past the limit: the C parser gives up before the check below could run
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}", param=param) from None
    if _nested_deeper_than(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


async def _read_json(request: web.Request, model: type[M]) -> M:
    body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    data = await asyncio.to_thread(parse_json, body) if len(body) > THREAD_PARSE_BYTES else parse_json(body)
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return _validate(model, data)


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


def sanitize_filename(name: str | None) -> str | None:
    """A display-only copy of an upload's name: last path component, printable, at most 100 chars."""
    if not name:
        return None
    # Some clients (aiohttp among them) percent-encode the name in Content-Disposition.
    base = re.split(r"[\\/]", urllib.parse.unquote(name))[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " ").strip()
    return base[:MAX_FILENAME_CHARS] or None


@dataclass
class Upload:
    data: bytes
    filename: str | None


async def _read_multipart(request: web.Request, max_bytes: int) -> tuple[dict[str, str], Upload | None]:
    """Form fields and the ``file`` part, counting every byte against ``max_bytes``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise TooLarge(f"request body is over the limit of {max_bytes} bytes")
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise InvalidInput(f"malformed multipart/form-data body: {exc}") from None
    fields: dict[str, str] = {}
    upload: Upload | None = None
    total = 0
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("nested multipart bodies are not supported")
            data = bytearray()
            while chunk := await part.read_chunk(256 * 1024):
                total += len(chunk)
                if total > max_bytes:
                    raise TooLarge(f"request body is over the limit of {max_bytes} bytes")
                data.extend(chunk)
            name = part.name or ""
            if name == "file":
                upload = Upload(bytes(data), sanitize_filename(part.filename))
            elif len(fields) >= 64:
                raise InvalidInput("too many form fields")
            else:
                try:
                    fields[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"{name}: form field is not UTF-8 text", param=name) from None
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        # A part header that breaks the grammar (CR/LF/NUL smuggled into a file name) is the client's error.
        reason = getattr(exc, "message", None) or str(exc)
        raise InvalidInput(f"malformed multipart/form-data body: {str(reason).splitlines()[0][:120]}") from None
    return fields, upload


def _decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("audio_b64: not valid base64", param="audio_b64") from None


# ----------------------------------------------------------------------------------------- handlers


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _register(request: web.Request) -> web.Response:
    req = await _read_json(request, RegisterRequest)
    return _json(request.app[STATE_KEY].register(req), status=201)


async def _list_nodes(request: web.Request) -> web.Response:
    return _json(request.app[STATE_KEY].list_nodes())


async def _heartbeat(request: web.Request) -> web.Response:
    req = await _read_json(request, HeartbeatRequest)
    return _json(request.app[STATE_KEY].heartbeat(request.match_info["node_id"], req))


async def _next_job(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    settings = request.app[SETTINGS_KEY]
    node_id = request.match_info["node_id"]
    wait_s = _query_float(request, "wait_s", 0.0, 0.0, settings.max_wait_s)
    resource = request.query.get("resource") or None
    if resource is not None and not re.fullmatch(RESOURCE_PATTERN, resource):
        raise InvalidInput(f"resource: {resource[:20]!r} is not cpu or gpu:N", param="resource")
    gone = object()

    def check() -> Any:
        # A poller that hung up must not be handed a job it will never see.
        if _client_gone(request):
            return gone
        return state.assign_next(node_id, resource)

    assignment = await request.app[NOTIFIER_KEY].wait_for(QUEUE_TOPIC, check, wait_s)
    if assignment is None or assignment is gone:
        return web.Response(status=204)
    return _json(assignment)


async def _job_audio(request: web.Request) -> web.Response:
    audio = request.app[STATE_KEY].job_audio(request.match_info["job_id"])
    return web.Response(body=audio, content_type="application/octet-stream")


async def _grant_lease(request: web.Request) -> web.Response:
    req = await _read_json(request, LeaseRequest)
    return _json(request.app[STATE_KEY].grant_lease(req), status=201)


async def _renew_lease(request: web.Request) -> web.Response:
    req = await _read_json(request, RenewRequest)
    return _json(request.app[STATE_KEY].renew_lease(request.match_info["lease_id"], req))


async def _release_lease(request: web.Request) -> web.Response:
    request.app[STATE_KEY].release_lease(request.match_info["lease_id"])
    return web.Response(status=204)


async def _post_events(request: web.Request) -> web.Response:
    report = await _read_json(request, EventsReport)
    request.app[STATE_KEY].post_events(request.match_info["job_id"], report)
    return json_response({"accepted": True}, status=202)


async def _post_result(request: web.Request) -> web.Response:
    report = await _read_json(request, ResultReport)
    ack = request.app[STATE_KEY].report_result(request.match_info["job_id"], report)
    return _json(ack)


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
    # A plain form field for the one option a curl user most needs; it lands among the decode options.
    allow_truncated = _form_flag(fields, "allow_truncated")
    if allow_truncated is not None and isinstance(data.get("options", {}), dict):
        data["options"] = {**data.get("options", {}), "allow_truncated": allow_truncated}
    return _validate(JobSpec, data)


async def _submit_job(request: web.Request) -> web.Response:
    if request.content_type == "multipart/form-data":
        fields, upload = await _read_multipart(request, request.app[SETTINGS_KEY].max_body_bytes)
        spec = _form_spec(fields)
        if upload is None:
            raise InvalidInput("file: a multipart part named 'file' with the audio is required", param="file")
        audio, filename, param = upload.data, upload.filename, "file"
    else:
        submission = await _read_json(request, JobSubmission)
        text = submission.audio_b64
        audio = await asyncio.to_thread(_decode_b64, text) if len(text) > THREAD_PARSE_BYTES else _decode_b64(text)
        spec = JobSpec.model_validate(submission.model_dump(exclude={"audio_b64"}))
        filename, param = None, "audio_b64"
    _check_audio(spec, audio, param)
    state = request.app[STATE_KEY]
    key = _idempotency_key(request)
    replayed = key is not None and state.submitted(key, spec, len(audio), filename) is not None
    job = state.submit(spec, audio, filename, idempotency_key=key)
    # A replay answers as the first try did, with the job as it is now; the header tells the client it was one.
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    submitted = JobSubmitted(job_id=job.job_id, state=job.state)  # type: ignore[arg-type]
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


def _check_audio(spec: JobSpec, audio: bytes, param: str) -> None:
    if not audio:
        raise InvalidInput(f"{param}: audio is empty", param=param)
    if spec.format == "pcm_s16le" and len(audio) % 2 and not spec.options.allow_truncated:
        # bad_audio like every other cut audio (the plugin refuses it too); allow_truncated drops the half sample.
        raise InvalidInput(f"{param}: audio truncated: pcm_s16le audio must be a whole number of 16-bit samples; "
                           f"got {len(audio)} bytes", code="bad_audio", param=param)


async def _get_job(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
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
    if wait_s > 0:
        await request.app[NOTIFIER_KEY].wait_for(
            job_topic(job_id), lambda: True if state.job_settled(job_id, after) else None, wait_s
        )
    return _json(state.view_job(job_id))


async def _openai_transcriptions(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.content_type != "multipart/form-data":
        raise InvalidInput("expected a multipart/form-data body with a 'file' part", param="file")
    fields, upload = await _read_multipart(request, request.app[SETTINGS_KEY].max_body_bytes)
    if upload is None or not upload.data:
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
    # Other OpenAI fields (model, timestamp_granularities[], ...) are accepted and ignored.
    spec = _validate(
        JobSpec,
        {
            "language": fields.get("language") or None,
            "options": _validate(JobOptions, options, prefix="").wire(),
            "deadline_s": OPENAI_WAIT_S,
        },
    )
    job = state.submit(spec, upload.data, upload.filename)
    notifier = request.app[NOTIFIER_KEY]
    # A little past the job's own deadline, so a job that timed out in the queue is reported as such.
    await notifier.wait_for(
        job_topic(job.job_id), lambda: True if state.job_settled(job.job_id) else None, OPENAI_WAIT_S + 1.0
    )
    view = state.view_job(job.job_id)
    if view.state == "failed":
        error = view.error
        code, message = (error.code, error.message) if error is not None else ("failed", "transcription failed")
        statuses = {"bad_audio": 400, "invalid_request": 400, "no_capable_node": 422, "timeout": 504}
        status = statuses.get(code, 500)
        return _error_response(status, code, message, "file" if code == "bad_audio" else None, openai=True)
    if view.state != "succeeded":
        if notifier.closed:
            raise ShuttingDown("the scheduler is shutting down")
        raise WaitTimeout(f"job {job.job_id} did not finish within {OPENAI_WAIT_S:g} s")
    result = view.result or {}
    segments = view.segments
    if response_format == "json":
        return json_response({"text": result.get("text", "")})
    if response_format == "text":
        return web.Response(text=result.get("text", ""), content_type="text/plain")
    if response_format == "verbose_json":
        return json_response(to_verbose_json(result, segments))
    if response_format == "srt":
        return web.Response(text=to_srt(segments), content_type="application/x-subrip")
    return web.Response(text=to_vtt(segments), content_type="text/vtt")


# ------------------------------------------------------------------------------------------ the app


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE_KEY]

    async def run() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                state.tick()
            except Exception:  # one bad tick must not stop expiry for good
                log.exception("scheduler tick failed")

    task = asyncio.create_task(run(), name="scheduler-ticker")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _wake_waiters(app: web.Application) -> None:
    app[NOTIFIER_KEY].close()


def create_app(settings: SchedulerSettings, registry: CollectorRegistry | None = None) -> web.Application:
    """The scheduler as an aiohttp application (state at ``app[STATE_KEY]``)."""
    registry = registry if registry is not None else CollectorRegistry()
    state = SchedulerState(settings, registry=registry)
    notifier = Notifier()
    state.add_listener(notifier.notify)
    middlewares: list[Any] = [_error_middleware]
    if settings.token is not None:
        middlewares.append(_auth_middleware(settings.token.get_secret_value()))
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[STATE_KEY] = state
    app[SETTINGS_KEY] = settings
    app[REGISTRY_KEY] = registry
    app[NOTIFIER_KEY] = notifier
    app.cleanup_ctx.append(_ticker)
    app.on_shutdown.append(_wake_waiters)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/nodes", _register)
    app.router.add_get("/v1/nodes", _list_nodes)
    app.router.add_put("/v1/nodes/{node_id}/heartbeat", _heartbeat)
    app.router.add_get("/v1/nodes/{node_id}/jobs/next", _next_job)
    app.router.add_post("/v1/leases", _grant_lease)
    app.router.add_post("/v1/leases/{lease_id}/renew", _renew_lease)
    app.router.add_delete("/v1/leases/{lease_id}", _release_lease)
    app.router.add_post("/v1/jobs", _submit_job)
    app.router.add_get("/v1/jobs/{job_id}", _get_job)
    app.router.add_get("/v1/jobs/{job_id}/audio", _job_audio)
    app.router.add_post("/v1/jobs/{job_id}/events", _post_events)
    app.router.add_post("/v1/jobs/{job_id}/result", _post_result)
    app.router.add_post(OPENAI_PATH, _openai_transcriptions)
    return app


@dataclass
class Running:
    """A scheduler serving on ``url`` until ``stop()``."""

    url: str
    state: SchedulerState
    app: web.Application
    runner: web.AppRunner
    _stopped: bool = False

    async def stop(self) -> None:
        """Stop serving: long polls answer at once, the expiry task ends. Safe to call twice."""
        if not self._stopped:
            self._stopped = True
            await self.runner.cleanup()


async def start_scheduler(
    settings: SchedulerSettings,
    registry: CollectorRegistry | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Running:
    """Serve the scheduler on ``host:port`` (default ``settings.listen``; port 0 picks a free one)."""
    default_host, default_port = host_port(settings.listen)
    host = default_host if host is None else host
    port = default_port if port is None else port
    app = create_app(settings, registry)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError.from_os_error(exc, host, port, "scheduler.listen") from None
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return Running(url=f"http://{shown}:{bound_port}", state=app[STATE_KEY], app=app, runner=runner)


async def serve(settings: SchedulerSettings) -> None:
    """Run a standalone scheduler until SIGTERM or SIGINT."""
    running = await start_scheduler(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    log.info("scheduler listening on %s", running.url)
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await running.stop()
        log.info("scheduler stopped after %.1f s", time.monotonic() - started)
