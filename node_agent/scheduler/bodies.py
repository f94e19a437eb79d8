"""What a request body holds, read within its bounds: JSON (size, nesting, time) and multipart forms (fields, and
the file streamed into the store as it arrives), each refused with one line naming what was wrong.

The scheduler's HTTP handlers (server.py) read every body through these, so every body's bounds are in one place:
``client_max_size`` for JSON, a byte budget for a form, and ``scheduler.body_timeout_s`` (``BODY_TIMEOUT_KEY``) for
all of it to arrive."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import parse_content_disposition
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from ..contracts import UNKNOWN_OPTION, error_key, error_loc, one_line
from .errors import ApiError, InvalidInput, TooLarge
from .store import Upload

#: Bodies above this are parsed / decoded in a thread so the event loop keeps serving heartbeats.
THREAD_PARSE_BYTES = 1024 * 1024
MAX_FILENAME_CHARS = 100
#: A form field other than the file (options, language, ...) is small; this bounds what one may hold in memory.
MAX_FIELD_BYTES = 1024 * 1024
#: Deepest nesting a JSON body (or the multipart ``options`` field) may have. The protocol's own shapes need
#: under 10 levels; far deeper input only exists to exhaust the parser's or a serializer's recursion.
MAX_JSON_DEPTH = 32
#: Seconds a request body has to arrive whole (the app's ``scheduler.body_timeout_s``).
BODY_TIMEOUT_KEY = web.AppKey("scheduler_body_timeout_s", float)

M = TypeVar("M", bound=BaseModel)


class BodyTimeout(ApiError):
    """A request body that did not fully arrive within ``scheduler.body_timeout_s``: 408, connection closed."""

    code = "timeout"



def describe(exc: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    """One line naming the first bad field, and that field's name."""
    loc = ".".join(error_loc(exc))
    if loc.startswith("options.") or prefix.startswith("options"):
        unknown = UNKNOWN_OPTION
    else:
        unknown = "unknown field"
    return one_line(exc, prefix=prefix, unknown=unknown), error_key(exc, prefix)


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = describe(exc, prefix)
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


def check_encoding(request: web.Request) -> None:
    """Bodies are taken as sent: a ``Content-Encoding`` (gzip, a gzip bomb) is refused before any is read."""
    encoding = request.headers.get("Content-Encoding", "").strip()
    if encoding and encoding.lower() != "identity":
        raise InvalidInput(f"Content-Encoding: {encoding[:40]!r} is not supported; send the body uncompressed",
                           param="Content-Encoding")


def body_deadline(request: web.Request) -> float:
    return asyncio.get_running_loop().time() + request.app[BODY_TIMEOUT_KEY]


def body_timeout(request: web.Request) -> BodyTimeout:
    return BodyTimeout(f"the request body did not arrive within {request.app[BODY_TIMEOUT_KEY]:g} s "
                       "(scheduler.body_timeout_s)")


async def read_json(request: web.Request, model: type[M]) -> M:
    check_encoding(request)
    if request.content_length is not None and request.content_length > request.client_max_size:
        # Refused on its header: read() would first buffer client_max_size bytes of a body it then refuses.
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=request.content_length)
    try:
        # The whole body within body_timeout_s: one that stalls is dropped, not held for as long as the client likes.
        async with asyncio.timeout_at(body_deadline(request)):
            body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    except TimeoutError:
        raise body_timeout(request) from None
    except RequestPayloadError as exc:
        raise InvalidInput(f"request body incomplete or malformed: {exc}") from None
    data = await asyncio.to_thread(parse_json, body) if len(body) > THREAD_PARSE_BYTES else parse_json(body)
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return validate(model, data)


def sanitize_filename(name: str | None) -> str | None:
    """A display-only copy of an upload's name: last path component, printable, at most 100 chars."""
    if not name:
        return None
    # Some clients (aiohttp among them) percent-encode the name in Content-Disposition.
    base = re.split(r"[\\/]", urllib.parse.unquote(name))[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " ").strip()
    return base[:MAX_FILENAME_CHARS] or None


@functools.lru_cache(maxsize=256)  # at most 256 headers of at most 8 KiB (aiohttp's limit) kept
def _parsed_disposition(header: str | None) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    disposition, params = parse_content_disposition(header)
    return disposition, tuple(params.items())


def _reader_parse_disposition(header: str | None) -> tuple[str | None, dict[str, str]]:
    disposition, params = _parsed_disposition(header)
    return disposition, dict(params)  # each caller its own dict, as from aiohttp's parser


def memoize_multipart_dispositions() -> None:
    """aiohttp parses a part's Content-Disposition on every ``MultipartReader.next`` (its RFC 7578 ``_charset_``
    check) and again for ``part.name`` and ``part.filename``, each time building its regular expressions anew
    (0.08-0.2 ms a call: 40 % of a small submission's CPU, 5 % of a job's on PostgreSQL). A form's headers are
    the same on every request, so aiohttp's module-level parser is replaced with a memoized one giving the same
    answers. Idempotent."""
    import aiohttp.multipart

    aiohttp.multipart.parse_content_disposition = _reader_parse_disposition  # type: ignore[assignment]


@dataclass
class FilePart:
    upload: Upload
    filename: str | None


async def _chunks_by(part: BodyPartReader, deadline: float) -> AsyncIterator[bytes]:
    """A part's chunks, each read by ``deadline`` (loop time); what the caller does with one is not timed."""
    while True:
        async with asyncio.timeout_at(deadline):
            chunk = await part.read_chunk(256 * 1024)
        if not chunk:
            return
        yield chunk


async def read_multipart(request: web.Request, max_bytes: int, begin_upload: Callable[[], Awaitable[Upload]],
                         file_field: str = "file") -> tuple[dict[str, str], FilePart | None]:
    """Form fields, and the ``file_field`` part streamed into the store as it arrives; every byte counts against
    ``max_bytes``. On any error the partial upload is dropped."""
    check_encoding(request)
    if request.content_length is not None and request.content_length > max_bytes:
        raise TooLarge(f"request body is over the limit of {max_bytes} bytes")
    # The whole body within body_timeout_s. Only the reads are timed: a write to the store is never cut short.
    deadline = body_deadline(request)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise InvalidInput(f"malformed multipart/form-data body: {exc}") from None
    fields: dict[str, str] = {}
    upload: FilePart | None = None
    total = 0
    try:
        while True:
            async with asyncio.timeout_at(deadline):
                part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("nested multipart bodies are not supported")
            name = part.name or ""
            if name == file_field:
                if upload is not None:
                    raise InvalidInput(f"{file_field}: more than one '{file_field}' part", param=file_field)
                upload = FilePart(await begin_upload(), sanitize_filename(part.filename))
                async for chunk in _chunks_by(part, deadline):
                    total += len(chunk)
                    if total > max_bytes:
                        raise TooLarge(f"request body is over the limit of {max_bytes} bytes")
                    await upload.upload.write(chunk)
                continue
            data = bytearray()
            async for chunk in _chunks_by(part, deadline):
                total += len(chunk)
                if total > max_bytes:
                    raise TooLarge(f"request body is over the limit of {max_bytes} bytes")
                if len(data) > MAX_FIELD_BYTES:
                    raise InvalidInput(f"{name}: form field is over {MAX_FIELD_BYTES} bytes", param=name)
                data.extend(chunk)
            if len(fields) >= 64:
                raise InvalidInput("too many form fields")
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{name}: form field is not UTF-8 text", param=name) from None
    except BaseException as exc:
        if upload is not None:
            with contextlib.suppress(Exception):
                await upload.upload.discard()
        if isinstance(exc, TimeoutError):
            raise body_timeout(request) from None
        if isinstance(exc, RequestPayloadError):
            raise InvalidInput(f"request body incomplete or malformed: {exc}") from None
        if isinstance(exc, (ValueError, AssertionError, HttpProcessingError)):
            # A part header that breaks the grammar (CR/LF/NUL smuggled into a file name) is the client's error.
            reason = getattr(exc, "message", None) or str(exc)
            raise InvalidInput(
                f"malformed multipart/form-data body: {str(reason).splitlines()[0][:120]}") from None
        raise
    return fields, upload


def decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("audio_b64: not valid base64", param="audio_b64") from None
