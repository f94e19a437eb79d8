"""node.state_dir belongs to one agent: a second one on the same directory stops at once, naming the holder."""

from __future__ import annotations

import asyncio
import fcntl
import os

import pytest

from node_agent.errors import ConfigError
from node_agent.statedir import StateDir
from procs import Proc, agent_env, free_port, http_json, wait_for


def test_second_holder_is_refused_with_the_pid_and_the_lock_is_released(tmp_path):
    first, second = StateDir(tmp_path / "state"), StateDir(tmp_path / "state")
    first.lock()
    # flock locks belong to an open file: two opens conflict even within one process.
    with pytest.raises(ConfigError) as info:
        second.lock()
    assert str(info.value) == (f"node.state_dir {tmp_path / 'state'} is in use by another node-agent "
                               f"(pid {os.getpid()}); give each agent its own node.state_dir")
    first.save_node_id("node-abc")
    first.unlock()
    second.lock()
    assert second.load_node_id() == "node-abc"
    assert (tmp_path / "state" / "lock").read_text() == f"{os.getpid()}\n"
    second.unlock()


def test_unusable_state_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"^node.state_dir {blocker / 'state'}: cannot create 'lock' in it: "):
        StateDir(blocker / "state").lock()


def _ready(url: str) -> bool:
    try:
        return http_json("GET", f"{url}/readyz", timeout=2)[0] == 200
    except OSError:
        return False


async def test_second_agent_on_the_same_state_dir_exits_at_once(tmp_path):
    state = tmp_path / "state"

    def env(http_port: int) -> dict[str, str]:
        return agent_env("embedded", state, http_port, NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{free_port()}")

    first_port = free_port()
    first = await Proc("first", ["run"], env(first_port), tmp_path).start()
    second = None
    try:
        url = f"http://127.0.0.1:{first_port}"
        await wait_for(lambda: _ready(url), 90, "first agent ready (model loaded, registered)")
        assert (state / "lock").read_text().strip() == str(first.pid)

        second = await Proc("second", ["run"], env(free_port()), tmp_path).start()
        # It stops before probing the node or loading a model: interpreter start and imports only (a generous
        # bound for a loaded 2-core machine; it takes about a second).
        code = await asyncio.wait_for(second.proc.wait(), 60)
        out = second.log().strip()
        assert code == 2, out
        assert out == (f"node-agent: config error: node.state_dir {state} is in use by another node-agent "
                       f"(pid {first.pid}); give each agent its own node.state_dir")
        assert _ready(url), "the first agent is unaffected"
    finally:
        if second is not None:
            await second.stop()
        assert await first.stop() == 0, first.log()

    # The first agent is gone: its lock went with it.
    fd = os.open(state / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
