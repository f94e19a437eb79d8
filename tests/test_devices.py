"""Pure device decisions, tested without ctranslate2 or a GPU."""

from __future__ import annotations

import pytest

from node_agent.devices import choose_compute_type, choose_cpu_threads, choose_device, resources_for
from node_agent.errors import ConfigError
from plugins.asr.probe import parse_nvidia_smi

CPU_TYPES = ["float32", "int16", "int8", "int8_float32"]
GPU_TYPES = ["bfloat16", "float16", "float32", "int8", "int8_bfloat16", "int8_float16", "int8_float32"]


def test_device_choice():
    assert choose_device("auto", 0) == "cpu"
    assert choose_device("auto", 2) == "cuda"
    assert choose_device("cpu", 2) == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        choose_device("cuda", 0)


@pytest.mark.parametrize("device, supported, expected", [
    ("cpu", CPU_TYPES, "int8"),
    ("cpu", ["float32"], "float32"),
    ("cuda", GPU_TYPES, "float16"),
    ("cuda", ["float32", "int8", "int8_float32"], "int8"),  # e.g. a GPU without fast fp16
    ("cuda", ["int8_float16", "float32"], "int8_float16"),
])
def test_auto_compute_type(device, supported, expected):
    assert choose_compute_type(device, supported) == expected


def test_explicit_compute_type_must_be_supported():
    assert choose_compute_type("cpu", CPU_TYPES, "float32") == "float32"
    with pytest.raises(ConfigError, match="float16.*not supported on cpu"):
        choose_compute_type("cpu", CPU_TYPES, "float16")


def test_threads_and_resources():
    assert choose_cpu_threads(0, 2) == 2
    assert choose_cpu_threads(0, 64) == 8
    assert choose_cpu_threads(3, 64) == 3
    assert [s.resource for s in resources_for("cpu", [0, 1])] == ["cpu/0"]
    assert [s.resource for s in resources_for("cpu", [0], 2)] == ["cpu/0", "cpu/1"]
    assert [(s.resource, s.device, s.device_index) for s in resources_for("cuda", [0, 1], 2)] == [
        ("gpu:0/0", "gpu:0", 0), ("gpu:0/1", "gpu:0", 0), ("gpu:1/0", "gpu:1", 1), ("gpu:1/1", "gpu:1", 1)]


def test_parse_nvidia_smi():
    text = "0, NVIDIA H200, 143771, GPU-1b2c\n1, NVIDIA L4, 23034, GPU-9f00\n"
    gpus = parse_nvidia_smi(text)
    assert gpus[0] == {"index": 0, "name": "NVIDIA H200", "memory_bytes": 143771 * 1024 * 1024, "uuid": "GPU-1b2c"}
    assert gpus[1]["index"] == 1 and parse_nvidia_smi("garbage") == []


async def test_plugin_process_gets_the_agents_environment(monkeypatch):
    """The plugin process (the stand-in plugin: its serve loop, no model) gets the agent's environment and nothing
    more: no OpenMP wait policy of the agent's own, so the lone-job worker's threads spin between parallel regions
    as libgomp's default has them (passive threads cost a lone job 5-9 %: docs/benchmarks.md)."""
    from fake_plugin import command as fake_command
    from fake_plugin import spec as fake_spec

    from node_agent.worker_process import spawn_plugin

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("NODE_AGENT_TEST_MARK", "kept")
    proc = await spawn_plugin(fake_command(), fake_spec(), start_timeout_s=30, stop_grace_s=2)
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    finally:
        await proc.stop(2)
    assert b"OMP_WAIT_POLICY" not in environ and environ[b"NODE_AGENT_TEST_MARK"] == b"kept"
