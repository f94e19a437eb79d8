"""``POST /utterance`` bodies in flight are bounded in bytes, those still arriving included (issue 22, row 3).

Ten concurrent 180 MB bodies once took the agent to 2.17 GB: a request held a place only once its body had
arrived, so any number of bodies could be arriving at once. Here, on a real agent with the stand-in plugin and a
small per-body limit, large bodies sent over raw sockets fill the byte budget; the next large one is 503 busy
before its body is read (and a chunked one as soon as its bytes pass the budget), a small one still fits and is
served, and the ones that were let in complete.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

import fake_plugin
from stack import agent_stack, eventually
from test_compat import RawClient, b64, compat, post, post_head

pytestmark = pytest.mark.timeout(120)

LIMIT = 1024 * 1024  # http.max_body_bytes: the per-body limit


def utterance_bytes(size: int, name: str) -> bytes:
    """A valid /utterance body of exactly ``size`` bytes (the JSON padded with spaces)."""
    pcm = np.zeros((size * 7 // 10) // 2, dtype="<i2").tobytes()
    body = json.dumps({"job_id": name, "trace_id": "t", "src_lang": "en", "audio": b64(pcm)}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def test_bodies_past_the_byte_budget_are_503_busy_before_they_are_read(tmp_path) -> None:
    async with agent_stack(tmp_path, fake_plugin.command(), http={"max_body_bytes": LIMIT},
                           compat={"queue_per_worker": 1, "body_timeout_s": 60}) as s:
        service = compat(s)
        assert service.capacity() == 2  # one worker: one running, one waiting; the budget is two full bodies
        big = utterance_bytes(LIMIT - 20_000, "big")
        head = 1000
        arriving = [await RawClient.open(s.http.url) for _ in range(2)]
        refused: list[RawClient] = []
        try:
            for client in arriving:
                await client.send(post_head(len(big)) + big[:head])
            await eventually(lambda: service.receiving == 2, 10, "two large bodies arriving")
            assert service.in_flight == 0

            # A third large body would pass the budget: refused at once, with only its first bytes sent (the
            # rest is never sent, so an agent that read it would answer nothing until the body timeout).
            client = await RawClient.open(s.http.url)
            refused.append(client)
            await client.send(post_head(len(big)) + big[:head])
            status, headers, reply = await client.answer(20)
            assert status == 503, reply
            assert reply["error"]["code"] == "busy", reply
            assert "compat.queue_per_worker" in reply["error"]["message"], reply
            assert int(headers["retry-after"]) >= 1 and headers.get("connection") == "close"

            # Chunked (no length up front): refused as soon as the bytes read pass the budget, body unfinished.
            client = await RawClient.open(s.http.url)
            refused.append(client)
            chunk = b" " * (LIMIT // 4)
            await client.send(post_head(None) + b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status, headers, reply = await client.answer(20)
            assert status == 503 and reply["error"]["code"] == "busy", reply
            assert int(headers["retry-after"]) >= 1 and headers.get("connection") == "close"

            # A small utterance still fits beside the two arriving bodies, and is served.
            status, reply, _ = await post(s, utterance_bytes(8000, "small"))
            assert status == 200, reply

            # The two let in finish sending and complete.
            for client in arriving:
                await client.send(big[head:])
            for client in arriving:
                status, _, reply = await client.answer(60)
                assert status == 200 and reply["job_id"] == "big", reply
        finally:
            for client in arriving + refused:
                client.close()
        await eventually(lambda: service.receiving == 0 and service.in_flight == 0, 10, "nothing in flight")
        assert service.body_bytes == 0
        assert service.totals["busy"] == 2 and service.totals["completed"] == 3, service.totals
