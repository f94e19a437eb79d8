"""The scheduler's decisions as pure functions: who may report, what a lease's TTL is, what is due, who serves what.

The SQL store decides with these: it loads rows, asks these, and writes the answer in the same transaction. Nothing
here does I/O or reads a clock: ``now`` is always given, so each rule is tested as a table.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

from ..config import SchedulerSettings
from ..labels import LABEL_VALUE_PATTERN
from ..languages import MULTILINGUAL_MODEL
from .errors import QueueFull, ReportRejected, TooLarge
from .schemas import DeviceSpec, JobErrorInfo, JobState, Priority

#: Retry-After of a 429 queue_full: a place frees whenever any job finishes, which on a busy cluster is seconds.
QUEUE_FULL_RETRY_S = 5
#: How many distinct offers (languages, model, labels) a no_capable_node message lists before "and N more".
MAX_OFFERS_SHOWN = 5


def language_fits(device: DeviceSpec, language: str | None) -> bool:
    return language is None or device.languages is None or language in device.languages


@dataclass(frozen=True)
class Ask:
    """What a job asks of the device that runs it: a language (None: detect), a model as nodes register it (None:
    any), and labels that must all match the device's (sorted ``(key, value)`` pairs)."""

    language: str | None = None
    model: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, language: str | None, model: str | None = None, labels: Mapping[str, str] | str = "{}") -> "Ask":
        """From a submission's fields, or a jobs row's columns (``labels`` as the JSON text the row keeps)."""
        pairs = json.loads(labels) if isinstance(labels, str) else labels
        return cls(language, model, tuple(sorted(pairs.items())))


def automatic_labels(device: DeviceSpec) -> dict[str, str]:
    """The labels a device carries by itself: ``device_class`` (gpu or cpu, from its resource), ``compute_type``,
    and ``model`` where the model's name (a path's last part) is a valid label value."""
    labels = {"device_class": "gpu" if device.resource.startswith("gpu") else "cpu"}
    if re.fullmatch(LABEL_VALUE_PATTERN, device.compute_type):
        labels["compute_type"] = device.compute_type
    name = device.model.rstrip("/").rpartition("/")[2]
    if name and re.fullmatch(LABEL_VALUE_PATTERN, name):
        labels["model"] = name
    return labels


def device_labels(device: DeviceSpec, node_labels: Mapping[str, str]) -> dict[str, str]:
    """Every label a job can match on ``device``: its node's (``node.labels``) and its automatic ones."""
    return {**node_labels, **automatic_labels(device)}


def serves(device: DeviceSpec, node_labels: Mapping[str, str], ask: Ask) -> bool:
    """Whether ``device`` (of a node labelled ``node_labels``) can run a job asking ``ask``: an ASR device whose
    languages fit, whose registered model is the one asked (if any), and that carries every label asked. The one
    capability rule: assignment, admission and the reaper all decide by it (``Offer`` and pgfast.ask_served_sql
    restate it for a summary and for SQL, and are tested against it)."""
    if device.plugin != "asr" or not language_fits(device, ask.language):
        return False
    if ask.model is not None and ask.model != device.model:
        return False
    if not ask.labels:
        return True
    labels = device_labels(device, node_labels)
    return all(labels.get(key) == value for key, value in ask.labels)


def pick_device(devices: Iterable[DeviceSpec], node_labels: Mapping[str, str], ask: Ask) -> DeviceSpec | None:
    """The first of a node's devices that can run a job asking ``ask``."""
    return next((d for d in devices if serves(d, node_labels, ask)), None)


@dataclass(frozen=True)
class Offer:
    """What one device offers, without which device: the unit the admission summary and the SQL tests compare a
    job's ask with. ``languages`` None: any language."""

    languages: tuple[str, ...] | None
    model: str
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, device: DeviceSpec, node_labels: Mapping[str, str]) -> "Offer":
        languages = tuple(sorted(device.languages)) if device.languages is not None else None
        return cls(languages, device.model, tuple(sorted(device_labels(device, node_labels).items())))

    def serves(self, ask: Ask) -> bool:
        """``serves`` for the device this offer was made of."""
        if ask.language is not None and self.languages is not None and ask.language not in self.languages:
            return False
        if ask.model is not None and ask.model != self.model:
            return False
        labels = dict(self.labels)
        return all(labels.get(key) == value for key, value in ask.labels)

    def wire(self) -> dict[str, object]:
        """As pgfast.ask_served_sql reads an offer from a JSON array."""
        return {"languages": list(self.languages) if self.languages is not None else None, "model": self.model,
                "labels": dict(self.labels)}

    def describe(self, with_labels: bool) -> str:
        """"en with tiny.en", and its labels when a job asked for some."""
        languages = "/".join(self.languages) if self.languages is not None else "any language"
        text = f"{languages or 'no language'} with {self.model}"
        if with_labels:
            text += " [" + ", ".join(f"{k}={v}" for k, v in self.labels) + "]"
        return text


@dataclass(frozen=True)
class Served:
    """What the live nodes' devices serve, as their distinct offers (a cluster of identical nodes is one offer),
    so that each job is checked in O(offers), not O(nodes)."""

    live_nodes: int
    offers: tuple[Offer, ...]
    #: ASR device slots of the live nodes that take jobs (neither cordoned nor draining): what the interactive
    #: headroom is a share of.
    slots: int = 0

    @classmethod
    def of(cls, live: Iterable[tuple[Iterable[DeviceSpec], Mapping[str, str]]],
           taking: Iterable[bool] | None = None, counts: Iterable[int] | None = None) -> "Served":
        """From each live node's (device list, labels); ``taking``: whether each takes jobs (None: all do);
        ``counts``: how many nodes each entry stands for (None: one each)."""
        nodes = slots = 0
        offers: dict[Offer, None] = {}
        takes = iter(taking) if taking is not None else None
        many = iter(counts) if counts is not None else None
        for devices, node_labels in live:
            n = next(many) if many is not None else 1
            nodes += n
            taken = next(takes) if takes is not None else True
            for d in devices:
                if d.plugin == "asr":
                    offers[Offer.of(d, node_labels)] = None
                    slots += taken * n
        return cls(live_nodes=nodes, offers=tuple(offers), slots=slots)

    def serves(self, ask: Ask) -> bool:
        """Whether some live device can run a job asking ``ask``."""
        return any(o.serves(ask) for o in self.offers)

    def offers_json(self) -> str:
        """The offers as the reaper's SQL test reads them (pgfast.ask_served_sql)."""
        return json.dumps([o.wire() for o in self.offers], sort_keys=True)

    def unserved_part(self, ask: Ask) -> Literal["language", "model", "labels"] | None:
        """The first of the ask's fields that no live device serves together with those before it (None: served);
        what a refusal names as its ``param``."""
        if not self.serves(Ask(ask.language)):
            return "language"
        if not self.serves(Ask(ask.language, ask.model)):
            return "model"
        if not self.serves(ask):
            return "labels"
        return None


def unservable_message(ask: Ask, served: Served) -> str:
    """One line for a job no live node serves: what was asked, what the live nodes serve, and what to change."""
    asked_parts = []
    if ask.language is not None:
        asked_parts.append(f"language {ask.language!r}")
    if ask.model is not None:
        asked_parts.append(f"model {ask.model!r}")
    if ask.labels:
        asked_parts.append("labels " + ", ".join(f"{k}={v}" for k, v in ask.labels))
    asked = "serves " + ", ".join(asked_parts) if asked_parts else "has an asr device"
    if served.offers:
        shown = ", ".join(o.describe(with_labels=bool(ask.labels)) for o in served.offers[:MAX_OFFERS_SHOWN])
        more = len(served.offers) - MAX_OFFERS_SHOWN
        serving = f"nodes serve: {shown}" + (f" and {more} more" if more > 0 else "")
    else:
        serving = "no node is live" if not served.live_nodes else "no live node has an asr device"
    part = served.unserved_part(ask) if served.offers else None
    if part == "model":
        fix = f"run a node with asr.model: {ask.model}, or ask for a model a live node has"
    elif part == "labels":
        fix = "set those labels on a node (node.labels), or ask for labels a live node has"
    elif ask.language is not None and ask.language != "en":
        fix = f"run a node with asr.model: {MULTILINGUAL_MODEL}"
    else:
        fix = "start a node (node-agent run)"
    return f"no live node {asked} ({serving}); {fix}"


def dispatch_class(priority: str, queued_at: float, now: float, settings: SchedulerSettings) -> int:
    """A queued job's class in the dispatch order (0 first): interactive jobs, and batch jobs queued longer than
    ``scheduler.batch_max_wait_s`` (so batch work is never starved); then the other batch jobs. Within a class,
    submission order (``seq``)."""
    if priority == Priority.INTERACTIVE or now - queued_at >= settings.batch_max_wait_s:
        return 0
    return 1


def headroom_slots(slots: int, fraction: float) -> int:
    """The idle slots kept for interactive work (``scheduler.interactive_headroom``): ``fraction`` of ``slots``,
    floored to whole slots (a product such as 0.05 * 20 may land a hair under the whole number it means)."""
    return math.floor(fraction * slots + 1e-9)


def batch_allowed(slots: int, busy: int, headroom: int) -> bool:
    """Whether a batch job (one not aged past ``batch_max_wait_s``: an aged one is interactive here) may take a
    slot: only while the idle slots left after it (``slots`` of the live nodes taking jobs, less the ``busy`` ones
    their open jobs hold) would still be at least ``headroom``, so an interactive job finds a slot free instead of
    waiting for one to finish. Headroom 0: always, as before there was any."""
    return headroom <= 0 or slots - busy - 1 >= headroom


@dataclass(frozen=True)
class CapacityFacts:
    """What the store sees when a parent job asks how many sections it may make (issue 24): among the live nodes
    taking jobs (neither cordoned nor draining), their ASR ``slots`` and the ``busy`` ones (open jobs hold them),
    the ``idle_serving`` slots that serve the parent's ask (``serves``), and the queued jobs those slots would take
    before a new section (``queued_ahead``: jobs they serve of the same dispatch class or an earlier one)."""

    slots: int
    busy: int
    idle_serving: int
    queued_ahead: int


def section_capacity(facts: CapacityFacts, *, batch: bool, headroom_fraction: float, max_sections: int) -> int:
    """How many section children of a job would be dispatched at once now: the idle slots serving it less the queued
    jobs ahead of them, and for a ``batch`` parent (its children are batch jobs not aged) no more than
    ``batch_allowed`` lets through before the interactive headroom is reached; at most ``max_sections`` - 1 (the
    parent's own section 0 is the other one), never below 0."""
    free = facts.idle_serving - facts.queued_ahead
    if batch:
        headroom = headroom_slots(facts.slots, headroom_fraction)
        if headroom > 0:
            # batch_allowed for k children in turn: slots - (busy + i) - 1 >= headroom for i < k.
            free = min(free, facts.slots - facts.busy - headroom)
    return max(0, min(free, max_sections - 1))


def unservable_error(ask: Ask, served: Served, waited_s: float, after_s: float) -> JobErrorInfo:
    return JobErrorInfo(
        code="no_capable_node",
        message=f"queued {waited_s:.0f} s without a capable node (scheduler.unservable_after_s: {after_s:g}): "
        f"{unservable_message(ask, served)}",
    )


def admission_refusal(settings: SchedulerSettings, priority: str, open_jobs: int, open_interactive: int,
                      open_bytes: int, size: int) -> str | None:
    """Why the queue's bounds have no room for a job of ``priority`` and ``size`` bytes (None: room). Raises
    TooLarge for a job that could never fit. Interactive jobs have a cap of their own
    (``max_queued_interactive_jobs``), so a queue full of batch jobs never refuses a live utterance; a batch job
    counts every unfinished job against ``max_queued_jobs``, as before there were classes."""
    s = settings
    if size > s.max_queued_bytes:
        raise TooLarge(f"audio of {size} bytes is over scheduler.max_queued_bytes ({s.max_queued_bytes})")
    if priority == Priority.INTERACTIVE:
        if open_interactive >= s.max_queued_interactive_jobs:
            return (f"{open_interactive} unfinished interactive jobs reach scheduler.max_queued_interactive_jobs "
                    f"({s.max_queued_interactive_jobs})")
    elif open_jobs >= s.max_queued_jobs:
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
