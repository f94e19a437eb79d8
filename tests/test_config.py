"""Settings: YAML + environment, rejected with one line naming key, value and origin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.config import load_settings
from node_agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_default_file_loads():
    s = load_settings(None, {})
    assert s.scheduler.url == "embedded"
    assert s.lease.renew_interval == pytest.approx(s.lease.ttl_s / 3)
    assert s.lease.renew_deadline == pytest.approx(s.lease.ttl_s * 2 / 3)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "asr:\n  modle: base\n")
    with pytest.raises(ConfigError) as info:
        load_settings(p, {})
    msg = str(info.value)
    assert "asr.modle" in msg and "unknown key" in msg and str(p) in msg and "'base'" in msg
    assert "\n" not in msg


def test_wrong_type_names_key_value_and_file(tmp_path):
    p = write(tmp_path, "asr:\n  beam_size: five\n")
    with pytest.raises(ConfigError, match=r"asr\.beam_size = 'five'") as info:
        load_settings(p, {})
    assert str(p) in str(info.value)


def test_out_of_range(tmp_path):
    p = write(tmp_path, "worker:\n  max_jobs: 0\n")
    with pytest.raises(ConfigError, match=r"worker\.max_jobs = 0: .*greater than or equal to 1"):
        load_settings(p, {})


def test_environment_override_wins_and_is_typed(tmp_path):
    p = write(tmp_path, "asr:\n  model: tiny.en\n  beam_size: 5\n")
    s = load_settings(p, {"NODE_AGENT_ASR__MODEL": "base", "NODE_AGENT_ASR__BEAM_SIZE": "2",
                          "NODE_AGENT_ASR__TIMEOUT__STALL_S": "7.5", "NODE_AGENT_ASR__DEVICE_INDEX": "[0, 1]"})
    assert s.asr.model == "base" and s.asr.beam_size == 2
    assert s.asr.timeout.stall_s == 7.5 and s.asr.device_index == [0, 1]


def test_environment_mistake_names_the_variable(tmp_path):
    p = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match="environment NODE_AGENT_WORKER__MAX_JOBS: worker.max_jobs = 'lots'"):
        load_settings(p, {"NODE_AGENT_WORKER__MAX_JOBS": "lots"})


def test_lease_renewal_must_fit_inside_the_ttl(tmp_path):
    p = write(tmp_path, "lease:\n  ttl_s: 3\n  renew_every_s: 2\n")
    with pytest.raises(ConfigError, match="renew_every_s=2.0 must be below ttl_s/2"):
        load_settings(p, {})


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(write(tmp_path, "asr: [unclosed\n"), {})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", {})


def test_token_never_printed(tmp_path):
    p = write(tmp_path, "scheduler:\n  token: s3cret-token-value\n")
    s = load_settings(p, {})
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.redacted())
    out = subprocess.run([sys.executable, "-m", "node_agent", "check-config", "--config", str(p)],
                         capture_output=True, text=True, check=True)
    assert "s3cret" not in out.stdout + out.stderr and "**********" in out.stdout
    bad = write(tmp_path, "scheduler:\n  token: [s3cret-token-value]\n")
    err = subprocess.run([sys.executable, "-m", "node_agent", "check-config", "--config", str(bad)],
                         capture_output=True, text=True)
    assert err.returncode == 2 and "s3cret" not in err.stderr and "scheduler.token" in err.stderr
    assert len(err.stderr.strip().splitlines()) == 1


def test_example_config_is_valid():
    from pathlib import Path

    s = load_settings(Path(__file__).parent.parent / "config" / "node-agent.example.yaml", {})
    assert s.asr.device_index == [0, 1] and s.scheduler.url.startswith("http://")
