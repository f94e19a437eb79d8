"""Agent <-> plugin framing: JSON header + raw bytes, both ends, large payloads, malformed input."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest

from node_agent import wire
from node_agent.errors import WireError


async def test_round_trip_an_hour_of_audio_between_both_ends():
    parent, child = socket.socketpair()
    hour = bytes(range(256)) * (3600 * 16000 * 2 // 256)  # an hour of 16 kHz pcm16: 115 MB
    echoed: list[int] = []

    def plugin_side() -> None:
        ch = wire.BlockingChannel(child)
        header, payload = ch.recv()
        echoed.append(len(payload))
        ch.send({"type": "result", "n": len(payload), "text": "名字"}, payload[:10])
        ch.close()

    t = threading.Thread(target=plugin_side)
    t.start()
    reader, writer = await asyncio.open_connection(sock=parent)
    writer.writelines(wire.encode({"type": "job", "job_id": "j"}, hour))
    await writer.drain()
    header, payload = await wire.read_frame(reader)
    assert header == {"type": "result", "n": len(hour), "text": "名字"} and payload == hour[:10]
    assert await wire.read_frame(reader) is None  # clean end of stream
    writer.close()
    await asyncio.to_thread(t.join)
    assert echoed == [len(hour)]


@pytest.mark.parametrize("raw, needle", [
    (struct.pack(">II", 0, 0), "bad frame prefix"),
    (struct.pack(">II", 5, 0) + b"[1,2]", "object with a string 'type'"),
    (struct.pack(">II", 3, 0) + b"{no", "not JSON"),
    (struct.pack(">II", 20, 0) + b"{}", "ended inside a frame"),
    (b"\x00\x00", "ended inside a frame prefix"),
])
async def test_malformed_frames_are_typed_errors(raw, needle):
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    with pytest.raises(WireError, match=needle):
        await wire.read_frame(reader)
