"""Framing between the agent and a plugin process: a small JSON header plus raw bytes, no pickle.

Frame = 8-byte big-endian prefix (header length, payload length), UTF-8 JSON header, payload.
Audio travels as the payload, so an hour of 16 kHz audio is one memcpy-sized frame, not base64.
Both ends use this module: the agent through asyncio streams, the plugin through a blocking socket.

This module only frames: a header is any JSON object with a string ``type``. The messages themselves (``job``,
``cancel``, ``stop`` / ``ready``, ``fatal``, ``started``, ``segment``, ``result``, ``error``, ``stopped``) are
typed once in ``node_agent.plugin_messages``, which both sides use to build and check them.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import struct
from typing import Any

from .errors import WireError

_PREFIX = struct.Struct(">II")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 31  # 2 GiB: far above an hour of any sane audio container


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """Frame parts ready for ``writelines``/``sendmsg`` (the payload is not copied)."""
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return [_PREFIX.pack(len(head), len(payload)), head, payload]


def _check_prefix(prefix: bytes) -> tuple[int, int]:
    head_len, payload_len = _PREFIX.unpack(prefix)
    if head_len == 0 or head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise WireError(f"bad frame prefix (header {head_len} bytes, payload {payload_len} bytes)")
    return head_len, payload_len


def _decode_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireError("frame header must be an object with a string 'type'")
    return header


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """Next frame, or None on a clean end of stream between frames."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise WireError("stream ended inside a frame prefix") from None
    head_len, payload_len = _check_prefix(prefix)
    try:
        header = _decode_header(await reader.readexactly(head_len))
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError:
        raise WireError("stream ended inside a frame") from None
    return header, payload


class BlockingChannel:
    """The plugin's end: blocking reads and writes on a connected socket, used from one thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def _recv_exactly(self, n: int, *, at_start: bool = False) -> bytes | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                if at_start and got == 0:
                    return None
                raise WireError("stream ended inside a frame")
            got += k
        return bytes(buf)

    def recv(self) -> tuple[dict[str, Any], bytes] | None:
        prefix = self._recv_exactly(_PREFIX.size, at_start=True)
        if prefix is None:
            return None
        head_len, payload_len = _check_prefix(prefix)
        header = _decode_header(self._recv_exactly(head_len) or b"")
        payload = self._recv_exactly(payload_len) or b"" if payload_len else b""
        return header, payload

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Whether a frame (or the end of the stream) is waiting; never blocks longer than ``timeout_s``."""
        readable, _, _ = select.select([self._sock], [], [], timeout_s)
        return bool(readable)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        for part in encode(header, payload):
            if len(part):
                self._sock.sendall(part)

    def close(self) -> None:
        self._sock.close()
