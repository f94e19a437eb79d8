"""Typed settings: one YAML file, overridable per key from ``NODE_AGENT_<SECTION>__<KEY>``.

Everything the agent, the scheduler and the plugin need is validated here once, at start, so a
mistake is one line naming the key, the value and the file instead of a failure mid-job.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import urllib.parse
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Literal, Mapping, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .contracts import error_loc, one_line
from .errors import ConfigError
from .labels import AUTOMATIC_LABELS, Labels
from .model_resolution import check_model_name

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
        description="GPU indexes; asr.workers_per_device workers on each. Ignored on CPU.",
    )
    compute_type: str = Field("auto", description="auto picks from what ctranslate2 supports on the device.")
    workers_per_device: Union[int, Literal["auto"]] = Field(
        "auto",
        description="Workers (slots) per device, each its own process and lease: auto = one per core on a CPU "
        "(at most 16, as memory allows), 1 per GPU.",
    )
    cpu_threads: int = Field(
        0, ge=0, le=256, description="Threads per worker; 0 = auto (the cores shared between the workers, at most "
        "8 each; on a CPU also a lone-job worker with every core, at most 8, for a job that finds the other slots "
        "idle). Set: that many per worker, and no lone-job worker."
    )
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
    split_min_s: float | None = Field(
        60.0,
        ge=0,
        description="A scheduler job whose audio is at least this long is cut at silences into sections decoded "
        "by free slots anywhere in the cluster, when some are free (issue 24); 0 or null: never.",
    )
    split_section_min_s: float = Field(
        30.0, gt=0, description="The shortest section a split makes: audio of 90 s is cut into at most 3."
    )
    split_max_sections: int = Field(32, ge=2, le=64, description="The most sections one job is cut into.")
    timeout: TimeoutSettings = Field(default_factory=TimeoutSettings)

    @field_validator("model")
    @classmethod
    def _model_known(cls, value: str) -> str:
        # Here rather than at worker start: a typo must stop check-config, not fail three worker starts.
        check_model_name(value)
        return value

    @field_validator("workers_per_device", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        # One message for every wrong shape (pydantic's union would report two, one per member).
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
            return value
        raise ValueError("must be auto or a whole number of workers from 1 to 64")

    @property
    def workers_requested(self) -> int | None:
        """``workers_per_device`` as a number, None for auto."""
        return None if self.workers_per_device == "auto" else int(self.workers_per_device)

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
    command: list[str] | None = Field(
        None, min_length=1,
        description="The plugin process's argv (default: this Python running -m plugins.asr), for a plugin in "
        "another environment or behind a wrapper; it gets --fd and --spec appended and must speak node_agent/wire.py.",
    )
    max_jobs: int = Field(1000, ge=1, description="Recycle a worker (between jobs) after this many jobs.")
    max_rss_bytes: int = Field(
        4 * 1024**3, ge=64 * 1024**2, description="Recycle a worker (between jobs) above this resident memory."
    )
    start_timeout_s: float = Field(120.0, gt=0, description="Model load and warm-up must finish within this.")
    stop_grace_s: float = Field(
        3.0, ge=0,
        description="SIGTERM to SIGKILL grace when stopping a worker; also how long a job past its deadline may "
        "take to reach the next segment boundary and stop there before its worker is killed.",
    )
    fatal_retry_s: float = Field(
        300.0, gt=0,
        description="A fatal worker is started again after this long, doubling after each fatal (at most 1 h).",
    )
    fatal_unhealthy_after_s: float = Field(
        600.0, gt=0,
        description="/healthz answers 503 once every worker has been fatal this long, so the agent is restarted.",
    )
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

    def timing(self, granted_ttl_s: float) -> tuple[float, float]:
        """(renew interval, self-fence deadline) for a lease the scheduler granted with ``granted_ttl_s``.

        The grant, not our request, decides: a scheduler may clamp the TTL, and renewing on our own TTL's
        schedule would let a shorter grant expire between renewals. Explicit settings apply only while they
        still fit the grant (below TTL/2 and below TTL); otherwise TTL/3 and 2/3 TTL, as etcd and client-go do.
        """
        interval = granted_ttl_s / 3
        if self.renew_every_s is not None and self.renew_every_s < granted_ttl_s / 2:
            interval = self.renew_every_s
        deadline = granted_ttl_s * 2 / 3
        if self.renew_deadline_s is not None and self.renew_deadline_s < granted_ttl_s:
            deadline = self.renew_deadline_s
        return interval, deadline


#: A token's name (in ``scheduler.tokens``): what a client's jobs are recorded under and logs name.
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class RoleTokens(_Section):
    """``scheduler.tokens``: named bearer tokens per role. Two names of one role are both valid, so a token is
    rotated by adding the new one, rolling the callers over, then removing the old (a rolling restart)."""

    clients: dict[str, SecretStr] = Field(
        default_factory=dict, description="Submit, follow, list and cancel the jobs submitted under their own name."
    )
    nodes: dict[str, SecretStr] = Field(
        default_factory=dict, description="Register, heartbeat, poll, lease, download audio and report; nothing else."
    )
    operators: dict[str, SecretStr] = Field(
        default_factory=dict, description="Everything: every job, nodes' cordon and drain, the cluster view."
    )

    @field_validator("clients", "nodes", "operators")
    @classmethod
    def _named_and_usable(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, token in value.items():
            if not re.fullmatch(TOKEN_NAME_PATTERN, name):
                raise ValueError(f"token name {name[:40]!r}: 1-64 letters, digits, '.', '_' or '-'")
            _usable_token(token)
        return value

    def __bool__(self) -> bool:
        return bool(self.clients or self.nodes or self.operators)

    def merged(self, other: "RoleTokens", where: str) -> "RoleTokens":
        """These tokens and ``other``'s (from ``where``); a name in both is refused, as is one token under two
        names (which role it has would depend on the order they are checked in)."""
        data: dict[str, dict[str, SecretStr]] = {}
        for role in ("clients", "nodes", "operators"):
            ours, theirs = getattr(self, role), getattr(other, role)
            twice = sorted(set(ours) & set(theirs))
            if twice:
                raise ValueError(f"tokens.{role}.{twice[0]} is set both here and in {where}")
            data[role] = {**ours, **theirs}
        return RoleTokens(**data)

    def check_distinct(self) -> None:
        seen: dict[str, str] = {}
        for role in ("clients", "nodes", "operators"):
            for name, token in getattr(self, role).items():
                where = f"{role}.{name}"
                if token.get_secret_value() in seen:
                    raise ValueError(f"tokens.{where} and tokens.{seen[token.get_secret_value()]} are the same token; "
                                     "give each name its own")
                seen[token.get_secret_value()] = where


def _read_tokens_file(path: Path) -> RoleTokens:
    """``scheduler.tokens_file``: a YAML mapping of the same shape as ``scheduler.tokens``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        # Never the parser's message: it may quote the line, and the line holds a token.
        raise ValueError(f"{path} is not a YAML mapping of clients/nodes/operators") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a YAML mapping of clients/nodes/operators")
    try:
        return RoleTokens.model_validate(data)
    except ValidationError as exc:
        # Every value in the file is a token or holds some: none is shown.
        masked = one_line(exc, top="(top level)", unknown="unknown key", value=lambda loc, value: "**********")
        raise ValueError(f"{path}: {masked}") from None


class SchedulerSettings(_Section):
    url: str = Field(
        "embedded",
        description="'embedded' runs the scheduler in-process; else its base URL, or several (replicas, tried in "
        "order, failing over on a transport error or 5xx) as 'http://a:8470,http://b:8470' or a YAML list.",
    )
    listen: str = Field("127.0.0.1:8470", description="HOST:PORT of the embedded/standalone scheduler.")
    token: SecretStr | None = Field(
        None, description="The bearer token this process sends to the scheduler (agent, submit, cluster...). A "
        "scheduler with no scheduler.tokens requires it on every call, with every role.",
    )
    tokens: RoleTokens = Field(
        default_factory=RoleTokens, description="The scheduler's named tokens per role (clients, nodes, operators); "
        "when any is set, scheduler.token is only what this process sends.",
    )
    tokens_file: Path | None = Field(
        None, description="A YAML file of the same shape as scheduler.tokens (clients/nodes/operators), read at "
        "start and added to it, so the secrets stay out of this file.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Let `node-agent scheduler` serve a non-loopback scheduler.listen without any token "
        "(anyone who can reach it may do everything).",
    )
    request_timeout_s: float = Field(10.0, gt=0)
    heartbeat_interval_s: float = Field(5.0, gt=0, description="What the scheduler tells nodes to use.")
    node_gone_after_heartbeats: int = Field(3, ge=1)
    max_attempts: int = Field(3, ge=1, description="Dispatches per job before it fails.")
    lease_min_ttl_s: float = Field(1.0, gt=0)
    lease_max_ttl_s: float = Field(300.0, gt=0)
    assign_timeout_s: float = Field(30.0, gt=0, description="A job assigned but never leased is re-queued.")
    max_body_bytes: int = Field(200 * 1024**2, ge=1024)
    body_timeout_s: float = Field(
        300.0, gt=0, le=3600,
        description="A request body (JSON or a multipart upload) must fully arrive within this, else 408 and the "
        "connection closed; raise it for large uploads over slow links.",
    )
    max_wait_s: float = Field(30.0, gt=0, description="Upper bound for long-poll waits.")
    job_retention_s: float = Field(3600.0, gt=0, description="Finished jobs are forgotten after this.")
    max_queued_jobs: int = Field(
        10_000, ge=1, description="Unfinished jobs (queued, assigned or running) before a submit is refused (429)."
    )
    max_queued_interactive_jobs: int = Field(
        1_000, ge=1, description="Unfinished interactive jobs before an interactive submit is refused (429); "
        "batch jobs are bounded by max_queued_jobs, so a full batch queue never refuses a live utterance.",
    )
    max_queued_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Audio bytes of unfinished jobs before a submit is refused (429)."
    )
    batch_max_wait_s: float = Field(
        600.0, gt=0, description="A batch job queued this long counts as interactive, so batch work is never "
        "starved by a steady stream of interactive jobs.",
    )
    interactive_headroom: float = Field(
        0.05, ge=0, lt=1, description="Share of the live, uncordoned nodes' ASR slots (floored to whole slots) "
        "kept idle for interactive jobs: a batch job is dispatched only while that many slots would stay idle "
        "after it, so a live utterance finds a free slot behind a batch backlog. The cost: that share of batch "
        "throughput on a saturated cluster. Batch jobs aged past batch_max_wait_s may use it. 0: none kept.",
    )
    keep_audio: bool = Field(
        False, description="Keep a finished job's audio until job_retention_s (default: dropped when it finishes)."
    )
    default_deadline_s: float = Field(
        86_400.0, gt=0, le=7 * 24 * 3600, description="Deadline of a job submitted without one."
    )
    unservable_after_s: float = Field(
        60.0, gt=0, description="A queued job no live node can serve fails with no_capable_node after this."
    )
    max_sections_per_job: int = Field(
        32, ge=1, le=256, description="Most sections one attempt of a long recording is split into (issue 24): "
        "the parent's own section 0 and up to this many less one section jobs (POST /v1/jobs/{id}/sections). "
        "1: no recording is split.",
    )
    store: SecretStr = Field(
        SecretStr("sqlite"),
        description="Where the scheduler keeps its state: 'sqlite' (scheduler.db in node.state_dir), "
        "'sqlite:////absolute/path.db', 'postgresql://USER[:PASSWORD]@HOST:PORT/DB' (replicas share it), or "
        "'memory' (SQLite in memory, lost on restart; for tests and experiments).",
    )

    @property
    def store_url(self) -> str:
        return self.store.get_secret_value()

    @property
    def store_shown(self) -> str:
        """``store`` with any password replaced by ``***``: what logs, /status and check-config show."""
        return redact_dsn(self.store_url)

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(raw, str):
            return value
        raw = raw.strip()
        if raw in ("sqlite", "memory"):
            return raw
        if raw.startswith("sqlite:"):
            if not raw.startswith("sqlite:////") or len(raw) <= len("sqlite:////"):
                raise ValueError("give an absolute path as sqlite:////absolute/path.db")
            return raw
        if raw.startswith(("postgresql://", "postgres://")):
            parts = urllib.parse.urlsplit(raw)
            try:
                port = parts.port
            except ValueError:
                port = -1
            if not parts.hostname or not parts.path.strip("/") or port == -1:
                raise ValueError("expected postgresql://USER[:PASSWORD]@HOST:PORT/DB (a host, a port and a database)")
            return raw
        raise ValueError("must be sqlite, sqlite:////absolute/path.db, postgresql://USER[:PASSWORD]@HOST:PORT/DB "
                         "or memory")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _split_host_port(value)
        return value

    @field_validator("token")
    @classmethod
    def _token_usable(cls, value: SecretStr | None) -> SecretStr | None:
        return _usable_token(value)

    @model_validator(mode="after")
    def _tokens_from_file(self) -> "SchedulerSettings":
        try:
            if self.tokens_file is not None:
                # Read once, at load: a rotation is a rolling restart, and a file that cannot be read is one line
                # now rather than a scheduler that answers 401 to everyone.
                merged = self.tokens.merged(_read_tokens_file(self.tokens_file.expanduser()), str(self.tokens_file))
                object.__setattr__(self, "tokens", merged)  # not validate_assignment: it would run this again
            self.tokens.check_distinct()
        except ValueError as exc:
            # Raised on scheduler.tokens, so the one line shows that key's value masked, not the section's.
            error = PydanticCustomError("tokens", str(exc))
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type=error, loc=("tokens",), input="**********")]
            ) from None
        return self

    @property
    def checks_tokens(self) -> bool:
        """Whether the scheduler asks callers for a token (roles, or the single scheduler.token)."""
        return bool(self.tokens) or self.token is not None

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        # A YAML list is kept as the comma form: one string is what the environment gives and what callers read.
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str) or value == "embedded":
            return value  # a wrong type is refused by the str annotation, with its own message
        return ",".join(scheduler_urls(value))


class HttpSettings(_Section):
    listen: str = Field(
        "127.0.0.1:9464", description="HOST:PORT for /metrics, /healthz, /readyz, /status, /utterance, /health."
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token required on /utterance, /health and /status; /metrics, /healthz and /readyz "
        "stay open for scrapers and probes.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve a non-loopback http.listen without http.token (anyone who can reach it may use it)."
    )
    max_body_bytes: int = Field(200 * 1024**2, ge=1024)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _split_host_port(value)
        return value

    @field_validator("token")
    @classmethod
    def _token_usable(cls, value: SecretStr | None) -> SecretStr | None:
        return _usable_token(value)

    @model_validator(mode="after")
    def _reachable_only_with_token(self) -> "HttpSettings":
        # /utterance spends scheduler capacity under the agent's own scheduler token, and /status shows job and
        # lease ids: beyond loopback, that needs a token of its own or an explicit opt-out.
        if self.token is None and not self.allow_unauthenticated and not _is_loopback(self.listen):
            error = PydanticCustomError(
                "insecure_listen",
                "a non-loopback address needs http.token (or http.allow_unauthenticated: true)",
            )
            # Raised as a ValidationError so the one-line message names http.listen and its value.
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type=error, loc=("listen",), input=self.listen)]
            )
        return self


class CompatSettings(_Section):
    """The drop-in endpoints of the old ASR service (POST /utterance, GET /health)."""

    timeout_s: float = Field(60.0, gt=0, le=600, description="Per-utterance limit; over it: 504, the decode stopped.")
    queue_per_worker: int = Field(2, ge=0, le=100, description="Waiting utterances per worker before 503.")
    body_timeout_s: float = Field(
        30.0, gt=0, le=600,
        description="The whole request body must arrive within this; a slower or idle client gets 408.",
    )
    scheduler_token: SecretStr | None = Field(
        None, description="The client token /utterance submits and follows its jobs with, where the scheduler gives "
        "each role its own tokens (one of its scheduler.tokens.clients; a node token may not submit); unset: "
        "scheduler.token.",
    )

    @field_validator("scheduler_token")
    @classmethod
    def _token_usable(cls, value: SecretStr | None) -> SecretStr | None:
        return _usable_token(value)


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/node-agent``, or ``~/.local/state/node-agent`` when that is unset (XDG base dirs)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative value is invalid and is ignored.
    root = Path(base) if os.path.isabs(base) else Path(os.path.expanduser("~")) / ".local" / "state"
    return root / "node-agent"


class NodeSettings(_Section):
    state_dir: Path = Field(
        None,
        validate_default=True,
        description="Where the node id is persisted; one per agent (locked). "
        "null = $XDG_STATE_HOME/node-agent (~/.local/state/node-agent).",
    )
    name: str | None = Field(None, description="Hostname reported to the scheduler; default the machine's.")
    labels: Labels = Field(
        default_factory=dict,
        description="Labels this node carries (a job's labels must all match); device_class, model and "
        "compute_type are added from the node's devices.",
    )

    @field_validator("labels")
    @classmethod
    def _own_labels(cls, value: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(value) & set(AUTOMATIC_LABELS))
        if taken:
            raise ValueError(f"{', '.join(taken)} are set from the node's devices; choose another key")
        return value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir_default(cls, value: Any, info: ValidationInfo) -> Any:
        # Resolved when settings are loaded, not at import, from the environment load_settings was given.
        if value is None:
            return default_state_dir((info.context or {}).get("environ"))
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty (leave it unset or null for $XDG_STATE_HOME/node-agent)")
        return value

    @field_validator("state_dir")
    @classmethod
    def _state_dir_absolute(cls, value: Path) -> Path:
        # Absolute at load time: a relative default made two agents started in one directory share a node id.
        return value.expanduser().absolute()


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
        if self.http.token is not None:
            data["http"]["token"] = "**********"
        data["scheduler"]["store"] = self.scheduler.store_shown
        return data


#: A DSN as scheme://authority and the rest (path, query, fragment); the authority may hold USER:PASSWORD@.
_DSN_PARTS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#]*)(?P<rest>.*)", re.S)


def redact_dsn(dsn: str) -> str:
    """A store DSN with every password replaced by ``***`` (for logs, /status, check-config): the userinfo's
    (``USER:PASSWORD@``) and any parameter libpq takes one from (``password=``, ``sslpassword=``; any case, its
    name percent-encoded or not), in the query or past a ``#``. Text only: a DSN that is not a valid URL is
    masked all the same."""
    match = _DSN_PARTS.fullmatch(dsn)
    if match is None:
        return dsn
    authority, rest = match["authority"], match["rest"]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    pieces = re.split(r"([?&#;])", rest)
    for i, piece in enumerate(pieces):
        key, eq, _ = piece.partition("=")
        if eq and urllib.parse.unquote(key).strip().lower().endswith("password"):
            pieces[i] = f"{key}=***"
    return match["scheme"] + authority + "".join(pieces)


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return host.strip("[]"), int(port)


def scheduler_urls(value: str) -> list[str]:
    """The base URLs of a ``scheduler.url`` that is not 'embedded': one, or several separated by commas, each
    an http(s):// URL with a host (trailing slashes dropped). Raises ValueError naming the first bad one."""
    urls: list[str] = []
    for raw in value.split(","):
        url = raw.strip()
        if not url:
            raise ValueError("an empty URL in the list (a stray comma?)")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or " " in url:
            raise ValueError(f"{url!r} is not an http(s)://HOST[:PORT] URL (expected 'embedded', a URL, or "
                             "several URLs separated by commas)")
        url = url.rstrip("/")
        if url in urls:
            raise ValueError(f"{url!r} is listed twice")
        urls.append(url)
    return urls


def _is_loopback(listen: str) -> bool:
    """Whether a validated ``HOST:PORT`` binds only to this machine (a name other than localhost counts as not)."""
    host, _ = _split_host_port(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(value: str) -> tuple[str, int]:
    """Split a validated ``HOST:PORT`` setting."""
    return _split_host_port(value)


#: What YAML reads as null; refused as a secret, null for an optional non-secret string from the environment.
_NULL_WORDS = ("", "~", "null")


def secret(value: SecretStr | None) -> str | None:
    """The value of an optional secret setting (a token), for the one call that sends it."""
    return value.get_secret_value() if value is not None else None


def _usable_token(value: SecretStr | None) -> SecretStr | None:
    """Refuse a token that is blank, 'null' or '~' (scheduler.token and http.token alike).

    An empty token would let a bare "Bearer " header through. 'null' or '~' as a string (quoted in YAML, or any
    environment value: those are taken raw) most likely meant "no token"; taken literally it would be a guessable
    token, taken as null it would turn authentication off unseen. Refuse both.
    """
    if value is not None and value.get_secret_value().strip().lower() in _NULL_WORDS:
        raise ValueError("must not be empty, 'null' or '~' (to run without authentication, leave it unset)")
    return value


def _field_type(path: list[str]) -> Any:
    """The annotation of the Settings field at ``path``, or None where no such field exists."""
    model: Any = Settings
    annotation: Any = None
    for key in path:
        if get_origin(model) is dict:  # a named entry (scheduler.tokens.clients.NAME): the map's value type
            annotation = model = get_args(model)[1]
            continue
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = model = field.annotation
    return annotation


def _env_value(path: list[str], raw: str) -> Any:
    """An environment string as the value for the field at ``path``.

    Numbers, bools, lists and sections are parsed as YAML, as in the file ("5" -> 5, "[0, 1]" -> [0, 1]).
    Strings, secrets, paths and enums are taken raw: YAML would turn "secret #x" into "secret" and "" or "null"
    into null, which for scheduler.token meant authentication silently off.
    """
    annotation = _field_type(path)
    union = get_origin(annotation) in (Union, types.UnionType)
    members = [a for a in (get_args(annotation) if union else (annotation,)) if a is not type(None)]
    stringy = bool(members) and all(
        isinstance(a, type) and issubclass(a, (str, SecretStr, PurePath, Enum)) for a in members
    )
    if stringy:
        optional = union and len(members) < len(get_args(annotation))
        # An optional plain string (asr.language, node.name) can still be set back to null; a secret cannot.
        if optional and SecretStr not in members and raw.strip().lower() in _NULL_WORDS:
            return None
        return raw
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        out.append((path, _env_value(path, raw), name))
    return out


def _set_path(data: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path)} conflicts with a non-section value")
        node = child
    node[path[-1]] = value


def load_settings(path: Path | str | None = None, environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load YAML (default file if ``path`` is None), apply environment overrides, then ``overrides`` (dotted
    keys from command-line options, e.g. ``{"asr.model": "base"}``), validate.

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
        env_origin[tuple(key_path)] = f"environment {name}"
    for dotted, value in (overrides or {}).items():
        _set_path(data, dotted.split("."), value, "command line")
        env_origin[tuple(dotted.split("."))] = "command line"

    # A section left out is built by its default factory, which sees no validation context: give node.state_dir's
    # default (from XDG_STATE_HOME in ``environ``) a section to be validated in.
    data.setdefault("node", {})
    try:
        return Settings.model_validate(data, context={"environ": environ})
    except ValidationError as exc:
        loc = error_loc(exc)
        # The env variable that set this key, a section above it, or (model checks) a key below it.
        origin = next((env_origin[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in env_origin), None)
        origin = origin or next((name for k, name in env_origin.items() if k[: len(loc)] == loc), None)
        raise ConfigError(one_line(exc, where=origin or str(file), unknown="unknown key", top="(top level)",
                                   value=_shown)) from None


def _shown(loc: tuple[str, ...], value: Any) -> str:
    """A bad value as a config error shows it; a token never, a store DSN without its password."""
    if any("token" in str(part) for part in loc):
        return "**********"
    if "store" in loc:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return repr(redact_dsn(raw)) if isinstance(raw, str) else "**********"
    return repr(value)
