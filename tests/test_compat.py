"""The old ASR service's endpoints (POST /utterance, GET /health) on a real in-process agent.

Every utterance runs as a real job on the embedded scheduler through lease, supervisor and the real plugin process;
the time-limit test checks that the decode really is stopped and the worker kept. Mandarin output (simplified or
traditional script) is tested in test_read_aloud.py, on the Mandarin agent that module starts anyway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil
import pytest
from aioresponses import aioresponses
from prometheus_client.parser import text_string_to_metric_families

from helpers import decode_clip, pcm16, plain_wer, reference, wer
from node_agent.compat import (BODY_TIMEOUT_S, COMPAT_KEY, DEFAULT_TIMEOUT_S, QUEUE_PER_WORKER, CompatLimits,
                               CompatService)
from node_agent.supervisor import WorkerState
from stack import AgentStack, agent_stack, eventually, long_audio

pytestmark = pytest.mark.timeout(240)

RESPONSE_KEYS = {"job_id", "trace_id", "text", "language", "language_probability", "segments", "duration"}
SEGMENT_KEYS = {"start", "end", "text", "no_speech_prob", "avg_logprob", "compression_ratio"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def exact_pcm16(samples: np.ndarray) -> bytes:
    """Little-endian pcm16 that decodes back to exactly ``samples`` when they came from 16-bit audio
    (``helpers.pcm16`` scales by 32767, which nudges every sample and so the decode)."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def utterance_body(name: str, src_lang: str = "auto", **fields: Any) -> dict[str, Any]:
    """The old service's request for one test clip (its own 16-bit samples at 16 kHz, base64)."""
    return {"job_id": f"job-{name[:12]}", "trace_id": "trace-1", "src_lang": src_lang,
            "audio": b64(exact_pcm16(decode_clip(name))), "sample_rate": 16000, **fields}


async def post(s: AgentStack, body: Any) -> tuple[int, Any, Any]:
    kwargs = {"json": body} if not isinstance(body, (bytes, str)) else {"data": body}
    async with s.session.post(s.http.url + "/utterance", **kwargs) as resp:
        return resp.status, await resp.json(), resp.headers


async def health(s: AgentStack) -> tuple[int, dict[str, Any]]:
    async with s.session.get(s.http.url + "/health") as resp:
        return resp.status, await resp.json()


async def scraped(s: AgentStack, name: str, **labels: str) -> float | None:
    """One sample as the agent's /metrics endpoint shows it."""
    async with s.session.get(s.http.url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def compat(s: AgentStack) -> CompatService:
    return s.http.runner.app[COMPAT_KEY]


# ----- shapes and the path a request takes -----------------------------------------------------------------------


async def test_utterance_runs_as_a_scheduler_job_and_answers_in_the_old_shape(tmp_path: Path) -> None:
    # A token on the scheduler: the endpoint must pass the agent's own bearer token on.
    async with agent_stack(tmp_path, scheduler={"token": "compat-secret"}) as s:
        worker = s.agent.workers["cpu/0"]
        status, doc = await health(s)
        assert status == 200, doc
        assert doc["status"] == "ok" and doc["queue_depth"] == 0
        assert doc["queue_limit"] == 1 + QUEUE_PER_WORKER
        assert doc["worker"]["state"] == "ready" and doc["worker"]["pid"] == worker.pid
        assert doc["totals"] == {"completed": 0, "failed": 0, "timeout": 0, "rejected": 0, "busy": 0}
        assert doc["restarts"] == 0 and doc["avg_wait_s"] == 0.0

        body = utterance_body("jfk.flac", "en", beam_size=5, temperature=0, no_speech_threshold=0.6,
                              log_prob_threshold=-1.0, compression_ratio_threshold=2.4, context="ignored")
        status, reply, headers = await post(s, body)
        assert status == 200, reply
        assert set(reply) == RESPONSE_KEYS
        assert reply["job_id"] == "job-jfk.flac" and reply["trace_id"] == "trace-1"
        assert reply["language"] == "en" and reply["language_probability"] == 1.0  # src_lang given
        assert reply["duration"] == pytest.approx(11.0, abs=0.01)
        plain = await asyncio.to_thread(plain_wer, reply["text"], "jfk.flac", language="en", beam_size=5,
                                        temperature=0.0, no_speech_threshold=0.6, log_prob_threshold=-1.0,
                                        compression_ratio_threshold=2.4)
        assert plain == 0.0, reply["text"]  # the same words as plain faster-whisper with the request's options
        assert reply["segments"] and all(set(seg) == SEGMENT_KEYS for seg in reply["segments"])
        assert reply["segments"][0]["start"] == 0.0 and reply["segments"][-1]["end"] <= 11.0
        assert wer(reply["text"], " ".join(seg["text"] for seg in reply["segments"])) == 0.0

        # It was an ordinary job: queued on the scheduler, leased, run by the worker, counted by the agent.
        job_id = headers["X-Scheduler-Job-Id"]
        async with s.session.get(f"{s.scheduler.url}/v1/jobs/{job_id}",
                                 headers={"Authorization": "Bearer compat-secret"}) as resp:
            view = await resp.json()
        assert view["state"] == "succeeded" and view["node_id"] == s.agent.identity.node_id, view
        assert view["result"]["text"] == reply["text"]
        await s.wait_counted("succeeded")
        assert s.sample("node_agent_lease_acquire_duration_seconds_count", device="cpu/0") == 1.0
        assert s.sample("node_agent_asr_audio_seconds_total", model="tiny.en", device="cpu/0") == pytest.approx(11.0)
        assert s.scheduler_registry.get_sample_value("node_agent_scheduler_jobs_total",
                                                     {"outcome": "succeeded"}) == 1.0
        # Submitted and followed through the node's scheduler client, so counted in its metrics too.
        assert s.sample("node_agent_scheduler_requests_total", endpoint="job_submit", code="202") == 1.0
        assert (s.sample("node_agent_scheduler_requests_total", endpoint="job_view", code="200") or 0) >= 1

        status, doc = await health(s)
        assert status == 200
        assert doc["totals"]["completed"] == 1 and doc["queue_depth"] == 0
        assert doc["worker"]["jobs_served"] == 1 and doc["avg_wait_s"] >= 0.0 and doc["avg_latency_s"] > 0

        # A draining node takes no more utterances, and says so in /health.
        await s.agent.drain(0)
        status, reply, headers = await post(s, body)
        assert status == 503 and reply["error"] == {"code": "unavailable", "message": "the node is draining"}
        assert int(headers["Retry-After"]) >= 1 and reply["job_id"] is None  # refused before the body was read
        status, doc = await health(s)
        assert status == 503 and doc["status"] == "draining" and doc["reasons"] == ["draining"]
        assert doc["totals"]["busy"] == 1


async def test_bad_requests_are_400_naming_the_field(tmp_path: Path) -> None:
    async with agent_stack(tmp_path) as s:
        good = b64(pcm16(decode_clip("jfk.flac")[:16000]))
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"audio": "not base64!"}, "audio", "not valid base64"),
            ({"audio": ""}, "audio", "audio is empty"),
            ({"audio": None}, "audio", "valid string"),
            ({"src_lang": "fr"}, "src_lang", "'fr' is not one of auto, zh, en, ja, ko"),
            ({"src_lang": "zh"}, "src_lang", "not served by this node's model tiny.en"),
            ({"sample_rate": 4000}, "sample_rate", "4000 Hz is outside 8000..48000 Hz"),
            ({"sample_rate": 96000}, "sample_rate", "outside"),
            ({"beam_size": 0}, "beam_size", "greater than or equal to 1"),
            ({"temperature": 1.5}, "temperature", "less than or equal to 1"),
            ({"timeout_s": 0}, "timeout_s", "must be above 0"),
        ]
        for change, field, words in cases:
            body = {"job_id": "j-1", "trace_id": "t-1", "src_lang": "en", "audio": good, **change}
            status, reply, _ = await post(s, body)
            assert status == 400, (change, reply)
            error = reply["error"]
            assert error["code"] == "invalid_request" and error["field"] == field, (change, reply)
            assert error["message"].startswith(f"{field}: ") and words in error["message"], (change, reply)
            assert reply["job_id"] == "j-1" and reply["trace_id"] == "t-1"
        missing = {"job_id": "j-1", "src_lang": "en"}
        status, reply, _ = await post(s, missing)
        assert status == 400 and reply["error"]["field"] == "audio", reply
        assert reply["error"]["message"] == "audio: Field required"
        status, reply, _ = await post(s, b"{not json")
        assert status == 400 and reply["error"]["message"].startswith("request body is not valid JSON"), reply
        status, reply, _ = await post(s, b"[1, 2]")
        assert status == 400 and reply["error"]["message"] == "request body must be a JSON object", reply
        # Nothing of that reached the scheduler.
        assert s.scheduler_registry.get_sample_value("node_agent_scheduler_jobs_submitted_total") == 0.0

        # Audio the worker itself rejects (too short to decode) comes back as the job's bad_audio, still 400.
        status, reply, _ = await post(s, {"job_id": "j-2", "src_lang": "en", "audio": b64(b"\x00\x00" * 400)})
        assert status == 400, reply
        assert reply["error"]["code"] == "bad_audio" and reply["error"]["field"] == "audio", reply
        assert "too short" in reply["error"]["message"] and reply["job_id"] == "j-2"
        status, doc = await health(s)
        assert doc["totals"] == {"completed": 0, "failed": 1, "timeout": 0, "rejected": len(cases) + 3, "busy": 0}


# ----- busy and over time ----------------------------------------------------------------------------------------


async def test_busy_is_503_and_over_time_is_504_with_the_decode_stopped(tmp_path: Path) -> None:
    # The decode stops at its next segment boundary after the limit (one 30 s window at most): a 15 s grace
    # holds that on a loaded machine, so the worker is kept rather than killed.
    async with agent_stack(tmp_path, worker={"stop_grace_s": 15}) as s:
        service = compat(s)
        service.limits = CompatLimits(timeout_s=DEFAULT_TIMEOUT_S, queue_per_worker=0)  # one in flight at most
        worker = s.agent.workers["cpu/0"]
        old_pid = worker.pid
        assert old_pid is not None
        # ~413 s of speech: over 15 s of decoding on an idle 2-core machine, far past the 3 s limit even on a
        # several times faster one (stopped at the limit, so the length costs nothing). Greedy at one temperature:
        # a window is one pass (no beam, no fallback), so the boundary after the limit comes soon.
        limit_s = 3.0
        slow = {"job_id": "slow", "trace_id": "t-slow", "src_lang": "en", "audio": b64(long_audio(36)),
                "timeout_s": limit_s, "beam_size": 1, "temperature": 0}
        started = time.monotonic()
        first = asyncio.ensure_future(post(s, slow))
        await eventually(lambda: worker.state is WorkerState.busy, 20, "the slow utterance is decoding")

        status, reply, headers = await post(s, utterance_body("jfk.flac", "en"))
        assert status == 503, reply
        assert reply["error"] == {"code": "busy", "message": "1 utterances in flight (limit 1)"}
        assert int(headers["Retry-After"]) >= 1
        status, doc = await health(s)
        assert doc["queue_depth"] == 1 and doc["queue_limit"] == 1 and doc["totals"]["busy"] == 1
        assert doc["worker"]["state"] == "busy"

        status, reply, _ = await first
        elapsed = time.monotonic() - started
        assert status == 504, reply
        assert reply["error"]["code"] == "timeout" and reply["job_id"] == "slow", reply
        assert "deadline" in reply["error"]["message"] and f"worker pid {old_pid} kept" in reply["error"]["message"]
        assert elapsed < limit_s + s.settings.worker.stop_grace_s + 5, elapsed
        # The decode did not go on in the background: the same process is idle (no CPU spent), not replaced.
        await eventually(lambda: worker.state is WorkerState.ready, 10, "the worker is ready again")
        assert worker.pid == old_pid
        before = psutil.Process(old_pid).cpu_times()
        await asyncio.sleep(1.0)
        after = psutil.Process(old_pid).cpu_times()
        assert (after.user + after.system) - (before.user + before.system) < 0.3
        assert await scraped(s, "node_agent_worker_restarts_total", device="cpu/0", reason="timeout") == 0.0
        await s.wait_counted("timeout")

        status, doc = await health(s)
        assert status == 200 and doc["worker"]["pid"] == old_pid
        assert doc["restarts"] == 0 and doc["restarts_by_reason"]["timeout"] == 0
        assert doc["totals"] == {"completed": 0, "failed": 1, "timeout": 1, "rejected": 0, "busy": 1}

        # The next utterance is served at once by the same process.
        status, reply, _ = await post(s, utterance_body("jfk.flac", "en"))
        assert status == 200, reply
        assert await asyncio.to_thread(plain_wer, reply["text"], "jfk.flac", language="en") == 0.0, reply


def test_limits_come_from_a_compat_settings_section_when_there_is_one() -> None:
    class Section:
        timeout_s = 12.5
        queue_per_worker = 5
        body_timeout_s = 7.0

    class WithSection:
        compat = Section()

    assert CompatLimits.from_settings(WithSection()) == CompatLimits(12.5, 5, 7.0)
    assert CompatLimits.from_settings(object()) == CompatLimits(DEFAULT_TIMEOUT_S, QUEUE_PER_WORKER, BODY_TIMEOUT_S)


# ----- bodies: slow, idle, too large, too deep ---------------------------------------------------------------------


class RawClient:
    """One connection speaking HTTP/1.1 by hand, for requests no client library sends: a body that stops after
    a byte, or that trickles."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> "RawClient":
        parts = urlsplit(url)
        return cls(*await asyncio.open_connection(parts.hostname, parts.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body of the answer."""
        async def read() -> tuple[int, dict[str, str], Any]:
            status_line = await self.reader.readline()
            status = int(status_line.split(b" ", 2)[1])
            headers = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers["content-length"]))
            return status, headers, json.loads(body)
        return await asyncio.wait_for(read(), timeout)

    def close(self) -> None:
        self.writer.close()


def post_head(length: int | None, path: str = "/utterance") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()


async def test_idle_and_trickling_bodies_hold_no_place_and_get_408(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.compat")
    body_timeout_s = 4.0
    async with agent_stack(tmp_path, compat={"body_timeout_s": body_timeout_s}) as s:
        service = compat(s)
        assert service.capacity() == 3
        # As many stalled uploads as there are places: two send headers and one byte, one trickles a byte every
        # 0.3 s (a per-read timeout would never fire on it; the whole body has one deadline).
        started = time.monotonic()
        stalled = [await RawClient.open(s.http.url) for _ in range(3)]
        for client in stalled:
            await client.send(post_head(100_000) + b"{")

        async def trickle(client: RawClient) -> None:
            try:
                while True:
                    await asyncio.sleep(0.3)
                    await client.send(b" ")
            except (ConnectionError, OSError):
                pass

        trickler = asyncio.ensure_future(trickle(stalled[2]))
        try:
            await eventually(lambda: service.receiving == 3, 10, "three bodies arriving")
            assert service.in_flight == 0
            status, doc = await health(s)
            assert status == 200 and doc["queue_depth"] == 0, doc

            # A real utterance is served meanwhile (it used to get 503 busy "3 utterances in flight").
            status, reply, _ = await post(s, utterance_body("jfk.flac", "en"))
            assert status == 200, reply
            assert wer(reference("jfk.flac"), reply["text"]) == 0.0, reply["text"]

            for client in stalled:
                status, headers, reply = await client.answer(body_timeout_s + 30)
                assert status == 408, reply
                assert reply["error"]["code"] == "timeout" and "compat.body_timeout_s" in reply["error"]["message"]
                assert reply["job_id"] is None and headers.get("connection") == "close"
            # Not before the deadline, whatever the trickle.
            assert time.monotonic() - started >= body_timeout_s
        finally:
            trickler.cancel()
            for client in stalled:
                client.close()
        assert service.receiving == 0 and service.in_flight == 0
        status, doc = await health(s)
        assert doc["totals"] == {"completed": 1, "failed": 0, "timeout": 0, "rejected": 3, "busy": 0}
        assert caplog.text.count("answered 408") == 3 and caplog.text.count("answered 200") == 1


async def test_oversized_and_deeply_nested_bodies_and_unexpected_errors(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.compat")
    limit = 1024 * 1024
    async with agent_stack(tmp_path, http={"max_body_bytes": limit}) as s:
        # Over the limit by its Content-Length: refused before reading (the client has sent 10 bytes of it).
        client = await RawClient.open(s.http.url)
        try:
            await client.send(post_head(limit + 1) + b'{"audio":"')
            status, headers, reply = await client.answer(20)
        finally:
            client.close()
        assert status == 413 and reply["error"]["code"] == "too_large", reply
        assert str(limit) in reply["error"]["message"] and headers.get("connection") == "close"

        # Chunked, so no length up front: refused once the bytes read pass the limit, with the body unfinished
        # (the terminating chunk is never sent).
        client = await RawClient.open(s.http.url)
        try:
            chunk = b" " * (limit // 2)
            await client.send(post_head(None) + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)))
            status, _, reply = await client.answer(20)
        finally:
            client.close()
        assert status == 413 and reply["error"]["code"] == "too_large", reply

        # A client that hangs up mid-body: the request's fault, counted as refused, not logged as a bug.
        client = await RawClient.open(s.http.url)
        await client.send(post_head(5000) + b'{"audio": "')
        await eventually(lambda: compat(s).receiving == 1, 10, "the body arriving")
        client.close()
        await eventually(lambda: compat(s).totals["rejected"] == 3, 10, "the hang-up counted")
        assert compat(s).receiving == 0 and "request body incomplete" in caplog.text
        assert "unexpected error" not in caplog.text

        # JSON nested deeper than the parser's recursion limit: a 400 like any other bad JSON, not a plain 500.
        for deep in (b"[" * 100_000 + b"]" * 100_000,
                     b'{"job_id": "deep", "audio": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
            status, reply, headers = await post(s, deep)
            assert status == 400, reply
            assert reply["error"] == {"code": "invalid_request",
                                      "message": "request body is not valid JSON: nested too deeply"}
            assert headers["Content-Type"].startswith("application/json")

        # Scheduler answers no real scheduler gives. One that is not a job view ("result" a list) is refused by
        # the scheduler client: a 500 naming the field. One that is a job view but breaks the handler (segments
        # that are not objects) is still the endpoint's JSON error, logged as the 500 it is.
        job = "job-0123456789abcdef"
        view = {"job_id": job, "state": "succeeded", "attempt": 1, "node_id": "n1", "language": "en",
                "segments": [], "error": None, "created_age_s": 1.0, "timings": {}}
        polls = re.compile(re.escape(f"{s.scheduler.url}/v1/jobs/{job}") + r"(\?.*)?$")
        with aioresponses(passthrough_unmatched=True) as mocked:
            mocked.post(f"{s.scheduler.url}/v1/jobs", status=202, payload={"job_id": job, "state": "queued"})
            mocked.get(polls, status=200, payload={**view, "result": ["not", "an", "object"]})
            status, reply, headers = await post(s, utterance_body("jfk.flac", "en"))
        assert status == 500, reply
        assert reply["error"]["code"] == "scheduler_error" and "invalid reply (result:" in reply["error"]["message"]
        assert headers["X-Scheduler-Job-Id"] == job and "unexpected error" not in caplog.text
        with aioresponses(passthrough_unmatched=True) as mocked:
            mocked.post(f"{s.scheduler.url}/v1/jobs", status=202, payload={"job_id": job, "state": "queued"})
            mocked.get(polls, status=200, payload={**view, "result": {"text": "x", "segments": ["not", "objects"]}})
            status, reply, headers = await post(s, utterance_body("jfk.flac", "en"))
        assert status == 500, reply
        assert reply["error"]["code"] == "internal" and reply["job_id"] == "job-jfk.flac", reply
        assert headers["X-Scheduler-Job-Id"] == job
        assert "unexpected error" in caplog.text and f"scheduler_job={job} answered 500" in caplog.text
        assert f"scheduler_job={job} answered 200" not in caplog.text

        status, doc = await health(s)
        assert doc["totals"] == {"completed": 0, "failed": 2, "timeout": 0, "rejected": 5, "busy": 0}
        # The endpoint still serves.
        status, reply, _ = await post(s, utterance_body("jfk.flac", "en"))
        assert status == 200 and wer(reference("jfk.flac"), reply["text"]) == 0.0, reply

