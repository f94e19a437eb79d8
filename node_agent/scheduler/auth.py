"""Who is calling the scheduler: the role and the name of the token a request came with, what each role may do,
and which node a node request may act as.

The authentication middleware puts a ``Caller`` on each request (``request["caller"]``); handlers ask
``client_scope`` which jobs the caller may see, and ``NodeFence.check`` whether the request proved the identity of
the node it acts for (its node secret). A scheduler without tokens has no callers to tell apart: every request may
do everything, as before roles existed."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Awaitable, Callable, Protocol

from aiohttp import web

from ..config import SchedulerSettings, _is_loopback
from ..errors import ConfigError
from .errors import Forbidden, Unauthorized
from .schemas import NODE_SECRET_HEADER

log = logging.getLogger("node_agent.scheduler")



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


#: The role each route needs, by method and canonical route. Operators may call every route; a route not listed
#: here is theirs alone, so a route added without a thought about roles is closed rather than open.
ROUTE_ROLES: dict[tuple[str, str], Role] = {
    ("POST", "/v1/jobs"): Role.CLIENT,
    ("GET", "/v1/jobs"): Role.CLIENT,
    ("GET", "/v1/jobs/{job_id}"): Role.CLIENT,
    ("DELETE", "/v1/jobs/{job_id}"): Role.CLIENT,
    ("POST", "/v1/audio/transcriptions"): Role.CLIENT,
    ("POST", "/v1/nodes"): Role.NODE,
    ("PUT", "/v1/nodes/{node_id}/heartbeat"): Role.NODE,
    ("GET", "/v1/nodes/{node_id}/jobs/next"): Role.NODE,
    ("POST", "/v1/leases"): Role.NODE,
    ("POST", "/v1/leases/{lease_id}/renew"): Role.NODE,
    ("DELETE", "/v1/leases/{lease_id}"): Role.NODE,
    ("GET", "/v1/jobs/{job_id}/audio"): Role.NODE,
    ("POST", "/v1/jobs/{job_id}/events"): Role.NODE,
    ("POST", "/v1/jobs/{job_id}/result"): Role.NODE,
    ("GET", "/v1/jobs/{job_id}/capacity"): Role.NODE,
    ("POST", "/v1/jobs/{job_id}/sections"): Role.NODE,
}
#: Routes more than one role may call (and operators): a parent's sections are followed by the node holding its
#: lease, and read by the client that submitted it.
SHARED_ROUTES: dict[tuple[str, str], frozenset[Role]] = {
    ("GET", "/v1/jobs/{job_id}/sections"): frozenset({Role.NODE, Role.CLIENT}),
}

_ROLE_KEYS = {"clients": Role.CLIENT, "nodes": Role.NODE, "operators": Role.OPERATOR}
_TOKEN_SETTING = {Role.CLIENT: "tokens.clients", Role.NODE: "tokens.nodes", Role.OPERATOR: "tokens.operators"}


def role_needed(method: str, route: str) -> Role:
    """The role a request needs (an operator's token may do everything)."""
    return ROUTE_ROLES.get(("GET" if method == "HEAD" else method, route), Role.OPERATOR)


def roles_allowed(method: str, route: str) -> frozenset[Role]:
    """Every role that may call a route besides operators (who may call all)."""
    key = ("GET" if method == "HEAD" else method, route)
    return SHARED_ROUTES.get(key) or frozenset({role_needed(method, route)})


class Credentials:
    """The tokens a scheduler accepts, each with the caller it proves. With the single ``scheduler.token`` (no
    ``scheduler.tokens``), that token is an operator: it may do everything, as before roles existed."""

    def __init__(self, entries: list[tuple[bytes, Caller]], single: bool) -> None:
        self._entries = entries
        self.single = single

    @classmethod
    def from_settings(cls, settings: SchedulerSettings) -> "Credentials | None":
        """The scheduler's credentials; None where it checks no tokens at all."""
        if settings.tokens:
            entries = [(token.get_secret_value().encode("utf-8", "surrogateescape"), Caller(role, name))
                       for key, role in _ROLE_KEYS.items()
                       for name, token in getattr(settings.tokens, key).items()]
            return cls(entries, single=False)
        if settings.token is not None:
            return cls([(settings.token.get_secret_value().encode("utf-8", "surrogateescape"),
                         Caller(Role.OPERATOR, "token"))], single=True)
        return None

    def caller(self, presented: bytes) -> Caller | None:
        """The caller whose token ``presented`` is; None for none. Every configured token is compared, in constant
        time each, so the answer's timing tells neither which token nor how much of one matched."""
        found: Caller | None = None
        for token, caller in self._entries:
            if hmac.compare_digest(presented, token):
                found = caller
        return found


def auth_middleware(credentials: Credentials) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every ``/v1`` request needs a known bearer token (401) of a role that may call its route (403);
    ``/healthz`` and ``/metrics`` stay open for probes and scrapers. The caller lands in ``request["caller"]``."""

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/v1" or request.path.startswith("/v1/"):
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            # Compared as the bytes that came: aiohttp keeps a header's undecodable bytes as surrogate escapes
            # (b"\xff" -> "\udcff"), which strict UTF-8 cannot encode.
            presented = value.strip().encode("utf-8", "surrogateescape")
            caller = credentials.caller(presented) if scheme.lower() == "bearer" else None
            if caller is None:
                raise Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <token>'")
            request["caller"] = caller
            resource = request.match_info.route.resource
            # No route (404) or a method it lacks (405): the router's own answer, to an authenticated caller.
            if resource is not None and request.match_info.http_exception is None:
                allowed = roles_allowed(request.method, resource.canonical)
                if caller.role is not Role.OPERATOR and caller.role not in allowed:
                    needed = " or ".join(f"{_a(r)} token (scheduler.{_TOKEN_SETTING[r]})" for r in sorted(allowed))
                    raise Forbidden(f"{request.method} {resource.canonical} needs {needed}; {caller.name!r} is "
                                    f"{_a(caller.role)} token")
        return await handler(request)

    return auth


def _a(role: Role) -> str:
    """``a client``, ``a node``, ``an operator``."""
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role}"


def warn_single_token(settings: SchedulerSettings) -> None:
    """One line at start where the scheduler has only the single ``scheduler.token``: every holder is every role."""
    if not settings.tokens and settings.token is not None:
        log.warning("scheduler.token alone: every caller holding it may act as any client, node or operator; give "
                    "each role its own named tokens (scheduler.tokens)")


def refuse_exposed(settings: SchedulerSettings, host: str) -> None:
    """A standalone scheduler on a non-loopback address without any token would let anyone who reaches it do
    everything: ``ConfigError`` (one line) unless ``scheduler.allow_unauthenticated``."""
    if not settings.checks_tokens and not settings.allow_unauthenticated and not _is_loopback(f"[{host}]:0"):
        raise ConfigError(f"scheduler.listen {host}: a non-loopback address needs scheduler.tokens (or "
                          "scheduler.token, or scheduler.allow_unauthenticated: true)")


# ------------------------------------------------------------------------------------------ node secrets


def new_node_secret() -> str:
    """A node's secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """What the store keeps of a node secret. A fast hash suffices: the secret is 256 random bits, not a password
    that a slow hash would protect against guessing."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def presented_secret(request: web.Request) -> str | None:
    """The node secret a request came with, if any."""
    value = request.headers.get(NODE_SECRET_HEADER, "").strip()
    return value or None


class SecretLookup(Protocol):
    """The store's side of the fence (``Store.node_secret``)."""

    async def __call__(self, *, node_id: str | None = None, lease_id: str | None = None,
                       job_id: str | None = None) -> tuple[str | None, str | None]: ...


#: How long a node's secret hash, once matched, is trusted without a store read. A node's hash changes only when
#: the reaper forgets a long-gone node and its id registers anew, so this only bounds how long the old secret
#: keeps working on one replica after that.
SECRET_CACHE_S = 30.0
#: Cached hashes at most (a scheduler of 10,000 nodes reads each again at most once per SECRET_CACHE_S).
SECRET_CACHE_MAX = 10_000


class NodeFence:
    """Checks that a node request proves the identity of the node it acts for: the node's secret, whose hash the
    store keeps (so every replica checks the same). On when the scheduler checks tokens; a node without a secret
    (registered before secrets existed, or not registered: the store answers for that) is not fenced."""

    def __init__(self, lookup: SecretLookup, enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self.enabled = enabled
        self._clock = clock
        self._matched: dict[str, tuple[str, float]] = {}  # node id -> (hash, when matched)

    async def check(self, request: web.Request, *, node_id: str | None = None, lease_id: str | None = None,
                    job_id: str | None = None) -> None:
        """Raise ``Forbidden`` unless the request carries the secret of the node named (``node_id``), of the node
        holding ``lease_id``, or of the node ``job_id`` is assigned to."""
        if not self.enabled:
            return
        caller = caller_of(request)
        if job_id is not None and caller is not None and caller.role is Role.OPERATOR:
            return  # reading a job's audio acts for no node: an operator may (kept audio, for a complaint)
        secret = presented_secret(request)
        presented = secret_hash(secret) if secret is not None else None
        if node_id is not None and presented is not None:
            cached = self._matched.get(node_id)
            if cached is not None and self._clock() - cached[1] < SECRET_CACHE_S \
                    and hmac.compare_digest(cached[0], presented):
                return
        acting, stored = await self._lookup(node_id=node_id, lease_id=lease_id, job_id=job_id)
        if acting is None:
            if job_id is not None:  # a job no node holds: no node may read its audio
                raise Forbidden(f"job {job_id} is not assigned to a node: only its holder may download its audio")
            return  # an unknown node or lease: the store says so, as without secrets
        if stored is None:
            return
        if presented is None or not hmac.compare_digest(stored, presented):
            raise Forbidden(node_refusal(acting, presented is not None))
        if len(self._matched) >= SECRET_CACHE_MAX:
            self._matched.clear()
        self._matched[acting] = (stored, self._clock())


def node_refusal(node_id: str, presented: bool) -> str:
    """The one line a request acting as ``node_id`` without its secret gets (an agent logs it as it comes)."""
    what = "a wrong node secret" if presented else f"no node secret ({NODE_SECRET_HEADER})"
    return (f"node {node_id} has a node secret and this request came with {what}: only that node may act as it. "
            "An agent whose node.state_dir lost its node-secret file registers as a new node (remove the node-id "
            "file there); the scheduler forgets the old id once it has been gone for scheduler.job_retention_s")
