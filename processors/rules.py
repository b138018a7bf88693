"""Detectors: ``(state, events) -> (state, findings)``. Pure: no I/O, no clock.

Time comes from event timestamps (``occurred_at``) only, so the same events always give
the same findings, live or in replay. Detectors and what they watch:

============================ ==================== ==========================================
detector                     subject              fires when
============================ ==================== ==========================================
``policy_violation``         the event's run      a write attempt uses a tool, system or
                                                  tenant outside the policy's ``allow`` lists
``failed_postcondition``     the event's run      the tool's verifier failed
                                                  (``labels["postcondition"] == "failed"``),
                                                  a write ended ``unknown`` (in doubt), or
                                                  the call partially failed
                                                  (``labels["partial_failure"]``)
``tool_uncertainty``         the event's run      ``confidence`` below ``min_confidence``, or
                                                  ``labels["uncertainty"]`` carries flags
``rate_anomaly``             run, agent           tool calls in the window above the limit
``retry_loop``               run                  the same tool, target and arguments N times
                                                  in the window
``mutation_volume``          run, agent           distinct records written, or value moved
                                                  (sum of ``|value|``), in the window above
                                                  the limit
``blast_radius``             run, agent           distinct tenants or systems written in the
                                                  window above the limit
``supervisor_drift``         the event's run      a sampled write's after-image no longer
                                                  matches the live record (see
                                                  :func:`drift_finding`)
============================ ==================== ==========================================

Labels the journal sets on ``ActionEvent.labels`` for these detectors:

- ``uncertainty``: comma-separated flags: ``low_confidence`` (the model or tool said it
  was unsure), ``decode_failure`` (the tool's output could not be parsed),
  ``schema_drift`` (the target answered with fields or types the tool did not declare).
  Unknown flags are reported as they are.
- ``postcondition``: ``failed`` or ``passed``, the verdict of the tool's declared verifier
  on the observed after-image; ``postcondition_detail``: why, in a few words.
- ``partial_failure``: set when a call succeeded only in part, e.g. ``"3/10"`` items
  failed; ``""``, ``"0"`` and ``"false"`` mean no.

Rollback's own inverse writes and compensations (``origin == "rollback"``) are recorded as
applied but judged by no detector: they undo an incident, and counting them as the
rolled-back agent's activity would freeze the recovery itself.

Windowed detectors count over a sliding window split into :data:`WINDOW_BUCKETS`
buckets; the oldest bucket is weighted by how much of it is still inside the window.
They fire once when a limit is crossed, again when the overshoot reaches the policy's
``high`` or ``critical`` ratio, and again once per window while it lasts. State is a
small :class:`ScopeState` per run and per agent that serialises to compact JSON.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeAlias, cast, get_args

from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    EventKind,
    Origin,
    RecordImage,
    Reversibility,
    Severity,
)

DetectorName: TypeAlias = Literal[
    "policy_violation",
    "failed_postcondition",
    "tool_uncertainty",
    "rate_anomaly",
    "retry_loop",
    "mutation_volume",
    "blast_radius",
    "supervisor_drift",
]
DETECTORS: tuple[DetectorName, ...] = get_args(DetectorName)
SubjectKind: TypeAlias = Literal["run", "agent"]

LABEL_UNCERTAINTY = "uncertainty"
"""Comma-separated uncertainty flags (see :data:`UNCERTAINTY_FLAGS`)."""
UNCERTAINTY_FLAGS = ("low_confidence", "decode_failure", "schema_drift")
"""The uncertainty flags the journal and tools use."""
LABEL_POSTCONDITION = "postcondition"
"""``failed`` or ``passed``: the verdict of the tool's declared verifier."""
LABEL_POSTCONDITION_DETAIL = "postcondition_detail"
"""Why the verifier failed, in a few words."""
LABEL_PARTIAL_FAILURE = "partial_failure"
"""Set when a call only partly succeeded (e.g. ``"3/10"`` items failed)."""

DEFAULT_SEVERITY: dict[DetectorName, Severity] = {
    "policy_violation": Severity.HIGH,
    "failed_postcondition": Severity.HIGH,
    "tool_uncertainty": Severity.MEDIUM,
    "rate_anomaly": Severity.MEDIUM,
    "retry_loop": Severity.MEDIUM,
    "mutation_volume": Severity.MEDIUM,
    "blast_radius": Severity.HIGH,
    "supervisor_drift": Severity.HIGH,
}
"""Severity of a finding when no policy says otherwise (windowed ones escalate)."""

WINDOW_BUCKETS = 12
"""Buckets a sliding window is split into."""
RECENT_REFS = 8
"""Recent events a scope keeps as evidence for windowed findings."""
RETRY_FINGERPRINTS = 64
"""Distinct call fingerprints a run tracks for retry loops (oldest evicted first)."""
RETRY_REFS = 10
"""Events kept as evidence per retry fingerprint."""

_RANK = {s: i for i, s in enumerate(Severity)}
_READ_ONLY = Reversibility.READ_ONLY
_TOOL_CALL = EventKind.TOOL_CALL
_WRITTEN = frozenset({CallStatus.SUCCEEDED, CallStatus.UNKNOWN, CallStatus.PENDING})
_ROLLBACK = Origin.ROLLBACK
_FIRED_KEEP = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_PARTIAL = frozenset({"", "0", "false", "no"})
_STATE_VERSION = 1


def _json_encoder() -> Callable[[object], str]:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))``, for acyclic values,
    without building an encoder per call (4x faster on small maps; the same text)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    if make is None:  # no C accelerator: the pure encoder, built once
        return encoder.encode
    chunks = make(
        None,  # no circular check: event arguments are decoded trees
        encoder.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
    return lambda value: "".join(chunks(value, 0))


_canonical_json = _json_encoder()


# --- values -----------------------------------------------------------------------------
def micros(at: datetime) -> int:
    """Microseconds since the epoch (naive datetimes are taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    """Inverse of :func:`micros` (UTC)."""
    return _EPOCH + timedelta(microseconds=value)


def digest(*parts: object) -> str:
    """A short, stable hex id of ``parts``."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


@dataclass(frozen=True, slots=True)
class EventRef:
    """An event and where it sits on the log (``None`` where unknown, as in a file)."""

    event_id: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def to_list(self) -> list[object]:
        """Compact form kept in state."""
        return [self.event_id, self.topic, self.partition, self.offset]

    @classmethod
    def from_list(cls, value: Sequence[object]) -> EventRef:
        """Inverse of :meth:`to_list`."""
        event_id, topic, partition, offset = value
        return cls(
            str(event_id),
            cast(str | None, topic),
            cast(int | None, partition),
            cast(int | None, offset),
        )


@dataclass(frozen=True, slots=True)
class Context:
    """Who did the triggering action, so a response can pick its scope."""

    run: str
    agent: str
    identity: str
    tenant: str | None
    workflow: str | None
    environment: str
    tool: str

    @classmethod
    def of(cls, event: ActionEvent) -> Context:
        """The context of ``event``."""
        return cls(
            event.run_id,
            event.agent_id,
            event.identity,
            event.tenant,
            event.workflow,
            event.environment,
            event.tool,
        )


@dataclass(frozen=True, slots=True)
class Finding:
    """One detector firing, with the event that made it fire and its evidence."""

    finding_id: str
    """Derived from detector, subject, level and trigger: a repeat has the same id."""
    detector: DetectorName
    severity: Severity
    at: datetime
    """The trigger event's ``occurred_at``."""
    subject: tuple[SubjectKind, str]
    """What was measured: ``("run", run_id)`` or ``("agent", agent_id)``."""
    context: Context
    summary: str
    trigger: EventRef
    evidence: tuple[EventRef, ...]
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """Windowed limits for one kind of subject; ``None`` switches a check off."""

    actions: int | None = None
    records: int | None = None
    tenants: int | None = None
    systems: int | None = None
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Everything the detectors need to judge one event, resolved from the policy."""

    window_us: int = 60_000_000
    run: ScopeLimits = ScopeLimits()
    agent: ScopeLimits = ScopeLimits()
    retry_loop: int | None = None
    """The Nth identical call in the window fires."""
    min_confidence: float | None = None
    allowed_tools: frozenset[str] | None = None
    allowed_systems: frozenset[str] | None = None
    allowed_tenants: frozenset[str] | None = None
    high_at: float = 2.0
    """Observed/limit ratio from which a windowed finding is at least ``high``."""
    critical_at: float = 5.0
    """Observed/limit ratio from which a windowed finding is ``critical``."""
    severity: Mapping[str, Severity] = field(
        default_factory=lambda: {str(k): v for k, v in DEFAULT_SEVERITY.items()}
    )
    track_cap: int = 10_000
    """Most distinct items a scope tracks per metric (enough to see the critical ratio)."""
    bucket_us: int = field(init=False, compare=False, repr=False)
    """Width of one window bucket (derived from ``window_us``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bucket_us", max(1, self.window_us // WINDOW_BUCKETS))


# --- state ------------------------------------------------------------------------------
@dataclass(slots=True)
class ScopeState:
    """What a run or an agent has done lately. Serialises with :meth:`to_bytes`.

    Inner values of ``distinct``, ``retries`` and ``fired`` are shared between a state
    and its :meth:`copy`; the detectors replace them instead of changing them in place.
    """

    bucket_us: int = 0
    last_us: int = 0
    applied: dict[int, int] = field(default_factory=dict)
    """Source partition -> newest offset applied: replays of older records are skipped."""
    buckets: dict[int, list[float]] = field(default_factory=dict)
    """Bucket index -> [tool calls, sum of ``|value|`` written]."""
    distinct: dict[str, dict[str, int]] = field(default_factory=dict)
    """Metric -> item -> last seen (µs), oldest first."""
    fired: dict[str, list[int]] = field(default_factory=dict)
    """Detector key -> [severity rank, quiet until (µs)]."""
    retries: dict[str, list[object]] = field(default_factory=dict)
    """Call fingerprint -> [count, first seen (µs), [refs]], oldest first."""
    recent: list[list[object]] = field(default_factory=list)
    """The last tool calls as [event id, topic, partition, offset, time (µs)]."""
    issued: dict[str, int] = field(default_factory=dict)
    """Response key -> quiet until (µs): the cooldown of graduated responses."""
    runs: dict[str, int] = field(default_factory=dict)
    """For an agent: its runs -> last seen (µs), oldest first."""
    sums: list[float] | None = field(default=None, compare=False, repr=False)
    """Not saved: [bucket, first bucket, calls, moved] summed strictly between the two."""
    mine: set[str] = field(default_factory=set, compare=False, repr=False)
    """Not saved: ``distinct`` maps this copy owns (copied on first change)."""

    def copy(self) -> ScopeState:
        """An independent copy (the detectors never change their input)."""
        return ScopeState(
            self.bucket_us,
            self.last_us,
            dict(self.applied),
            {k: list(v) for k, v in self.buckets.items()},
            dict(self.distinct),
            dict(self.fired),
            dict(self.retries),
            list(self.recent),
            dict(self.issued),
            dict(self.runs),
            self.sums,
            set(),
        )

    def claim(self, ref: EventRef) -> bool:
        """Mark ``ref`` applied; False when it (or a later record) already was."""
        if ref.partition is None or ref.offset is None:
            return True
        if self.applied.get(ref.partition, -1) >= ref.offset:
            return False
        self.applied[ref.partition] = ref.offset
        return True

    def to_bytes(self) -> bytes:
        """Compact JSON."""
        return json.dumps(
            {
                "v": _STATE_VERSION,
                "b": self.bucket_us,
                "l": self.last_us,
                "ap": self.applied,
                "bk": self.buckets,
                "d": self.distinct,
                "f": self.fired,
                "r": self.retries,
                "rc": self.recent,
                "i": self.issued,
                "ru": self.runs,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> ScopeState:
        """Inverse of :meth:`to_bytes`; ``None`` or another version gives a fresh state."""
        if not data:
            return cls()
        raw = json.loads(data)
        if raw.get("v") != _STATE_VERSION:
            return cls()
        return cls(
            raw["b"],
            raw["l"],
            {int(k): v for k, v in raw["ap"].items()},
            {int(k): v for k, v in raw["bk"].items()},
            raw["d"],
            raw["f"],
            raw["r"],
            raw["rc"],
            raw["i"],
            raw["ru"],
        )


@dataclass(frozen=True, slots=True)
class Detection:
    """What :func:`detect` returns: new states, findings, and runs whose state can go."""

    agent: ScopeState
    runs: dict[str, ScopeState]
    findings: list[Finding]
    expired_runs: list[str]
    skipped: int
    """Events already applied (a replay after a restart), ignored."""


class _Facts:
    """What the windowed detectors read from one tool call, computed once."""

    __slots__ = (
        "event",
        "recent",
        "record",
        "ref",
        "ref_list",
        "system",
        "t",
        "tenant",
        "value",
        "write",
    )

    def __init__(self, event: ActionEvent, ref: EventRef, t: int) -> None:
        self.event = event
        self.ref = ref
        self.ref_list: list[object] = [ref.event_id, ref.topic, ref.partition, ref.offset]
        self.recent: list[object] = [*self.ref_list, t]
        """The entry for ``ScopeState.recent`` (shared by the agent's and the run's: never
        changed once built)."""
        self.t = t
        self.tenant = event.tenant
        # ActionEvent.is_write for a tool call, without the property's call
        self.write = event.reversibility is not _READ_ONLY and event.status in _WRITTEN
        target = event.target
        if target is None:
            self.system = self.record = None
        else:
            self.system = target.system
            record = f"{target.system}/{target.object_id}"
            self.record = digest(record) if len(record) > 40 else record
        value = event.value
        self.value = abs(value) if value is not None else 0.0


LimitsFor: TypeAlias = Callable[[ActionEvent], Limits]


# --- the fold ---------------------------------------------------------------------------
def detect(
    agent: ScopeState,
    runs: Mapping[str, ScopeState],
    batch: Iterable[tuple[ActionEvent, EventRef]],
    limits_for: LimitsFor,
) -> Detection:
    """Run every detector over ``batch``, events of one agent, in order.

    Args:
        agent: the agent's state (not changed; a new one is returned).
        runs: states of the runs in the batch that have one (not changed).
        batch: the agent's events with their positions, in log order per partition.
        limits_for: the policy's limits for an event.

    Returns:
        The new agent state, the new states of the runs touched, the findings in event
        order, the runs idle for longer than a window, and how many events were skipped.
    """
    agent = agent.copy()
    agent_runs = agent.runs
    touched: dict[str, ScopeState] = {}
    findings: list[Finding] = []
    skipped = 0
    retain = 0
    agent_subject: tuple[SubjectKind, str] | None = None
    for event, ref in batch:
        run_id = event.run_id
        run = touched.get(run_id)
        if run is None:
            base = runs.get(run_id)
            run = touched[run_id] = base.copy() if base is not None else ScopeState()
        if ref.partition is None or ref.offset is None:  # from a file: nothing to claim
            fresh_agent = fresh_run = True
        else:
            fresh_agent, fresh_run = agent.claim(ref), run.claim(ref)
            if not (fresh_agent or fresh_run):
                skipped += 1
                continue
        if event.origin is _ROLLBACK:
            continue  # recovery, not the agent's own activity: see the module docstring
        limits = limits_for(event)
        if limits.window_us > retain:
            retain = limits.window_us
        at = event.occurred_at
        if at.tzinfo is None:
            t = micros(at)
        else:  # micros(), inlined for the usual aware time
            delta = at - _EPOCH
            t = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        facts = _Facts(event, ref, t) if event.kind is _TOOL_CALL else None
        if fresh_agent:
            if facts is not None:
                found = event_findings(event, ref, limits)
                if found:
                    findings.extend(found)
                if agent_subject is None:
                    agent_subject = ("agent", event.agent_id)
                if agent_subject is not None:  # narrows the type for mypy
                    _observe(agent, agent_subject, limits.agent, facts, limits, findings)
            agent_runs.pop(run_id, None)
            agent_runs[run_id] = t
            if t > agent.last_us:
                agent.last_us = t
        if fresh_run and facts is not None:
            subject: tuple[SubjectKind, str] = ("run", run_id)
            _observe(run, subject, limits.run, facts, limits, findings)
            if limits.retry_loop is not None and event.reversibility is not _READ_ONLY:
                _retry(run, subject, facts, limits, findings)
    expired = _expire_runs(agent, retain, touched)
    return Detection(agent, touched, findings, expired, skipped)


def _expire_runs(agent: ScopeState, retain_us: int, touched: Mapping[str, ScopeState]) -> list[str]:
    if not retain_us:
        return []
    horizon = agent.last_us - retain_us
    expired: list[str] = []
    for run_id, last in agent.runs.items():
        if last > horizon:
            break
        if run_id not in touched:
            expired.append(run_id)
    for run_id in expired:
        del agent.runs[run_id]
    return expired


# --- per-event detectors ----------------------------------------------------------------
def event_findings(event: ActionEvent, ref: EventRef, limits: Limits) -> list[Finding]:
    """Findings that need no state: policy violation, failed postcondition, uncertainty."""
    if event.kind is not EventKind.TOOL_CALL:
        return []
    out: list[Finding] = []
    attempt = (
        event.reversibility is not Reversibility.READ_ONLY
        and event.status is not CallStatus.BLOCKED
    )
    if (
        not event.labels
        and event.status is not CallStatus.UNKNOWN
        and (
            event.confidence is None
            or limits.min_confidence is None
            or event.confidence >= limits.min_confidence
        )
        and (
            not attempt
            or (
                limits.allowed_tools is None
                and limits.allowed_systems is None
                and limits.allowed_tenants is None
            )
        )
    ):
        return out
    if attempt:
        problems = _violations(event, limits)
        if problems:
            out.append(
                _event_finding(
                    "policy_violation",
                    event,
                    ref,
                    limits,
                    "write outside the policy: " + "; ".join(problems),
                    {"violations": "; ".join(problems)},
                )
            )
    quiet = not event.labels  # most calls: no labels, so only status and confidence matter
    reasons = (
        _postcondition(event, attempt) if not quiet or event.status is CallStatus.UNKNOWN else None
    )
    if reasons:
        out.append(
            _event_finding(
                "failed_postcondition",
                event,
                ref,
                limits,
                "postcondition: " + "; ".join(reasons),
                {"reasons": "; ".join(reasons)},
            )
        )
    flags = _uncertainty(event, limits) if not quiet or event.confidence is not None else None
    if flags:
        out.append(
            _event_finding(
                "tool_uncertainty",
                event,
                ref,
                limits,
                f"tool {event.tool!r} is unsure: " + ", ".join(flags),
                {"flags": ",".join(flags)},
            )
        )
    return out


def _violations(event: ActionEvent, limits: Limits) -> list[str]:
    problems: list[str] = []
    if limits.allowed_tools is not None and event.tool not in limits.allowed_tools:
        problems.append(f"tool {event.tool!r} not allowed")
    system = event.target.system if event.target is not None else None
    if (
        limits.allowed_systems is not None
        and system is not None
        and system not in limits.allowed_systems
    ):
        problems.append(f"system {system!r} not allowed")
    if limits.allowed_tenants is not None and event.tenant not in limits.allowed_tenants:
        problems.append(f"tenant {event.tenant!r} not allowed")
    return problems


def _postcondition(event: ActionEvent, attempt: bool) -> list[str]:
    reasons: list[str] = []
    if event.labels.get(LABEL_POSTCONDITION) == "failed":
        detail = event.labels.get(LABEL_POSTCONDITION_DETAIL)
        reasons.append("verifier failed" + (f" ({detail})" if detail else ""))
    if attempt and event.status is CallStatus.UNKNOWN:
        reasons.append("status unknown (the write may or may not have happened)")
    partial = event.labels.get(LABEL_PARTIAL_FAILURE)
    if partial is not None and partial.strip().lower() not in _NO_PARTIAL:
        reasons.append(f"partial failure ({partial})")
    return reasons


def _uncertainty(event: ActionEvent, limits: Limits) -> list[str]:
    flags = [f.strip() for f in event.labels.get(LABEL_UNCERTAINTY, "").split(",") if f.strip()]
    if (
        limits.min_confidence is not None
        and event.confidence is not None
        and event.confidence < limits.min_confidence
        and "low_confidence" not in flags
    ):
        flags.insert(0, "low_confidence")
    if "low_confidence" in flags and event.confidence is not None:
        flags[flags.index("low_confidence")] = f"low_confidence={event.confidence:g}"
    return flags


def _event_finding(
    detector: DetectorName,
    event: ActionEvent,
    ref: EventRef,
    limits: Limits,
    summary: str,
    details: dict[str, str],
) -> Finding:
    return Finding(
        "f_" + digest(detector, event.event_id),
        detector,
        limits.severity[detector],
        event.occurred_at,
        ("run", event.run_id),
        Context.of(event),
        summary,
        ref,
        (ref,),
        details,
    )


# --- windowed detectors -----------------------------------------------------------------
def _observe(
    state: ScopeState,
    subject: tuple[SubjectKind, str],
    lim: ScopeLimits,
    facts: _Facts,
    limits: Limits,
    out: list[Finding],
) -> None:
    bucket_us = limits.bucket_us
    if state.bucket_us != bucket_us:  # the window changed: counts in old buckets are moot
        state.bucket_us, state.buckets, state.distinct, state.sums = bucket_us, {}, {}, None
        state.mine = set()
    t = facts.t
    if t > state.last_us:
        state.last_us = t
    recent = state.recent
    recent.append(facts.recent)
    if len(recent) > 2 * RECENT_REFS:
        del recent[:-RECENT_REFS]
    window = limits.window_us
    write = facts.write
    if lim.actions is not None or (write and lim.value is not None):
        moved = facts.value if write else 0.0
        calls, total = _bucket_add(state, t, moved, window, bucket_us)
        if lim.actions is not None and calls > lim.actions:
            _fire(
                state,
                "rate_anomaly",
                "actions",
                subject,
                calls,
                lim.actions,
                facts,
                limits,
                f"{calls:g} tool calls in {_secs(window)}",
                out,
            )
        if write and lim.value is not None and moved and total > lim.value:
            _fire(
                state,
                "mutation_volume",
                "value",
                subject,
                total,
                lim.value,
                facts,
                limits,
                f"value moved {total:g} in {_secs(window)}",
                out,
            )
    if not write:
        return
    for metric, detector, item, limit in (
        ("records", "mutation_volume", facts.record, lim.records),
        ("tenants", "blast_radius", facts.tenant, lim.tenants),
        ("systems", "blast_radius", facts.system, lim.systems),
    ):
        if limit is None or item is None:
            continue
        seen = state.distinct[metric] if metric in state.mine else _owned(state, metric)
        count = _distinct_add(seen, item, t, window, limit, limits.track_cap)
        if count > limit:
            _fire(
                state,
                cast(DetectorName, detector),
                metric,
                subject,
                count,
                limit,
                facts,
                limits,
                f"{count} distinct {metric} written in {_secs(window)}",
                out,
            )


def _owned(state: ScopeState, metric: str) -> dict[str, int]:
    """The state's item map for ``metric``, copied on its first change by this copy."""
    seen = state.distinct.get(metric)
    seen = state.distinct[metric] = dict(seen) if seen is not None else {}
    state.mine.add(metric)
    return seen


def _retry(
    run: ScopeState,
    subject: tuple[SubjectKind, str],
    facts: _Facts,
    limits: Limits,
    out: list[Finding],
) -> None:
    assert limits.retry_loop is not None
    event, t = facts.event, facts.t
    args = event.approved_args if event.approved_args is not None else event.requested_args
    target = facts.record or ""
    call = f"{event.tool}|{target}|" + _canonical_json(args)
    # 64 bits of two C checksums: stable across processes, far cheaper than a digest,
    # and a run tracks at most RETRY_FINGERPRINTS calls, so a collision is negligible
    data = call.encode()
    fp = f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"
    entry = run.retries.pop(fp, None)
    if entry is None or t - cast(int, entry[1]) >= limits.window_us:
        count, first = 1, t
        refs: list[object] = [facts.ref_list]
    else:
        count, first = cast(int, entry[0]) + 1, cast(int, entry[1])
        refs = [*cast(list[object], entry[2])[-(RETRY_REFS - 1) :], facts.ref_list]
    run.retries[fp] = [count, first, refs]
    if len(run.retries) > RETRY_FINGERPRINTS:
        del run.retries[next(iter(run.retries))]
    if count >= limits.retry_loop:
        _fire(
            run,
            "retry_loop",
            fp,
            subject,
            count,
            limits.retry_loop,
            facts,
            limits,
            f"{event.tool}({target}) called {count} times with the same arguments in "
            f"{_secs(limits.window_us)}",
            out,
            refs=refs,
            inclusive=True,
        )  # nested ref lists


def _fire(
    state: ScopeState,
    detector: DetectorName,
    metric: str,
    subject: tuple[SubjectKind, str],
    observed: float,
    limit: float,
    facts: _Facts,
    limits: Limits,
    what: str,
    out: list[Finding],
    *,
    refs: list[object] | None = None,
    inclusive: bool = False,
) -> None:
    """Add a finding when ``observed`` reaches a new level, or the last one went quiet."""
    base = limits.severity[detector]
    ratio = observed / limit
    level = base
    if ratio >= limits.critical_at:
        level = Severity.CRITICAL
    elif ratio >= limits.high_at and _RANK[base] < _RANK[Severity.HIGH]:
        level = Severity.HIGH
    key = f"{detector}:{metric}"
    rank = _RANK[level]
    t = facts.t
    last = state.fired.get(key)
    if last is not None and last[0] >= rank and t < last[1]:
        return
    if len(state.fired) >= _FIRED_KEEP:
        for stale in [k for k, v in state.fired.items() if v[1] <= t]:
            del state.fired[stale]
    state.fired[key] = [rank, t + limits.window_us]
    event = facts.event
    if refs is None:  # the recent calls still inside the window
        refs = [r for r in state.recent[-RECENT_REFS:] if cast(int, r[4]) > t - limits.window_us]
    evidence = tuple(EventRef.from_list(cast(Sequence[object], r)[:4]) for r in refs)
    shown_metric = "calls" if detector == "retry_loop" else metric
    limit_text = f"{limit:g}" + ("" if inclusive else " max")
    out.append(
        Finding(
            "f_" + digest(detector, metric, subject[0], subject[1], level.value, event.event_id),
            detector,
            level,
            event.occurred_at,
            subject,
            Context.of(event),
            f"{subject[0]} {subject[1]}: {what} (limit {limit_text})",
            facts.ref,
            evidence,
            {
                "metric": shown_metric,
                "observed": f"{observed:g}",
                "limit": f"{limit:g}",
                "window_s": f"{limits.window_us / 1e6:g}",
            },
        )
    )


def _bucket_add(
    state: ScopeState, t: int, moved: float, window: int, width: int
) -> tuple[float, float]:
    """Count a call (moving ``moved``) at ``t``; weighted sums over ``(t - window, t]``.

    The sum over the buckets strictly inside the window, newest excluded, is cached on
    the state while events keep landing in the newest bucket (the common case).
    """
    buckets = state.buckets
    index = t // width
    sums = state.sums
    if sums is not None and sums[0] != index:
        sums = state.sums = None
    slot = buckets.get(index)
    if slot is None:
        slot = buckets[index] = [1.0, moved]
        if len(buckets) > WINDOW_BUCKETS + 1:
            horizon = (t - window) // width
            for i in [i for i in buckets if i < horizon]:
                del buckets[i]
    else:
        slot[0] += 1.0
        slot[1] += moved
    start = t - window
    first = start // width
    if sums is None or sums[1] != first:
        calls = total = 0.0
        for i, (c, v) in buckets.items():
            if first < i < index:
                calls += c
                total += v
        sums = state.sums = [index, first, calls, total]
    calls, total = sums[2] + slot[0], sums[3] + slot[1]
    oldest = buckets.get(first) if first < index else None
    if oldest is not None:
        weight = ((first + 1) * width - start) / width
        calls += oldest[0] * weight
        total += oldest[1] * weight
    return calls, total


def _distinct_add(
    seen: dict[str, int], item: str, t: int, window: int, limit: int, cap: int
) -> int:
    """Record ``item`` at ``t``; the distinct items seen in ``(t - window, t]`` when that
    may be over ``limit`` (a lower bound otherwise: stale items are only pruned then)."""
    seen.pop(item, None)
    seen[item] = t
    if len(seen) <= limit:
        return len(seen)
    start = t - window
    while True:
        oldest = next(iter(seen))
        if seen[oldest] > start:
            break
        del seen[oldest]
    while len(seen) > cap:
        del seen[next(iter(seen))]
    return len(seen)


def _secs(us: int) -> str:
    return f"{us / 1e6:g}s"


# --- supervisor sampling ----------------------------------------------------------------
def samplable(event: ActionEvent) -> bool:
    """True for a succeeded write whose after-image the supervisor can re-check."""
    return (
        event.kind is EventKind.TOOL_CALL
        and event.status is CallStatus.SUCCEEDED
        and event.reversibility is not Reversibility.READ_ONLY
        and event.target is not None
        and event.after is not None
    )


def sampled(event_id: str, share: float) -> bool:
    """Deterministic sampling: the same event id is always in or out for a given share."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")
    return h < share * 2**64


def drift(expected: RecordImage, live: RecordImage) -> dict[str, str]:
    """Fields whose live value differs from the after-image (``{}`` when none)."""
    if expected.exists != live.exists:
        return {"exists": f"expected {expected.exists}, live {live.exists}"}
    if not expected.exists:
        return {}
    return {
        name: f"expected {value!r}, live {live.fields.get(name)!r}"
        for name, value in sorted(expected.fields.items())
        if live.fields.get(name) != value
    }


def drift_finding(
    event: ActionEvent,
    ref: EventRef,
    live: RecordImage,
    severity: Severity = DEFAULT_SEVERITY["supervisor_drift"],
) -> Finding | None:
    """A ``supervisor_drift`` finding when the live record no longer matches ``event``.

    The caller re-reads the record through its Target and only asks about the newest
    journaled write of that record, so a later journaled write is not mistaken for drift.
    """
    if event.after is None or event.target is None:
        return None
    changed = drift(event.after, live)
    if not changed:
        return None
    fields = ", ".join(sorted(changed))
    return Finding(
        "f_" + digest("supervisor_drift", event.event_id),
        "supervisor_drift",
        severity,
        event.occurred_at,
        ("run", event.run_id),
        Context.of(event),
        f"{event.target.key} drifted from what {event.tool!r} wrote: {fields}",
        ref,
        (ref,),
        {"target": event.target.key, **{f"field.{k}": v for k, v in changed.items()}},
    )
