"""``node-agent submit``: send files to a scheduler, stream their segments, print the transcripts; and
``node-agent cancel``: end jobs.

Submitting and following each job goes through ``JobWaiter`` (node_agent/job_waiter.py), as ``/utterance`` does:
failover between several ``--scheduler`` URLs, a submit or poll that fails in transport, with 5xx or 429 retried
with backoff within ``--timeout`` (one ``Idempotency-Key`` per file), a job the scheduler lost said in one line.
Only a scheduler never reached at all ends the command at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .scheduler_client import (ConnectFailed, SchedulerClient, SchedulerError, SchedulerUnavailable, UnknownJob,
                               lost_job_line)
from .config import Settings, host_port, scheduler_urls, secret
from .errors import SchedulerUnreachable, UsageError
from .job_waiter import JobLost, JobUpdate, JobWaiter, Retrying, WaitExpired
from .jsonio import dumps
from .labels import Labels

#: Checks ``--label`` as the scheduler checks a job's labels.
_LABELS: TypeAdapter[dict[str, str]] = TypeAdapter(Labels)

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


def _retrying(name: str) -> Callable[[Retrying], None]:
    """Says each failed try of ``name``'s submit or polls (a scheduler restarting is worth seeing)."""
    def say(retry: Retrying) -> None:
        what = "submitting" if retry.stage == "submit" else "polling"
        print(f"node-agent: {name}: {what} failed ({retry.error}); retrying", file=sys.stderr)
    return say


def job_asks(args: argparse.Namespace) -> dict[str, Any]:
    """What the command's jobs ask of their node (``--model``, ``--label``, ``--priority``), as submit_job takes
    it; a malformed label is a UsageError naming it."""
    labels: dict[str, str] = {}
    for given in args.label:
        key, sep, value = given.partition("=")
        if not sep:
            raise UsageError(f"--label {given!r}: expected KEY=VALUE, e.g. --label device_class=gpu")
        labels[key.strip()] = value.strip()
    try:
        labels = _LABELS.validate_python(labels)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if part != "[key]")
        raise UsageError(f"--label {where}: {error['msg']}") from None
    return {"model": args.model or None, "labels": labels, "priority": args.priority}


async def _submit_one(waiter: JobWaiter, name: str, audio: bytes, language: str | None,
                      allow_truncated: bool = False, *, timeout: float = 600.0,
                      asks: dict[str, Any] | None = None) -> str:
    """Submit one file (retried within ``timeout``). Before any scheduler has answered this command, a refused
    connection ends it at once."""
    until = asyncio.get_running_loop().time() + timeout
    try:
        return await waiter.submit(audio, until=until, on_retry=_retrying(name), filename=name,
                                   language=language or None, allow_truncated=allow_truncated, **(asks or {}))
    except ConnectFailed as exc:
        if waiter.reached:
            raise
        # Nothing there at all (every URL refused): every file would fail the same way; a wrong URL or a
        # scheduler not started is far likelier than a restart, so say so now instead of waiting.
        raise SchedulerUnreachable(", ".join(waiter.client.urls), f"{exc.reason} (is `node-agent run` or "
                                   "`node-agent scheduler` running there?)") from None


async def _follow(waiter: JobWaiter, path: str, job_id: str, as_json: bool, timeout: float) -> dict[str, Any]:
    """Follow one job to its end, printing its segments as they come; its final view, or one saying why not."""
    name = Path(path).name
    until = asyncio.get_running_loop().time() + timeout

    def show(update: JobUpdate) -> None:
        for seg in update.new_segments if not as_json else ():
            print(f"{name} [{seg['start']:.2f} -> {seg['end']:.2f}] {seg['text'].strip()}", flush=True)

    try:
        view = await waiter.wait(job_id, until, on_update=show, on_retry=_retrying(name))
    except JobLost:
        return {"state": LOST, "error": {"code": "unknown_job", "message": lost_job_line(job_id)}}
    except WaitExpired as exc:
        why = f"; the last poll failed: {exc.last_error}" if exc.last_error is not None else ""
        return {"state": "failed", "error": {"code": "timeout", "message": f"no result within {timeout:g} s{why}"}}
    except SchedulerError as exc:
        return {"state": "failed", "error": {"code": exc.code or "failed", "message": exc.detail}}
    return view.model_dump()


async def submit_files(args: argparse.Namespace, settings: Settings) -> int:
    url = scheduler_url(args, settings)
    asks = job_asks(args)
    failures = 0
    async with SchedulerClient(url, secret(settings.scheduler.token), settings.scheduler.request_timeout_s) as client:
        waiter = JobWaiter(client, reached=False)
        # A list, not a dict by path: the same file given twice is two jobs, each followed and printed.
        jobs: list[tuple[str, str]] = []
        for index, path in enumerate(args.audio):
            try:
                audio = Path(path).read_bytes()
            except OSError as exc:
                print(f"node-agent: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                failures += 1
                continue
            try:
                jobs.append((path, await _submit_one(waiter, Path(path).name, audio, args.language,
                                                     args.allow_truncated, timeout=args.timeout, asks=asks)))
            except SchedulerError as exc:
                if exc.status == 422 and exc.code == "no_capable_node":
                    # Every file asks for the same language, so the rest would be refused alike: the scheduler's
                    # line (what was asked, what the nodes serve, what to change) is said once, and nothing waits.
                    print(f"node-agent: {exc.detail}", file=sys.stderr)
                    failures += len(args.audio) - index
                    break
                print(f"node-agent: {path}: submit to {url} failed: {_failure(exc)}", file=sys.stderr)
                failures += 1
        views = await asyncio.gather(*(_follow(waiter, p, j, args.json, args.timeout) for p, j in jobs))
    for (path, job_id), view in zip(jobs, views):
        if view.get("state") == "succeeded":
            result = view.get("result") or {}
            if args.json:
                print(dumps({"file": path, "job_id": job_id, **result}))
            else:
                print(f"{Path(path).name}: {result.get('text', '').strip()}")
        elif view.get("state") == LOST:
            failures += 1
            print(f"node-agent: {path}: {lost_job_line(job_id)}", file=sys.stderr)
        elif view.get("state") == "cancelled":
            failures += 1
            message = (view.get("error") or {}).get("message", "cancelled")
            print(f"node-agent: {path}: job {job_id} {message}", file=sys.stderr)
        else:
            failures += 1
            err = view.get("error") or {}
            print(f"node-agent: {path}: job {job_id} failed: {err.get('code', 'failed')}: {err.get('message', '')}",
                  file=sys.stderr)
    return 1 if failures else 0


async def cancel_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """``node-agent cancel``: cancel each job and print its state after, one line each (``JOB STATE``; a job
    that had ended keeps its state). Exit status 0 when every job is cancelled or had ended, 1 when any is
    unknown or could not be cancelled. A scheduler never reached at all ends the command at once."""
    url = scheduler_url(args, settings)
    async with SchedulerClient(url, secret(settings.scheduler.token), settings.scheduler.request_timeout_s) as client:
        try:
            return await _cancel_each(JobWaiter(client, reached=False), args.job, args.timeout)
        except ConnectFailed as exc:
            raise SchedulerUnreachable(url, exc.reason) from None


async def _cancel_each(waiter: JobWaiter, job_ids: list[str], timeout: float) -> int:
    until = asyncio.get_running_loop().time() + timeout
    failures = 0
    for job_id in dict.fromkeys(job_ids):  # the same id twice is one job: cancelled and printed once
        try:
            view = await waiter.cancel(job_id, until)
        except UnknownJob:
            failures += 1
            print(f"{job_id} unknown", flush=True)
            print(f"node-agent: {job_id}: no such job on the scheduler (never submitted, forgotten after "
                  "scheduler.job_retention_s, or not this client's)", file=sys.stderr)
            continue
        except ConnectFailed:
            if waiter.reached:
                failures += 1
                print(f"node-agent: {job_id}: cancel failed: no scheduler could be reached", file=sys.stderr)
                continue
            raise
        except SchedulerError as exc:
            failures += 1
            print(f"node-agent: {job_id}: cancel failed: {_failure(exc)}", file=sys.stderr)
            continue
        print(f"{job_id} {view.state}", flush=True)
    return 1 if failures else 0
