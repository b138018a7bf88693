"""Journal rows: events as rows of the append-only ``journal`` table, and back. [adapter]

``journal_row`` turns an event read from the topic into a row (with the bytes it was
read as); ``InfoDecoder`` turns the columns planning reads back into
:class:`~backout.projections.values.EventInfo` (never the payload).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backout.projections import tables as t
from backout.projections.cells import dump_json, from_us, to_us
from backout.projections.values import EventInfo, changes_record, undone_ids
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    EventKind,
    Origin,
    Reversibility,
)

__all__ = [
    "ENUM_TEXT",
    "INFO_COLUMNS",
    "JOURNAL_COLUMNS",
    "InfoDecoder",
    "Positioned",
    "journal_row",
]


@dataclass(frozen=True, slots=True)
class Positioned:
    """An event with the bytes and the topic position it was read from."""

    event: ActionEvent
    raw: bytes
    topic: str
    partition: int
    offset: int


JOURNAL_COLUMNS = (
    "event_id",
    "kind",
    "occurred_us",
    "run_id",
    "parent_run_id",
    "agent_id",
    "identity",
    "tenant",
    "environment",
    "workflow",
    "step_id",
    "parent_step_id",
    "tool",
    "system",
    "object_id",
    "record_key",
    "reversibility",
    "status",
    "origin",
    "compensates",
    "undoes",
    "compensation",
    "labels",
    "job_id",
    "has_after",
    "changes_record",
    "topic",
    "partition",
    "offset",
    "payload",
)
_PLAIN_COMPENSATION = {
    s: dump_json({"strategy": s, "tool": None, "args": {}, "allowed_until": None})
    for s in ("restore_fields", "manual")
}


def _compensation_json(comp: Compensation | None) -> str | None:
    if comp is None:
        return None
    if comp.tool is None and not comp.args and comp.allowed_until is None:
        plain = _PLAIN_COMPENSATION.get(comp.strategy)
        if plain is not None:
            return plain
    until = to_us(comp.allowed_until) if comp.allowed_until else None
    return dump_json(
        {"strategy": comp.strategy, "tool": comp.tool, "args": comp.args, "allowed_until": until}
    )


ENUM_TEXT: dict[object, str] = {
    member: member.value
    for enum in (EventKind, Reversibility, CallStatus, Origin)
    for member in enum
}
"""Enum members to their stored text (a dict lookup is cheaper than ``.value``)."""


def journal_row(item: Positioned) -> tuple[Any, ...]:
    """One journal row, in ``JOURNAL_COLUMNS`` order."""
    e = item.event
    target, labels, compensates = e.target, e.labels, e.compensates
    undoes = undone_ids(compensates, labels) if compensates else ()
    system: str | None = None
    object_id: str | None = None
    key: str | None = None
    if target is not None:
        system, object_id = target.system, target.object_id
        key = f"{system}/{object_id}"
    return (
        e.event_id,
        ENUM_TEXT[e.kind],
        to_us(e.occurred_at),
        e.run_id,
        e.parent_run_id,
        e.agent_id,
        e.identity,
        e.tenant,
        e.environment,
        e.workflow,
        e.step_id,
        e.parent_step_id,
        e.tool,
        system,
        object_id,
        key,
        ENUM_TEXT[e.reversibility],
        ENUM_TEXT[e.status],
        ENUM_TEXT[e.origin],
        compensates,
        " ".join(undoes) if undoes else None,
        _compensation_json(e.compensation),
        dump_json(dict(labels)) if labels else None,
        e.job_id,
        e.after is not None,
        changes_record(e),
        item.topic,
        item.partition,
        item.offset,
        item.raw,
    )


_INFO_NAMES = (
    "event_id",
    "kind",
    "occurred_us",
    "run_id",
    "agent_id",
    "identity",
    "tool",
    "reversibility",
    "status",
    "origin",
    "parent_run_id",
    "tenant",
    "workflow",
    "step_id",
    "parent_step_id",
    "system",
    "object_id",
    "compensation",
    "compensates",
    "undoes",
    "job_id",
    "has_after",
    "changes_record",
    "labels",
)
INFO_COLUMNS = tuple(t.journal.c[name] for name in _INFO_NAMES)
"""Journal columns planning reads (never the payload), in ``InfoDecoder`` order."""


class InfoDecoder:
    """Journal rows to EventInfo, sharing the objects many rows have in common."""

    def __init__(self) -> None:
        self.compensations: dict[str, Compensation] = {}
        self.kinds = {k.value: k for k in EventKind}
        self.reversibility = {r.value: r for r in Reversibility}
        self.statuses = {s.value: s for s in CallStatus}
        self.origins = {o.value: o for o in Origin}

    def compensation(self, text: str | None) -> Compensation | None:
        if not text:
            return None
        found = self.compensations.get(text)
        if found is None:
            data = json.loads(text)
            until = data.get("allowed_until")
            found = self.compensations[text] = Compensation.model_construct(
                strategy=data["strategy"],
                tool=data.get("tool"),
                args=data.get("args") or {},
                allowed_until=from_us(until) if until is not None else None,
            )
        return found

    def __call__(self, row: Any) -> EventInfo:
        (
            event_id,
            kind,
            occurred_us,
            run_id,
            agent_id,
            identity,
            tool,
            reversibility,
            status,
            origin,
            parent_run_id,
            tenant,
            workflow,
            step_id,
            parent_step_id,
            system,
            object_id,
            compensation,
            compensates,
            undoes,
            job_id,
            has_after,
            changes,
            labels,
        ) = row
        return EventInfo(
            event_id,
            self.kinds[kind],
            from_us(occurred_us),
            run_id,
            agent_id,
            identity,
            tool,
            self.reversibility[reversibility],
            self.statuses[status],
            self.origins[origin],
            parent_run_id,
            tenant,
            workflow,
            step_id,
            parent_step_id,
            system,
            object_id,
            self.compensation(compensation),
            compensates,
            tuple(undoes.split()) if undoes else (),
            job_id,
            bool(has_after),
            bool(changes),
            json.loads(labels) if labels else {},
        )
