"""The agent's own HTTP endpoints: /metrics, /healthz, /readyz, /status (loopback by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import HttpSettings, host_port

if TYPE_CHECKING:
    from .agent import Agent

AGENT_KEY: web.AppKey["Agent"] = web.AppKey("agent")


async def _metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    agent.metrics.refresh_workers(agent.workers.values())
    body = generate_latest(agent.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop is alive; that is what liveness means here.
    return web.json_response({"ok": True})


async def _readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[AGENT_KEY].ready()
    return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].status())


def create_app(agent: "Agent", settings: HttpSettings) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[AGENT_KEY] = agent
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    from .compat import add_compat_routes

    add_compat_routes(app, agent)
    return app


@dataclass
class RunningHttp:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(agent: "Agent", settings: HttpSettings, port: int | None = None) -> RunningHttp:
    host, default_port = host_port(settings.listen)
    runner = web.AppRunner(create_app(agent, settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, default_port if port is None else port)
    await site.start()
    bound = runner.addresses[0]
    return RunningHttp(runner, f"http://{host if ':' not in host else '[' + host + ']'}:{bound[1]}")
