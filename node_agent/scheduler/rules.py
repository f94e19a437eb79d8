"""The scheduler's decisions as pure functions: who may report, what a lease's TTL is, what is due, who serves what.

The SQL store decides with these: it loads rows, asks these, and writes the answer in the same transaction. Nothing
here does I/O or reads a clock: ``now`` is always given, so each rule is tested as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from ..config import SchedulerSettings
from ..languages import MULTILINGUAL_MODEL
from .errors import QueueFull, ReportRejected, TooLarge
from .schemas import DeviceSpec, JobErrorInfo, JobState

#: Retry-After of a 429 queue_full: a place frees whenever any job finishes, which on a busy cluster is seconds.
QUEUE_FULL_RETRY_S = 5
#: How many distinct (languages, model) offers a no_capable_node message lists before "and N more".
MAX_OFFERS_SHOWN = 5


def language_fits(device: DeviceSpec, language: str | None) -> bool:
    return language is None or device.languages is None or language in device.languages


def serves(device: DeviceSpec, language: str | None) -> bool:
    """Whether ``device`` can run a job in ``language``: the one capability rule, for assignment and admission."""
    return device.plugin == "asr" and language_fits(device, language)


def pick_device(devices: Iterable[DeviceSpec], language: str | None) -> DeviceSpec | None:
    """The first of a node's devices that can run a job in ``language``."""
    return next((d for d in devices if serves(d, language)), None)


def poll_languages(devices: Iterable[DeviceSpec]) -> frozenset[str] | None:
    """The languages a node polling with ``devices`` can take: None when some device takes any language."""
    languages: set[str] = set()
    for d in devices:
        if d.plugin != "asr":
            continue
        if d.languages is None:
            return None
        languages.update(d.languages)
    return frozenset(languages)


@dataclass(frozen=True)
class Served:
    """What the live nodes' devices serve, summed up so that each job is checked in O(1)."""

    live_nodes: int
    #: Some live device takes every language (a multilingual model without a language list).
    any_language: bool
    has_device: bool
    languages: frozenset[str]
    #: "en with tiny.en": one per distinct (languages, model), for messages.
    offers: tuple[str, ...]

    @classmethod
    def of(cls, live_devices: Iterable[list[DeviceSpec]]) -> "Served":
        """From each live node's device list."""
        per_node = list(live_devices)
        devices = [d for node in per_node for d in node if d.plugin == "asr"]
        offers: dict[str, None] = {}
        for d in devices:
            languages = "/".join(d.languages) if d.languages is not None else "any language"
            offers[f"{languages or 'no language'} with {d.model}"] = None
        return cls(
            live_nodes=len(per_node),
            any_language=any(d.languages is None for d in devices),
            has_device=bool(devices),
            languages=frozenset(lang for d in devices for lang in d.languages or ()),
            offers=tuple(offers),
        )

    def serves(self, language: str | None) -> bool:
        """Whether some live device can run a job in ``language`` (None: detect it; any device will do)."""
        if language is None:
            return self.has_device
        return self.any_language or language in self.languages


def unservable_message(language: str | None, served: Served) -> str:
    """One line for a job no live node serves: what was asked, what the live nodes serve, and what to change."""
    asked = f"serves language {language!r}" if language is not None else "has an asr device"
    if served.offers:
        shown = ", ".join(served.offers[:MAX_OFFERS_SHOWN])
        more = len(served.offers) - MAX_OFFERS_SHOWN
        serving = f"nodes serve: {shown}" + (f" and {more} more" if more > 0 else "")
    else:
        serving = "no node is live" if not served.live_nodes else "no live node has an asr device"
    if language is not None and language != "en":
        fix = f"run a node with asr.model: {MULTILINGUAL_MODEL}"
    else:
        fix = "start a node (node-agent run)"
    return f"no live node {asked} ({serving}); {fix}"


def unservable_error(language: str | None, served: Served, waited_s: float, after_s: float) -> JobErrorInfo:
    return JobErrorInfo(
        code="no_capable_node",
        message=f"queued {waited_s:.0f} s without a capable node (scheduler.unservable_after_s: {after_s:g}): "
        f"{unservable_message(language, served)}",
    )


def admission_refusal(settings: SchedulerSettings, open_jobs: int, open_bytes: int, size: int) -> str | None:
    """Why the queue's bounds have no room for a job of ``size`` bytes (None: room). Raises TooLarge for a job
    that could never fit."""
    s = settings
    if size > s.max_queued_bytes:
        raise TooLarge(f"audio of {size} bytes is over scheduler.max_queued_bytes ({s.max_queued_bytes})")
    if open_jobs >= s.max_queued_jobs:
        return f"{open_jobs} unfinished jobs reach scheduler.max_queued_jobs ({s.max_queued_jobs})"
    if open_bytes + size > s.max_queued_bytes:
        return (f"{open_bytes} bytes of unfinished jobs' audio and this job's {size} would pass "
                f"scheduler.max_queued_bytes ({s.max_queued_bytes})")
    return None


def queue_full(why: str) -> QueueFull:
    return QueueFull(f"queue full: {why}; retry later", retry_after_s=QUEUE_FULL_RETRY_S)


def clamp_ttl(settings: SchedulerSettings, ttl_s: float) -> float:
    return min(max(ttl_s, settings.lease_min_ttl_s), settings.lease_max_ttl_s)


@dataclass(frozen=True)
class Holder:
    """Who holds a job now, as the store has it: its attempt and its live lease (None: no live lease)."""

    job_id: str
    terminal: bool
    state: str
    attempt: int
    lease_id: str | None
    epoch: int | None
    node_id: str | None


def check_holder(holder: Holder, attempt: int, lease_id: str, epoch: int, node_id: str) -> None:
    """Nothing if (attempt, lease id, epoch, node) all name the job's current holder; else ReportRejected naming
    the first field that does not match. Renewals, events and results all pass here."""
    job_id = holder.job_id
    if holder.state == JobState.CANCELLED:
        # Its own code, so the holder stops the decode quietly instead of taking it for a lost lease.
        raise ReportRejected(f"job {job_id} was cancelled", code="job_cancelled")
    if holder.terminal:
        raise ReportRejected(f"job {job_id} already finished ({holder.state})", code="already_completed")
    if attempt != holder.attempt:
        raise ReportRejected(
            f"attempt {attempt} is not the current attempt {holder.attempt} of job {job_id}", code="stale_attempt"
        )
    if holder.lease_id is None:
        raise ReportRejected(f"job {job_id} has no live lease", code="stale_epoch")
    # Each field is checked on its own: a superseded lease, a reused epoch number or a node repeating the
    # holder's numbers must all be refused, and the message says which field gave it away.
    if lease_id != holder.lease_id:
        why = f"lease_id {lease_id} is not the live lease {holder.lease_id} of job {job_id}"
    elif epoch != holder.epoch:
        why = f"lease_epoch {epoch} is not the epoch {holder.epoch} of job {job_id}'s live lease {lease_id}"
    elif node_id != holder.node_id:
        why = f"node_id {node_id} is not the holder {holder.node_id} of job {job_id}'s lease {lease_id}"
    else:
        return
    raise ReportRejected(why, code="stale_epoch")


Requeue = Literal["requeue"]


def requeue_or_fail(
    settings: SchedulerSettings, attempt: int, deadline_at: float | None, now: float, code: str, message: str
) -> JobErrorInfo | Requeue:
    """What becomes of a job that lost its node: another attempt, or the error it fails with."""
    if attempt >= settings.max_attempts:
        return JobErrorInfo(code=code, message=f"{message} (after {attempt} attempts)")
    if deadline_at is not None and deadline_at <= now:
        return JobErrorInfo(code="timeout", message=f"the deadline passed ({message})")
    return "requeue"


def gone_after_s(settings: SchedulerSettings) -> float:
    """A node without a heartbeat for this long is gone."""
    return settings.heartbeat_interval_s * settings.node_gone_after_heartbeats
