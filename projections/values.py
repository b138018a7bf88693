"""The projection's values: cells, records, runs, rollback steps and tasks. Pure: no I/O.

The types :mod:`backout.projections.fold` folds events into and rollback planning reads,
with the labels the rollback executor writes and the fold reads (the contract between
them), and the two facts about an event every aggregate needs (``changes_record``,
``undone_ids``). ``backout.projections.fold`` re-exports every name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final, TypeAlias

from pydantic import JsonValue

from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    EventKind,
    Origin,
    Reversibility,
    may_have_written,
)

__all__ = [
    "ABSENT",
    "EXISTS",
    "LABEL_CAS",
    "LABEL_CHECKPOINT",
    "LABEL_DETAIL",
    "LABEL_FREEZE",
    "LABEL_OUTCOME",
    "LABEL_PLAN",
    "LABEL_REASON",
    "LABEL_RUN",
    "LABEL_STEP",
    "LABEL_TASK",
    "LABEL_TASK_STATUS",
    "LABEL_TOOL",
    "LABEL_UNDOES",
    "Absent",
    "CellValue",
    "Checkpoint",
    "CompensationLink",
    "EventInfo",
    "FieldWrite",
    "RecordChange",
    "RecordHistory",
    "RecordState",
    "RunState",
    "RunStatus",
    "StepState",
    "Task",
    "changes_record",
    "same",
    "undone_ids",
]

EXISTS: Final = "$exists"
"""The cell that says whether the record exists (values ``True``/``False``)."""

# Labels the rollback executor writes and this fold reads: the contract between them.
LABEL_PLAN: Final = "rollback.plan"
LABEL_STEP: Final = "rollback.step"
LABEL_OUTCOME: Final = "rollback.outcome"
LABEL_UNDOES: Final = "rollback.undoes"
"""Space-separated event ids an inverse write undoes (``compensates`` holds one of them)."""
LABEL_REASON: Final = "rollback.reason"
LABEL_DETAIL: Final = "rollback.detail"
LABEL_FREEZE: Final = "rollback.freeze"
LABEL_CAS: Final = "rollback.cas"
LABEL_RUN: Final = "rollback.run"
"""On a step event: the run of the action the step undoes."""
LABEL_TOOL: Final = "rollback.tool"
"""On a step event: the tool of the action the step undoes."""
LABEL_TASK: Final = "task"
LABEL_TASK_STATUS: Final = "task.status"
LABEL_CHECKPOINT: Final = "checkpoint"


class Absent:
    """The value of a cell of a record that does not exist (or a field it lacks)."""

    __slots__ = ()
    _instance: Absent | None = None

    def __new__(cls) -> Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Final = Absent()
CellValue: TypeAlias = JsonValue | Absent
"""A field value, or :data:`ABSENT`."""


def same(a: CellValue, b: CellValue) -> bool:
    """Value equality that keeps ``True`` apart from ``1`` and ABSENT apart from None."""
    kind = type(a)
    if kind is type(b) and (kind is str or kind is int):
        return a == b  # the common case, decided without the checks below
    if a is ABSENT or b is ABSENT:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


# --- value types -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EventInfo:
    """What planning needs to know about one journaled event (no images, no arguments)."""

    event_id: str
    kind: EventKind
    occurred_at: datetime
    run_id: str
    agent_id: str
    identity: str
    tool: str
    reversibility: Reversibility
    status: CallStatus
    origin: Origin = Origin.AGENT
    parent_run_id: str | None = None
    tenant: str | None = None
    workflow: str | None = None
    step_id: str = ""
    parent_step_id: str | None = None
    system: str | None = None
    object_id: str | None = None
    compensation: Compensation | None = None
    compensates: str | None = None
    undoes: tuple[str, ...] = ()
    """Every event this one undoes (``compensates`` and the ``rollback.undoes`` label)."""
    job_id: str | None = None
    has_after: bool = False
    changes_record: bool = False
    """True when the event is a call that may have changed its target record."""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def record_key(self) -> str | None:
        """``system/object_id`` of the target record, if any."""
        if self.system is None or self.object_id is None:
            return None
        return f"{self.system}/{self.object_id}"

    @property
    def is_write(self) -> bool:
        """Mirrors :attr:`ActionEvent.is_write`: a call that may have changed something."""
        return may_have_written(self.kind, self.reversibility, self.status)

    @classmethod
    def of(cls, event: ActionEvent) -> EventInfo:
        """The planning view of an event."""
        target = event.target
        return cls(
            event_id=event.event_id,
            kind=event.kind,
            occurred_at=event.occurred_at,
            run_id=event.run_id,
            agent_id=event.agent_id,
            identity=event.identity,
            tool=event.tool,
            reversibility=event.reversibility,
            status=event.status,
            origin=event.origin,
            parent_run_id=event.parent_run_id,
            tenant=event.tenant,
            workflow=event.workflow,
            step_id=event.step_id,
            parent_step_id=event.parent_step_id,
            system=target.system if target is not None else None,
            object_id=target.object_id if target is not None else None,
            compensation=event.compensation,
            compensates=event.compensates,
            undoes=undone_ids(event.compensates, event.labels),
            job_id=event.job_id,
            has_after=event.after is not None,
            changes_record=changes_record(event),
            labels=dict(event.labels),
        )


@dataclass(frozen=True, slots=True)
class FieldWrite:
    """One change of one cell of a record, in the record's order."""

    field: str
    seq: int
    """Position in the record's history (unjournaled writes sort before the observing event)."""
    event_id: str
    """The event that made the write, or (unjournaled) the event that revealed it."""
    run_id: str | None
    """None for an unjournaled write."""
    origin: Origin | None
    """None for an unjournaled write: someone changed the record outside backout."""
    occurred_at: datetime
    before: CellValue
    after: CellValue
    journaled: bool = True
    before_known: bool = True
    """False when the log never saw the value before this write (no before-image)."""


@dataclass(frozen=True, slots=True)
class RecordState:
    """A record as the log last saw it."""

    system: str
    object_id: str
    exists: bool = False
    known: bool = False
    """False until an image of the record has been seen."""
    fields: Mapping[str, JsonValue] = field(default_factory=dict, hash=False)
    version: JsonValue = None
    seq: int = 0
    """The last ``FieldWrite.seq`` used for this record."""
    last_event_id: str | None = None
    updated_at: datetime | None = None

    @property
    def key(self) -> str:
        """``system/object_id``."""
        return f"{self.system}/{self.object_id}"

    def value(self, cell: str) -> CellValue:
        """The current value of one cell."""
        if cell == EXISTS:
            return self.exists
        if not self.exists:
            return ABSENT
        return self.fields.get(cell, ABSENT)


@dataclass(frozen=True, slots=True)
class RecordChange:
    """What one event did to one record."""

    state: RecordState
    writes: tuple[FieldWrite, ...]
    opaque: bool
    """True when the event may have changed the record but has no after-image."""


@dataclass(frozen=True, slots=True)
class RecordHistory:
    """One record: its current state and every cell write, oldest first."""

    state: RecordState
    writes: tuple[FieldWrite, ...] = ()
    opaque: tuple[str, ...] = ()
    """Events that may have changed the record without an after-image (in doubt)."""

    def cells(self) -> dict[str, list[FieldWrite]]:
        """Writes by cell, oldest first."""
        out: dict[str, list[FieldWrite]] = {}
        for write in self.writes:
            out.setdefault(write.field, []).append(write)
        return out


class RunStatus(StrEnum):
    """A run's lifecycle as the log knows it."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A named point in a run (``journal.checkpoint(name)``)."""

    run_id: str
    name: str
    event_id: str
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class RunState:
    """One run: where it belongs and how far it got."""

    run_id: str
    agent_id: str
    identity: str
    parent_run_id: str | None = None
    tenant: str | None = None
    workflow: str | None = None
    environment: str = "production"
    status: RunStatus = RunStatus.RUNNING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_event_at: datetime | None = None
    calls: int = 0
    writes: int = 0
    checkpoints: tuple[Checkpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class CompensationLink:
    """An event (``inverse``) that undid another (``undone``)."""

    undone_event_id: str
    inverse_event_id: str
    origin: Origin
    occurred_at: datetime
    plan_id: str | None = None
    step_id: str | None = None


@dataclass(frozen=True, slots=True)
class StepState:
    """A rollback step as its started/finished events record it."""

    step_id: str
    plan_id: str
    status: str
    """``started`` or ``finished``."""
    outcome: str | None = None
    record_key: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Task:
    """Manual work a rollback could not do itself (an irreversible or expired action)."""

    task_id: str
    plan_id: str
    status: str
    """``open`` or ``done``."""
    event_id: str | None
    """The action that needs manual undoing."""
    system: str | None
    object_id: str | None
    run_id: str | None
    tool: str
    reason: str
    created_at: datetime
    closed_at: datetime | None = None
    freeze: str = ""
    """The freeze command id protecting the target, or why there is none."""


# --- facts about one event ------------------------------------------------------------------
def undone_ids(compensates: str | None, labels: Mapping[str, str]) -> tuple[str, ...]:
    """Event ids an event undoes: ``compensates`` plus the ``rollback.undoes`` label."""
    if compensates is None:
        return ()
    ids = [compensates, *labels.get(LABEL_UNDOES, "").split()]
    return tuple(dict.fromkeys(ids))


def changes_record(event: ActionEvent) -> bool:
    """True for a tool call on a target that may have changed it.

    Succeeded, in-doubt and pending calls count; so does a failed call whose after-image
    differs from its before-image (it failed half-way).
    """
    if event.kind is not EventKind.TOOL_CALL or event.target is None:
        return False
    if event.reversibility is Reversibility.READ_ONLY or event.status is CallStatus.BLOCKED:
        return False
    if event.status is CallStatus.FAILED:
        return event.before is not None and event.after is not None and event.before != event.after
    return True
