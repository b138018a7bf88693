"""Rollback planning: which writes to undo, how, and in what order. Pure: no I/O.

Surgical semantics (``shared/design.md``). Per record and per cell (each field, plus the
record's existence) walk the writes newest first; undo them while they are the scope's,
and stop at the first write by anyone else:

- cells whose newest writes are the scope's go back to their value before those writes
  (``restore``); a record the scope created is deleted and one it deleted is recreated,
  unless someone else touched it afterwards (then it is kept and reported);
- the scope's writes that someone else overwrote later are reported ``superseded``, with
  who and when (unjournaled writers, seen in later before-images, count as someone else);
- compensatable actions run their compensating tool while ``allowed_until`` holds; a
  compensation that would wipe someone else's later write is not run automatically;
  irreversible, expired and in-doubt actions are ``manual`` and stop the walk of the
  cells they wrote, since nothing older can be restored until a person acts;
- inverse writes of an earlier rollback (``compensates``) cancel what they undid, so a
  second plan of the same scope reports ``already_undone`` and writes nothing.

Steps come in reverse causal order: newest first, with every step before the steps it
depended on (same record: newer writes first; across records: an action before its
causal parent step's), and the plan id and step ids are derived from the inputs.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from backout.projections.fold import (
    ABSENT,
    EXISTS,
    Absent,
    CellValue,
    EventInfo,
    FieldWrite,
    Projection,
    RecordHistory,
    RecordState,
    same,
)
from backout.rollback.ordering import Draft, assemble_plan, order_drafts
from backout.rollback.plan import (
    ACTIONABLE,
    Decision,
    FieldChange,
    RollbackPlan,
    Writer,
)
from backout.rollback.scope import RollbackScope, ScopeMatcher
from backout.schemas.errors import PlanningError
from backout.schemas.events import CallStatus, Reversibility

__all__ = ["plan_rollback"]


class _Klass(Enum):
    RESTORE = "restore"
    COMPENSATE = "compensate"
    MANUAL = "manual"


@dataclass(slots=True)
class _Walk:
    """One cell's walk, newest write first."""

    chain: list[FieldWrite] = field(default_factory=list)
    stop: FieldWrite | None = None
    blocker: FieldWrite | None = None
    superseded: list[tuple[FieldWrite, FieldWrite]] = field(default_factory=list)
    blocked: list[FieldWrite] = field(default_factory=list)
    undone: list[tuple[FieldWrite, str]] = field(default_factory=list)


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


def plan_rollback(history: Projection, scope: RollbackScope, *, now: datetime) -> RollbackPlan:
    """Plan the rollback of ``scope`` from what the log says.

    Args:
        history: the projection (or the part of it around the scope).
        scope: what to roll back.
        now: judges compensation windows; recorded as the plan's ``created_at``.

    Raises:
        PlanningError: an empty scope, an unknown run or checkpoint, no calls in scope, or
            a scope whose records are missing from the projection.
    """
    matcher = ScopeMatcher.resolve(scope, history)
    selected = matcher.select(history)
    if not selected:
        raise PlanningError(f"no journaled tool calls match {scope.describe()}")
    with _paused_gc():
        return _Planner(history, selected, now).plan(scope)


@contextmanager
def _paused_gc() -> Iterator[None]:
    """Planning allocates many small objects next to a large history; Python's cyclic
    collector would re-scan that history again and again for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Planner:
    def __init__(self, history: Projection, selected: list[EventInfo], now: datetime) -> None:
        self.history = history
        self.now = now
        self.selected = selected
        self.in_scope = {e.event_id: e for e in selected}
        self._klass = {e.event_id: _classify(e, now) for e in selected}
        self.kinds = {event_id: found[0] for event_id, found in self._klass.items()}

    # --- the whole plan ---------------------------------------------------------------------
    def plan(self, scope: RollbackScope) -> RollbackPlan:
        by_record: dict[str, list[EventInfo]] = {}
        loose: list[EventInfo] = []
        for event in self.selected:
            key = event.record_key
            if event.changes_record and key is not None:
                by_record.setdefault(key, []).append(event)
            elif key is None and event.is_write:
                loose.append(event)
        drafts: list[Draft] = []
        for key in sorted(by_record):
            record = self.history.records.get(key)
            if record is None:
                raise PlanningError(
                    f"record {key!r} (event {by_record[key][0].event_id}) is not in the "
                    "projection: rebuild it with `backout project --rebuild`"
                )
            drafts += self._plan_record(record, by_record[key])
        drafts += [self._event_draft(e, None) for e in loose]
        ordered, notes = order_drafts(drafts, self.history.events)
        writes = sum(len(v) for v in by_record.values()) + len(loose)
        if not any(d.decision in ACTIONABLE for d in ordered):
            notes.append(
                "nothing to roll back: every write in scope is superseded, already "
                "undone, or changed nothing"
            )
        return assemble_plan(scope, self.now, self.selected, writes, len(by_record), ordered, notes)

    # --- classes of actions -----------------------------------------------------------------
    def klass(self, event: EventInfo) -> tuple[_Klass, str]:
        """How an in-scope event is undone, and why."""
        return self._klass[event.event_id]

    def linked(self, event_id: str) -> str | None:
        links = self.history.links.get(event_id)
        return links[0].inverse_event_id if links else None

    # --- one record -------------------------------------------------------------------------
    def _plan_record(self, record: RecordHistory, scoped: list[EventInfo]) -> list[Draft]:
        cells = record.cells()
        writers = {w.event_id for w in record.writes if w.journaled}
        demoted: dict[str, str] = {}
        compensations = [e for e in scoped if self.klass(e)[0] is _Klass.COMPENSATE]
        while True:
            walks = {c: self._walk(ws, writers, demoted) for c, ws in cells.items()}
            newly = self._ineligible(compensations, walks, demoted, record)
            if not newly:
                break
            demoted.update(newly)
        drafts = self._segments(record, walks)
        reported = self._reports(record, walks, drafts)
        chained = {w.event_id for walk in walks.values() for w in walk.chain}
        for event in scoped:
            kind = self.klass(event)[0]
            if event.event_id in reported or event.event_id in chained:
                continue
            if kind is _Klass.RESTORE and event.event_id not in demoted:
                continue  # its cells were restored, superseded or already undone
            drafts.append(self._event_draft(event, record, walks, demoted.get(event.event_id)))
        return drafts

    def _walk(
        self, writes: list[FieldWrite], writers: set[str], demoted: Mapping[str, str]
    ) -> _Walk:
        events, in_scope, kinds = self.history.events, self.in_scope, self.kinds
        transparent: set[int] = set()
        inverse_here: dict[str, str] = {}
        for i, w in enumerate(writes):
            info = events.get(w.event_id) if w.journaled else None
            if info is not None and info.undoes and any(u in in_scope for u in info.undoes):
                transparent.add(i)
                for undone in info.undoes:
                    inverse_here.setdefault(undone, w.event_id)
        walk, ended, nearest_out = _Walk(), False, None
        for i in range(len(writes) - 1, -1, -1):
            w = writes[i]
            if i in transparent:
                continue
            if not (w.journaled and w.event_id in in_scope):
                if not ended:
                    walk.stop, ended = w, True
                nearest_out = w
                continue
            undone_by = inverse_here.get(w.event_id) or self._undone_elsewhere(w.event_id, writers)
            if undone_by is not None:
                walk.undone.append((w, undone_by))
                continue
            manual = kinds[w.event_id] is _Klass.MANUAL or w.event_id in demoted
            if not ended:
                if manual:
                    walk.blocker, ended = w, True
                else:
                    walk.chain.append(w)
            elif not manual:
                if nearest_out is not None:
                    walk.superseded.append((w, nearest_out))
                else:
                    walk.blocked.append(w)
        return walk

    def _undone_elsewhere(self, event_id: str, writers: set[str]) -> str | None:
        """An inverse that undid the event without writing this record (tool or closed task)."""
        links = self.history.links.get(event_id)
        if not links or any(link.inverse_event_id in writers for link in links):
            return None
        return links[0].inverse_event_id

    def _ineligible(
        self,
        compensations: list[EventInfo],
        walks: Mapping[str, _Walk],
        demoted: Mapping[str, str],
        record: RecordHistory,
    ) -> dict[str, str]:
        """Compensations that would wipe someone else's later write, with the reason."""
        chains = {(c, w.seq) for c, wk in walks.items() for w in wk.chain}
        out: dict[str, str] = {}
        for event in compensations:
            if event.event_id in demoted or self.linked(event.event_id):
                continue
            for w in record.writes:
                if w.event_id == event.event_id and (w.field, w.seq) not in chains:
                    name = "the record" if w.field == EXISTS else f"field {w.field!r}"
                    out[event.event_id] = (
                        f"not compensated automatically: {name} was changed after it by "
                        "someone out of scope (or by an action that needs a person)"
                    )
                    break
        return out

    # --- restore segments -------------------------------------------------------------------
    def _segments(self, record: RecordHistory, walks: Mapping[str, _Walk]) -> list[Draft]:
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
            event, writes = self.in_scope[event_id], by_event[event_id]
            if self.klass(event)[0] is _Klass.COMPENSATE:
                out += self._flush(record, segment, current, walks)
                segment = _Segment()
                out.append(self._compensate(event, record.state, writes, current))
                for w in writes:
                    current[w.field] = w.before
                continue
            segment.add(event, writes, current)
        out += self._flush(record, segment, current, walks)
        return out

    def _compensate(
        self,
        event: EventInfo,
        state: RecordState,
        writes: list[FieldWrite],
        current: Mapping[str, CellValue],
    ) -> Draft:
        changes = [_change(w.field, current[w.field], w.before) for w in writes]
        _, why = self.klass(event)
        return Draft(
            Decision.COMPENSATE, [event], event.occurred_at, writes[0].seq, state, changes, why
        )

    def _flush(
        self,
        record: RecordHistory,
        segment: _Segment,
        current: dict[str, CellValue],
        walks: Mapping[str, _Walk],
    ) -> list[Draft]:
        if not segment.cells:
            return []
        state, cells = record.state, segment.cells
        was = bool(current[EXISTS])
        existence = cells.get(EXISTS)
        want = bool(existence.desired) if existence is not None else was
        out: list[Draft] = []
        if was and not want:
            out += self._undo_create(record, segment, current, walks)
        elif want and not was:
            fields = {f: c for f, c in cells.items() if f != EXISTS and c.desired is not ABSENT}
            changes = [_change(EXISTS, False, True)] + [
                _change(f, ABSENT, c.desired) for f, c in sorted(fields.items())
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
            out += self._restore(state, segment)
        # else: absent before and after the scope's writes; its fields do not matter.
        for name, cell in cells.items():
            current[name] = cell.desired
        if out and out[0].decision is Decision.DELETE:
            for name in current:
                current[name] = False if name == EXISTS else ABSENT
        return out

    def _undo_create(
        self,
        record: RecordHistory,
        segment: _Segment,
        current: dict[str, CellValue],
        walks: Mapping[str, _Walk],
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
            changes = [_change(EXISTS, True, False)] + [
                _change(f, v, ABSENT)
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
        writer = self._writer(max(barriers, key=lambda w: w.seq))
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
        return [kept, *self._restore(state, segment)]

    def _restore(self, state: RecordState, segment: _Segment) -> list[Draft]:
        changed = {
            f: c
            for f, c in segment.cells.items()
            if f != EXISTS and not same(c.expected, c.desired)
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
                    [_change(f, c.expected, c.desired) for f, c in sorted(good.items())],
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
                    [_change(f, c.expected, c.desired) for f, c in sorted(bad.items())],
                    "the value before the scope's write was not captured (or the "
                    "field did not exist): restore it by hand",
                )
            )
        return out

    # --- event-level steps and reports --------------------------------------------------------
    def _event_draft(
        self,
        event: EventInfo,
        record: RecordHistory | None,
        walks: Mapping[str, _Walk] | None = None,
        demoted: str | None = None,
    ) -> Draft:
        state = record.state if record is not None else None
        writes = [w for w in record.writes if w.event_id == event.event_id] if record else []
        seq = writes[0].seq if writes else None
        changes = (
            [_change(w.field, state.value(w.field), w.before) for w in writes]
            if state is not None
            else []
        )
        inverse = self.linked(event.event_id)
        if inverse is not None:
            return Draft(
                Decision.ALREADY_UNDONE,
                [event],
                event.occurred_at,
                seq,
                state,
                changes,
                f"already undone by event {inverse}",
                undone_by=inverse,
            )
        kind, why = self.klass(event)
        if kind is _Klass.COMPENSATE and demoted is None:
            return Draft(Decision.COMPENSATE, [event], event.occurred_at, seq, state, changes, why)
        blocked = sorted(
            {
                w.event_id
                for wk in (walks or {}).values()
                for w in wk.blocked
                if wk.blocker is not None and wk.blocker.event_id == event.event_id
            }
        )
        reason = demoted or why
        if blocked:
            reason += f"; {len(blocked)} older write(s) of the scope wait behind it"
        return Draft(
            Decision.MANUAL,
            [event],
            event.occurred_at,
            seq,
            state,
            changes,
            reason,
            blocked=blocked,
        )

    def _reports(
        self, record: RecordHistory, walks: Mapping[str, _Walk], drafts: list[Draft]
    ) -> set[str]:
        """Add superseded and already-undone reports; return the event ids they cover."""
        state, covered = record.state, set[str]()
        superseded: dict[tuple[int, str], list[FieldWrite]] = {}
        by_write: dict[tuple[int, str], FieldWrite] = {}
        undone: dict[str, list[FieldWrite]] = {}
        for walk in walks.values():
            for w, by in walk.superseded:
                superseded.setdefault((by.seq, by.event_id), []).append(w)
                by_write[(by.seq, by.event_id)] = by
            for w, inverse in walk.undone:
                undone.setdefault(inverse, []).append(w)
        for key, writes in sorted(superseded.items()):
            writer = self._writer(by_write[key])
            events = _events_of(writes, self.in_scope)
            names = ", ".join(sorted({_cell_name(w.field) for w in writes}))
            drafts.append(
                Draft(
                    Decision.SUPERSEDED,
                    events,
                    events[0].occurred_at,
                    None,
                    state,
                    [_change(w.field, state.value(w.field), w.before) for w in _newest(writes)],
                    f"{names} overwritten later by {writer.describe()}: kept",
                    superseded_by=writer,
                )
            )
        for inverse, writes in sorted(undone.items()):
            events = _events_of(writes, self.in_scope)
            covered.update(e.event_id for e in events)
            drafts.append(
                Draft(
                    Decision.ALREADY_UNDONE,
                    events,
                    events[0].occurred_at,
                    None,
                    state,
                    [_change(w.field, state.value(w.field), w.before) for w in _newest(writes)],
                    f"already undone by event {inverse}",
                    undone_by=inverse,
                )
            )
        return covered

    def _writer(self, write: FieldWrite) -> Writer:
        info = self.history.events.get(write.event_id) if write.journaled else None
        if info is None:
            return Writer(event_id=write.event_id, at=write.occurred_at, journaled=False)
        return Writer(
            event_id=info.event_id,
            at=info.occurred_at,
            run_id=info.run_id,
            agent_id=info.agent_id,
            identity=info.identity,
            origin=info.origin.value,
        )


# --- helpers -----------------------------------------------------------------------------------
def _classify(event: EventInfo, now: datetime) -> tuple[_Klass, str]:
    comp = event.compensation
    irreversible = event.reversibility is Reversibility.IRREVERSIBLE or (
        comp is not None and comp.strategy == "manual"
    )
    if irreversible and event.status is CallStatus.SUCCEEDED:
        # Known to have happened and nothing can undo it: no image is needed to say so.
        return _Klass.MANUAL, f"{event.tool!r} is irreversible: undo it by hand"
    if event.changes_record and not event.has_after:
        if event.status is CallStatus.PENDING:
            return _Klass.MANUAL, (
                f"pending job {event.job_id}: what it will change is not "
                "known yet; check it by hand"
            )
        return _Klass.MANUAL, "in doubt: the call's outcome is unknown (no after-image)"
    if event.record_key is None and event.status is CallStatus.UNKNOWN:
        return _Klass.MANUAL, "in doubt: the call's outcome is unknown"
    if comp is not None and comp.strategy == "compensating_tool" and comp.tool:
        until = comp.allowed_until
        if until is not None and now > until:
            return _Klass.MANUAL, (
                f"compensation window of {comp.tool!r} expired at "
                f"{until.isoformat(timespec='seconds')}"
            )
        limit = f" (allowed until {until.isoformat(timespec='seconds')})" if until else ""
        return _Klass.COMPENSATE, f"run compensating tool {comp.tool!r}{limit}"
    if irreversible:
        return _Klass.MANUAL, f"{event.tool!r} is irreversible: undo it by hand"
    if event.reversibility is Reversibility.COMPENSATABLE:
        return _Klass.MANUAL, f"{event.tool!r} is compensatable but declares no compensating tool"
    if event.record_key is None:
        return _Klass.MANUAL, f"{event.tool!r} has no target record to restore"
    return _Klass.RESTORE, ""


def _change(name: str, current: CellValue, restore: CellValue) -> FieldChange:
    return FieldChange(
        field=name,
        current=None if isinstance(current, Absent) else current,
        current_present=current is not ABSENT,
        restore_to=None if isinstance(restore, Absent) else restore,
        restore_present=restore is not ABSENT,
    )


def _cell_name(name: str) -> str:
    return "the record" if name == EXISTS else repr(name)


def _newest(writes: list[FieldWrite]) -> list[FieldWrite]:
    """One write per cell (the newest), in cell order."""
    by_cell: dict[str, FieldWrite] = {}
    for w in writes:
        if w.field not in by_cell or w.seq > by_cell[w.field].seq:
            by_cell[w.field] = w
    return [by_cell[c] for c in sorted(by_cell)]


def _events_of(writes: Iterable[FieldWrite], in_scope: Mapping[str, EventInfo]) -> list[EventInfo]:
    seen = {w.event_id: in_scope[w.event_id] for w in sorted(writes, key=lambda w: -w.seq)}
    return list(seen.values())
