"""The ``node-agent`` command: argument parsing and one function per subcommand.

Input and configuration mistakes end as one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import __version__, eventloop
from .config import Settings, load_settings
from .errors import ConfigError, JobError, NodeAgentError, UsageError
from .jsonio import dumps
from .languages import NOT_A_CODE, english_only, english_only_message, is_language_code

log = logging.getLogger("node_agent")

DESCRIPTION = """\
Speech recognition on this machine, as one node of a cluster or on its own. `node-agent run` starts the agent
(with a scheduler inside it by default); `submit` sends audio files to it and prints the transcripts; `status`
shows what it is doing; `transcribe` decodes files directly, without any scheduler."""

EPILOG = """\
Settings come from config/node-agent.yaml (or --config FILE, or NODE_AGENT_CONFIG); any key can be overridden
from the environment as NODE_AGENT_<SECTION>__<KEY>, e.g. NODE_AGENT_ASR__MODEL=base. Run `node-agent COMMAND
--help` for a command's options."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    # Options validated with the rest: `--model nosuchmodel` is one config-error line, not a traceback.
    return load_settings(args.config, overrides=overrides)


# ----- transcribe ------------------------------------------------------------------------------------------------


def _fmt_ts(seconds: float) -> str:
    return f"{seconds:.2f}"


async def _transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from .contracts import DecodeOptions
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
            job = JobRequest(job_id=name, audio=data, language=args.language,
                             options=DecodeOptions(allow_truncated=True if args.allow_truncated else None))
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
                doc = {"file": path, **result.transcript(), "wall_s": round(wall, 3)}
                print(dumps(doc), flush=True)
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


def _language_arg(value: str | None) -> str | None:
    """``--language`` as a Whisper code (any case accepted); None for ``auto`` or absent (detect)."""
    if value is None:
        return None
    code = value.strip().lower()
    if code in ("", "auto"):
        return None
    if not is_language_code(code):
        raise UsageError(f"--language {value}: {NOT_A_CODE}")
    return code


def cmd_transcribe(args: argparse.Namespace) -> int:
    args.language = _language_arg(args.language)
    overrides: dict[str, Any] = {}
    if args.model:
        overrides["asr.model"] = args.model
    settings = _load(args, overrides)
    # Checked before a worker starts: the plugin would refuse every file, each after a model load.
    language = args.language or settings.asr.language
    if language and language != "en" and english_only(settings.asr.model):
        raise UsageError(english_only_message(settings.asr.model, language))
    _setup_logging("WARNING")
    return eventloop.run(_transcribe(args, settings))


# ----- check-config ----------------------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    source = args.config or os.environ.get("NODE_AGENT_CONFIG") or "built-in defaults + config/node-agent.yaml"
    print(f"# effective settings (from {source}, environment overrides applied); secrets masked")
    print(yaml.safe_dump(settings.redacted(), sort_keys=False, allow_unicode=True), end="")
    from .agent import slots_here

    # The split `run` would choose on this machine; one that cannot fit in memory stops here with its line.
    _, slots = eventloop.run(slots_here(settings))
    print(f"# slots on this machine: {slots.describe()}")
    return 0


# ----- run / scheduler / submit / status -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import run_agent
    from .mmap_tuning import pin_mmap_threshold

    settings = _load(args)
    _setup_logging(settings.log.level)
    pin_mmap_threshold()  # this process moves MB-sized audio buffers; see mmap_tuning.py
    return eventloop.run(run_agent(settings))


def cmd_scheduler(args: argparse.Namespace) -> int:
    from .mmap_tuning import pin_mmap_threshold
    from .scheduler.server import serve

    overrides = {"scheduler.listen": args.listen} if args.listen else None
    settings = _load(args, overrides)
    _setup_logging(settings.log.level)
    pin_mmap_threshold()  # moves MB-sized audio chunks; see mmap_tuning.py
    eventloop.run(serve(settings.scheduler, settings.node.state_dir))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit_files

    args.language = _language_arg(args.language)
    settings = _load(args)
    _setup_logging("WARNING")
    return eventloop.run(submit_files(args, settings))


def cmd_cancel(args: argparse.Namespace) -> int:
    from .submit import cancel_jobs

    settings = _load(args)
    _setup_logging("WARNING")
    return eventloop.run(cancel_jobs(args, settings))


def cmd_hold(args: argparse.Namespace) -> int:
    from .operator_commands import hold_node

    settings = _load(args)
    _setup_logging("WARNING")
    return eventloop.run(hold_node(args, settings))


def cmd_cluster(args: argparse.Namespace) -> int:
    from .cluster_view import cluster_command

    settings = _load(args)
    _setup_logging("WARNING")
    return cluster_command(args, settings, eventloop.run)


def cmd_status(args: argparse.Namespace) -> int:
    from .status_render import status_command

    return status_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node-agent", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"node-agent {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                help="one of the commands below")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE",
                       help="YAML settings file (default: config/node-agent.yaml, or NODE_AGENT_CONFIG)")
        return p

    def with_language(p: argparse.ArgumentParser) -> None:
        p.add_argument("--language", metavar="CODE",
                       help="spoken language as a Whisper code such as en or zh (default: detected per file; "
                            "asr.language sets one for every file)")
        p.add_argument("--allow-truncated", action="store_true",
                       help="decode what a file holds even when its header declares more audio (by default such "
                            "a file fails with bad_audio)")

    p = with_config(command(
        "run", "start the agent: take jobs from the scheduler and decode them",
        "Start the agent: register with the scheduler (by default one started inside this process on "
        "scheduler.listen), take jobs, decode them in supervised worker processes, and serve /metrics, /status "
        "and /utterance on http.listen. SIGTERM or Ctrl-C lets running jobs finish first."))
    p.set_defaults(func=cmd_run)

    p = with_config(command(
        "scheduler", "run a scheduler alone, for several agents to share",
        "Run the scheduler alone, for agents on other machines (scheduler.url pointing here) and for clients "
        "using the job API or the OpenAI-compatible /v1/audio/transcriptions."))
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address to serve on (default: scheduler.listen, 127.0.0.1:8470; 0.0.0.0:8470 for "
                        "every interface)")
    p.set_defaults(func=cmd_scheduler)

    p = with_config(command(
        "transcribe", "transcribe files here, without a scheduler",
        "Transcribe audio files on this machine through one supervised worker, without any scheduler; "
        "segments print as they are decoded. Exit status 1 when any file failed."))
    p.add_argument("audio", nargs="+", metavar="AUDIO",
                   help="audio files in any format ffmpeg reads (wav, flac, mp3, ogg, ...)")
    p.add_argument("--model", metavar="MODEL",
                   help="model to use instead of asr.model: tiny.en (English), base (multilingual), a hub name "
                        "such as large-v3, or a model directory")
    with_language(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document per file (text, segments, timings) instead of text lines")
    p.set_defaults(func=cmd_transcribe)

    p = with_config(command(
        "submit", "send files to a scheduler and print the transcripts",
        "Send audio files to a scheduler as jobs, print their segments as they are decoded, then each file's "
        "transcript. Exit status 1 when any file failed."))
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files to transcribe")
    p.add_argument("--scheduler", metavar="URL",
                   help="scheduler to send to, as http://HOST:PORT or HOST:PORT, or several separated by commas "
                        "(replicas, failed over in order) (default: scheduler.url, or the embedded scheduler's "
                        "scheduler.listen)")
    with_language(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document per file (job id, text, segments) instead of text lines")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop waiting for jobs not finished within this many seconds (default: 600)")
    p.add_argument("--model", metavar="MODEL",
                   help="run only on a node whose asr.model is MODEL, as the node registers it (default: any)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="run only on a node carrying this label (node.labels, or the automatic device_class, "
                        "model, compute_type); repeat for several, all must match")
    p.add_argument("--priority", choices=("batch", "interactive"), default="batch",
                   help="interactive jobs are dispatched before queued batch jobs (default: batch)")
    p.set_defaults(func=cmd_submit)

    p = with_config(command(
        "cancel", "cancel jobs on a scheduler",
        "Cancel jobs by id: a queued job ends at once, a running one stops between two segments (its node keeps "
        "its worker). Prints each job's state after, one per line (a job that had ended keeps its state). Exit "
        "status 0 when every job is cancelled or had ended, 1 when any is unknown."))
    p.add_argument("job", nargs="+", metavar="JOB", help="job ids, as submit --json and GET /v1/jobs show them")
    p.add_argument("--scheduler", metavar="URL",
                   help="scheduler to ask, as for submit (default: scheduler.url, or the embedded scheduler's "
                        "scheduler.listen)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="stop retrying a scheduler that does not answer after this many seconds (default: 30)")
    p.set_defaults(func=cmd_cancel)

    def with_node(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("node", nargs="?", metavar="NODE",
                       help="the node id (default: this machine's agent, from its /status or its state directory)")
        p.add_argument("--scheduler", metavar="URL",
                       help="scheduler to ask, as for submit (default: scheduler.url, or the embedded scheduler's "
                            "scheduler.listen)")
        p.set_defaults(func=cmd_hold)
        return p

    with_node(with_config(command(
        "cordon", "give a node no new jobs",
        "Cordon a node: the scheduler gives it no new jobs; what it runs goes on. Kept in the scheduler's store "
        "(a restart or replica failover keeps it) until `node-agent uncordon`.")))
    with_node(with_config(command(
        "uncordon", "let a node take new jobs again",
        "Uncordon a node: it takes new jobs again, and a drain's deadline is dropped.")))
    p = with_node(with_config(command(
        "drain", "cordon a node and wait until it runs no job",
        "Drain a node for maintenance: cordon it, then wait (saying what still runs) until it runs no job. With "
        "--deadline, the jobs still running then go back to the queue and run elsewhere as their next attempt. "
        "Exit status 0 once the node runs nothing.")))
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="hand the node's running jobs back to the queue after this many seconds, 0 to 604800 "
                        "(default: wait for them however long they take)")

    p = with_config(command(
        "cluster", "show the scheduler's nodes, queue and recent jobs",
        "Show every node (state, cordon, labels, slots, running jobs with their lease age), the queue by priority "
        "and model, the jobs finished in the last hour, and which scheduler answered. Exit status 0 healthy, 1 "
        "degraded (a node gone or cordoned, no live node, a queue waiting past scheduler.batch_max_wait_s), 2 "
        "scheduler unreachable."))
    p.add_argument("--scheduler", metavar="URL",
                   help="scheduler to ask, as for submit (default: scheduler.url, or the embedded scheduler's "
                        "scheduler.listen)")
    p.add_argument("--json", action="store_true",
                   help="print the cluster view as JSON (with a health section) instead of a page")
    p.set_defaults(func=cmd_cluster)

    p = command(
        "status", "show the local agent's state",
        "Show the agent's state: registration, workers, running jobs with their leases, totals and recent "
        "failures. Exit status 0 healthy, 1 degraded, 2 agent unreachable.")
    p.add_argument("--url", metavar="URL",
                   help="the agent to ask, as http://HOST:PORT or HOST:PORT (default: from http.listen)")
    p.add_argument("--json", action="store_true", help="print the agent's whole status document as JSON")
    p.add_argument("--config", metavar="FILE",
                   help="settings file whose http.listen locates the agent (default: config/node-agent.yaml)")
    p.set_defaults(func=cmd_status)

    p = with_config(command(
        "check-config", "validate and print the effective settings",
        "Validate the settings (file plus NODE_AGENT_* environment overrides) and print the result, secrets "
        "masked. A mistake is one line naming the key, the value and where it came from."))
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"node-agent: config error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 2
    except NodeAgentError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
