"""A fault-injecting reverse proxy between an agent and a real scheduler, for the failure shapes a healthy
scheduler never produces on demand: 500, 503 with Retry-After, malformed JSON, and hanging past the client's
timeout. Faults are queued per endpoint and consumed one request at a time."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter, defaultdict, deque

import aiohttp
from aiohttp import web

ENDPOINTS = {
    "register": ("POST", re.compile(r"^/v1/nodes$")),
    "heartbeat": ("PUT", re.compile(r"^/v1/nodes/[^/]+/heartbeat$")),
    "next_job": ("GET", re.compile(r"^/v1/nodes/[^/]+/jobs/next$")),
    "audio": ("GET", re.compile(r"^/v1/jobs/[^/]+/audio$")),
    "lease_acquire": ("POST", re.compile(r"^/v1/leases$")),
    "lease_renew": ("POST", re.compile(r"^/v1/leases/[^/]+/renew$")),
    "lease_release": ("DELETE", re.compile(r"^/v1/leases/[^/]+$")),
    "events": ("POST", re.compile(r"^/v1/jobs/[^/]+/events$")),
    "result": ("POST", re.compile(r"^/v1/jobs/[^/]+/result$")),
    "job_submit": ("POST", re.compile(r"^/v1/jobs$")),
    "job_view": ("GET", re.compile(r"^/v1/jobs/[^/]+$")),
}


def endpoint_of(method: str, path: str) -> str | None:
    for name, (m, pattern) in ENDPOINTS.items():
        if m == method and pattern.match(path):
            return name
    return None


class ChaosProxy:
    def __init__(self, upstream: str, hang_s: float = 3.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.hang_s = hang_s
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.injected: Counter[tuple[str, str]] = Counter()
        self.forwarded: Counter[str] = Counter()
        # (endpoint, status, body) of forwarded results; for events, the request body (what was delivered)
        self.answers: list[tuple[str, int, bytes]] = []
        #: Query parameters removed before forwarding, per endpoint: a scheduler older than them, as it would see
        #: the request (e.g. next_job without lease_ttl_s: the job comes without its lease).
        self.strip_query: dict[str, set[str]] = defaultdict(set)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    def inject(self, endpoint: str, *kinds: str) -> None:
        self.faults[endpoint].extend(kinds)

    def pending(self) -> int:
        return sum(len(q) for q in self.faults.values())

    def delivered_segment_ids(self) -> set[int]:
        """Ids of the segments the scheduler accepted through the events endpoint (a garbage answer counts:
        the scheduler did store them)."""
        return {e["id"] for name, status, body in self.answers if name == "events" and status in (200, 202, 204)
                for e in json.loads(body)["events"]}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = endpoint_of(request.method, request.path)
        body = await request.read()
        fault = self.faults[name].popleft() if name and self.faults[name] else None
        if fault is not None:
            self.injected[(name, fault)] += 1
        if fault == "500":
            return web.Response(status=500, text="Internal Server Error")
        if fault == "503":
            return web.Response(status=503, headers={"Retry-After": "1"}, text="busy")
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            return web.Response(status=504, text="too late")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "idempotency-key")}
        target = request.rel_url
        if stripped := self.strip_query.get(name or ""):
            target = target.with_query([(k, v) for k, v in request.query.items() if k not in stripped])
        url = self.upstream + str(target)
        async with self._session.request(request.method, url, data=body or None, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type")
            retry_after = resp.headers.get("Retry-After")
            replayed = resp.headers.get("Idempotent-Replayed")
        if name:
            self.forwarded[name] += 1
        if name == "result":
            self.answers.append((name, status, data))
        elif name == "events":
            self.answers.append((name, status, body))
        if fault == "garbage":
            # The scheduler did the work; the node only sees a broken answer (the worst case for idempotency).
            return web.Response(status=200, body=b"<html>proxy error</html>", content_type="text/html")
        out = web.Response(status=status, body=data)
        if ctype:
            out.headers["Content-Type"] = ctype
        if retry_after:
            out.headers["Retry-After"] = retry_after
        if replayed:
            out.headers["Idempotent-Replayed"] = replayed
        return out

    async def start(self, port: int) -> "ChaosProxy":
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # At stop, a request still in flight is the agent's last long poll, forwarded to the scheduler: abandon
        # it rather than wait out the poll (aiohttp waits up to 60 s for handlers by default).
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
