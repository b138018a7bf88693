"""Incident figures and blast radius from the log's records. Pure: no I/O.

An *incident* is a freeze, a detector signal or a run. :func:`select_incident` finds it
among the control commands and signals and says which runs and events it is about;
:func:`build_report` then computes, from those runs' events and the records related to them
(rollback's inverse writes and steps, later writes by others):

- time to containment: first offending event (the earliest evidence of the incident's
  signals) to the freeze applied (the freeze record's append time, else its ``issued_at``;
  the first call it blocked when no freeze is known);
- detection latency: first offending event to the first signal;
- rollback coverage: the share of consequential actions (calls that may have changed a
  record) declared reversible or compensatable whose inverse has been exercised (an
  inverse write with ``compensates`` set, or a rollback step that finished done);
- rollback success rate: rollback steps that finished restored, already restored or
  compensated, out of the steps started for the incident (conflicts, failures and steps
  still unfinished count against it; manual hand-offs are reported apart);
- recovery time: first offending event to the last rollback step finished, once no step
  of the incident is left unfinished;
- the blast radius (:func:`blast_radius`): runs, records, tenants, systems, value moved,
  downstream consumer groups that read the runs' events, and what is still exposed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import JsonValue

from backout.infra.exposure import (
    DONE_OUTCOMES,
    BlastRadius,
    DownstreamGroup,
    Exposure,
    UndoIndex,
    blast_radius,
    iso_or_none,
    undo_index,
)
from backout.projections.fold import (
    changes_record,
    fold,
)
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    EventKind,
    Origin,
    Reversibility,
    Signal,
)

__all__ = [
    "INTEGRITY_DETECTOR",
    "BlastRadius",
    "DownstreamGroup",
    "Exposure",
    "Incident",
    "IncidentReport",
    "RollbackSteps",
    "blast_radius",
    "build_report",
    "select_incident",
]

INTEGRITY_DETECTOR = "control_integrity"
"""Signals about forged or malformed control commands: never picked as the latest incident."""

IncidentKind = Literal["freeze", "signal", "run"]
_UNDOABLE = (Reversibility.REVERSIBLE, Reversibility.COMPENSATABLE)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)


# --- which incident --------------------------------------------------------------------------
@dataclass(frozen=True)
class Incident:
    """What an incident id resolved to, before its runs are read."""

    incident_id: str
    kind: IncidentKind
    freezes: tuple[ControlCommand, ...]
    signals: tuple[Signal, ...]
    runs: tuple[str, ...]
    """Runs named by the freezes' and signals' scopes (or the run itself)."""
    evidence: tuple[str, ...]
    """Event ids the signals cite (their runs belong to the incident too)."""

    @property
    def freeze_ids(self) -> frozenset[str]:
        """Command ids of the incident's freezes."""
        return frozenset(c.command_id for c in self.freezes)


def select_incident(
    incident_id: str | None,
    signals: Sequence[Signal],
    freezes: Sequence[ControlCommand],
    *,
    known_runs: Iterable[str] = (),
) -> Incident:
    """Resolve ``incident_id`` (a freeze command id, a signal id or a run id); None picks
    the latest freeze caused by a signal, else the latest freeze, else the latest detector
    signal.

    Args:
        freezes: valid freeze commands (invalid ones must be filtered out before).
        known_runs: run ids seen on the log (to recognise a run id).

    Raises:
        ConfigError: unknown id, or no incident on the log.
    """
    freezes = [c for c in freezes if c.action is ControlAction.FREEZE]
    by_cause: dict[str, list[ControlCommand]] = {}
    for command in freezes:
        if command.cause:
            by_cause.setdefault(command.cause, []).append(command)
    signal_ids = {s.signal_id: s for s in signals}
    if incident_id is None:
        # A detector's freeze is an incident; a rollback's own follow-on freeze (its cause
        # an event) only when nothing else is on the log.
        detected = [c for c in freezes if c.cause in signal_ids]
        if detected or freezes:
            incident_id = max(detected or freezes, key=lambda c: c.issued_at).command_id
        else:
            found = [s for s in signals if s.detector != INTEGRITY_DETECTOR]
            if not found:
                raise ConfigError(
                    "no incident on the log (no freeze and no detector signal); "
                    "pass --incident RUN_ID to report on a run"
                )
            incident_id = max(found, key=lambda s: s.detected_at).signal_id
    chosen_freezes: list[ControlCommand] = []
    chosen_signals: list[Signal] = []
    kind: IncidentKind
    picked = next((c for c in freezes if c.command_id == incident_id), None)
    if picked is not None:
        kind = "freeze"
        chosen_freezes.append(picked)
        if picked.cause in signal_ids:
            chosen_signals.append(signal_ids[picked.cause])
    elif incident_id in signal_ids:
        kind = "signal"
        chosen_signals.append(signal_ids[incident_id])
        chosen_freezes.extend(by_cause.get(incident_id, ()))
    elif incident_id in set(known_runs):
        kind = "run"
        chosen_signals.extend(s for s in signals if s.scope.get("run") == incident_id)
        chosen_freezes.extend(c for c in freezes if c.scope.get("run") == incident_id)
        for signal in chosen_signals:
            chosen_freezes.extend(by_cause.get(signal.signal_id, ()))
    else:
        raise ConfigError(
            f"unknown incident {incident_id!r}: not a freeze command, signal or run on the log"
        )
    runs = [incident_id] if picked is None and incident_id not in signal_ids else []
    runs += [s.scope["run"] for s in chosen_signals if "run" in s.scope]
    runs += [c.scope["run"] for c in chosen_freezes if "run" in c.scope]
    evidence = [e.event_id for s in chosen_signals for e in s.evidence]
    # A freeze caused by an event rather than a signal (the rollback executor's freeze of
    # follow-on automation names the action it could not undo): that event is evidence.
    evidence += [c.cause for c in chosen_freezes if c.cause and c.cause not in signal_ids]
    return Incident(
        incident_id,
        kind,
        tuple({c.command_id: c for c in chosen_freezes}.values()),
        tuple({s.signal_id: s for s in chosen_signals}.values()),
        tuple(dict.fromkeys(runs)),
        tuple(dict.fromkeys(evidence)),
    )


# --- the report ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RollbackSteps:
    """Rollback steps started for the incident's actions, by outcome."""

    succeeded: int = 0
    conflicts: int = 0
    failed: int = 0
    manual: int = 0
    unfinished: int = 0

    @property
    def attempted(self) -> int:
        """Automatic steps started (manual hand-offs excluded)."""
        return self.succeeded + self.conflicts + self.failed + self.unfinished

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "succeeded": self.succeeded,
            "conflicts": self.conflicts,
            "failed": self.failed,
            "manual": self.manual,
            "unfinished": self.unfinished,
            "attempted": self.attempted,
        }


@dataclass(frozen=True)
class IncidentReport:
    """The incident's figures. Times are None when the log has no answer (yet)."""

    incident: Incident
    first_offending_event: str | None
    first_offending_at: datetime | None
    detected_at: datetime | None
    detection_latency_s: float | None
    contained_at: datetime | None
    contained_by: str | None
    """The freeze command id (or ``blocked call <event id>``) that marks containment."""
    time_to_containment_s: float | None
    first_blocked_at: datetime | None
    blocked_calls: int
    consequential_actions: int
    undoable_actions: int
    """Consequential actions declared reversible or compensatable."""
    irreversible_actions: int
    undone_actions: int
    rollback_coverage: float | None
    steps: RollbackSteps
    rollback_success_rate: float | None
    recovered_at: datetime | None
    recovery_time_s: float | None
    records_restored: int
    others_writes_kept: int
    open_tasks: tuple[str, ...]
    conflicts: tuple[str, ...]
    blast: BlastRadius
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        inc = self.incident
        return {
            "incident": {
                "id": inc.incident_id,
                "kind": inc.kind,
                "runs": list(self.blast.runs),
                "freezes": [c.command_id for c in inc.freezes],
                "signals": [s.signal_id for s in inc.signals],
            },
            "first_offending_event": self.first_offending_event,
            "first_offending_at": iso_or_none(self.first_offending_at),
            "detected_at": iso_or_none(self.detected_at),
            "detection_latency_s": self.detection_latency_s,
            "contained_at": iso_or_none(self.contained_at),
            "contained_by": self.contained_by,
            "time_to_containment_s": self.time_to_containment_s,
            "first_blocked_at": iso_or_none(self.first_blocked_at),
            "blocked_calls": self.blocked_calls,
            "consequential_actions": self.consequential_actions,
            "undoable_actions": self.undoable_actions,
            "irreversible_actions": self.irreversible_actions,
            "undone_actions": self.undone_actions,
            "rollback_coverage": self.rollback_coverage,
            "rollback_steps": self.steps.to_dict(),
            "rollback_success_rate": self.rollback_success_rate,
            "recovered_at": iso_or_none(self.recovered_at),
            "recovery_time_s": self.recovery_time_s,
            "records_restored": self.records_restored,
            "others_writes_kept": self.others_writes_kept,
            "open_tasks": list(self.open_tasks),
            "conflicts": list(self.conflicts),
            "blast_radius": self.blast.to_dict(),
            "notes": list(self.notes),
        }


def _containment(
    incident: Incident,
    first_at: datetime | None,
    blocked: Sequence[ActionEvent],
    appended: Mapping[str, datetime],
) -> tuple[datetime | None, str | None]:
    candidates = []
    for freeze in incident.freezes:
        at = appended.get(freeze.command_id, freeze.issued_at)
        if first_at is None or at >= first_at:
            candidates.append((at, freeze.command_id))
    if candidates:
        return min(candidates)
    if blocked:
        return blocked[0].occurred_at, f"blocked call {blocked[0].event_id}"
    return None, None


def _steps(undo: UndoIndex, ids: set[str]) -> tuple[RollbackSteps, datetime | None]:
    counts = {"succeeded": 0, "conflicts": 0, "failed": 0, "manual": 0, "unfinished": 0}
    last: datetime | None = None
    for outcome, at, undoes in undo.steps.values():
        if not ids.intersection(undoes):
            continue
        key = (
            "succeeded"
            if outcome in DONE_OUTCOMES
            else "conflicts"
            if outcome == "conflict"
            else "manual"
            if outcome == "manual"
            else "unfinished"
            if outcome == "started"
            else "failed"
        )
        counts[key] += 1
        if outcome != "started" and (last is None or at > last):
            last = at
    return RollbackSteps(**counts), last


def build_report(
    incident: Incident,
    events: Sequence[ActionEvent],
    related: Sequence[ActionEvent] = (),
    *,
    runs: Sequence[str],
    now: datetime,
    appended: Mapping[str, datetime] | None = None,
    positions: Mapping[str, tuple[int, int]] | None = None,
    groups: Mapping[str, Mapping[int, int]] | None = None,
    internal_prefixes: tuple[str, ...] = ("backout",),
    notes: Sequence[str] = (),
) -> IncidentReport:
    """The incident's figures from its runs' events and the events related to them.

    Args:
        runs: the incident's run trees (roots first, then children).
        appended: control command id -> when its record was appended (freeze applied).
        positions, groups, internal_prefixes: for the downstream consumer groups (see
            :func:`blast_radius`).
    """
    tree = set(runs)
    mine = sorted((e for e in events if e.run_id in tree), key=lambda e: e.occurred_at)
    by_id = {e.event_id: e for e in mine}
    cited = sorted((by_id[i] for i in incident.evidence if i in by_id), key=lambda e: e.occurred_at)
    consequential = [
        e
        for e in mine
        if e.kind is EventKind.TOOL_CALL
        and e.origin is not Origin.ROLLBACK
        and (changes_record(e) or e.is_write)
    ]
    all_notes = list(notes)
    first = cited[0] if cited else (consequential[0] if consequential else None)
    if not cited and first is not None:
        all_notes.append(
            "no detector evidence on the log: the first offending event is taken "
            "to be the runs' first consequential action"
        )
    first_at = first.occurred_at if first else None
    detected = min((s.detected_at for s in incident.signals), default=None)
    blocked = [
        e
        for e in mine
        if e.status is CallStatus.BLOCKED
        and (not incident.freeze_ids or e.blocked_by in incident.freeze_ids)
    ]
    contained_at, contained_by = _containment(incident, first_at, blocked, appended or {})
    undo = undo_index([*events, *related])
    undoable = [e for e in consequential if e.reversibility in _UNDOABLE]
    undone = [e for e in undoable if undo.done(e.event_id)]
    steps, last_step = _steps(undo, {e.event_id for e in consequential})
    tasks = fold([*mine, *related]).tasks
    blast = blast_radius(
        runs,
        events,
        related,
        now=now,
        positions=positions,
        groups=groups,
        internal_prefixes=internal_prefixes,
    )
    restored = {e.target.key for e in undone if e.target is not None}
    recovered = last_step if steps.unfinished == 0 and (steps.attempted or steps.manual) else None
    return IncidentReport(
        incident=incident,
        first_offending_event=first.event_id if first else None,
        first_offending_at=first_at,
        detected_at=detected,
        detection_latency_s=_seconds(first_at, detected),
        contained_at=contained_at,
        contained_by=contained_by,
        time_to_containment_s=_seconds(first_at, contained_at),
        first_blocked_at=blocked[0].occurred_at if blocked else None,
        blocked_calls=len(blocked),
        consequential_actions=len(consequential),
        undoable_actions=len(undoable),
        irreversible_actions=sum(
            1 for e in consequential if e.reversibility is Reversibility.IRREVERSIBLE
        ),
        undone_actions=len(undone),
        rollback_coverage=round(len(undone) / len(consequential), 6) if consequential else None,
        steps=steps,
        rollback_success_rate=(
            round(steps.succeeded / steps.attempted, 6) if steps.attempted else None
        ),
        recovered_at=recovered,
        recovery_time_s=_seconds(first_at, recovered),
        records_restored=len(restored),
        others_writes_kept=_others_kept(mine, related, tree),
        open_tasks=tuple(
            sorted(t.task_id for t in tasks.values() if t.status == "open" and t.event_id in by_id)
        ),
        conflicts=tuple(
            sorted(
                {
                    e.target.key
                    for e in consequential
                    if e.target is not None and undo.outcome.get(e.event_id) == "conflict"
                }
            )
        ),
        blast=blast,
        notes=tuple(all_notes),
    )


def _others_kept(
    mine: Sequence[ActionEvent], related: Sequence[ActionEvent], tree: set[str]
) -> int:
    """Writes by others on the runs' records after the runs first wrote them."""
    first: dict[str, datetime] = {}
    for e in mine:
        if e.target is not None and changes_record(e):
            first.setdefault(e.target.key, e.occurred_at)
    return sum(
        1
        for e in related
        if e.run_id not in tree
        and e.origin is not Origin.ROLLBACK
        and e.target is not None
        and changes_record(e)
        and e.target.key in first
        and e.occurred_at > first[e.target.key]
    )
