"""Settings: YAML + environment, rejected with one line naming key, value and origin."""

from __future__ import annotations

import os
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
    assert s.lease.timing(s.lease.ttl_s) == pytest.approx((s.lease.ttl_s / 3, s.lease.ttl_s * 2 / 3))


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

    # It listens beyond loopback, so it needs the agent's HTTP token, which belongs in the environment.
    s = load_settings(Path(__file__).parent.parent / "config" / "node-agent.example.yaml",
                      {"NODE_AGENT_HTTP__TOKEN": "example-token"})
    assert s.asr.device_index == [0, 1] and s.scheduler.url.startswith("http://")


# ----- environment values: strings raw, YAML only for numbers, bools and lists ------------------------------------


def test_environment_strings_are_taken_raw(tmp_path):
    p = write(tmp_path, "{}\n")
    s = load_settings(p, {"NODE_AGENT_SCHEDULER__TOKEN": "secret #x", "NODE_AGENT_NODE__NAME": "1:20",
                          "NODE_AGENT_ASR__COMPUTE_TYPE": "int8", "NODE_AGENT_ASR__BEAM_SIZE": "3",
                          "NODE_AGENT_ASR__VAD_FILTER": "true"})
    # YAML would have read "secret #x" as "secret" (a comment) and "1:20" as the sexagesimal integer 80.
    assert s.scheduler.token is not None and s.scheduler.token.get_secret_value() == "secret #x"
    assert s.node.name == "1:20"
    assert s.asr.beam_size == 3 and s.asr.vad_filter is True
    # An optional plain string can still be set back to null from the environment.
    s = load_settings(write(tmp_path, "asr:\n  language: en\n"), {"NODE_AGENT_ASR__LANGUAGE": "null"})
    assert s.asr.language is None


@pytest.mark.parametrize("key", ["scheduler.token", "http.token"])
@pytest.mark.parametrize("value", ["", " ", "null", "~", "NULL"])
def test_blank_or_null_token_from_the_environment_is_refused(tmp_path, value, key):
    p = write(tmp_path, "{}\n")
    variable = "NODE_AGENT_" + key.upper().replace(".", "__")
    with pytest.raises(ConfigError) as info:
        load_settings(p, {variable: value})
    msg = str(info.value)
    assert msg.startswith(f"environment {variable}: {key} = **********: ")
    assert "leave it unset" in msg and "\n" not in msg


def test_blank_token_in_yaml_is_refused_the_same_way(tmp_path):
    with pytest.raises(ConfigError, match=r"scheduler\.token = \*+: must not be empty"):
        load_settings(write(tmp_path, "scheduler:\n  token: ' '\n"), {})
    assert load_settings(write(tmp_path, "scheduler:\n  token: null\n"), {}).scheduler.token is None


# ----- asr.model ---------------------------------------------------------------------------------------------------


def test_unknown_model_is_refused_with_the_names_that_work(tmp_path):
    p = write(tmp_path, "asr:\n  model: nosuchmodel\n")
    with pytest.raises(ConfigError) as info:
        load_settings(p, {})
    msg = str(info.value)
    assert msg.startswith(f"{p}: asr.model = 'nosuchmodel': unknown model 'nosuchmodel': use a model directory, "
                          "an offline name (tiny.en, base), a faster-whisper name (")
    assert "large-v3" in msg and "\n" not in msg
    # check-config (and so `run`) stops on it with that one line.
    err = subprocess.run([sys.executable, "-m", "node_agent", "check-config", "--config", str(p)],
                         capture_output=True, text=True)
    assert err.returncode == 2 and err.stdout == ""
    assert err.stderr.startswith("node-agent: config error: ") and "unknown model 'nosuchmodel'" in err.stderr
    assert len(err.stderr.strip().splitlines()) == 1
    # The same from an option, before any worker starts.
    err = subprocess.run([sys.executable, "-m", "node_agent", "transcribe", "--model", "nosuchmodel",
                          str(Path(__file__).parent / "data" / "jfk.flac")], capture_output=True, text=True)
    assert err.returncode == 2 and err.stdout == ""
    assert err.stderr.startswith("node-agent: config error: command line: asr.model = 'nosuchmodel': unknown model")
    assert len(err.stderr.strip().splitlines()) == 1


def test_model_directories_and_hub_names(tmp_path):
    p = write(tmp_path, "{}\n")
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model.bin").write_bytes(b"\0")
    assert load_settings(p, {"NODE_AGENT_ASR__MODEL": str(model)}).asr.model == str(model)
    for hub in ("large-v3", "distil-large-v3", "Systran/faster-whisper-small"):
        assert load_settings(p, {"NODE_AGENT_ASR__MODEL": hub}).asr.model == hub
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no model.bin"):
        load_settings(p, {"NODE_AGENT_ASR__MODEL": str(empty)})
    for missing in (str(tmp_path / "nope"), "./models/nope", "~/no-such-model-dir-here"):
        with pytest.raises(ConfigError, match="model directory .* does not exist"):
            load_settings(p, {"NODE_AGENT_ASR__MODEL": missing})


def test_model_names_are_read_without_loading_faster_whisper():
    # The agent process never loads ctranslate2 (it belongs to the plugin process); validating a hub name must
    # not change that.
    code = ("import sys; from node_agent.config import load_settings; "
            "assert load_settings(None, {'NODE_AGENT_ASR__MODEL': 'large-v3'}).asr.model == 'large-v3'; "
            "print(sorted(m for m in ('faster_whisper', 'ctranslate2', 'av', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----- node.state_dir ----------------------------------------------------------------------------------------------


def test_state_dir_defaults_to_xdg_state_home_and_is_absolute(tmp_path, monkeypatch):
    p = write(tmp_path, "{}\n")
    assert load_settings(p, {"XDG_STATE_HOME": "/srv/state"}).node.state_dir == Path("/srv/state/node-agent")
    home = Path.home() / ".local" / "state" / "node-agent"
    assert load_settings(p, {}).node.state_dir == home
    assert load_settings(p, {"XDG_STATE_HOME": "relative/ignored"}).node.state_dir == home
    monkeypatch.chdir(tmp_path)
    assert load_settings(p, {"NODE_AGENT_NODE__STATE_DIR": "rel/x"}).node.state_dir == tmp_path / "rel" / "x"
    with pytest.raises(ConfigError, match="environment NODE_AGENT_NODE__STATE_DIR: node.state_dir = '': must not"):
        load_settings(p, {"NODE_AGENT_NODE__STATE_DIR": ""})


@pytest.mark.parametrize("store", ["sqlite", "memory", "sqlite:////var/lib/x/scheduler.db",
                                   "postgresql://agent:pw@db.example:5432/sched", "postgres://agent@db/sched"])
def test_scheduler_stores_that_load(store: str) -> None:
    settings = load_settings(None, {"NODE_AGENT_SCHEDULER__STORE": store})
    assert settings.scheduler.store_url == store
    assert "pw@" not in settings.scheduler.store_shown and "pw@" not in str(settings.redacted())


@pytest.mark.parametrize("store, says", [
    ("mysql://u:s3cret@h/db", "must be sqlite, sqlite:////absolute/path.db, postgresql://"),
    ("sqlite://relative.db", "give an absolute path as sqlite:////absolute/path.db"),
    ("postgresql://u:s3cret@h:99999/db", "expected postgresql://USER[:PASSWORD]@HOST:PORT/DB"),
    ("postgresql://u:s3cret@h:5432/", "expected postgresql://USER[:PASSWORD]@HOST:PORT/DB"),
])
def test_a_bad_store_is_one_line_without_its_password(store: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, {"NODE_AGENT_SCHEDULER__STORE": store})
    message = str(exc.value)
    assert "scheduler.store" in message and says in message and "\n" not in message
    assert "s3cret" not in message


def test_check_config_shows_the_store_without_its_password() -> None:
    env = {"NODE_AGENT_SCHEDULER__STORE": "postgresql://agent:s3cret-pw@db.example:5432/sched"}
    out = subprocess.run([sys.executable, "-m", "node_agent", "check-config"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "store: postgresql://agent:***@db.example:5432/sched" in out.stdout
    assert "s3cret-pw" not in out.stdout + out.stderr


def test_worker_command_is_an_argv_list() -> None:
    settings = load_settings(None, {"NODE_AGENT_WORKER__COMMAND": '["/opt/asr/bin/python", "-m", "plugins.asr"]'})
    assert settings.worker.command == ["/opt/asr/bin/python", "-m", "plugins.asr"]
    assert load_settings(None, {}).worker.command is None
    with pytest.raises(ConfigError) as exc:
        load_settings(None, {"NODE_AGENT_WORKER__COMMAND": "[]"})
    assert "worker.command" in str(exc.value)
