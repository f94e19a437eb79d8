"""Who is calling the scheduler: the role and the name of the token a request came with.

The authentication middleware puts a ``Caller`` on each request (``request["caller"]``); handlers ask
``client_scope`` which jobs the caller may see. A scheduler without tokens has no callers to tell apart: every
request may do everything, as before roles existed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web


class Role(StrEnum):
    CLIENT = "client"
    NODE = "node"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Caller:
    """A request's proven identity: its role, and the name its token has in the scheduler's config."""

    role: Role
    name: str


def caller_of(request: web.Request) -> Caller | None:
    """The request's caller; None where the scheduler checks no tokens."""
    return request.get("caller")


def client_scope(request: web.Request) -> str | None:
    """The client whose jobs alone this request may see or cancel; None: every job (an operator, or a scheduler
    without per-client tokens)."""
    caller = caller_of(request)
    return caller.name if caller is not None and caller.role is Role.CLIENT else None
