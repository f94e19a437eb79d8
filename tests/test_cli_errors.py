"""Mistakes a user makes with the ``node-agent`` command end in one line naming the fix, never a traceback; and
every command and option explains itself in ``--help``."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import DATA
from node_agent import cli
from node_agent.jsonio import dumps
from node_agent.languages import WHISPER_LANGUAGES
from procs import free_port

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # The caller's NODE_AGENT_* variables must not change what these tests see.
    base = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT_")}
    return subprocess.run([sys.executable, "-m", "node_agent", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port with a real listener on it, as a second ``make run`` finds the first one's ports."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]



def test_scheduler_on_a_port_in_use(busy_port: int) -> None:
    out = run_cli("scheduler", "--listen", f"127.0.0.1:{busy_port}")
    assert out.returncode != 0
    assert one_line(out) == (f"node-agent: cannot listen on 127.0.0.1:{busy_port} (scheduler.listen): "
                             "address already in use")


@pytest.mark.parametrize("key", ["http.listen", "scheduler.listen"])
def test_run_on_a_port_in_use(key: str, busy_port: int, tmp_path: Path) -> None:
    env = {"NODE_AGENT_NODE__STATE_DIR": str(tmp_path / "state"),
           # The other port is any free one, so only the busy one can fail.
           "NODE_AGENT_HTTP__LISTEN": "127.0.0.1:0", "NODE_AGENT_SCHEDULER__LISTEN": "127.0.0.1:0"}
    env["NODE_AGENT_" + key.upper().replace(".", "__")] = f"127.0.0.1:{busy_port}"
    out = run_cli("run", env=env)
    assert out.returncode != 0
    assert one_line(out) == f"node-agent: cannot listen on 127.0.0.1:{busy_port} ({key}): address already in use"


def test_submit_with_no_scheduler_blames_the_scheduler_not_the_file() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = run_cli("submit", "--scheduler", url, str(DATA / "jfk.flac"))
    assert out.returncode == 1
    line = one_line(out)
    assert line.startswith(f"node-agent: cannot reach the scheduler at {url}: connection refused"), line
    assert "jfk.flac" not in line


def test_submit_checks_the_language_before_sending() -> None:
    # Nothing listens there: the language is refused before any connection is tried.
    out = run_cli("submit", "--scheduler", f"127.0.0.1:{free_port()}", "--language", "english",
                  str(DATA / "jfk.flac"))
    assert out.returncode == 2
    assert one_line(out) == "node-agent: --language english: not a language code; use a code such as en, zh"


def test_status_with_no_agent_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = run_cli("status", "--url", url)
    assert out.returncode == 2
    assert one_line(out).startswith(f"node-agent: cannot reach the agent at {url}: ")


def test_language_list_is_faster_whispers() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert WHISPER_LANGUAGES == tuple(_LANGUAGE_CODES)


def test_json_text_keeps_non_ascii_and_survives_a_lone_surrogate() -> None:
    assert dumps({"text": "广州"}) == '{"text": "广州"}'
    assert dumps({"text": "a\ud800"}) == '{"text": "a\\ud800"}'  # not encodable as UTF-8: escaped instead


def _actions(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the one-line summaries in the command list
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                assert sub.description, f"{path} {name}: no description"
                yield from _actions(sub, f"{path} {name}")


def test_every_command_and_option_has_help() -> None:
    parser = cli.build_parser()
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, a in _actions(parser, "node-agent")
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing
    seen = {f"{path} {'/'.join(a.option_strings)}" for path, a in _actions(parser, "node-agent")}
    assert {"node-agent scheduler --listen", "node-agent status --json", "node-agent status --config",
            "node-agent status --url", "node-agent submit --timeout"} <= seen
    # Written for users, not the module docstring meant for developers.
    assert cli.__doc__ and cli.__doc__.splitlines()[0] not in parser.format_help()
