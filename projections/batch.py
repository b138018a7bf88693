"""One batch of events folded into rows of the projection tables. [adapter]

:class:`BatchWriter` runs the pure steps of ``projections.fold`` over the rows a batch
touches and writes the result; ``SqlProjectionStore.apply`` runs it inside the
transaction that also stores the topic positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, select

from backout.projections import tables as t
from backout.projections.fold import (
    LABEL_STEP,
    RecordState,
    advance_record,
    advance_step,
    advance_task,
    changes_record,
    checkpoint_of,
    fold_run,
    links_of,
    task_key,
)
from backout.projections.rows import (
    JOURNAL_COLUMNS,
    STATE_COLUMNS,
    WRITE_COLUMNS,
    Positioned,
    link_row,
    run_from_row,
    run_row,
    state_from_row,
    state_row,
    step_from_row,
    step_row,
    task_from_row,
    task_row,
    to_us,
    write_row,
)
from backout.projections.sql import BulkSql, chunks
from backout.schemas.events import ActionEvent, EventKind

__all__ = ["BatchWriter", "load_locked"]

_CHECKPOINT = EventKind.CHECKPOINT


class BatchWriter:
    """The rows one batch adds or changes, computed with the pure fold steps.

    ``records`` folds the records (their rows belong to this projector's partitions, so no
    lock is needed); ``shared`` folds runs, steps and tasks, which events from every
    partition touch, and writes everything; call it holding the write lock.
    """

    def __init__(
        self, conn: Connection, sql: BulkSql, cached: Mapping[str, tuple[RecordState, str]]
    ) -> None:
        self.conn = conn
        self.sql = sql
        self.cached = cached
        self.fresh: list[Positioned] = []
        self.states: dict[str, tuple[RecordState, str]] = {}
        self.dirty: set[str] = set()
        self.write_rows: list[tuple[Any, ...]] = []
        self.state_rows: list[tuple[Any, ...]] = []

    def upsert(self, conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        if rows:
            columns = tuple(rows[0])
            self.sql.upsert(conn, table, columns, [tuple(r[c] for c in columns) for r in rows])

    def records(self, fresh: list[Positioned]) -> None:
        """Fold the batch into its records' states and field writes (no writes yet)."""
        self.fresh = fresh
        changes = []
        for item in fresh:
            e = item.event
            target = e.target
            if target is not None and changes_record(e):
                changes.append((f"{target.system}/{target.object_id}", e))
        states = self.states = self._states(sorted({key for key, _ in changes}))
        rows = self.write_rows
        for key, e in changes:
            known = states.get(key)
            change = advance_record(known[0] if known is not None else None, e)
            opaque = known[1] if known is not None else ""
            if change.opaque:
                opaque = f"{opaque} {e.event_id}".strip()
            states[key] = (change.state, opaque)
            rows += [write_row(key, w) for w in change.writes]
        self.dirty.update(key for key, _ in changes)
        self.state_rows = [state_row(*states[k]) for k in sorted(self.dirty)]

    def shared(self, prepared: Mapping[str, tuple[Any, ...]]) -> dict[str, tuple[RecordState, str]]:
        """Fold runs, steps and tasks and write every row; returns the changed record states."""
        conn = self.conn
        events = [p.event for p in self.fresh]
        by_run: dict[str, list[ActionEvent]] = {}
        for e in events:
            by_run.setdefault(e.run_id, []).append(e)
        run_ids = sorted(by_run)
        runs = load_locked(conn, t.runs, t.runs.c.run_id, run_ids, lambda r: run_from_row(r, ()))
        for run_id, mine in by_run.items():
            runs[run_id] = fold_run(runs.get(run_id), mine)
        # Most events are plain tool calls: only labelled, compensating and checkpoint
        # events can touch steps, tasks, links or checkpoints.
        special = [
            e for e in events if e.labels or e.compensates is not None or e.kind is _CHECKPOINT
        ]
        step_ids = sorted({s for e in special if (s := e.labels.get(LABEL_STEP))})
        steps = load_locked(
            conn, t.rollback_steps, t.rollback_steps.c.step_id, step_ids, step_from_row
        )
        task_ids = sorted({k for e in special if (k := task_key(e))})
        tasks = load_locked(conn, t.tasks, t.tasks.c.task_id, task_ids, task_from_row)
        point_rows, link_rows = [], []
        dirty_steps, dirty_tasks = set(), set()
        for e in special:
            point = checkpoint_of(e)
            if point is not None:
                point_rows.append(
                    {
                        "run_id": point.run_id,
                        "event_id": point.event_id,
                        "name": point.name,
                        "occurred_us": to_us(point.occurred_at),
                    }
                )
            link_rows += [link_row(link) for link in links_of(e)]
            step_id = e.labels.get(LABEL_STEP)
            step = advance_step(steps.get(step_id), e) if step_id else None
            if step_id and step is not None:
                steps[step_id] = step
                dirty_steps.add(step_id)
            task_id = task_key(e)
            task = advance_task(tasks.get(task_id), e) if task_id else None
            if task_id and task is not None:
                tasks[task_id] = task
                dirty_tasks.add(task_id)
        self.sql.insert(conn, t.journal, JOURNAL_COLUMNS, [prepared[e.event_id] for e in events])
        self.sql.insert(conn, t.field_writes, WRITE_COLUMNS, self.write_rows)
        self.sql.upsert(conn, t.record_state, STATE_COLUMNS, self.state_rows)
        self.upsert(conn, t.runs, [run_row(runs[r]) for r in run_ids])
        self.upsert(conn, t.checkpoints, point_rows)
        self.upsert(conn, t.compensations, link_rows)
        self.upsert(conn, t.rollback_steps, [step_row(steps[s]) for s in sorted(dirty_steps)])
        self.upsert(conn, t.tasks, [task_row(tasks[k]) for k in sorted(dirty_tasks)])
        return {k: self.states[k] for k in self.dirty}

    def _states(self, keys: Sequence[str]) -> dict[str, tuple[RecordState, str]]:
        out = {k: self.cached[k] for k in keys if k in self.cached}
        missing = [k for k in keys if k not in out]
        for chunk in chunks(missing):
            for row in self.conn.execute(
                select(t.record_state).where(t.record_state.c.record_key.in_(chunk))
            ):
                out[row.record_key] = (state_from_row(row), row.opaque or "")
        return out


def load_locked(
    conn: Connection, table: Table, column: Any, ids: Sequence[str], build: Callable[[Any], Any]
) -> dict[str, Any]:
    """Rows by id, locked for this transaction where the database can (``FOR UPDATE``;
    ids are sorted, so concurrent projector processes lock in the same order)."""
    out: dict[str, Any] = {}
    for chunk in chunks(sorted(ids)):
        for row in conn.execute(select(table).where(column.in_(chunk)).with_for_update()):
            out[getattr(row, column.name)] = build(row)
    return out
