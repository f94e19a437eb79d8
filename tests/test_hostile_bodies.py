"""Hostile request bodies on real servers on loopback (issue 22, rows 4 and 12): bodies that stall mid-way on the
scheduler (JSON and multipart) are answered 408 within ``scheduler.body_timeout_s`` and their buffers and partial
uploads dropped; a ``Content-Encoding`` (a gzip bomb included) is refused with 400 naming the header, on the
scheduler's ``POST /v1/jobs`` and on the agent's ``POST /utterance``, never a 500."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import psutil
from prometheus_client import CollectorRegistry

from node_agent.config import SchedulerSettings
from node_agent.scheduler.server import Running, start_scheduler
import fake_plugin
from stack import agent_stack, eventually
from test_compat import RawClient as CompatRawClient

MB = 1024 * 1024
BOUNDARY = "hostile-boundary"


@contextlib.asynccontextmanager
async def scheduler(tmp_path: Path, **overrides: Any) -> AsyncIterator[Running]:
    settings = SchedulerSettings(**{"store": "sqlite", **overrides})
    running = await start_scheduler(settings, CollectorRegistry(), host="127.0.0.1", port=0,
                                    state_dir=tmp_path)
    try:
        yield running
    finally:
        await running.stop()


class RawClient(CompatRawClient):
    """A hand-spoken HTTP/1.1 connection (tests/test_compat.py) that can also wait for the server to close it."""

    async def closed(self, timeout: float) -> bool:
        """True once the server has closed the connection (whatever it sent before is skipped)."""
        async def drain() -> None:
            while await self.reader.read(65536):
                pass
        try:
            await asyncio.wait_for(drain(), timeout)
        except (asyncio.TimeoutError, ConnectionError):
            return False
        return True


def head(path: str, length: int, content_type: str = "application/json", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def multipart(fields: dict[str, str], audio: bytes) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pcm\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    out += audio + f"\r\n--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def rows(state_dir: Path, table: str) -> int:
    db = sqlite3.connect(f"file:{state_dir / 'scheduler.db'}?mode=ro", uri=True)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


async def submit_small(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/jobs", json={"audio_b64": base64.b64encode(bytes(3200)).decode(),
                                                        "format": "pcm_s16le", "sample_rate": 16000}) as resp:
            return resp.status, await resp.json()


# ----- row 4: bodies that stall --------------------------------------------------------------------------------


async def test_stalled_json_bodies_get_408_in_time_and_are_dropped(tmp_path: Path) -> None:
    body_timeout_s = 2.0
    async with scheduler(tmp_path, body_timeout_s=body_timeout_s) as s:
        before = rss_mb()
        started = time.monotonic()
        stalled = [await RawClient.open(s.url) for _ in range(4)]
        for client in stalled:
            # 4 MB of a 40 MB JSON body (under the 64 MiB JSON bound), then nothing.
            await client.send(head("/v1/jobs", 40 * MB) + b'{"audio_b64": "' + b"A" * (4 * MB))
        try:
            # A normal request is served meanwhile.
            status, reply = await submit_small(s.url)
            assert status == 202, reply
            for client in stalled:
                status, headers, reply = await client.answer(body_timeout_s + 15)
                assert status == 408, reply
                assert reply["error"]["code"] == "timeout", reply
                assert "scheduler.body_timeout_s" in reply["error"]["message"], reply
                assert headers.get("connection") == "close", headers
            assert time.monotonic() - started >= body_timeout_s
            for client in stalled:
                assert await client.closed(20), "the connection stayed open after the 408"
        finally:
            for client in stalled:
                client.close()
        print(f"in-process RSS {before:.0f} -> {rss_mb():.0f} MB")  # informative only: no memory assert
        status, reply = await submit_small(s.url)
        assert status == 202, reply


async def test_stalled_multipart_upload_gets_408_and_its_partial_upload_is_discarded(tmp_path: Path) -> None:
    body_timeout_s = 2.0
    async with scheduler(tmp_path, body_timeout_s=body_timeout_s) as s:
        client = await RawClient.open(s.url)
        body = multipart({"format": "pcm_s16le", "sample_rate": "16000"}, bytes(6 * MB))
        # The file part's headers and 3 MB of its audio (some of it already in the store), then nothing.
        partial = body[: len(body) - 3 * MB]
        try:
            await client.send(head("/v1/jobs", len(body), f"multipart/form-data; boundary={BOUNDARY}") + partial)
            await eventually(lambda: rows(tmp_path, "audio_chunks") >= 1, 10, "the upload begun in the store")
            status, headers, reply = await client.answer(body_timeout_s + 15)
            assert status == 408, reply
            assert reply["error"]["code"] == "timeout" and "scheduler.body_timeout_s" in reply["error"]["message"]
            assert headers.get("connection") == "close", headers
            assert rows(tmp_path, "uploads") == 0 and rows(tmp_path, "audio_chunks") == 0
            assert await client.closed(20), "the connection stayed open after the 408"
        finally:
            client.close()
        status, reply = await submit_small(s.url)
        assert status == 202, reply


# ----- row 12: Content-Encoding ------------------------------------------------------------------------------


def gzip_bomb(decoded_bytes: int) -> bytes:
    return gzip.compress(bytes(decoded_bytes), compresslevel=9)


async def assert_encoding_refused(url: str, path: str, content_type: str, body: bytes, what: str) -> None:
    client = await RawClient.open(url)
    try:
        await client.send(head(path, len(body), content_type, "Content-Encoding: gzip\r\n") + body)
        status, _, reply = await client.answer(15)
    finally:
        client.close()
    assert status == 400, (what, reply)
    assert reply["error"]["code"] == "invalid_request", (what, reply)
    assert "Content-Encoding" in reply["error"]["message"], (what, reply)


async def test_content_encoding_on_jobs_is_400_naming_the_header(tmp_path: Path) -> None:
    async with scheduler(tmp_path, max_body_bytes=1 * MB) as s:
        form = multipart({"format": "pcm_s16le", "sample_rate": "16000"}, bytes(3200))
        json_body = json.dumps({"audio_b64": base64.b64encode(bytes(3200)).decode()}).encode()
        cases = [
            ("multipart, gzip", f"multipart/form-data; boundary={BOUNDARY}", gzip.compress(form)),
            ("multipart, not gzip at all", f"multipart/form-data; boundary={BOUNDARY}", form),
            ("multipart, gzip bomb", f"multipart/form-data; boundary={BOUNDARY}", gzip_bomb(64 * MB)),
            ("JSON, gzip", "application/json", gzip.compress(json_body)),
            ("JSON, gzip bomb", "application/json", gzip_bomb(64 * MB)),
        ]
        for what, content_type, body in cases:
            await assert_encoding_refused(s.url, "/v1/jobs", content_type, body, what)
        # identity is no encoding: accepted.
        client = await RawClient.open(s.url)
        try:
            await client.send(head("/v1/jobs", len(form), f"multipart/form-data; boundary={BOUNDARY}",
                                   "Content-Encoding: identity\r\n") + form)
            status, _, reply = await client.answer(15)
        finally:
            client.close()
        assert status == 202, reply
        assert rows(tmp_path, "uploads") == 1  # the accepted job's alone


async def test_content_encoding_on_utterance_is_400_naming_the_header(tmp_path: Path) -> None:
    async with agent_stack(tmp_path, fake_plugin.command()) as s:
        pcm = base64.b64encode(bytes(32000)).decode()
        body = json.dumps({"audio": pcm, "sample_rate": 16000, "src_lang": "en"}).encode()
        for what, payload in [("gzip", gzip.compress(body)), ("gzip bomb", gzip_bomb(64 * MB)),
                              ("not gzip at all", body)]:
            await assert_encoding_refused(s.http.url, "/utterance", "application/json", payload, what)
