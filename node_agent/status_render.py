"""``node-agent status``: read the local agent's ``GET /status`` and show it in an 80-column terminal.

Fetching is one bounded HTTP call; everything about layout is pure functions of the status document
(``render``, ``exit_code``), so they are tested with a hand-made dict. Exit status: 0 healthy, 1 degraded,
2 agent unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import shutil
import sys
import textwrap
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from .config import load_settings, secret
from .jsonio import dumps

TIMEOUT_S = 5.0
WIDTH = 80
#: At most this many recent failures are shown (the agent keeps more).
SHOWN_FAILURES = 5
#: A split job's sections shown per running job (the rest are counted).
SHOWN_SECTIONS = 8
ELLIPSIS = "..."
EXIT_HEALTHY, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 2
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
#: Terminal escape sequences (CSI and OSC), removed whole so no fragments such as "[31m" remain.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")


class AgentUnreachable(Exception):
    """No usable status document came back from the agent."""


# ----- where and how to ask ---------------------------------------------------------------------------------------


def default_url(listen: str) -> str:
    """The base URL for an ``http.listen`` HOST:PORT; a wildcard bind is reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def normalize_url(url: str) -> str:
    """Accept ``HOST:PORT`` as well as a full base URL; no trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_status(base_url: str, timeout_s: float = TIMEOUT_S, token: str | None = None) -> dict[str, Any]:
    """``GET base_url/status`` (with ``token`` as the bearer token when given); raises ``AgentUnreachable``
    with a one-line reason."""
    headers = {"Accept": "application/json", "User-Agent": "node-agent-status"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base_url + "/status", headers=headers)
    # An http_proxy set for the node's outbound traffic must not swallow a call to this very host.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(base_url) else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout_s) as resp:
            body = resp.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = "wrong http.token" if token is not None else "no http.token set here"
            raise AgentUnreachable(f"HTTP 401 {exc.reason}: the agent requires its http.token "
                                   f"(NODE_AGENT_HTTP__TOKEN); {hint}") from None
        raise AgentUnreachable(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise AgentUnreachable(f"no answer within {timeout_s:g} s") from None
        raise AgentUnreachable(str(getattr(reason, "strerror", None) or reason)) from None
    except TimeoutError:
        raise AgentUnreachable(f"no answer within {timeout_s:g} s") from None
    except (OSError, ValueError) as exc:
        raise AgentUnreachable(str(exc) or type(exc).__name__) from None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AgentUnreachable("the answer is not JSON (is this a node-agent?)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("health"), dict):
        raise AgentUnreachable("the answer is not a node-agent status document")
    return doc


def exit_code(status: dict[str, Any]) -> int:
    """0 when the agent calls itself healthy, 1 otherwise (degraded, or a status this version does not know)."""
    health = status.get("health") or {}
    return EXIT_HEALTHY if health.get("status") == "healthy" else EXIT_DEGRADED


# ----- text that fits -------------------------------------------------------------------------------------------
#
# The wrapping is textwrap's. What is this module's own is counting terminal columns, where textwrap counts
# characters: while wrapping, each wide (CJK) character is followed by a pad character so that len() counts its
# two columns, and _ColumnWrapper keeps a long word from being split between the two; the pads go afterwards.

_PAD = "\ue000"  # private use: clean() drops those, so no text shown has one of its own
_HARD_SPACE = "\u00a0"  # textwrap breaks only at ASCII whitespace; clean() turns this one into a plain space


def _char_cells(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def cells(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters take two, combining marks none."""
    return sum(_char_cells(ch) for ch in text)


class _ColumnWrapper(textwrap.TextWrapper):
    """Splits a word longer than a line without parting a wide character from its pad."""

    def _handle_long_word(self, reversed_chunks: list[str], cur_line: list[str], cur_len: int,
                          width: int) -> None:
        chunk = reversed_chunks[-1]
        end = max(0, width - cur_len)
        if chunk[end:end + 1] == _PAD:
            end -= 1
        if end <= 0 and not cur_line:
            end = 2  # a line narrower than one wide character: overflow rather than loop
        cur_line.append(chunk[:max(0, end)])
        reversed_chunks[-1] = chunk[max(0, end):]


def _wrap(text: str, width: int, first: str = "", indent: str = "") -> list[str]:
    """``textwrap.wrap`` by terminal columns. Never at hyphens: ids such as ``job-1234`` stay whole."""
    padded = "".join(ch + _PAD if _char_cells(ch) == 2 else ch for ch in text)
    wrapper = _ColumnWrapper(width, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False)
    return [line.replace(_PAD, "").replace(_HARD_SPACE, " ") for line in wrapper.wrap(padded)]


def _head(text: str, width: int) -> str:
    """The start of ``text`` that fits in ``width`` columns, cut anywhere (indentation kept)."""
    # As one unbreakable word, textwrap cuts it wherever the room ends.
    lines = _wrap(text.replace(" ", _HARD_SPACE), max(1, width))
    return lines[0].rstrip() if lines else ""


def _shown(lines: list[str], width: int, max_lines: int) -> list[str]:
    """At most ``max_lines`` lines; when some are left out, the last one shown ends in an ellipsis."""
    if len(lines) <= max_lines:
        return lines
    return lines[:max_lines - 1] + [_head(lines[max_lines - 1], width - len(ELLIPSIS)) + ELLIPSIS]


def clean(value: Any) -> str:
    """One line of printable text: newlines and tabs become spaces, other control characters are dropped
    (an error message must not be able to move the cursor or recolour the terminal)."""
    text = _ESCAPES.sub("", "" if value is None else str(value))
    out = []
    for ch in text:
        if ch in "\n\r\t\v\f":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            continue
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, ending in an ellipsis when anything was cut."""
    if cells(text) <= width:
        return text
    return _head(text, width - len(ELLIPSIS)) + ELLIPSIS


def wrap(text: str, width: int, first: str = "", indent: str = "", max_lines: int = 3) -> list[str]:
    """Word wrap by terminal columns: ``first`` prefixes line one, ``indent`` the others; words longer than a
    line are split; when more than ``max_lines`` are needed the last one shown ends in an ellipsis."""
    return _shown(_wrap(clean(text), width, first, indent), width, max_lines) or [first]


def pack(items: Iterable[str], width: int, first: str = "", indent: str = "", sep: str = "  ",
         max_lines: int = 3) -> list[str]:
    """``items`` joined by ``sep``, starting a new line between items rather than inside one (an item too long
    for a whole line is cut); ``first`` prefixes line one, ``indent`` the others."""
    room = max(1, width - max(cells(first), cells(indent)) - len(sep.strip()))
    words = [truncate(item, room).replace(" ", _HARD_SPACE) for item in map(clean, items) if item]
    return _shown(_wrap(sep.join(words), width, first, indent), width, max_lines) or [first.rstrip()]


def fit(lines: Iterable[str], width: int) -> list[str]:
    """The last guard: no line wider than ``width``."""
    return [truncate(line.rstrip(), width) for line in lines]


# ----- formatting values ----------------------------------------------------------------------------------------


def duration(seconds: Any) -> str:
    """Compact human duration: ``4.2s``, ``12m03s``, ``3h02m``, ``2d03h``; ``-`` when unknown."""
    if not isinstance(seconds, (int, float)) or seconds != seconds:  # None or NaN
        return "-"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def mib(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def _v(value: Any) -> str:
    return "-" if value is None or value == "" else clean(value)


def _restarts(restarts: Any) -> str:
    if not isinstance(restarts, dict) or not any(restarts.values()):
        return "restarts 0"
    parts = ", ".join(f"{k} {v}" for k, v in sorted(restarts.items()) if v)
    return f"restarts {sum(int(v) for v in restarts.values())} ({parts})"


# ----- the page -------------------------------------------------------------------------------------------------


def render(status: dict[str, Any], width: int = WIDTH) -> str:
    """The status document as text no wider than ``width`` columns (at least 40; one trailing newline).

    Tolerates missing keys, so an agent of another version still gets a page rather than a traceback."""
    width = max(40, width)
    agent = status.get("agent") or {}
    health = status.get("health") or {}
    out: list[str] = []
    label = "%-10s "
    sub = " " * 11

    out.append(f"node-agent {_v(agent.get('version'))} on {_v(agent.get('hostname'))} "
               f"(pid {_v(agent.get('pid'))})")
    reg = "registered" if agent.get("registered") else "NOT registered"
    hb = agent.get("last_heartbeat_age_s")
    out.extend(pack([_v(agent.get("node_id") or "(no id yet)"),
                     f"{reg}, last heartbeat " + (f"{duration(hb)} ago" if hb is not None else "never")],
                    width, first=label % "node", indent=sub, max_lines=2))
    store = agent.get("scheduler_store")
    # The replica the agent calls now, first; the whole failover list only when it has several.
    urls, in_use = str(agent.get("scheduler_url") or ""), agent.get("scheduler_in_use")
    where = [f"{_v(in_use)} (in use)" + (f", of {urls}" if "," in urls else "")] if in_use else [_v(urls or None)]
    out.extend(pack(where + ([f"embedded, store {_v(store)}"] if store else []),
                    width, first=label % "scheduler", indent=sub, max_lines=2))
    out.append(label % "agent" + f"{_v(agent.get('state'))}, up {duration(agent.get('uptime_s'))}, "
               f"RSS {mib(agent.get('rss_bytes'))}")
    state = str(health.get("status") or "unknown")
    out.append(label % "health" + (state if state == "healthy" else state.upper()))
    for reason in health.get("reasons") or []:
        out.extend(wrap(reason, width, first=sub + "- ", indent=sub + "  ", max_lines=3))

    workers = status.get("workers") or []
    out.append("")
    out.append(f"workers ({len(workers)})")
    slots = status.get("slots") or {}
    if slots:
        # Each worker is a slot with its own lease: the split, and how many of them are in use.
        out.extend(pack([_v(slots.get("text")) if slots.get("text") else "",
                         f"{_v(slots.get('busy'))} busy, {_v(slots.get('ready'))} ready of {_v(slots.get('total'))}"],
                        width, first="  slots ", indent=" " * 8, sep="; ", max_lines=2))
    for w in workers:
        kind = "/".join(x for x in (_v(w.get("device")), _v(w.get("compute_type"))) if x != "-") or "-"
        # The lone-job worker is no slot: it runs a slot's job that found the others idle (lent to that slot).
        lone = (f"lone-job worker, lent to {w['lent_to']}" if w.get("lent_to") else "lone-job worker") \
            if w.get("lone") else ""
        out.extend(pack([_v(w.get("resource")), _v(w.get("state")), lone, f"pid {_v(w.get('pid'))}", kind,
                         f"up {duration(w.get('uptime_s'))}"], width, first="  ", indent=" " * 6, max_lines=2))
        out.extend(wrap(_v(w.get("model")), width, first="      model ", indent=" " * 12, max_lines=2))
        load = w.get("model_load_s")
        out.extend(pack([f"RSS {mib(w.get('rss_bytes'))}",
                         f"jobs {_v(w.get('jobs_served'))} (total {_v(w.get('jobs_served_total'))})",
                         _restarts(w.get("restarts")), f"load {duration(load)}" if load else ""],
                        width, first=" " * 6, indent=" " * 6, sep=", ", max_lines=2))
        if w.get("last_error"):
            out.extend(wrap(w["last_error"], width, first="      last error: ", indent=" " * 8, max_lines=3))

    jobs = status.get("jobs") or []
    out.append("")
    out.append(f"running jobs ({len(jobs)})" if jobs else "running jobs: none")
    for j in jobs:
        worker = j.get("worker")
        on = _v(j.get("resource")) + (f" (decoding on {worker})" if worker and worker != j.get("resource") else "")
        out.extend(pack([_v(j.get("job_id")), f"attempt {_v(j.get('attempt'))} on {on}"],
                        width, first="  ", indent=" " * 6, max_lines=2))
        audio = j.get("audio_s")
        since = j.get("since_last_segment_s")
        out.extend(pack([f"audio {duration(audio) if audio is not None else '?'}",
                         f"elapsed {duration(j.get('elapsed_s'))}", f"segments {_v(j.get('segments'))}",
                         f"last {duration(since)} ago" if since is not None else ""],
                        width, first=" " * 6, indent=" " * 6, sep=", ", max_lines=2))
        if j.get("lease_id"):
            margin = j.get("lease_margin_s")
            out.extend(pack([f"lease {_v(j.get('lease_id'))}", f"epoch {_v(j.get('epoch'))}"],
                            width, first=" " * 6, indent=" " * 6, sep=" ", max_lines=2))
            out.extend(pack([f"renewed {duration(j.get('since_last_renewal_s'))} ago "
                             f"({_v(j.get('renewals'))} renewals)",
                             "margin " + (f"{margin:.2f}s" if isinstance(margin, (int, float)) else "-")],
                            width, first=" " * 6, indent=" " * 6, sep=", ", max_lines=2))
        else:
            out.append("      no lease yet")
        sections = j.get("sections") or []
        if sections:
            out.append(f"      sections ({len(sections) + 1}, section 0 here)")
            for sec in sections[:SHOWN_SECTIONS]:
                out.extend(pack([f"{_v(sec.get('index'))}: {_v(sec.get('job_id'))}", _v(sec.get("state")),
                                 f"on {_v(sec.get('node_id'))}" if sec.get("node_id") else ""],
                                width, first=" " * 8, indent=" " * 10, sep=" ", max_lines=2))
            if len(sections) > SHOWN_SECTIONS:
                out.append(f"        and {len(sections) - SHOWN_SECTIONS} more")

    totals = status.get("totals") or {}
    out.append("")
    out.extend(pack([f"{k} {v}" for k, v in totals.items()] or ["none"], width, first=label % "totals",
                    indent=sub, sep=", ", max_lines=4))
    losses = status.get("lease_losses_10m")
    if losses:
        out.append(sub + f"lease losses in the last 10 minutes: {losses}")

    failures = (status.get("recent_failures") or [])[:SHOWN_FAILURES]
    if failures:
        out.append("")
        out.append(f"recent failures ({len(failures)} shown, newest first)")
        for f in failures:
            head = [f"{duration(f.get('age_s'))} ago", _v(f.get("job_id")), _v(f.get("code")),
                    "(report not accepted)" if f.get("accepted") is False else ""]
            out.extend(pack(head, width, first="  ", indent=" " * 6, max_lines=2))
            out.extend(wrap(_v(f.get("message")), width, first=" " * 6, indent=" " * 6, max_lines=2))
    return "\n".join(fit(out, width)) + "\n"


# ----- the command ----------------------------------------------------------------------------------------------


def terminal_width() -> int:
    return min(WIDTH, max(40, shutil.get_terminal_size((WIDTH, 24)).columns))


def status_command(args: argparse.Namespace) -> int:
    """``node-agent status [--url URL] [--json] [--config FILE]``: 0 healthy, 1 degraded, 2 unreachable."""
    # Loaded even with --url: the agent's http.token (file or NODE_AGENT_HTTP__TOKEN) comes from the settings.
    settings = load_settings(getattr(args, "config", None))
    url = normalize_url(args.url) if getattr(args, "url", None) else default_url(settings.http.listen)
    token = secret(settings.http.token)
    try:
        status = fetch_status(url, token=token)
    except AgentUnreachable as exc:
        print(f"node-agent: cannot reach the agent at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    # A message in a script the terminal's encoding lacks must not turn into a traceback.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    if getattr(args, "json", False):
        print(dumps(status, indent=2))
    else:
        sys.stdout.write(render(status, terminal_width()))
    sys.stdout.flush()
    return exit_code(status)
