"""Detector values: names, labels, limits, findings, and what a run or agent has done
lately (:class:`ScopeState`). Pure.

The detectors themselves are in ``rules.py`` (the fold and the per-event checks) and
``windows.py`` (the windowed counts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeAlias, cast, get_args

from backout.schemas.events import ActionEvent, Severity

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

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATE_VERSION = 1


def micros(at: datetime) -> int:
    """Microseconds since the epoch (naive datetimes are taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    """Inverse of :func:`micros` (UTC)."""
    return EPOCH + timedelta(microseconds=value)


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
