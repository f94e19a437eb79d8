"""Drop-in endpoints of the ASR service this agent replaces: ``POST /utterance`` and ``GET /health``.

An utterance becomes an ordinary job on the scheduler the agent uses (``POST /v1/jobs``, then long polls on
``GET /v1/jobs/{id}``), so it takes the path every job takes: queue, lease, supervisor, plugin process, metrics.
Its time limit travels as the job's ``deadline_s``: a decode that overruns it is stopped by the supervisor
killing the worker process, which is then replaced. (The old service's timeout only stopped waiting, and the
next request queued behind the abandoned decode.) Submitting and following go through ``JobWaiter``
(job_waiter.py), as for ``node-agent submit``: a scheduler that restarts, fails over or answers 429 is retried
within the utterance's time limit, and a job it lost is a 503 saying so.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from .scheduler_client import BadRequest, SchedulerClient, SchedulerError, SchedulerUnavailable
from .config import Settings
from .contracts import OPTION_KEYS, DecodeOptions, error_key, one_line
from .errors import NodeAgentError, job_error_status
from .job_waiter import JobLost, JobUpdate, JobWaiter, Retrying, WaitExpired
from .jsonio import json_response
from .node_view import LocalNodeView
from .supervisor import RESTART_REASONS, WorkerState

log = logging.getLogger("node_agent.compat")

T = TypeVar("T")

#: Time limit of one utterance (seconds from when its body has arrived) when the request names none.
DEFAULT_TIMEOUT_S = 60.0
#: The largest ``timeout_s`` a request may ask for.
MAX_TIMEOUT_S = 600.0
#: Utterances that may wait behind each serving worker before more are answered 503.
QUEUE_PER_WORKER = 2
#: After the deadline: time for the supervisor's kill (SIGTERM grace) and the node's report to arrive.
REPORT_GRACE_S = 5.0
SRC_LANGS = ("auto", "zh", "en", "ja", "ko")
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
#: How many finished utterances the averages in /health cover.
RECENT = 100
#: Bodies above this are parsed and base64-decoded in a thread so the event loop keeps serving.
THREAD_BYTES = 1024 * 1024
#: Seconds the whole request body may take to arrive when the settings name no ``compat.body_timeout_s``.
BODY_TIMEOUT_S = 30.0
#: Bytes taken from the request stream at a time.
READ_CHUNK = 1 << 20
#: Serving worker states: a worker starting or backing off will take the queued work within seconds.
_SERVING = (WorkerState.ready, WorkerState.busy, WorkerState.starting, WorkerState.backoff)
#: How often an utterance waiting for its job checks that its client is still connected (aiohttp does not cancel a
#: handler whose client hung up): a job nobody waits for any more is cancelled within about this long.
DISCONNECT_CHECK_S = 0.25
#: How long cancelling an abandoned utterance's job may retry a scheduler that does not answer.
CANCEL_WAIT_S = 5.0
#: Decode options the request may carry as top-level fields, under their own names: every ``DecodeOptions`` key.
OPTION_FIELDS: tuple[str, ...] = OPTION_KEYS


@dataclass
class CompatLimits:
    """Bounds of the endpoint: the default time limit, the wait queue per serving worker, the body's arrival."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    queue_per_worker: int = QUEUE_PER_WORKER
    body_timeout_s: float = BODY_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: Any) -> "CompatLimits":
        """Values from a ``compat`` settings section where one exists, else the module defaults."""
        section = getattr(settings, "compat", None)
        return cls(
            timeout_s=float(getattr(section, "timeout_s", DEFAULT_TIMEOUT_S)),
            queue_per_worker=int(getattr(section, "queue_per_worker", QUEUE_PER_WORKER)),
            body_timeout_s=float(getattr(section, "body_timeout_s", BODY_TIMEOUT_S)),
        )


class UtteranceRequest(BaseModel):
    """The old service's request. Unknown fields are ignored, as the old service did."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    job_id: str | None = Field(None, max_length=256)
    trace_id: str | None = Field(None, max_length=256)
    src_lang: str = "auto"
    audio: str
    sample_rate: int = 16000
    timeout_s: float | None = None
    #: The decode options, gathered from the request's top-level fields of the same names (``OPTION_FIELDS``).
    decode: DecodeOptions = Field(default_factory=DecodeOptions)

    @model_validator(mode="wrap")
    @classmethod
    def _gather_options(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> "UtteranceRequest":
        if not isinstance(data, dict):
            return handler(data)
        flat = {name: data[name] for name in OPTION_FIELDS if data.get(name) is not None}
        # A shallow copy: the (large) audio text is shared, not copied. A "decode" key of the caller's is not ours.
        req = handler({k: v for k, v in data.items() if k not in OPTION_FIELDS and k != "decode"})
        # Lax, as the old service was: "5" is 5 here, unlike in a scheduler submission. Errors keep their key.
        req.decode = DecodeOptions.model_validate(flat, strict=False)
        return req

    @field_validator("src_lang", mode="before")
    @classmethod
    def _known_language(cls, value: Any) -> Any:
        if value is None:
            return "auto"
        if not isinstance(value, str) or value.strip().lower() not in SRC_LANGS:
            raise ValueError(f"{str(value)[:20]!r} is not one of {', '.join(SRC_LANGS)}")
        return value.strip().lower()

    @field_validator("sample_rate", mode="before")
    @classmethod
    def _default_rate(cls, value: Any) -> Any:
        return 16000 if value is None else value

    @field_validator("sample_rate")
    @classmethod
    def _rate_in_range(cls, value: int) -> int:
        if not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE:
            raise ValueError(f"{value} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
        return value

    @field_validator("timeout_s")
    @classmethod
    def _timeout_in_range(cls, value: float | None) -> float | None:
        if value is not None and not (0 < value <= MAX_TIMEOUT_S and math.isfinite(value)):
            raise ValueError(f"must be above 0 and at most {MAX_TIMEOUT_S:g} seconds")
        return value


class CompatError(Exception):
    """An answer other than 200: HTTP status, stable code, one-line message, and the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


def _invalid(exc: ValidationError) -> CompatError:
    return CompatError(400, "invalid_request", one_line(exc, more=False), error_key(exc))


def _decode_audio(text: str) -> bytes:
    # a2b_base64 reads an ASCII str in place; b64decode would first copy it into bytes. strict_mode refuses what
    # b64decode(validate=True) refuses: characters outside the alphabet and misplaced padding.
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise CompatError(400, "invalid_request", "audio: not valid base64", "audio") from None


def _consume(func: Callable[[Any], T], box: list[Any]) -> T:
    return func(box.pop())


async def _consume_off_loop(func: Callable[[Any], T], box: list[Any], size: int) -> T:
    """``func`` applied to the one value in ``box``, in a thread when ``size`` is large.

    The box hands the value over: once ``func`` returns, nothing holds it. (Passed as an argument, it would live
    on in the thread pool's work item until that worker thread next runs, which a parse holding the GIL in
    another worker can put off: an extra copy of the body at the worst moment.)
    """
    if size > THREAD_BYTES:
        return await asyncio.to_thread(_consume, func, box)
    return _consume(func, box)


def _decode_text(body: bytearray) -> str:
    return body.decode("utf-8-sig")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _until_disconnected(request: web.Request) -> None:
    while not _client_gone(request):
        await asyncio.sleep(DISCONNECT_CHECK_S)


def _ids(data: Any) -> dict[str, Any]:
    """The caller's ids, echoed in every answer that can carry them, errors included."""
    if not isinstance(data, dict):
        return {"job_id": None, "trace_id": None}
    return {key: data.get(key) if isinstance(data.get(key), (str, int)) else None for key in ("job_id", "trace_id")}


def _segment(seg: dict[str, Any]) -> dict[str, Any]:
    return {
        "start": seg.get("start"),
        "end": seg.get("end"),
        "text": str(seg.get("text", "")).strip(),
        "no_speech_prob": seg.get("no_speech_prob"),
        "avg_logprob": seg.get("avg_logprob"),
        "compression_ratio": seg.get("compression_ratio"),
    }


def _log_retry(retry: Retrying) -> None:
    """One warning per run of failed submits or polls of an utterance, not one per retry."""
    if not retry.first:
        return
    if retry.stage == "submit":
        log.warning("utterance: submitting the job failed (%s); retrying", retry.error)
    else:
        log.warning("utterance: following job %s failed (%s); retrying", retry.job_id, retry.error)


class _BodyHold:
    """One request's body bytes counted against ``CompatService.body_budget()``: its ``Content-Length`` before
    any of it is read, else (chunked, or decoded larger) the bytes as they arrive; given back once its audio has
    gone to the scheduler, or the request ends."""

    def __init__(self, service: "CompatService") -> None:
        self.service = service
        self.bytes = 0

    def grow_to(self, size: int) -> None:
        """Hold at least ``size`` bytes; 503 busy where that would pass the budget."""
        if size > self.bytes:
            self.service._take_body_bytes(size - self.bytes)
            self.bytes = size

    def release(self) -> None:
        self.service.body_bytes -= self.bytes
        self.bytes = 0


class CompatService:
    """State of the compatibility endpoints: requests in flight, totals, recent waits."""

    def __init__(self, node: LocalNodeView, client: SchedulerClient, settings: Settings,
                 limits: CompatLimits | None = None) -> None:
        #: The node, read-only: its workers, registration and draining decide what is admitted.
        self.node = node
        #: The node's own scheduler client (its token, its metrics), to submit through.
        self.client = client
        #: Submits utterances as jobs and follows them, riding through a scheduler that restarts. The node is
        #: registered, so a scheduler has answered: a refused connection is a restart, retried like a 503.
        self.jobs = JobWaiter(client)
        self.settings = settings
        self.limits = limits or CompatLimits.from_settings(settings)
        self.in_flight = 0  # admitted utterances: their bodies are in, and they hold a place in the queue
        self.receiving = 0  # requests whose bodies are still arriving (bounded by body_timeout_s, not a place)
        #: Bytes of the bodies held now, arriving ones included, from before they are read until their audio
        #: has gone to the scheduler: bounded by ``body_budget()`` (``_BodyHold``).
        self.body_bytes = 0
        self.totals: Counter[str] = Counter()
        self.waits: deque[float] = deque(maxlen=RECENT)  # seconds queued before a node took the job
        self.latencies: deque[float] = deque(maxlen=RECENT)  # seconds from arrival to answer

    # ----- bounds ------------------------------------------------------------------------------------------------

    def serving_workers(self) -> int:
        return sum(1 for state in self.node.worker_states().values() if state in _SERVING)

    def capacity(self) -> int:
        """How many utterances may be in flight: one running plus a short queue per serving worker."""
        return self.serving_workers() * (1 + max(0, self.limits.queue_per_worker))

    def retry_after(self) -> int:
        recent = list(self.latencies)[-10:]
        typical = sum(recent) / len(recent) if recent else 1.0
        return int(min(30, max(1, math.ceil(typical))))

    def _admit(self) -> None:
        node = self.node
        why = None
        if node.draining:
            why = "the node is draining"
        elif not node.registered:
            why = "the node is not registered with its scheduler yet"
        elif self.capacity() == 0:
            why = "no worker can take jobs: " + "; ".join(
                f"{resource} {state.value}" for resource, state in node.worker_states().items())
        if why is not None:
            raise CompatError(503, "unavailable", why, retry_after=self.retry_after())
        if self.in_flight >= self.capacity():
            raise CompatError(503, "busy", f"{self.in_flight} utterances in flight (limit {self.capacity()})",
                              retry_after=self.retry_after())

    def body_budget(self) -> int:
        """Bytes of bodies that may be held at once, arriving ones included: a full body for each place."""
        return self.capacity() * self.settings.http.max_body_bytes

    def _take_body_bytes(self, extra: int) -> None:
        """Count ``extra`` more bytes of a body against the budget; 503 busy (nothing counted) past it."""
        budget = self.body_budget()
        if self.body_bytes + extra > budget:
            raise CompatError(503, "busy", f"{self.body_bytes} bytes of utterance bodies arriving or in flight; "
                                           f"{extra} more would pass the limit of {budget} bytes "
                                           f"(http.max_body_bytes for each of {self.capacity()} places, "
                                           "see compat.queue_per_worker)", retry_after=self.retry_after())
        self.body_bytes += extra

    def served_languages(self) -> set[str] | None:
        """Languages this node's models serve; None means any (a multilingual model)."""
        return self.node.served_languages()

    # ----- the scheduler -----------------------------------------------------------------------------------------

    @staticmethod
    def _scheduler_error(what: str, exc: SchedulerError) -> CompatError:
        """The answer for a scheduler call that failed: its refusals of the request are passed on as the
        request's fault (400, 413); an unreachable or unavailable scheduler is 503; anything else is 500."""
        if isinstance(exc, SchedulerUnavailable) and exc.status in (None, 429, 503):  # 429: its queue is full
            return CompatError(503, "unavailable", f"{what}: {exc}", retry_after=exc.retry_after or 1)
        if isinstance(exc, BadRequest) and exc.status == 400:
            return CompatError(400, "invalid_request", exc.detail,
                               "audio" if exc.param in ("audio_b64", "file") else exc.param)
        if isinstance(exc, BadRequest) and exc.status == 413:
            return CompatError(413, "too_large", exc.detail, "audio")
        return CompatError(500, "scheduler_error", f"{what}: {exc}")

    async def _submit(self, req: UtteranceRequest, audio: bytes, deadline_s: float) -> str:
        """Submit through the job waiter (retried within ``deadline_s`` under one Idempotency-Key: no second job).
        Every try is the same submission (the key's contract), so the job's deadline stays ``deadline_s``; the
        wait that follows is bounded by the time limit all the same."""
        until = asyncio.get_running_loop().time() + deadline_s
        try:
            return await self.jobs.submit(
                audio, until=until, on_retry=_log_retry, filename="utterance.pcm", format="pcm_s16le",
                sample_rate=req.sample_rate, language=None if req.src_lang == "auto" else req.src_lang,
                options=req.decode, deadline_s=deadline_s, priority="interactive")  # a caller waits on it
        except SchedulerError as exc:
            raise self._scheduler_error("submitting the job", exc) from None

    async def _wait(self, job_id: str, give_up: float, limit_s: float) -> dict[str, Any]:
        """Follow the job through the job waiter until it is finished or ``give_up`` (loop time) passes; a job
        the scheduler no longer knows is a 503 (submit again)."""

        def still_wanted(update: JobUpdate) -> None:
            if self.node.draining and update.view.state == "queued":
                raise CompatError(503, "unavailable", "the node is draining; the utterance was not started",
                                  retry_after=self.retry_after())

        try:
            view = await self.jobs.wait(job_id, give_up, stream=False, on_update=still_wanted, on_retry=_log_retry)
        except JobLost as exc:
            # Submitted here moments ago: the scheduler lost it. Nothing to wait for; the caller may resend.
            raise CompatError(503, "unavailable", str(exc), retry_after=1) from None
        except WaitExpired as exc:
            if exc.last_error is not None:
                raise self._scheduler_error(f"following job {job_id}", exc.last_error) from None
            raise CompatError(504, "timeout", f"no result within the time limit of {limit_s:g} s "
                                              f"(scheduler job {job_id})") from None
        except SchedulerError as exc:
            raise self._scheduler_error(f"following job {job_id}", exc) from None
        return view.model_dump()

    async def _wait_attended(self, request: web.Request, job_id: str, give_up: float,
                             limit_s: float) -> dict[str, Any] | None:
        """``_wait`` while the client is still connected; None when it hung up first. Its job is then cancelled,
        so no node decodes for nobody (also when the server cancels the handler itself)."""
        waiting = asyncio.ensure_future(self._wait(job_id, give_up, limit_s))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel_abandoned(job_id))
            raise
        finally:
            for task in (waiting, gone):
                task.cancel()
        if not waiting.done():
            await self._cancel_abandoned(job_id)
            return None
        return waiting.result()

    async def _cancel_abandoned(self, job_id: str) -> None:
        """Cancel the job of an utterance whose client went away; best effort (else it ends as it would)."""
        until = asyncio.get_running_loop().time() + CANCEL_WAIT_S
        try:
            view = await self.jobs.cancel(job_id, until)
        except (SchedulerError, NodeAgentError) as exc:
            log.warning("utterance: scheduler job %s: its client disconnected, and cancelling it failed: %s",
                        job_id, exc)
            return
        log.info("utterance: scheduler job %s cancelled (%s): its client disconnected", job_id, view.state)

    # ----- handlers ----------------------------------------------------------------------------------------------

    async def _read_body(self, request: web.Request, hold: _BodyHold) -> str:
        """The whole body as text, read within ``body_timeout_s`` and counted against ``http.max_body_bytes``
        and, through ``hold``, against the bytes of all bodies in flight (503 busy before reading past them)."""
        # The body is taken as sent: a Content-Encoding (gzip, a gzip bomb) is refused before any is read.
        encoding = request.headers.get("Content-Encoding", "").strip()
        if encoding and encoding.lower() != "identity":
            raise CompatError(400, "invalid_request", f"Content-Encoding: {encoding[:40]!r} is not supported; "
                                                      "send the body uncompressed")
        # Read the stream ourselves: the app's client_max_size is sized for small control requests.
        limit = self.settings.http.max_body_bytes
        too_large = CompatError(413, "too_large", f"request body is over the limit of {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        hold.grow_to(request.content_length or 0)
        timeout_s = self.limits.body_timeout_s
        body = bytearray()
        self.receiving += 1
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await request.content.read(READ_CHUNK):
                    if len(body) + len(chunk) > limit:
                        raise too_large
                    hold.grow_to(len(body) + len(chunk))
                    body.extend(chunk)
        except TimeoutError:
            raise CompatError(408, "timeout", f"the request body did not arrive within {timeout_s:g} s "
                                              "(compat.body_timeout_s)") from None
        except (ConnectionError, HttpProcessingError, RequestPayloadError) as exc:
            # The client hung up mid-body or broke the framing: its fault, not a bug worth a traceback.
            raise CompatError(400, "invalid_request", f"request body incomplete: {type(exc).__name__}") from None
        finally:
            self.receiving -= 1
        # Decoded here, once, and the bytes dropped as soon as the text exists: json.loads(bytes) would hold
        # the bytes, a decoded copy and the parsed values all at once.
        size, box = len(body), [body]
        del body
        try:
            return await _consume_off_loop(_decode_text, box, size)
        except UnicodeDecodeError as exc:
            raise CompatError(400, "invalid_request", f"request body is not valid JSON: {exc}") from None

    @staticmethod
    async def _load_json(text: str) -> dict[str, Any]:
        size, box = len(text), [text]
        del text  # the parsed values replace the text: never both for longer than the parse
        try:
            data = await _consume_off_loop(json.loads, box, size)
        except ValueError as exc:
            raise CompatError(400, "invalid_request", f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise CompatError(400, "invalid_request", "request body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise CompatError(400, "invalid_request", "request body must be a JSON object")
        return data

    async def _validate(self, data: dict[str, Any]) -> tuple[UtteranceRequest, bytes]:
        """The request, checked field by field, and its decoded audio.

        The base64 text leaves ``data`` and the request here, so only the decoded bytes live on.
        """
        try:
            req = UtteranceRequest.model_validate(data)
        except ValidationError as exc:
            raise _invalid(exc) from None
        text, req.audio = req.audio, ""
        data.pop("audio", None)
        if not text:
            raise CompatError(400, "invalid_request", "audio: audio is empty", "audio")
        size, box = len(text), [text]
        del text
        audio = await _consume_off_loop(_decode_audio, box, size)
        if not audio:
            raise CompatError(400, "invalid_request", "audio: audio is empty", "audio")
        if len(audio) % 2:
            raise CompatError(400, "bad_audio", f"audio: pcm16 audio must be a whole number of 16-bit "
                                                f"samples; got {len(audio)} bytes", "audio")
        max_s = self.settings.asr.max_audio_s
        if len(audio) / 2 / req.sample_rate > max_s:
            raise CompatError(400, "invalid_request", f"audio: longer than this node's limit of {max_s:g} s "
                                                      "(asr.max_audio_s)", "audio")
        served = self.served_languages()
        if req.src_lang != "auto" and served is not None and req.src_lang not in served:
            raise CompatError(400, "invalid_request", f"src_lang: {req.src_lang!r} is not served by this node's "
                                                      f"model {self.settings.asr.model} (serves "
                                                      f"{', '.join(sorted(served))} or auto)", "src_lang")
        return req, audio

    async def utterance(self, request: web.Request) -> web.Response:
        """``POST /utterance``: transcribe one base64 pcm16 utterance through the scheduler."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        ids: dict[str, Any] = {"job_id": None, "trace_id": None}
        try:
            # Refused at once when it could not be served anyway, before a large body is read for nothing.
            self._admit()
        except CompatError as exc:
            return self._busy(exc, ids)
        counted = False
        hold = _BodyHold(self)
        scheduler_job = None
        status: int | None = None
        detail = ""
        try:
            # Not in flight while the body arrives: a client that never finishes sending must not hold a slot.
            # Its bytes are held, though, so the bodies arriving and in flight stay within body_budget().
            data = await self._load_json(await self._read_body(request, hold))
            ids = _ids(data)
            req, audio = await self._validate(data)
            try:
                self._admit()
            except CompatError as exc:
                status = exc.status
                return self._busy(exc, ids)
            self.in_flight += 1
            counted = True
            # The time limit covers the work, not the upload (which body_timeout_s bounds on its own).
            received = loop.time()
            limit_s = req.timeout_s or self.limits.timeout_s
            audio_bytes = len(audio)
            scheduler_job = await self._submit(req, audio, limit_s)
            del audio  # the scheduler has its own copy; this one must not live on through the wait
            hold.release()
            give_up = received + limit_s + self.settings.worker.stop_grace_s + REPORT_GRACE_S
            attended = await self._wait_attended(request, scheduler_job, give_up, limit_s)
            if attended is None:
                raise CompatError(499, "cancelled", f"the client disconnected; scheduler job {scheduler_job} "
                                                    "cancelled")  # (nobody reads it: said for the log)
            view = attended
            queued = (view.get("timings") or {}).get("queued_s")
            if isinstance(queued, (int, float)):
                self.waits.append(float(queued))
            if view["state"] in ("failed", "cancelled"):
                error = view.get("error") or {}
                code = str(error.get("code") or "failed")
                raise CompatError(job_error_status(code), code,
                                  str(error.get("message") or "transcription failed"),
                                  "audio" if code == "bad_audio" else None,
                                  retry_after=self.retry_after() if code in ("shutdown", "worker_unavailable")
                                  else None)
            result = view.get("result") or {}
            body = {
                **ids,
                "text": result.get("text", ""),
                "language": result.get("language"),
                "language_probability": result.get("language_probability"),
                "segments": [_segment(s) for s in result.get("segments") or []],
                "duration": round(float(result.get("duration_s") or audio_bytes / 2 / req.sample_rate), 3),
            }
            response = json_response(body, headers={"X-Scheduler-Job-Id": scheduler_job})
            self.totals["completed"] += 1
            status = 200
            return response
        except CompatError as exc:
            status, detail = exc.status, f" ({exc.code}: {exc.message})"
            if exc.code == "busy":
                # The bodies in flight are at their budget: refused before this one was read (or read on).
                response = self._busy(exc, ids)
                response.force_close()
                return response
            # Refused before anything was queued: the request's fault. Otherwise the utterance failed.
            self.totals["rejected" if scheduler_job is None and exc.status in (400, 408, 413) else "failed"] += 1
            if exc.status == 504:
                self.totals["timeout"] += 1
            response = self._error_response(exc, ids, scheduler_job)
            if exc.status in (408, 413):
                response.force_close()  # the rest of the body is not wanted: no keep-alive after it
            return response
        except Exception:
            # A bug, not the caller's fault: still the endpoint's JSON shape, and logged as what it was.
            status = 500
            self.totals["failed"] += 1
            log.exception("utterance job_id=%s trace_id=%s: unexpected error", ids.get("job_id"), ids.get("trace_id"))
            return self._error_response(CompatError(500, "internal", "internal agent error; see the agent log"),
                                        ids, scheduler_job)
        finally:
            if counted:
                self.in_flight -= 1
            hold.release()
            elapsed = loop.time() - arrived
            self.latencies.append(elapsed)
            log.info("utterance job_id=%s trace_id=%s scheduler_job=%s answered %s in %.2f s%s",
                     ids.get("job_id"), ids.get("trace_id"), scheduler_job or "-",
                     status if status is not None else "nothing (cancelled)", elapsed, detail)

    def _busy(self, exc: CompatError, ids: dict[str, Any]) -> web.Response:
        self.totals["busy"] += 1
        log.info("utterance rejected: %s", exc.message)
        return self._error_response(exc, ids)

    @staticmethod
    def _error_response(exc: CompatError, ids: dict[str, Any], scheduler_job: str | None = None) -> web.Response:
        error: dict[str, Any] = {"code": exc.code, "message": exc.message}
        if exc.field:
            error["field"] = exc.field
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(int(math.ceil(exc.retry_after)))
        if scheduler_job:
            headers["X-Scheduler-Job-Id"] = scheduler_job
        return json_response({"error": error, **ids}, status=exc.status, headers=headers)

    def health_doc(self) -> tuple[int, dict[str, Any]]:
        node = self.node
        snapshots = node.worker_snapshots()
        workers = [self._worker_view(snap) for snap in snapshots]
        restarts: Counter[str] = Counter()
        for snap in snapshots:
            restarts.update(snap["restarts"])
        reasons = []
        if node.draining:
            reasons.append("draining")
        if not node.registered:
            reasons.append("not registered with the scheduler")
        if self.serving_workers() == 0:
            reasons.append("no worker can take jobs")
        status = "ok" if not reasons else "draining" if node.draining else "degraded"
        doc = {
            "status": status,
            "reasons": reasons,
            "worker": workers[0] if workers else None,
            "workers": workers,
            "queue_depth": self.in_flight,
            "queue_limit": self.capacity(),
            "totals": {key: self.totals.get(key, 0) for key in ("completed", "failed", "timeout", "rejected",
                                                                "busy")},
            "restarts": sum(restarts.values()),
            "restarts_by_reason": {reason: restarts.get(reason, 0) for reason in RESTART_REASONS},
            "avg_wait_s": round(sum(self.waits) / len(self.waits), 4) if self.waits else 0.0,
            "avg_latency_s": round(sum(self.latencies) / len(self.latencies), 4) if self.latencies else 0.0,
        }
        return (200 if status == "ok" else 503), doc

    @staticmethod
    def _worker_view(snap: dict[str, Any]) -> dict[str, Any]:
        return {key: snap.get(key) for key in ("resource", "state", "pid", "model", "device", "compute_type",
                                               "uptime_s", "jobs_served", "jobs_served_total", "last_error")}

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: the old service's health document (200 when it can serve, else 503)."""
        status, doc = self.health_doc()
        return json_response(doc, status=status)


COMPAT_KEY: web.AppKey[CompatService] = web.AppKey("compat", CompatService)


def add_compat_routes(app: web.Application, node: LocalNodeView, client: SchedulerClient,
                      settings: Settings) -> None:
    """Register the compatibility routes on the agent's HTTP app."""
    service = CompatService(node, client, settings)
    app[COMPAT_KEY] = service
    app.router.add_post("/utterance", service.utterance)
    app.router.add_get("/health", service.health)
