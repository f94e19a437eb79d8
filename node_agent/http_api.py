"""The agent's own HTTP endpoints: /metrics, /healthz, /readyz, /status (loopback by default).

With ``http.token`` set, /status and the compatibility endpoints (/utterance, /health) need it as a bearer
token; /metrics, /healthz and /readyz stay open for scrapers and probes. Every handler reads the node through
its read-only view (``node_view.LocalNodeView``), never the agent.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .scheduler_client import SchedulerClient
from .compat import add_compat_routes
from .config import Settings, host_port
from .errors import ListenError
from .jsonio import json_response
from .node_view import LocalNodeView

log = logging.getLogger("node_agent.http")

NODE_KEY: web.AppKey[LocalNodeView] = web.AppKey("node", LocalNodeView)
#: Paths that need ``http.token`` when it is set. Everything else is for scrapers and probes.
PROTECTED_PATHS = frozenset({"/status", "/utterance", "/health"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, path: str, headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if path == "/utterance":
        body.update(job_id=None, trace_id=None)  # the old service's error shape always carries the caller's ids
    return json_response(body, status=status, headers=headers)


def bearer_ok(header: str, expected: bytes) -> bool:
    """Whether an ``Authorization`` header carries the expected bearer token (compared in constant time)."""
    scheme, _, value = header.partition(" ")
    presented = value.strip().encode("utf-8", "surrogatepass")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, expected)


def _auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = token.encode("utf-8", "surrogatepass")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Checked before the handler runs, so a stranger's body is never read. The matched route decides, not
        # the raw path, so no spelling of a protected path slips past.
        resource = request.match_info.route.resource
        protected = resource is not None and resource.canonical in PROTECTED_PATHS
        if protected and not bearer_ok(request.headers.get("Authorization", ""), expected):
            return _error(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                          "(http.token)", request.path, {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Any unexpected exception becomes a logged JSON 500, never a plain-text page."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error answering %s %s; answered 500", request.method, request.path)
        return _error(500, "internal", "internal agent error; see the agent log", request.path)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[NODE_KEY].metrics_registry())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    alive, reason = request.app[NODE_KEY].liveness()
    if not alive:
        return json_response({"ok": False, "reason": reason}, status=503)
    return json_response({"ok": True})


async def _readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[NODE_KEY].ready()
    return json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def _status(request: web.Request) -> web.Response:
    return json_response(request.app[NODE_KEY].status())


def create_app(node: LocalNodeView, client: SchedulerClient, settings: Settings) -> web.Application:
    """The agent's endpoints and the old service's, over ``node``; ``/utterance`` submits through ``client``."""
    middlewares: list[Any] = [_error_middleware]
    if settings.http.token is not None:
        middlewares.append(_auth_middleware(settings.http.token.get_secret_value()))
    app = web.Application(client_max_size=64 * 1024, middlewares=middlewares)
    app[NODE_KEY] = node
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    add_compat_routes(app, node, client, settings)
    return app


@dataclass
class RunningHttp:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(node: LocalNodeView, client: SchedulerClient, settings: Settings,
                     port: int | None = None) -> RunningHttp:
    """Serve the app on ``http.listen`` (or ``port``: 0 picks a free one)."""
    host, default_port = host_port(settings.http.listen)
    # auto_decompress off: /utterance refuses a Content-Encoding (400), so a gzip bomb is never expanded on arrival.
    runner = web.AppRunner(create_app(node, client, settings), access_log=None, auto_decompress=False)
    await runner.setup()
    port = default_port if port is None else port
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError.from_os_error(exc, host, port, "http.listen") from None
    bound = runner.addresses[0]
    return RunningHttp(runner, f"http://{host if ':' not in host else '[' + host + ']'}:{bound[1]}")
