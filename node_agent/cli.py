"""The ``node-agent`` command: argument parsing and one function per subcommand.

Input and configuration mistakes end as one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import Settings, load_settings
from .errors import ConfigError, JobError, NodeAgentError

log = logging.getLogger("node_agent")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    settings = load_settings(args.config)
    if overrides:
        data = settings.model_dump()
        for dotted, value in overrides.items():
            section, key = dotted.split(".", 1)
            data[section][key] = value
        settings = Settings.model_validate(data)
    return settings


# ----- transcribe ------------------------------------------------------------------------------------------------


def _fmt_ts(seconds: float) -> str:
    return f"{seconds:.2f}"


async def _transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from .supervisor import JobRequest, Worker, WorkerState, worker_spec

    spec = worker_spec(settings.asr, settings.asr.device.value, settings.asr.device_index[0],
                       log_level="WARNING")
    worker = Worker("local", spec, settings.worker, settings.asr.timeout)
    await worker.start()
    failures = 0
    try:
        for path in args.audio:
            name = Path(path).name
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                print(f"node-agent: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                failures += 1
                continue
            if worker.state is not WorkerState.fatal:
                with _suppress_timeout():
                    await worker.wait_ready(settings.worker.start_timeout_s)
            job = JobRequest(job_id=name, audio=data, language=args.language)
            started = time.perf_counter()

            def show(event: dict[str, Any]) -> None:
                if not args.json:
                    print(f"[{_fmt_ts(event['start'])} -> {_fmt_ts(event['end'])}] {event['text'].strip()}",
                          flush=True)

            try:
                result = await worker.run_job(job, on_segment=show)
            except JobError as exc:
                print(f"node-agent: {path}: {exc.code}: {exc.message}", file=sys.stderr)
                failures += 1
                continue
            wall = time.perf_counter() - started
            if args.json:
                doc = {"file": path, **result.to_dict(), "wall_s": round(wall, 3)}
                print(json.dumps(doc, ensure_ascii=False), flush=True)
            else:
                rtf = wall / result.duration_s if result.duration_s else 0.0
                print(f"{name}: {result.duration_s:.2f} s audio in {wall:.2f} s wall (RTF {rtf:.3f}), "
                      f"language {result.language}", flush=True)
    finally:
        await worker.stop()
    return 1 if failures else 0


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is asyncio.TimeoutError


def cmd_transcribe(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.model:
        overrides["asr.model"] = args.model
    settings = _load(args, overrides)
    _setup_logging("WARNING")
    return asyncio.run(_transcribe(args, settings))


# ----- check-config ----------------------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    source = args.config or os.environ.get("NODE_AGENT_CONFIG") or "built-in defaults + config/node-agent.yaml"
    print(f"# effective settings (from {source}, environment overrides applied); secrets masked")
    print(yaml.safe_dump(settings.redacted(), sort_keys=False, allow_unicode=True), end="")
    return 0


# ----- run / scheduler / submit / status -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import run_agent
    from .allocator import pin_mmap_threshold

    settings = _load(args)
    _setup_logging(settings.log.level)
    pin_mmap_threshold()  # this process moves MB-sized audio buffers; see allocator.py
    return asyncio.run(run_agent(settings))


def cmd_scheduler(args: argparse.Namespace) -> int:
    from .allocator import pin_mmap_threshold
    from .scheduler.server import serve

    overrides = {"scheduler.listen": args.listen} if args.listen else None
    settings = _load(args, overrides)
    _setup_logging(settings.log.level)
    pin_mmap_threshold()  # holds every queued job's audio; see allocator.py
    asyncio.run(serve(settings.scheduler))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit_files

    settings = _load(args)
    _setup_logging("WARNING")
    return asyncio.run(submit_files(args, settings))


def cmd_status(args: argparse.Namespace) -> int:
    from .status import status_command

    return status_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node-agent", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"node-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="YAML settings (default config/node-agent.yaml)")
        return p

    p = with_config(sub.add_parser("run", help="join the scheduler and serve jobs"))
    p.set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("scheduler", help="run the scheduler alone"))
    p.add_argument("--listen", metavar="HOST:PORT")
    p.set_defaults(func=cmd_scheduler)

    p = with_config(sub.add_parser("transcribe", help="transcribe files locally through a supervised worker"))
    p.add_argument("audio", nargs="+", metavar="AUDIO")
    p.add_argument("--model", help="override asr.model")
    p.add_argument("--language", help="language code (default: detect)")
    p.add_argument("--json", action="store_true", help="one JSON document per file")
    p.set_defaults(func=cmd_transcribe)

    p = with_config(sub.add_parser("submit", help="submit files to a scheduler and print the transcripts"))
    p.add_argument("audio", nargs="+", metavar="AUDIO")
    p.add_argument("--scheduler", metavar="URL", help="scheduler URL (default from config, embedded listen)")
    p.add_argument("--language", help="language code (default: detect)")
    p.add_argument("--json", action="store_true", help="one JSON document per file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all jobs")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show the local agent's state")
    p.add_argument("--url", help="agent HTTP URL (default from config http.listen)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", metavar="FILE")
    p.set_defaults(func=cmd_status)

    p = with_config(sub.add_parser("check-config", help="validate and print the effective settings"))
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"node-agent: config error: {exc}", file=sys.stderr)
        return 2
    except NodeAgentError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
