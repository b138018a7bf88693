"""The rollback plan as a value: printable, JSON-serialisable, diffable. Pure: no I/O.

Plans are frozen dataclasses (tens of thousands of steps are built in a blink); pydantic
serialises and validates them (``to_json``/``from_json``), so the JSON form is checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import Any

from pydantic import JsonValue, TypeAdapter

from backout.projections.fold import EXISTS
from backout.rollback.scope import RollbackScope
from backout.schemas.events import JsonMap

__all__ = [
    "ACTIONABLE",
    "Decision",
    "FieldChange",
    "PlanDiff",
    "PlanStep",
    "RollbackPlan",
    "Writer",
    "diff_plans",
]


class Decision(StrEnum):
    """What a step does (or, for the last three, why nothing is done)."""

    RESTORE = "restore"
    """Compare-and-set fields back to their value before the scope's trailing writes."""
    DELETE = "delete"
    """The scope created the record and nobody else touched it since: delete it."""
    RECREATE = "recreate"
    """The scope deleted the record: insert it again with its earlier fields."""
    COMPENSATE = "compensate"
    """Run the action's declared compensating tool (its window still holds)."""
    MANUAL = "manual"
    """Irreversible, expired or in doubt: a person must act; opens a task."""
    SUPERSEDED = "superseded"
    """Someone out of scope wrote over the scope's write later: kept, reported."""
    ALREADY_UNDONE = "already_undone"
    """An earlier rollback (or a closed task) already undid it."""


ACTIONABLE = frozenset(
    {Decision.RESTORE, Decision.DELETE, Decision.RECREATE, Decision.COMPENSATE, Decision.MANUAL}
)
"""Decisions the executor acts on (a manual step opens a task and freezes)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Writer:
    """Who made a write (for superseded reports)."""

    event_id: str
    at: datetime
    journaled: bool = True
    """False: someone changed the record outside backout (seen in a later before-image)."""
    run_id: str | None = None
    agent_id: str | None = None
    identity: str | None = None
    origin: str = "unjournaled"

    def describe(self) -> str:
        """``run wf_7 (agent billing-bot, identity svc) at 2026-...``."""
        when = self.at.isoformat(timespec="seconds")
        if not self.journaled:
            return f"an unjournaled writer (seen by event {self.event_id}) before {when}"
        who = f"{self.origin} run {self.run_id}" if self.run_id else self.origin
        return f"{who} (agent {self.agent_id}, identity {self.identity}) at {when}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldChange:
    """One cell of a step: its value now (as the log says) and the value to restore."""

    field: str
    """A field name, or ``$exists`` for the record's existence."""
    current: JsonValue = None
    current_present: bool = True
    """False: the field (or record) is absent now."""
    restore_to: JsonValue = None
    restore_present: bool = True
    """False: the field (or record) should be absent afterwards."""

    def describe_current(self) -> str:
        """The current value as text."""
        return _show(self.current, self.current_present, self.field)

    def describe_restore(self) -> str:
        """The restore-to value as text."""
        return _show(self.restore_to, self.restore_present, self.field)


def _show(value: JsonValue, present: bool, name: str) -> str:
    if name == EXISTS:
        return "exists" if value else "absent"
    return repr(value) if present else "(absent)"


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanStep:
    """One decision about one record (or one action without a record)."""

    step_id: str
    index: int
    decision: Decision
    system: str | None = None
    object_id: str | None = None
    changes: tuple[FieldChange, ...] = ()
    undoes: tuple[str, ...] = ()
    """The in-scope events this step is about, newest first."""
    blocked: tuple[str, ...] = ()
    """Manual steps: older in-scope writes that cannot be undone until this one is."""
    reason: str = ""
    at: datetime
    """When the newest event of this step happened."""
    tool: str | None = None
    """Compensate: the compensating tool. Manual: the action's tool."""
    args: JsonMap = field(default_factory=dict)
    """Compensate: the compensating tool's arguments."""
    allowed_until: datetime | None = None
    run_id: str | None = None
    agent_id: str | None = None
    tenant: str | None = None
    superseded_by: Writer | None = None
    undone_by: str | None = None
    """Already undone: the inverse event that did it."""

    @property
    def record_key(self) -> str | None:
        """``system/object_id``, if the step is about a record."""
        if self.system is None or self.object_id is None:
            return None
        return f"{self.system}/{self.object_id}"

    @property
    def actionable(self) -> bool:
        """True when the executor acts on this step."""
        return self.decision in ACTIONABLE

    def expected(self) -> JsonMap:
        """Field values the live record must have for the step to write (compare-and-set)."""
        return {c.field: c.current for c in self.changes if c.field != EXISTS and c.current_present}

    def desired(self) -> JsonMap:
        """Field values the step writes (restore) or inserts (recreate)."""
        return {
            c.field: c.restore_to for c in self.changes if c.field != EXISTS and c.restore_present
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RollbackPlan:
    """A rollback plan: the same inputs always give the same plan (ids included)."""

    plan_id: str
    scope: RollbackScope
    created_at: datetime
    """The ``now`` the plan was made for (compensation windows are judged at it)."""
    events_in_scope: int
    writes_in_scope: int
    records: int
    """Records the scope wrote."""
    steps: tuple[PlanStep, ...] = ()
    notes: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """Steps per decision (every decision present, zero when none)."""
        found = Counter(s.decision for s in self.steps)
        return {d.value: found.get(d, 0) for d in Decision}

    @property
    def actionable(self) -> tuple[PlanStep, ...]:
        """The steps the executor acts on, in order."""
        return tuple(s for s in self.steps if s.actionable)

    def step(self, step_id: str) -> PlanStep:
        """One step by id (KeyError when absent)."""
        for candidate in self.steps:
            if candidate.step_id == step_id:
                return candidate
        raise KeyError(step_id)

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(record, field, current, restore-to, decision, why) per changed cell or step."""
        out = []
        for s in self.steps:
            record = s.record_key or f"({s.tool or 'no target'})"
            if not s.changes:
                out.append((record, "", "", "", s.decision.value, s.reason))
            for c in s.changes:
                out.append(
                    (
                        record,
                        "(record)" if c.field == EXISTS else c.field,
                        c.describe_current(),
                        c.describe_restore() if s.actionable else "",
                        s.decision.value,
                        s.reason,
                    )
                )
        return out

    def render(self) -> str:
        """The plan as plain text, one line per changed cell."""
        head = (
            f"plan {self.plan_id} for {self.scope.describe()}: {self.writes_in_scope} "
            f"write(s) on {self.records} record(s); "
            + ", ".join(f"{k} {v}" for k, v in self.counts().items() if v)
        )
        lines = [head]
        for record, name, current, restore, decision, why in self.rows():
            change = (
                f" {name}: {current} -> {restore}"
                if restore
                else (f" {name}: {current}" if name else "")
            )
            lines.append(f"  {decision:<14} {record}{change}  # {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def with_steps(self, steps: tuple[PlanStep, ...]) -> RollbackPlan:
        """The same plan limited to ``steps`` (e.g. one system's steps)."""
        return replace(self, steps=steps)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON data."""
        data: dict[str, Any] = _adapter().dump_python(self, mode="json")
        return data

    def to_json(self, *, indent: int | None = None) -> str:
        """The plan as JSON text (``from_json`` reads it back)."""
        return _adapter().dump_json(self, indent=indent).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> RollbackPlan:
        """Read a plan written by ``to_json`` (validated).

        Raises:
            pydantic.ValidationError: the text is not a plan.
        """
        return _adapter().validate_json(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanDiff:
    """What changed between two plans of the same scope, by step id."""

    added: tuple[PlanStep, ...] = ()
    removed: tuple[PlanStep, ...] = ()
    changed: tuple[tuple[PlanStep, PlanStep], ...] = ()

    @property
    def empty(self) -> bool:
        """True when both plans have the same steps (order aside)."""
        return not (self.added or self.removed or self.changed)


def diff_plans(old: RollbackPlan, new: RollbackPlan) -> PlanDiff:
    """Steps added, removed or changed from ``old`` to ``new``.

    Steps are matched by the content part of their id (after the plan id), so plans of
    the same scope made at different times compare step by step.
    """
    before = {_content_id(s): s for s in old.steps}
    after = {_content_id(s): s for s in new.steps}
    added = tuple(s for k, s in after.items() if k not in before)
    removed = tuple(s for k, s in before.items() if k not in after)
    changed = tuple(
        (before[k], after[k])
        for k in after
        if k in before and _comparable(before[k]) != _comparable(after[k])
    )
    return PlanDiff(added=added, removed=removed, changed=changed)


def _content_id(step: PlanStep) -> str:
    return step.step_id.rsplit(":", 1)[-1]


def _comparable(step: PlanStep) -> PlanStep:
    return replace(step, index=0, step_id=_content_id(step))


@cache
def _adapter() -> TypeAdapter[RollbackPlan]:
    return TypeAdapter(RollbackPlan)
