"""Entry point: ``python -m plugins.asr --fd N --spec JSON`` (started by the agent) or ``--probe``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the agent dies, so no orphaned worker keeps a GPU busy."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.asr")
    parser.add_argument("--fd", type=int, help="connected socket inherited from the agent")
    parser.add_argument("--spec", help="the worker's settings (WorkerSpec) as JSON")
    parser.add_argument("--probe", action="store_true", help="print the device facts as JSON and exit")
    args = parser.parse_args(argv)

    if args.probe:
        from .probe import probe

        print(json.dumps(probe()))
        return 0
    if args.fd is None or args.spec is None:
        parser.error("--fd and --spec are required")

    _die_with_parent()
    # Ctrl-C reaches the whole process group; only the agent decides when a worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pydantic import ValidationError

    from node_agent.contracts import one_line
    from node_agent.plugin_messages import WorkerSpec

    try:
        spec = WorkerSpec.model_validate_json(args.spec)
    except ValidationError as exc:
        print(f"plugins.asr: --spec: {one_line(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=spec.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s asr-worker[%(process)d] %(message)s",
    )
    # faster-whisper logs every job's duration at INFO; the agent already logs each job once.
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    from node_agent.wire import BlockingChannel

    from .worker import serve

    channel = BlockingChannel(socket.socket(fileno=args.fd))
    try:
        return serve(channel, spec)
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the agent went away mid-job; nothing left to report to
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
