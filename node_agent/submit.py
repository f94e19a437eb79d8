"""``node-agent submit``: send files to a scheduler, stream their segments, print the transcripts.

Every call goes through the scheduler client (typed errors, failover between several ``--scheduler`` URLs). A
submit or a poll that fails in transport or with 5xx (a scheduler restarting) is retried under the one retry policy
(full jitter, a cap on each wait), all within ``--timeout``; a submit's retries carry one ``Idempotency-Key``, so a
POST whose answer was lost creates no second job. Only a scheduler never reached at all ends the command at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .client import (
    ConnectFailed,
    SchedulerClient,
    SchedulerError,
    SchedulerUnavailable,
    UnknownJob,
    lost_job_line,
    new_idempotency_key,
)
from .config import Settings, host_port, scheduler_urls
from .errors import SchedulerUnreachable, UsageError
from .jsonio import dumps
from .retry import Backoff, RetryPolicy
from .scheduler.schemas import TERMINAL_JOB_STATES

#: Longest single long poll for a job's progress.
POLL_SLICE_S = 10.0
#: Failed submissions and polls (a scheduler restarting, a network blip) are retried with full jitter, each wait
#: at most ``max_wait_s``; the total is set per call to what is left of ``--timeout``.
RETRY = RetryPolicy(initial_s=0.5, max_wait_s=10.0, max_total_s=None)
#: The job state for a job the scheduler no longer knows (not a scheduler state: it never answers it).
LOST = "lost"


def scheduler_url(args: argparse.Namespace, settings: Settings) -> str:
    """The scheduler URL(s) to use, comma-separated when several (failover order)."""
    if args.scheduler:
        # HOST:PORT is accepted too, for each of a comma list.
        given = ",".join(u if "://" in u or not u.strip() else "http://" + u.strip()
                         for u in args.scheduler.split(","))
        try:
            return ",".join(scheduler_urls(given))
        except ValueError as exc:
            raise UsageError(f"--scheduler {args.scheduler!r}: {exc}") from None
    if settings.scheduler.url != "embedded":
        return settings.scheduler.url
    host, port = host_port(settings.scheduler.listen)
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _failure(exc: SchedulerError) -> str:
    """One line for a refused or failed call, as ``STATUS CODE: MESSAGE`` when the scheduler answered one."""
    if isinstance(exc, SchedulerUnavailable) or exc.status is None:
        return str(exc)
    return f"{exc.status} {exc.code or ''}: {exc.detail}"


async def _submit_one(client: SchedulerClient, name: str, audio: bytes, language: str | None,
                      allow_truncated: bool = False, *, timeout: float = 600.0, reached: bool = False) -> str:
    """Submit one file, retrying a failed POST (same Idempotency-Key) within ``timeout``. ``reached``: whether
    a scheduler has answered this command before (if not, a refused connection ends the command at once)."""
    key = new_idempotency_key()
    backoff: Backoff | None = None
    while True:
        try:
            submitted = await client.submit_job(audio, filename=name, language=language or None,
                                                allow_truncated=allow_truncated, idempotency_key=key)
            return submitted.job_id
        except ConnectFailed as exc:
            if not reached:
                # Nothing there at all (every URL refused): every file would fail the same way; a wrong URL or a
                # scheduler not started is far likelier than a restart, so say so now instead of waiting.
                raise SchedulerUnreachable(", ".join(client.urls), f"{exc.reason} (is `node-agent run` or "
                                           "`node-agent scheduler` running there?)") from None
            error: SchedulerUnavailable = exc
        except SchedulerUnavailable as exc:
            error = exc
            reached = reached or exc.status is not None  # something answered: a later refusal is a restart
        if backoff is None:
            backoff = dataclasses.replace(RETRY, max_total_s=timeout).start("job_submit")
        print(f"node-agent: {name}: submitting failed ({error}); retrying", file=sys.stderr)
        if not await backoff.wait(error.retry_after):
            raise error


async def _follow(client: SchedulerClient, path: str, job_id: str, as_json: bool,
                  timeout: float) -> dict[str, Any]:
    seen = 0
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    name = Path(path).name
    backoff: Backoff | None = None  # the current run of failed polls, if any
    while True:
        left = give_up - loop.time()
        if left <= 0:
            return {"state": "failed", "error": {"code": "timeout", "message": f"no result within {timeout:g} s"}}
        try:
            view = await client.get_job(job_id, wait_s=min(POLL_SLICE_S, left), after_segment=seen)
        except SchedulerUnavailable as exc:
            if backoff is None:
                backoff = dataclasses.replace(RETRY, max_total_s=left).start("job_poll")
            print(f"node-agent: {name}: polling failed ({exc}); retrying", file=sys.stderr)
            if not await backoff.wait(exc.retry_after):
                return {"state": "failed", "error": {"code": "timeout", "message": f"no result within {timeout:g} "
                                                                                   f"s; the last poll failed: {exc}"}}
            continue
        except UnknownJob:
            # It was submitted here, so the scheduler lost it: polling on would only repeat the 404.
            return {"state": LOST, "error": {"code": "unknown_job", "message": lost_job_line(job_id)}}
        except SchedulerError as exc:
            return {"state": "failed", "error": {"code": exc.code or "failed", "message": exc.detail}}
        backoff = None
        segments = view.segments
        if len(segments) < seen:
            seen = 0  # a new attempt started over
        for seg in segments[seen:]:
            if not as_json:
                print(f"{name} [{seg['start']:.2f} -> {seg['end']:.2f}] {seg['text'].strip()}", flush=True)
        seen = len(segments)
        if view.state in TERMINAL_JOB_STATES:
            return view.model_dump()


async def submit_files(args: argparse.Namespace, settings: Settings) -> int:
    url = scheduler_url(args, settings)
    token = settings.scheduler.token.get_secret_value() if settings.scheduler.token is not None else None
    failures = 0
    async with SchedulerClient(url, token, settings.scheduler.request_timeout_s) as client:
        jobs: dict[str, str] = {}
        reached = False  # whether any scheduler has answered yet
        for index, path in enumerate(args.audio):
            try:
                audio = Path(path).read_bytes()
            except OSError as exc:
                print(f"node-agent: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                failures += 1
                continue
            try:
                jobs[path] = await _submit_one(client, Path(path).name, audio, args.language, args.allow_truncated,
                                               timeout=args.timeout, reached=reached)
                reached = True
            except SchedulerError as exc:
                reached = reached or not isinstance(exc, ConnectFailed)
                if exc.status == 422 and exc.code == "no_capable_node":
                    # Every file asks for the same language, so the rest would be refused alike: the scheduler's
                    # line (what was asked, what the nodes serve, what to change) is said once, and nothing waits.
                    print(f"node-agent: {exc.detail}", file=sys.stderr)
                    failures += len(args.audio) - index
                    break
                print(f"node-agent: {path}: submit to {url} failed: {_failure(exc)}", file=sys.stderr)
                failures += 1
        views = await asyncio.gather(*(_follow(client, p, j, args.json, args.timeout) for p, j in jobs.items()))
    for (path, job_id), view in zip(jobs.items(), views):
        if view.get("state") == "succeeded":
            result = view.get("result") or {}
            if args.json:
                print(dumps({"file": path, "job_id": job_id, **result}))
            else:
                print(f"{Path(path).name}: {result.get('text', '').strip()}")
        elif view.get("state") == LOST:
            failures += 1
            print(f"node-agent: {path}: {lost_job_line(job_id)}", file=sys.stderr)
        else:
            failures += 1
            err = view.get("error") or {}
            print(f"node-agent: {path}: job {job_id} failed: {err.get('code', 'failed')}: {err.get('message', '')}",
                  file=sys.stderr)
    return 1 if failures else 0
