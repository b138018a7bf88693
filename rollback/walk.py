"""What planning reads, how each action in scope is undone, and the walk of a cell. Pure.

A cell is one field of a record, or the record's existence. Its walk goes through the
cell's writes newest first: the scope's writes are undone while they are the newest
(``chain``); the first write by anyone else ends the chain (``stop``), and so does an
action of the scope that needs a person (``blocker``). Older writes of the scope after
that are ``superseded`` (by the nearest newer write out of scope) or ``blocked`` (behind
the blocker). Writes an earlier rollback already undid are ``undone``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from backout.projections.fold import EventInfo, FieldWrite, Projection
from backout.rollback.plan import Writer
from backout.schemas.events import CallStatus, Reversibility


class ActionClass(Enum):
    """How an action in scope is undone."""

    RESTORE = "restore"
    COMPENSATE = "compensate"
    MANUAL = "manual"


@dataclass(slots=True)
class CellWalk:
    """One cell's walk, newest write first."""

    chain: list[FieldWrite] = field(default_factory=list)
    stop: FieldWrite | None = None
    blocker: FieldWrite | None = None
    superseded: list[tuple[FieldWrite, FieldWrite]] = field(default_factory=list)
    blocked: list[FieldWrite] = field(default_factory=list)
    undone: list[tuple[FieldWrite, str]] = field(default_factory=list)


class PlanContext:
    """The projection, the events in scope, and how each of them is undone.

    Args:
        history: the projection.
        selected: the events in scope, in log order.
        now: judges compensation windows.
    """

    def __init__(self, history: Projection, selected: list[EventInfo], now: datetime) -> None:
        self.history = history
        self.now = now
        self.selected = selected
        self.in_scope = {e.event_id: e for e in selected}
        self._classes = {e.event_id: classify(e, now) for e in selected}
        self.kinds = {event_id: found[0] for event_id, found in self._classes.items()}

    def klass(self, event: EventInfo) -> tuple[ActionClass, str]:
        """How an in-scope event is undone, and why."""
        return self._classes[event.event_id]

    def linked(self, event_id: str) -> str | None:
        """The inverse event that already undid ``event_id``, if any."""
        links = self.history.links.get(event_id)
        return links[0].inverse_event_id if links else None

    def writer(self, write: FieldWrite) -> Writer:
        """Who made ``write``, as a plan reports it."""
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

    def walk(
        self, writes: list[FieldWrite], writers: set[str], demoted: Mapping[str, str]
    ) -> CellWalk:
        """Walk one cell's ``writes`` (oldest first) newest first.

        Args:
            writes: the cell's writes, oldest first.
            writers: the journaled events that wrote the record (any cell).
            demoted: compensations of the scope that must be done by a person instead.
        """
        events, in_scope, kinds = self.history.events, self.in_scope, self.kinds
        transparent: set[int] = set()
        inverse_here: dict[str, str] = {}
        for i, w in enumerate(writes):
            info = events.get(w.event_id) if w.journaled else None
            if info is not None and info.undoes and any(u in in_scope for u in info.undoes):
                transparent.add(i)
                for undone in info.undoes:
                    inverse_here.setdefault(undone, w.event_id)
        walk, ended, nearest_out = CellWalk(), False, None
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
            manual = kinds[w.event_id] is ActionClass.MANUAL or w.event_id in demoted
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


def classify(event: EventInfo, now: datetime) -> tuple[ActionClass, str]:
    """How ``event`` is undone at ``now``, and why (empty for a plain restore)."""
    comp = event.compensation
    irreversible = event.reversibility is Reversibility.IRREVERSIBLE or (
        comp is not None and comp.strategy == "manual"
    )
    if irreversible and event.status is CallStatus.SUCCEEDED:
        # Known to have happened and nothing can undo it: no image is needed to say so.
        return ActionClass.MANUAL, f"{event.tool!r} is irreversible: undo it by hand"
    if event.changes_record and not event.has_after:
        if event.status is CallStatus.PENDING:
            return ActionClass.MANUAL, (
                f"pending job {event.job_id}: what it will change is not "
                "known yet; check it by hand"
            )
        return ActionClass.MANUAL, "in doubt: the call's outcome is unknown (no after-image)"
    if event.record_key is None and event.status is CallStatus.UNKNOWN:
        return ActionClass.MANUAL, "in doubt: the call's outcome is unknown"
    if comp is not None and comp.strategy == "compensating_tool" and comp.tool:
        until = comp.allowed_until
        if until is not None and now > until:
            return ActionClass.MANUAL, (
                f"compensation window of {comp.tool!r} expired at "
                f"{until.isoformat(timespec='seconds')}"
            )
        limit = f" (allowed until {until.isoformat(timespec='seconds')})" if until else ""
        return ActionClass.COMPENSATE, f"run compensating tool {comp.tool!r}{limit}"
    if irreversible:
        return ActionClass.MANUAL, f"{event.tool!r} is irreversible: undo it by hand"
    if event.reversibility is Reversibility.COMPENSATABLE:
        return ActionClass.MANUAL, (
            f"{event.tool!r} is compensatable but declares no compensating tool"
        )
    if event.record_key is None:
        return ActionClass.MANUAL, f"{event.tool!r} has no target record to restore"
    return ActionClass.RESTORE, ""
