"""Typed settings: one YAML file, overridable per key from ``NODE_AGENT_<SECTION>__<KEY>``.

Everything the agent, the scheduler and the plugin need is validated here once, at start, so a
mistake is one line naming the key, the value and the file instead of a failure mid-job.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

ENV_PREFIX = "NODE_AGENT_"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "node-agent.yaml"


class _Section(BaseModel):
    # Unknown keys are mistakes (a typo silently ignored is a setting silently lost).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ZhScript(str, Enum):
    simplified = "simplified"
    traditional = "traditional"
    as_is = "as-is"


class TimeoutSettings(_Section):
    min_s: float = Field(30.0, gt=0, description="Smallest per-job deadline, whatever the audio length.")
    per_audio_s: float = Field(
        2.0, gt=0, description="Deadline seconds granted per second of audio (2.0 = twice real time)."
    )
    stall_s: float = Field(
        60.0, gt=0, description="Fail the job as stalled when a busy worker sends nothing for this long."
    )


class AsrSettings(_Section):
    model: str = Field(
        "tiny.en",
        min_length=1,
        description="A model directory, an offline name (tiny.en, base) or a hub name passed to faster-whisper.",
    )
    device: Device = Field(Device.auto, description="auto picks cuda when ctranslate2 sees a GPU.")
    device_index: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="GPU indexes; one worker each. Ignored on CPU (one worker).",
    )
    compute_type: str = Field("auto", description="auto picks from what ctranslate2 supports on the device.")
    cpu_threads: int = Field(0, ge=0, le=256, description="0 = one per available core (at most 8).")
    beam_size: int = Field(5, ge=1, le=20)
    language: str | None = Field(None, description="Default language; null detects it per job.")
    vad_filter: bool = False
    condition_on_previous_text: bool = True
    max_audio_s: float = Field(3600.0, gt=0, description="Longer audio fails with bad_audio.")
    zh_script: ZhScript = Field(
        ZhScript.simplified, description="Script for Mandarin output: simplified, traditional or as-is."
    )
    batched_min_audio_s: float | None = Field(
        None,
        ge=0,
        description="Audio at least this long is decoded in batched (chunked) mode; null = never automatically.",
    )
    batch_size: int = Field(8, ge=1, le=64)
    timeout: TimeoutSettings = Field(default_factory=TimeoutSettings)

    @field_validator("device_index", mode="before")
    @classmethod
    def _one_index(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("device_index")
    @classmethod
    def _indexes_valid(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct non-negative GPU indexes")
        return value


class BackoffSettings(_Section):
    initial_s: float = Field(0.5, gt=0)
    max_s: float = Field(30.0, gt=0)
    multiplier: float = Field(2.0, ge=1.0)
    max_quick_failures: int = Field(
        3, ge=1, description="Consecutive failures before ready (or within min_uptime_s) that make a worker fatal."
    )
    min_uptime_s: float = Field(10.0, ge=0, description="A worker up this long has started well.")


class WorkerSettings(_Section):
    max_jobs: int = Field(1000, ge=1, description="Recycle a worker (between jobs) after this many jobs.")
    max_rss_bytes: int = Field(
        4 * 1024**3, ge=64 * 1024**2, description="Recycle a worker (between jobs) above this resident memory."
    )
    start_timeout_s: float = Field(120.0, gt=0, description="Model load and warm-up must finish within this.")
    stop_grace_s: float = Field(3.0, ge=0, description="SIGTERM to SIGKILL grace when stopping a worker.")
    backoff: BackoffSettings = Field(default_factory=BackoffSettings)


class LeaseSettings(_Section):
    ttl_s: float = Field(15.0, gt=0, le=600)
    renew_every_s: float | None = Field(None, gt=0, description="Default TTL/3; must stay below TTL/2.")
    renew_deadline_s: float | None = Field(
        None, gt=0, description="Self-fence when no renewal succeeded this long; default 2/3 of the TTL."
    )
    acquire_timeout_s: float = Field(
        20.0, gt=0,
        description="Give up on a job whose device stays held this long; keep it below scheduler.assign_timeout_s, "
        "after which the scheduler re-queues the assignment anyway.",
    )

    @model_validator(mode="after")
    def _renewal_fits(self) -> "LeaseSettings":
        if self.renew_every_s is not None and self.renew_every_s >= self.ttl_s / 2:
            raise ValueError(f"renew_every_s={self.renew_every_s} must be below ttl_s/2 ({self.ttl_s / 2:g})")
        if self.renew_deadline_s is not None and self.renew_deadline_s >= self.ttl_s:
            raise ValueError(f"renew_deadline_s={self.renew_deadline_s} must be below ttl_s ({self.ttl_s:g})")
        return self

    @property
    def renew_interval(self) -> float:
        return self.renew_every_s if self.renew_every_s is not None else self.ttl_s / 3

    @property
    def renew_deadline(self) -> float:
        return self.renew_deadline_s if self.renew_deadline_s is not None else self.ttl_s * 2 / 3


class SchedulerSettings(_Section):
    url: str = Field("embedded", description="'embedded' runs the scheduler in-process; else its base URL.")
    listen: str = Field("127.0.0.1:8470", description="HOST:PORT of the embedded/standalone scheduler.")
    token: SecretStr | None = Field(None, description="Bearer token required on every scheduler call.")
    request_timeout_s: float = Field(10.0, gt=0)
    heartbeat_interval_s: float = Field(5.0, gt=0, description="What the scheduler tells nodes to use.")
    node_gone_after_heartbeats: int = Field(3, ge=1)
    max_attempts: int = Field(3, ge=1, description="Dispatches per job before it fails.")
    lease_min_ttl_s: float = Field(1.0, gt=0)
    lease_max_ttl_s: float = Field(300.0, gt=0)
    assign_timeout_s: float = Field(30.0, gt=0, description="A job assigned but never leased is re-queued.")
    max_body_bytes: int = Field(200 * 1024**2, ge=1024)
    max_wait_s: float = Field(30.0, gt=0, description="Upper bound for long-poll waits.")
    job_retention_s: float = Field(3600.0, gt=0, description="Finished jobs are forgotten after this.")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _split_host_port(value)
        return value

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token would let a bare "Bearer " header through; unset it instead.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (leave it unset, or null, for no authentication)")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(("http://", "https://")):
            raise ValueError("must be 'embedded' or an http(s):// URL")
        return value.rstrip("/")


class HttpSettings(_Section):
    listen: str = Field(
        "127.0.0.1:9464", description="HOST:PORT for /metrics, /healthz, /readyz, /status, /utterance, /health."
    )
    max_body_bytes: int = Field(200 * 1024**2, ge=1024)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _split_host_port(value)
        return value


class CompatSettings(_Section):
    """The drop-in endpoints of the old ASR service (POST /utterance, GET /health)."""

    timeout_s: float = Field(60.0, gt=0, le=600, description="Per-utterance limit; over it: 504, worker replaced.")
    queue_per_worker: int = Field(2, ge=0, le=100, description="Waiting utterances per worker before 503.")


class NodeSettings(_Section):
    state_dir: Path = Field(Path("var/node-agent"), description="Where the node id is persisted.")
    name: str | None = Field(None, description="Hostname reported to the scheduler; default the machine's.")


class ShutdownSettings(_Section):
    grace_s: float = Field(30.0, ge=0, description="How long a running job may finish after SIGTERM.")


class LogSettings(_Section):
    level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")


class Settings(_Section):
    """The whole configuration; sections mirror the YAML file."""

    asr: AsrSettings = Field(default_factory=AsrSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    lease: LeaseSettings = Field(default_factory=LeaseSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    compat: CompatSettings = Field(default_factory=CompatSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    def redacted(self) -> dict[str, Any]:
        """Plain data for printing; secrets show as '**********'."""
        data = self.model_dump(mode="json")
        if self.scheduler.token is not None:
            data["scheduler"]["token"] = "**********"
        return data


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return host.strip("[]"), int(port)


def host_port(value: str) -> tuple[str, int]:
    """Split a validated ``HOST:PORT`` setting."""
    return _split_host_port(value)


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        # YAML parsing gives "5" -> 5, "true" -> True, "[0, 1]" -> [0, 1], as in the file itself.
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((path, value, name))
    return out


def _set_path(data: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path)} conflicts with a non-section value")
        node = child
    node[path[-1]] = value


def load_settings(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load YAML (default file if ``path`` is None), apply environment overrides, validate.

    Raises ConfigError with one line naming the key, the value and where it came from.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    file = Path(path) if path is not None else DEFAULT_CONFIG
    if path is None and not file.exists():
        data: Any = {}
    else:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{file}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read config file: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{file}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping of sections, got {type(data).__name__}")

    env_origin: dict[tuple[str, ...], str] = {}
    for key_path, value, name in _env_overrides(environ):
        _set_path(data, key_path, value, name)
        env_origin[tuple(key_path)] = name

    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        # The env variable that set this key, a section above it, or (model checks) a key below it.
        origin = next((env_origin[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in env_origin), None)
        origin = origin or next((name for k, name in env_origin.items() if k[: len(loc)] == loc), None)
        where = f"environment {origin}" if origin else str(file)
        value = err.get("input")
        shown = "**********" if "token" in loc else repr(value)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{where}: {key} = {shown}: {msg}{extra}") from None
