"""Drop-in endpoints of the ASR service this agent replaces (POST /utterance, GET /health). Being written."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .agent import Agent


def add_compat_routes(app: web.Application, agent: "Agent") -> None:
    """Register the compatibility routes on the agent's HTTP app."""
