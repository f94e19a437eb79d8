"""``node-agent submit``: send files to a scheduler, stream their segments, print the transcripts."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .config import Settings, host_port
from .errors import SchedulerUnreachable
from .jsonio import dumps

TERMINAL = ("succeeded", "failed")


def scheduler_url(args: argparse.Namespace, settings: Settings) -> str:
    if args.scheduler:
        url = args.scheduler.strip()
        return ("http://" + url if "://" not in url else url).rstrip("/")  # HOST:PORT is accepted too
    if settings.scheduler.url != "embedded":
        return settings.scheduler.url
    host, port = host_port(settings.scheduler.listen)
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _unreachable(url: str, exc: aiohttp.ClientConnectorError) -> SchedulerUnreachable:
    errno_ = exc.os_error.errno
    reason = os.strerror(errno_).lower() if isinstance(errno_, int) and errno_ > 0 else str(exc.os_error or exc)
    return SchedulerUnreachable(url, f"{reason} (is `node-agent run` or `node-agent scheduler` running there?)")


async def _submit_one(session: aiohttp.ClientSession, url: str, name: str, audio: bytes, language: str | None,
                      allow_truncated: bool = False) -> str:
    data = aiohttp.FormData()
    data.add_field("file", audio, filename=name, content_type="application/octet-stream")
    if language:
        data.add_field("language", language)
    if allow_truncated:
        data.add_field("allow_truncated", "true")
    try:
        async with session.post(f"{url}/v1/jobs", data=data) as resp:
            body = await resp.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        # Nothing there at all: every other file would fail the same way, so this ends the command.
        raise _unreachable(url, exc) from None
    if resp.status != 202:
        err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        raise RuntimeError(f"{resp.status} {err.get('code', '')}: {err.get('message', body)}")
    return body["job_id"]


async def _follow(session: aiohttp.ClientSession, url: str, path: str, job_id: str, as_json: bool,
                  timeout: float) -> dict[str, Any]:
    seen = 0
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    name = Path(path).name
    while True:
        left = give_up - loop.time()
        if left <= 0:
            return {"state": "failed", "error": {"code": "timeout", "message": f"no result within {timeout:g} s"}}
        params = {"wait_s": f"{min(10.0, left):.1f}", "after_segment": str(seen)}
        try:
            async with session.get(f"{url}/v1/jobs/{job_id}", params=params,
                                   timeout=aiohttp.ClientTimeout(total=min(10.0, left) + 10)) as resp:
                view = await resp.json(content_type=None)
                if resp.status != 200:
                    return {"state": "failed", "error": view.get("error") if isinstance(view, dict) else None}
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            print(f"node-agent: {name}: polling failed ({exc}); retrying", file=sys.stderr)
            await asyncio.sleep(1.0)
            continue
        segments = view.get("segments") or []
        if len(segments) < seen:
            seen = 0  # a new attempt started over
        for seg in segments[seen:]:
            if not as_json:
                print(f"{name} [{seg['start']:.2f} -> {seg['end']:.2f}] {seg['text'].strip()}", flush=True)
        seen = len(segments)
        if view.get("state") in TERMINAL:
            return view


async def submit_files(args: argparse.Namespace, settings: Settings) -> int:
    url = scheduler_url(args, settings)
    headers = {}
    if settings.scheduler.token is not None:
        headers["Authorization"] = f"Bearer {settings.scheduler.token.get_secret_value()}"
    failures = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        jobs: dict[str, str] = {}
        for path in args.audio:
            try:
                audio = Path(path).read_bytes()
            except OSError as exc:
                print(f"node-agent: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                failures += 1
                continue
            try:
                jobs[path] = await _submit_one(session, url, Path(path).name, audio, args.language,
                                             args.allow_truncated)
            except (aiohttp.ClientError, RuntimeError, asyncio.TimeoutError) as exc:
                print(f"node-agent: {path}: submit to {url} failed: {exc}", file=sys.stderr)
                failures += 1
        views = await asyncio.gather(*(_follow(session, url, p, j, args.json, args.timeout)
                                       for p, j in jobs.items()))
    for (path, job_id), view in zip(jobs.items(), views):
        if view.get("state") == "succeeded":
            result = view.get("result") or {}
            if args.json:
                print(dumps({"file": path, "job_id": job_id, **result}))
            else:
                print(f"{Path(path).name}: {result.get('text', '').strip()}")
        else:
            failures += 1
            err = view.get("error") or {}
            print(f"node-agent: {path}: job {job_id} failed: {err.get('code', 'failed')}: {err.get('message', '')}",
                  file=sys.stderr)
    return 1 if failures else 0
