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
from datetime import datetime

from backout.projections.fold import EXISTS, EventInfo, FieldWrite, Projection, RecordHistory
from backout.rollback.ordering import Draft, assemble_plan, order_drafts
from backout.rollback.plan import ACTIONABLE, Decision, RollbackPlan
from backout.rollback.scope import RollbackScope, ScopeMatcher
from backout.rollback.segments import change, restore_drafts
from backout.rollback.walk import ActionClass, CellWalk, PlanContext
from backout.schemas.errors import PlanningError

__all__ = ["plan_rollback"]


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
    """Drafts every step of one plan; ``segments.py`` drafts the restores of a record."""

    def __init__(self, history: Projection, selected: list[EventInfo], now: datetime) -> None:
        self.context = PlanContext(history, selected, now)
        self.history, self.now, self.selected = history, now, selected
        self.in_scope = self.context.in_scope

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

    # --- one record -------------------------------------------------------------------------
    def _plan_record(self, record: RecordHistory, scoped: list[EventInfo]) -> list[Draft]:
        cells = record.cells()
        writers = {w.event_id for w in record.writes if w.journaled}
        demoted: dict[str, str] = {}
        compensations = [e for e in scoped if self.context.klass(e)[0] is ActionClass.COMPENSATE]
        while True:
            walks = {c: self.context.walk(ws, writers, demoted) for c, ws in cells.items()}
            newly = self._ineligible(compensations, walks, demoted, record)
            if not newly:
                break
            demoted.update(newly)
        drafts = restore_drafts(self.context, record, walks)
        reported = self._reports(record, walks, drafts)
        chained = {w.event_id for walk in walks.values() for w in walk.chain}
        for event in scoped:
            kind = self.context.klass(event)[0]
            if event.event_id in reported or event.event_id in chained:
                continue
            if kind is ActionClass.RESTORE and event.event_id not in demoted:
                continue  # its cells were restored, superseded or already undone
            drafts.append(self._event_draft(event, record, walks, demoted.get(event.event_id)))
        return drafts

    def _ineligible(
        self,
        compensations: list[EventInfo],
        walks: Mapping[str, CellWalk],
        demoted: Mapping[str, str],
        record: RecordHistory,
    ) -> dict[str, str]:
        """Compensations that would wipe someone else's later write, with the reason."""
        chains = {(c, w.seq) for c, wk in walks.items() for w in wk.chain}
        out: dict[str, str] = {}
        for event in compensations:
            if event.event_id in demoted or self.context.linked(event.event_id):
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

    # --- event-level steps and reports --------------------------------------------------------
    def _event_draft(
        self,
        event: EventInfo,
        record: RecordHistory | None,
        walks: Mapping[str, CellWalk] | None = None,
        demoted: str | None = None,
    ) -> Draft:
        state = record.state if record is not None else None
        writes = [w for w in record.writes if w.event_id == event.event_id] if record else []
        seq = writes[0].seq if writes else None
        changes = (
            [change(w.field, state.value(w.field), w.before) for w in writes]
            if state is not None
            else []
        )
        inverse = self.context.linked(event.event_id)
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
        kind, why = self.context.klass(event)
        if kind is ActionClass.COMPENSATE and demoted is None:
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
        self, record: RecordHistory, walks: Mapping[str, CellWalk], drafts: list[Draft]
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
            writer = self.context.writer(by_write[key])
            events = _events_of(writes, self.in_scope)
            names = ", ".join(sorted({_cell_name(w.field) for w in writes}))
            drafts.append(
                Draft(
                    Decision.SUPERSEDED,
                    events,
                    events[0].occurred_at,
                    None,
                    state,
                    [change(w.field, state.value(w.field), w.before) for w in _newest(writes)],
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
                    [change(w.field, state.value(w.field), w.before) for w in _newest(writes)],
                    f"already undone by event {inverse}",
                    undone_by=inverse,
                )
            )
        return covered


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
