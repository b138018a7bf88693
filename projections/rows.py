"""Rows of the projection's view tables <-> the fold's values. [adapter]

Rows are built as tuples in the column orders below, for executemany; cell values go
through :mod:`backout.projections.cells` (times as integer microseconds, JSON as
canonical text). Journal rows live in :mod:`backout.projections.journal_rows`; their
names are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from backout.projections import tables as t
from backout.projections.cells import cell_in, dump_json, from_us, load_json, to_us
from backout.projections.fold import (
    ABSENT,
    Absent,
    Checkpoint,
    CompensationLink,
    FieldWrite,
    RecordHistory,
    RecordState,
    RunState,
    RunStatus,
    StepState,
    Task,
)
from backout.projections.journal_rows import (
    ENUM_TEXT,
    INFO_COLUMNS,
    JOURNAL_COLUMNS,
    InfoDecoder,
    Positioned,
    journal_row,
)
from backout.schemas.events import Origin

__all__ = [
    "INFO_COLUMNS",
    "JOURNAL_COLUMNS",
    "STATE_COLUMNS",
    "WRITE_COLUMNS",
    "WRITE_SELECT",
    "InfoDecoder",
    "Positioned",
    "cell_in",
    "dump_json",
    "from_us",
    "histories",
    "journal_row",
    "link_from_row",
    "link_row",
    "load_json",
    "run_from_row",
    "run_row",
    "state_from_row",
    "state_row",
    "step_from_row",
    "step_row",
    "task_from_row",
    "task_row",
    "to_us",
    "write_from_row",
    "write_row",
]


WRITE_COLUMNS = (
    "record_key",
    "seq",
    "field",
    "event_id",
    "run_id",
    "origin",
    "occurred_us",
    "before",
    "before_present",
    "after",
    "after_present",
    "journaled",
    "before_known",
)


def write_row(key: str, w: FieldWrite) -> tuple[Any, ...]:
    """One field_writes row, in ``WRITE_COLUMNS`` order."""
    before, after, origin = w.before, w.after, w.origin
    return (
        key,
        w.seq,
        w.field,
        w.event_id,
        w.run_id,
        ENUM_TEXT[origin] if origin is not None else None,
        to_us(w.occurred_at),
        None if isinstance(before, Absent) else dump_json(before),
        before is not ABSENT,
        None if isinstance(after, Absent) else dump_json(after),
        after is not ABSENT,
        w.journaled,
        w.before_known,
    )


WRITE_SELECT = tuple(t.field_writes.c[name] for name in WRITE_COLUMNS)


def write_from_row(row: Any) -> FieldWrite:
    """A FieldWrite from a row of ``WRITE_SELECT``."""
    (
        _,
        seq,
        name,
        event_id,
        run_id,
        origin,
        occurred_us,
        before,
        before_present,
        after,
        after_present,
        journaled,
        before_known,
    ) = row
    return FieldWrite(
        name,
        seq,
        event_id,
        run_id,
        _ORIGINS[origin] if origin else None,
        from_us(occurred_us),
        cell_in(before, before_present),
        cell_in(after, after_present),
        bool(journaled),
        bool(before_known),
    )


_ORIGINS = {o.value: o for o in Origin}


STATE_COLUMNS = (
    "record_key",
    "system",
    "object_id",
    "exists",
    "known",
    "fields",
    "version",
    "seq",
    "last_event_id",
    "updated_us",
    "opaque",
)


def state_row(state: RecordState, opaque: str) -> tuple[Any, ...]:
    """One record_state row, in ``STATE_COLUMNS`` order."""
    return (
        f"{state.system}/{state.object_id}",
        state.system,
        state.object_id,
        state.exists,
        state.known,
        dump_json(dict(state.fields)),
        dump_json(state.version),
        state.seq,
        state.last_event_id,
        to_us(state.updated_at) if state.updated_at else None,
        opaque,
    )


def state_from_row(row: Any) -> RecordState:
    return RecordState(
        row.system,
        row.object_id,
        bool(row.exists),
        bool(row.known),
        json.loads(row.fields),
        json.loads(row.version) if row.version else None,
        row.seq,
        row.last_event_id,
        from_us(row.updated_us) if row.updated_us is not None else None,
    )


def histories(state_rows: Iterable[Any], write_rows: Iterable[Any]) -> dict[str, RecordHistory]:
    writes: dict[str, list[FieldWrite]] = {}
    for row in write_rows:
        writes.setdefault(row[0], []).append(write_from_row(row))
    out = {}
    for row in state_rows:
        out[row.record_key] = RecordHistory(
            state_from_row(row),
            tuple(writes.get(row.record_key, ())),
            tuple((row.opaque or "").split()),
        )
    return out


def run_row(run: RunState) -> dict[str, Any]:
    def us(moment: datetime | None) -> int | None:
        return to_us(moment) if moment is not None else None

    return {
        "run_id": run.run_id,
        "parent_run_id": run.parent_run_id,
        "agent_id": run.agent_id,
        "identity": run.identity,
        "tenant": run.tenant,
        "workflow": run.workflow,
        "environment": run.environment,
        "status": run.status.value,
        "started_us": us(run.started_at),
        "finished_us": us(run.finished_at),
        "last_event_us": us(run.last_event_at),
        "calls": run.calls,
        "writes": run.writes,
    }


def run_from_row(row: Any, points: tuple[Checkpoint, ...]) -> RunState:
    def at(value: int | None) -> datetime | None:
        return from_us(value) if value is not None else None

    return RunState(
        row.run_id,
        row.agent_id,
        row.identity,
        row.parent_run_id,
        row.tenant,
        row.workflow,
        row.environment,
        RunStatus(row.status),
        at(row.started_us),
        at(row.finished_us),
        at(row.last_event_us),
        row.calls,
        row.writes,
        points,
    )


def link_row(link: CompensationLink) -> dict[str, Any]:
    return {
        "undone_event_id": link.undone_event_id,
        "inverse_event_id": link.inverse_event_id,
        "origin": link.origin.value,
        "occurred_us": to_us(link.occurred_at),
        "plan_id": link.plan_id,
        "step_id": link.step_id,
    }


def link_from_row(row: Any) -> CompensationLink:
    return CompensationLink(
        row.undone_event_id,
        row.inverse_event_id,
        Origin(row.origin),
        from_us(row.occurred_us),
        row.plan_id,
        row.step_id,
    )


def step_row(step: StepState) -> dict[str, Any]:
    return {
        "step_id": step.step_id,
        "plan_id": step.plan_id,
        "status": step.status,
        "outcome": step.outcome,
        "record_key": step.record_key,
        "started_us": to_us(step.started_at) if step.started_at else None,
        "finished_us": to_us(step.finished_at) if step.finished_at else None,
        "detail": step.detail,
    }


def step_from_row(row: Any) -> StepState:
    return StepState(
        row.step_id,
        row.plan_id,
        row.status,
        row.outcome,
        row.record_key,
        from_us(row.started_us) if row.started_us is not None else None,
        from_us(row.finished_us) if row.finished_us is not None else None,
        row.detail or "",
    )


def task_row(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "plan_id": task.plan_id,
        "status": task.status,
        "event_id": task.event_id,
        "system": task.system,
        "object_id": task.object_id,
        "run_id": task.run_id,
        "tool": task.tool,
        "reason": task.reason,
        "created_us": to_us(task.created_at),
        "closed_us": to_us(task.closed_at) if task.closed_at else None,
        "freeze": task.freeze,
    }


def task_from_row(row: Any) -> Task:
    return Task(
        row.task_id,
        row.plan_id,
        row.status,
        row.event_id,
        row.system,
        row.object_id,
        row.run_id,
        row.tool,
        row.reason,
        from_us(row.created_us),
        from_us(row.closed_us) if row.closed_us is not None else None,
        row.freeze or "",
    )
