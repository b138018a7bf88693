"""The blast radius of an incident's runs. Pure: no I/O.

What the runs' writes touched (records, tenants, systems, value moved), which consumer
groups downstream have read their events, and for each record whether it is still
exposed: rolled back, overwritten by someone else since, or still carrying the runs'
effect (reversible, compensation due, irreversible, in doubt, a conflict or a manual task).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import JsonValue

from backout.projections.fold import (
    LABEL_DETAIL,
    LABEL_OUTCOME,
    LABEL_STEP,
    LABEL_UNDOES,
    changes_record,
    fold,
    undone_ids,
)
from backout.rollback.blast_radius import blast_radius as scope_blast_radius
from backout.rollback.scope import RollbackScope
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    EventKind,
    Origin,
    Reversibility,
)

ExposureStatus = Literal[
    "rolled_back",
    "exposed",
    "irreversible",
    "compensation_due",
    "conflict",
    "manual_task",
    "in_doubt",
    "overwritten_by_others",
]
DONE_OUTCOMES = frozenset({"applied", "already", "compensated"})
"""Rollback step outcomes that leave the event undone."""


def iso_or_none(at: datetime | None) -> str | None:
    """``at`` in ISO 8601, or None."""
    return at.isoformat() if at is not None else None


@dataclass(frozen=True)
class Exposure:
    """One record the runs wrote, and whether it is still exposed."""

    record: str
    status: ExposureStatus
    detail: str
    writes: int
    tenant: str | None
    last_write_at: datetime

    @property
    def exposed(self) -> bool:
        """True when the record still carries the runs' effect and nobody took it over."""
        return self.status not in ("rolled_back", "overwritten_by_others")

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "record": self.record,
            "status": self.status,
            "detail": self.detail,
            "writes": self.writes,
            "tenant": self.tenant,
            "last_write_at": iso_or_none(self.last_write_at),
            "exposed": self.exposed,
        }


@dataclass(frozen=True)
class DownstreamGroup:
    """A consumer group and how many of the runs' events it has consumed."""

    group: str
    consumed: int
    total: int
    internal: bool
    """True for backout's own readers (projector, processors, tools)."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "group": self.group,
            "consumed": self.consumed,
            "total": self.total,
            "internal": self.internal,
        }


@dataclass(frozen=True)
class BlastRadius:
    """What a set of runs touched, who read it downstream, and what is still exposed."""

    runs: tuple[str, ...]
    child_runs: tuple[str, ...]
    writes: int
    records: tuple[str, ...]
    tenants: tuple[str, ...]
    systems: tuple[str, ...]
    value_moved: float
    exposures: tuple[Exposure, ...]
    downstream: tuple[DownstreamGroup, ...] = ()
    contested: tuple[str, ...] = ()
    """Records someone outside the runs wrote after the runs did."""
    irreversible: int = 0
    """Writes that cannot be undone automatically."""
    in_doubt: int = 0
    """Writes whose outcome is unknown or pending."""

    @property
    def still_exposed(self) -> tuple[Exposure, ...]:
        """Records still carrying the runs' effect."""
        return tuple(e for e in self.exposures if e.exposed)

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        counts: dict[str, JsonValue] = {}
        for e in self.exposures:
            counts[e.status] = int(counts.get(e.status, 0) or 0) + 1  # type: ignore[arg-type]
        return {
            "runs": list(self.runs),
            "child_runs": list(self.child_runs),
            "writes": self.writes,
            "records": list(self.records),
            "tenants": list(self.tenants),
            "systems": list(self.systems),
            "value_moved": self.value_moved,
            "contested": list(self.contested),
            "irreversible": self.irreversible,
            "in_doubt": self.in_doubt,
            "still_exposed": len(self.still_exposed),
            "exposure_counts": counts,
            "exposures": [e.to_dict() for e in self.exposures],
            "downstream": [g.to_dict() for g in self.downstream],
        }


@dataclass
class UndoIndex:
    """What the log says about undoing each event: inverse writes and rollback steps."""

    inverses: dict[str, list[str]] = field(default_factory=dict)
    """Event id -> inverse events that undid it."""
    outcome: dict[str, str] = field(default_factory=dict)
    """Event id -> latest rollback step outcome (``started`` while unfinished)."""
    detail: dict[str, str] = field(default_factory=dict)
    steps: dict[str, tuple[str, datetime, tuple[str, ...]]] = field(default_factory=dict)
    """Step id -> (outcome or ``started``, when, events it undoes)."""

    def done(self, event_id: str) -> bool:
        return bool(self.inverses.get(event_id)) or self.outcome.get(event_id) in DONE_OUTCOMES


def undo_index(events: Iterable[ActionEvent]) -> UndoIndex:
    undo = UndoIndex()
    for event in sorted(events, key=lambda e: e.occurred_at):
        for target in undone_ids(event.compensates, event.labels):
            undo.inverses.setdefault(target, []).append(event.event_id)
        step = event.labels.get(LABEL_STEP)
        if step is None or event.kind not in (
            EventKind.ROLLBACK_STEP_STARTED,
            EventKind.ROLLBACK_STEP_FINISHED,
        ):
            continue
        undoes = tuple(event.labels.get(LABEL_UNDOES, "").split())
        finished = event.kind is EventKind.ROLLBACK_STEP_FINISHED
        previous = undo.steps.get(step)
        if not finished and previous is not None and previous[0] != "started":
            continue  # a late duplicate start never reopens a finished step
        outcome = event.labels.get(LABEL_OUTCOME, "finished") if finished else "started"
        undo.steps[step] = (outcome, event.occurred_at, undoes or (previous[2] if previous else ()))
        for target in undo.steps[step][2]:
            undo.outcome[target] = outcome
            if finished and LABEL_DETAIL in event.labels:
                undo.detail[target] = event.labels[LABEL_DETAIL]
    return undo


def _record_status(
    writes: Sequence[ActionEvent], later: Sequence[ActionEvent], undo: UndoIndex, now: datetime
) -> tuple[ExposureStatus, str]:
    outcomes = {undo.outcome.get(w.event_id) for w in writes}
    if all(undo.done(w.event_id) for w in writes):
        return "rolled_back", "every write undone"
    if "conflict" in outcomes:
        return "conflict", "rollback found the live record changed outside the log"
    if "manual" in outcomes:
        return "manual_task", "handed to a person (manual task)"
    pending = [w for w in writes if not undo.done(w.event_id)]
    if later:
        who = later[-1]
        return "overwritten_by_others", (
            f"{who.origin.value} {who.agent_id} ({who.run_id}) wrote it later"
        )
    if any(w.status is CallStatus.UNKNOWN for w in pending):
        return "in_doubt", "a call's outcome is unknown"
    if any(w.reversibility is Reversibility.IRREVERSIBLE for w in pending):
        return "irreversible", "cannot be undone automatically"
    comp = next((w for w in pending if w.reversibility is Reversibility.COMPENSATABLE), None)
    if comp is not None:
        until = comp.compensation.allowed_until if comp.compensation else None
        if until is not None and until < now:
            return "irreversible", f"compensation window closed at {until.isoformat()}"
        return "compensation_due", "compensatable, not compensated yet"
    return "exposed", "reversible, not rolled back yet"


def blast_radius(
    runs: Iterable[str],
    events: Sequence[ActionEvent],
    related: Sequence[ActionEvent] = (),
    *,
    now: datetime,
    positions: Mapping[str, tuple[int, int]] | None = None,
    groups: Mapping[str, Mapping[int, int]] | None = None,
    internal_prefixes: tuple[str, ...] = ("backout",),
) -> BlastRadius:
    """What the runs' writes touched and what is still exposed.

    Args:
        runs: the run tree (root first).
        events: the runs' own events.
        related: other events on the same records (inverse writes, rollback steps, others).
        now: judges compensation windows.
        positions: event id -> (partition, offset) on the actions topic.
        groups: consumer group -> partition -> committed offset on the actions topic.
        internal_prefixes: group ids of backout's own readers start with one of these.
    """
    run_list = list(dict.fromkeys(runs))
    tree = set(run_list)
    mine = [e for e in events if e.run_id in tree and e.origin is not Origin.ROLLBACK]
    writes = [e for e in mine if changes_record(e) or e.is_write]
    undo = undo_index([*events, *related])
    by_record: dict[str, list[ActionEvent]] = {}
    for w in sorted(writes, key=lambda e: e.occurred_at):
        by_record.setdefault(w.target.key if w.target else f"({w.tool})", []).append(w)
    others: dict[str, list[ActionEvent]] = {}
    for e in sorted(related, key=lambda e: e.occurred_at):
        if (
            e.run_id not in tree
            and e.origin is not Origin.ROLLBACK
            and e.target is not None
            and (changes_record(e))
        ):
            others.setdefault(e.target.key, []).append(e)
    exposures = []
    for record, ws in sorted(by_record.items()):
        last = ws[-1].occurred_at
        later = [o for o in others.get(record, ()) if o.occurred_at > last]
        status, detail = _record_status(ws, later, undo, now)
        exposures.append(Exposure(record, status, detail, len(ws), ws[-1].tenant, last))
    base = _scope_counts(run_list, mine, related)
    return BlastRadius(
        runs=tuple(run_list),
        child_runs=base.child_runs,
        writes=base.writes,
        records=base.records,
        tenants=base.tenants,
        systems=base.systems,
        value_moved=float(sum(w.value or 0.0 for w in writes)),
        exposures=tuple(exposures),
        downstream=_downstream(mine, positions or {}, groups or {}, internal_prefixes),
        contested=base.contested,
        irreversible=base.irreversible,
        in_doubt=base.in_doubt,
    )


@dataclass(frozen=True)
class _Counts:
    child_runs: tuple[str, ...]
    writes: int
    records: tuple[str, ...]
    tenants: tuple[str, ...]
    systems: tuple[str, ...]
    contested: tuple[str, ...]
    irreversible: int
    in_doubt: int


def _scope_counts(
    runs: Sequence[str], mine: Sequence[ActionEvent], related: Sequence[ActionEvent]
) -> _Counts:
    """The rollback planner's blast radius (``rollback.blast_radius``) of each root run, merged:
    the operator sees the same records, tenants and contested records a rollback would."""
    with_events = {e.run_id for e in mine}
    parents = {e.run_id: e.parent_run_id for e in mine}
    roots = [r for r in runs if r in with_events and parents.get(r) not in with_events]
    history = fold([*mine, *related])
    found = [scope_blast_radius(history, RollbackScope(run=root)) for root in roots]

    def union(values: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
        return tuple(sorted({v for group in values for v in group}))

    return _Counts(
        child_runs=tuple(r for r in union(b.child_runs for b in found) if r != runs[0]),
        writes=sum(b.writes for b in found),
        records=union(b.records for b in found),
        tenants=union(b.tenants for b in found),
        systems=union(b.systems for b in found),
        contested=union(b.contested for b in found),
        irreversible=sum(b.irreversible for b in found),
        in_doubt=sum(b.in_doubt for b in found),
    )


def _downstream(
    events: Sequence[ActionEvent],
    positions: Mapping[str, tuple[int, int]],
    groups: Mapping[str, Mapping[int, int]],
    internal_prefixes: tuple[str, ...],
) -> tuple[DownstreamGroup, ...]:
    located = [positions[e.event_id] for e in events if e.event_id in positions]
    out = []
    for group, committed in sorted(groups.items()):
        consumed = sum(1 for p, off in located if committed.get(p, -1) > off)
        if consumed:
            out.append(
                DownstreamGroup(group, consumed, len(located), group.startswith(internal_prefixes))
            )
    return tuple(out)
