"""Restore steps of one record: the scope's chained writes, grouped into segments. Pure.

The writes each cell's walk chained (see ``walk.py``) are taken newest event first and
grouped into segments of consecutive restorable writes; a compensation ends a segment
and runs between the segments before and after it. Each segment becomes a restore of
the fields it changed, a delete (the scope created the record) or a recreate (the scope
deleted it); a created record someone else changed since is kept and reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from backout.projections.fold import (
    ABSENT,
    EXISTS,
    Absent,
    CellValue,
    EventInfo,
    FieldWrite,
    RecordHistory,
    RecordState,
    same,
)
from backout.rollback.ordering import Draft
from backout.rollback.plan import Decision, FieldChange
from backout.rollback.walk import ActionClass, CellWalk, PlanContext


@dataclass(slots=True)
class _Cell:
    expected: CellValue
    desired: CellValue
    oldest: FieldWrite
    writes: list[FieldWrite] = field(default_factory=list)
    """The segment's writes of this cell, newest first."""


@dataclass(slots=True)
class _Segment:
    """Consecutive restorable writes of one record (between compensations)."""

    cells: dict[str, _Cell] = field(default_factory=dict)
    events: list[EventInfo] = field(default_factory=list)
    """Newest first."""
    seq: int = 0

    @property
    def at(self) -> datetime:
        return self.events[0].occurred_at

    def add(
        self, event: EventInfo, writes: list[FieldWrite], current: Mapping[str, CellValue]
    ) -> None:
        if not self.events:
            self.seq = writes[0].seq
        self.events.append(event)
        for w in writes:
            cell = self.cells.get(w.field)
            if cell is None:
                cell = self.cells[w.field] = _Cell(current[w.field], w.before, w)
            else:
                cell.desired, cell.oldest = w.before, w
            cell.writes.append(w)


def change(name: str, current: CellValue, restore: CellValue) -> FieldChange:
    """One cell's change in a plan step: from its current value back to ``restore``."""
    return FieldChange(
        field=name,
        current=None if isinstance(current, Absent) else current,
        current_present=current is not ABSENT,
        restore_to=None if isinstance(restore, Absent) else restore,
        restore_present=restore is not ABSENT,
    )


def restore_drafts(
    context: PlanContext, record: RecordHistory, walks: Mapping[str, CellWalk]
) -> list[Draft]:
    """Restore/delete/recreate steps, split at compensations (which run in between)."""
    by_event: dict[str, list[FieldWrite]] = {}
    for walk in walks.values():
        for w in walk.chain:
            by_event.setdefault(w.event_id, []).append(w)
    current = {c: record.state.value(c) for c in walks}
    current.setdefault(EXISTS, record.state.exists)
    segment = _Segment()
    out: list[Draft] = []
    for event_id in sorted(by_event, key=lambda e: by_event[e][0].seq, reverse=True):
        event, writes = context.in_scope[event_id], by_event[event_id]
        kind, why = context.klass(event)
        if kind is ActionClass.COMPENSATE:
            out += _flush(context, record, segment, current, walks)
            segment = _Segment()
            out.append(_compensate(event, why, record.state, writes, current))
            for w in writes:
                current[w.field] = w.before
            continue
        segment.add(event, writes, current)
    out += _flush(context, record, segment, current, walks)
    return out


def _compensate(
    event: EventInfo,
    why: str,
    state: RecordState,
    writes: list[FieldWrite],
    current: Mapping[str, CellValue],
) -> Draft:
    changes = [change(w.field, current[w.field], w.before) for w in writes]
    return Draft(
        Decision.COMPENSATE, [event], event.occurred_at, writes[0].seq, state, changes, why
    )


def _flush(
    context: PlanContext,
    record: RecordHistory,
    segment: _Segment,
    current: dict[str, CellValue],
    walks: Mapping[str, CellWalk],
) -> list[Draft]:
    if not segment.cells:
        return []
    state, cells = record.state, segment.cells
    was = bool(current[EXISTS])
    existence = cells.get(EXISTS)
    want = bool(existence.desired) if existence is not None else was
    out: list[Draft] = []
    if was and not want:
        out += _undo_create(context, record, segment, current, walks)
    elif want and not was:
        fields = {f: c for f, c in cells.items() if f != EXISTS and c.desired is not ABSENT}
        changes = [change(EXISTS, False, True)] + [
            change(f, ABSENT, c.desired) for f, c in sorted(fields.items())
        ]
        out.append(
            Draft(
                Decision.RECREATE,
                segment.events,
                segment.at,
                segment.seq,
                state,
                changes,
                "the scope deleted it: insert it again with its earlier fields",
            )
        )
    elif was:
        out += _restore(state, segment)
    # else: absent before and after the scope's writes; its fields do not matter.
    for name, cell in cells.items():
        current[name] = cell.desired
    if out and out[0].decision is Decision.DELETE:
        for name in current:
            current[name] = False if name == EXISTS else ABSENT
    return out


def _undo_create(
    context: PlanContext,
    record: RecordHistory,
    segment: _Segment,
    current: dict[str, CellValue],
    walks: Mapping[str, CellWalk],
) -> list[Draft]:
    """Delete a record the scope created, or keep it when someone else touched it since."""
    state = record.state
    # The record as it is now was created by the latest create in the chain.
    create = next(w for w in segment.cells[EXISTS].writes if w.before is False)
    barriers = [
        w
        for wk in walks.values()
        for w in (wk.stop, wk.blocker)
        if w is not None and w.seq > create.seq
    ]
    if not barriers:
        changes = [change(EXISTS, True, False)] + [
            change(f, v, ABSENT)
            for f, v in sorted(current.items())
            if f != EXISTS and v is not ABSENT
        ]
        return [
            Draft(
                Decision.DELETE,
                segment.events,
                segment.at,
                segment.seq,
                state,
                changes,
                "the scope created it and nobody else changed it since",
            )
        ]
    writer = context.writer(max(barriers, key=lambda w: w.seq))
    creator = [e for e in segment.events if e.event_id == create.event_id]
    kept = Draft(
        Decision.SUPERSEDED,
        creator,
        creator[0].occurred_at,
        None,
        state,
        [],
        f"created by the scope, but changed later by {writer.describe()}: kept",
        superseded_by=writer,
    )
    # Keep the record as the scope created it; the scope's later writes still go.
    segment.cells.pop(EXISTS)
    later: set[str] = set()
    for cell in segment.cells.values():
        newer = [w for w in cell.writes if w.seq > create.seq]
        later.update(w.event_id for w in newer)
        at_create = next((w for w in cell.writes if w.seq == create.seq), None)
        if at_create is not None:
            cell.desired = at_create.after
        elif newer:
            cell.desired = newer[-1].before
    segment.events = [e for e in segment.events if e.event_id in later]
    return [kept, *_restore(state, segment)]


def _restore(state: RecordState, segment: _Segment) -> list[Draft]:
    changed = {
        f: c for f, c in segment.cells.items() if f != EXISTS and not same(c.expected, c.desired)
    }
    if not changed or not segment.events:
        return []
    good = {
        f: c
        for f, c in changed.items()
        if c.desired is not ABSENT and c.expected is not ABSENT and c.oldest.before_known
    }
    bad = {f: c for f, c in changed.items() if f not in good}
    out = []
    if good:
        out.append(
            Draft(
                Decision.RESTORE,
                segment.events,
                segment.at,
                segment.seq,
                state,
                [change(f, c.expected, c.desired) for f, c in sorted(good.items())],
                "the scope's writes are the newest: restore the earlier value",
            )
        )
    if bad:
        out.append(
            Draft(
                Decision.MANUAL,
                segment.events,
                segment.at,
                segment.seq,
                state,
                [change(f, c.expected, c.desired) for f, c in sorted(bad.items())],
                "the value before the scope's write was not captured (or the "
                "field did not exist): restore it by hand",
            )
        )
    return out
