"""A model-free stand-in for ``plugins.asr``, for fast and deterministic supervisor tests.

A real subprocess started by the real supervisor (``Worker(command=COMMAND)``) with the same arguments. It runs
the plugin's own serve loop and cancel handling (``plugins.asr.worker.serve`` and ``JobControl``) over the same
framing (``node_agent.wire``); only the engine is replaced by one that follows a script instead of decoding.

The process script is the ``--script`` argument (JSON; ``command(**script)`` builds the argv):
    load: "ok" (default) | "fail" (answer fatal) | "exit" (exit 3 before ready) | "hang" (never ready)
    load_s: seconds before ready
    fail_while: a path; loading fails while it exists
    exit_after_ready_s: exit with status 1 this long after loading (an idle death)
    job: the default job script
A job's script is its ``options["fake"]`` (``FakeOptions``: the decode options plus the script, arriving in the
job message like the real ones), else the process script's ``job``:
    segments: N (default 3), every_s: seconds of "decoding" before each (default 0.02)
    duration_s: the audio length reported in ``started`` (default 1.0)
    crash_after: k: SIGSEGV itself after sending k segments
    hang_in: k: never finish segment k (1-based), without looking for a cancel (a decode stuck in native code)
    ignore_stop: true: never look for a cancel (a plugin that does not support stopping)
    error: a job error code to answer instead of a result
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node_agent.config import AsrSettings
from node_agent.contracts import DecodeOptions
from node_agent.plugin_messages import (
    JobMessage,
    PluginMessage,
    ResultMessage,
    SegmentMessage,
    StartedMessage,
    WorkerSpec,
)

#: argv that starts this fake, for ``Worker(command=...)``.
COMMAND = [sys.executable, str(Path(__file__).resolve())]


def command(**script: Any) -> list[str]:
    """argv for a fake following ``script`` (the process script above), for ``Worker(command=...)`` or the
    agent's ``worker_command=``."""
    return [*COMMAND, "--script", json.dumps(script)]


class FakeOptions(DecodeOptions):
    """The decode options plus the job's script (see the module docstring)."""

    fake: dict[str, Any] | None = None


class FakeJobMessage(JobMessage):
    """A job whose options may carry its script."""

    options: FakeOptions = FakeOptions()


def spec(**asr: Any) -> WorkerSpec:
    """A worker spec for a fake started by hand (the supervisor's tests pass the real one)."""
    return WorkerSpec(asr=AsrSettings(**asr), device="cpu", device_index=0, cpu_threads=1, log_level="WARNING")


class FakeEngine:
    """``AsrEngine``'s interface (``load``, ``run``, ``job_message``), following a script."""

    job_message = FakeJobMessage

    def __init__(self, spec: WorkerSpec, script: dict[str, Any]) -> None:
        self.spec = spec
        self.script = script

    def load(self) -> dict[str, Any]:
        s = self.script
        time.sleep(float(s.get("load_s", 0.0)))
        mode = s.get("load", "ok")
        if mode == "exit":
            os._exit(3)
        if mode == "hang":
            time.sleep(3600)
        if mode == "fail" or (s.get("fail_while") and os.path.exists(s["fail_while"])):
            raise RuntimeError(f"fake model {self.spec.asr.model!r} failed to load")
        if s.get("exit_after_ready_s") is not None:
            timer = threading.Timer(float(s["exit_after_ready_s"]), os._exit, (1,))
            timer.daemon = True
            timer.start()
        return {"model": self.spec.asr.model, "device": "cpu", "compute_type": "int8",
                "load_s": 0.0, "languages": ["en"], "multilingual": False}

    def run(self, job: FakeJobMessage, payload: bytes, emit: Callable[[PluginMessage], None],
            check: Callable[[], None]) -> None:
        from node_agent.errors import job_error

        job_id = job.job_id
        script = dict(self.script.get("job") or {})
        script.update(job.options.fake or {})
        if not script.get("ignore_stop"):
            look = check
        else:
            def look() -> None:
                return None
        emit(StartedMessage(job_id=job_id, duration_s=float(script.get("duration_s", 1.0)), decode_audio_s=0.0))
        look()
        texts = []
        for i in range(1, int(script.get("segments", 3)) + 1):
            if script.get("hang_in") == i:
                time.sleep(3600)
            time.sleep(float(script.get("every_s", 0.02)))
            text = f" segment {i}."
            texts.append(text)
            emit(SegmentMessage(job_id=job_id, id=i, start=float(i - 1), end=float(i), text=text, temperature=0.0,
                                avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0,
                                decode_s=float(script.get("every_s", 0.02))))
            if script.get("crash_after") == i:
                os.kill(os.getpid(), signal.SIGSEGV)
            look()
        if script.get("error"):
            raise job_error(script["error"], f"fake error for job {job_id}")
        emit(ResultMessage(job_id=job_id, text="".join(texts).strip(), language="en", language_probability=1.0,
                           duration_s=float(script.get("duration_s", 1.0)), segments_count=len(texts),
                           timings={"decode_audio_s": 0.0, "transcribe_call_s": 0.0, "segments_iteration_s": 0.0,
                                    "first_segment_s": None, "total_s": 0.0}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--script", default="{}", help="the process script (JSON)")
    args = parser.parse_args()
    from plugins.asr.__main__ import _die_with_parent
    from plugins.asr.worker import serve
    from node_agent.wire import BlockingChannel

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = WorkerSpec.model_validate_json(args.spec)
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s fake-plugin[%(process)d] %(message)s")
    channel = BlockingChannel(socket.socket(fileno=args.fd))
    try:
        return serve(channel, spec, FakeEngine(spec, json.loads(args.script)))
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
