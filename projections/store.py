"""SqlProjectionStore: the projection in SQL, written one batch per transaction. [adapter]

``apply`` folds a batch of events into the view tables with the pure steps of
``projections.fold`` and writes the consumer's topic positions in the same transaction,
so a restart resumes exactly where the last commit ended. An event already in the journal
is skipped: reprocessing is a no-op. ``load`` reads back the part of the projection a
rollback scope needs (its events, the full histories of the records they touched, the
links that undid any of them, the run tree) as a pure :class:`Projection` for planning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Table, and_, func, select, true
from sqlalchemy.exc import IntegrityError

from backout.projections import tables as t
from backout.projections.batch import BatchWriter
from backout.projections.fold import (
    Checkpoint,
    CompensationLink,
    Projection,
    RecordHistory,
    RecordState,
    RunState,
    StepState,
    Task,
)
from backout.projections.rows import (
    INFO_COLUMNS,
    WRITE_SELECT,
    InfoDecoder,
    Positioned,
    from_us,
    histories,
    journal_row,
    link_from_row,
    run_from_row,
    step_from_row,
    task_from_row,
    to_us,
)
from backout.projections.sql import BulkSql, chunks, make_engine, paused_gc, sql_errors
from backout.rollback.scope import RollbackScope
from backout.schemas.errors import ProjectionError
from backout.schemas.events import EventKind

__all__ = ["ApplyResult", "Positioned", "SqlProjectionStore", "from_us", "paused_gc", "to_us"]

_STATE_CACHE = 500_000
"""Record states a store keeps in memory between batches, at most."""


@dataclass(frozen=True)
class ApplyResult:
    """What one ``apply`` did."""

    applied: int
    duplicates: int
    positions: Mapping[tuple[str, int], int] = field(default_factory=dict)


class SqlProjectionStore:
    """The projection tables on any SQLAlchemy engine (SQLite default, PostgreSQL tested).

    Args:
        engine: an Engine, or a URL to create one from (SQLite files get WAL mode).
        consumer: the name positions are stored under (one per projector).
    """

    def __init__(self, engine: Engine | str, *, consumer: str = "projector") -> None:
        self.engine = make_engine(engine) if isinstance(engine, str) else engine
        self.consumer = consumer
        self._sql = BulkSql(self.engine.dialect)
        self._states: dict[str, tuple[RecordState, str]] = {}
        """Record states as last committed by this store, by record key."""

    def __repr__(self) -> str:
        return f"SqlProjectionStore({self.engine.url!r}, consumer={self.consumer!r})"

    # --- schema -----------------------------------------------------------------------------
    def create(self) -> None:
        """Create missing tables (idempotent)."""
        with sql_errors("create the projection tables"):
            t.metadata.create_all(self.engine)

    def drop(self) -> None:
        """Drop every projection table (``--rebuild``)."""
        self._states.clear()
        with sql_errors("drop the projection tables"):
            t.metadata.drop_all(self.engine)

    def reset(self) -> None:
        """Drop and re-create the tables: the projection starts again from offset 0."""
        self.drop()
        self.create()

    # --- writing ----------------------------------------------------------------------------
    def positions(self, topic: str) -> dict[int, int]:
        """The last applied offset per partition of ``topic`` for this consumer."""
        query = select(t.positions.c.partition, t.positions.c.offset).where(
            t.positions.c.consumer == self.consumer, t.positions.c.topic == topic
        )
        with sql_errors("read positions"), self.engine.connect() as conn:
            return {int(p): int(o) for p, o in conn.execute(query)}

    def apply(
        self, batch: Sequence[Positioned], positions: Mapping[tuple[str, int], int] | None = None
    ) -> ApplyResult:
        """Fold ``batch`` into the views and store ``positions``, in one transaction.

        Args:
            batch: events in log order (per partition).
            positions: ``(topic, partition) -> last offset`` to store; by default the
                highest offset per partition in ``batch``. Pass positions of skipped
                records (undecodable ones sent to the dead-letter topic) here too.
        """
        marks = dict(positions or {})
        for item in batch:
            here = (item.topic, item.partition)
            marks[here] = max(marks.get(here, -1), item.offset)
        # Journal rows need no state: build them before taking the write lock.
        prepared = {item.event.event_id: journal_row(item) for item in batch}
        for attempt in (1, 2):
            try:
                fresh, written = self._apply_once(batch, prepared, marks)
                break
            except ProjectionError as exc:
                # The same event id on two partitions (a producer keyed it two ways) can
                # race two projector processes; the second attempt skips it as a duplicate.
                if attempt == 2 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        # Committed: remember the records' states for the next batches (this store's
        # projector owns their partitions, so nobody else changes these rows).
        if len(self._states) + len(written) > _STATE_CACHE:
            self._states.clear()
        self._states.update(written)
        return ApplyResult(len(fresh), len(batch) - len(fresh), marks)

    def _apply_once(
        self,
        batch: Sequence[Positioned],
        prepared: Mapping[str, tuple[Any, ...]],
        marks: Mapping[tuple[str, int], int],
    ) -> tuple[list[Positioned], dict[str, tuple[RecordState, str]]]:
        with sql_errors("apply a batch to the projection"), self.engine.begin() as conn:
            # This projector owns the batch's partitions: the records and event ids it
            # reads belong to it alone, so it folds them before taking the write lock.
            fresh = self._fresh(conn, batch)
            work = BatchWriter(conn, self._sql, self._states)
            work.records(fresh)
            if self.engine.dialect.name == "sqlite":
                # Runs, steps and tasks are shared by every partition: read them under the
                # write lock, so several projector processes on one file stay consistent.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            written = work.shared(prepared) if fresh else {}
            work.upsert(
                conn,
                t.positions,
                [
                    {
                        "consumer": self.consumer,
                        "topic": topic,
                        "partition": partition,
                        "offset": offset,
                    }
                    for (topic, partition), offset in sorted(marks.items())
                ],
            )
        return fresh, written

    def _fresh(self, conn: Connection, batch: Sequence[Positioned]) -> list[Positioned]:
        ids = list(dict.fromkeys(p.event.event_id for p in batch))
        known: set[str] = set()
        for chunk in chunks(ids):
            known.update(
                conn.scalars(select(t.journal.c.event_id).where(t.journal.c.event_id.in_(chunk)))
            )
        fresh, seen = [], set()
        for item in batch:
            event_id = item.event.event_id
            if event_id not in known and event_id not in seen:
                seen.add(event_id)
                fresh.append(item)
        return fresh

    # --- reading for planning ---------------------------------------------------------------
    def load(self, scope: RollbackScope) -> Projection:
        """The part of the projection a scope needs: its events, the full histories of the
        records they touched, the events that undid any of them and the run tree."""
        with sql_errors("load the projection"), paused_gc(), self.engine.connect() as conn:
            run_ids = self._run_tree(conn, scope) if scope.run else None
            condition = _scope_filter(scope, run_ids)
            touched = (
                select(t.journal.c.record_key)
                .where(condition, t.journal.c.record_key.is_not(None))
                .distinct()
            )
            info = select(*INFO_COLUMNS)
            rows = {r[0]: r for r in conn.execute(info.where(condition)).all()}
            for row in conn.execute(info.where(t.journal.c.record_key.in_(touched))):
                rows.setdefault(row[0], row)
            scoped = select(t.journal.c.event_id).where(condition)
            link_rows = list(
                conn.execute(
                    select(t.compensations).where(t.compensations.c.undone_event_id.in_(scoped))
                )
            )
            missing = sorted({r.inverse_event_id for r in link_rows} - rows.keys())
            for chunk in chunks(missing):
                for row in conn.execute(info.where(t.journal.c.event_id.in_(chunk))):
                    rows[row[0]] = row
            records = histories(
                conn.execute(
                    select(t.record_state).where(t.record_state.c.record_key.in_(touched))
                ),
                conn.execute(
                    select(*WRITE_SELECT)
                    .where(t.field_writes.c.record_key.in_(touched))
                    .order_by(t.field_writes.c.record_key, t.field_writes.c.seq)
                ),
            )
            decoder = InfoDecoder()
            events = {event_id: decoder(row) for event_id, row in rows.items()}
            wanted = set(run_ids or ()) | {e.run_id for e in events.values()}
            runs = self._runs(conn, sorted(wanted))
        links: dict[str, tuple[CompensationLink, ...]] = {}
        for row in link_rows:
            links[row.undone_event_id] = (*links.get(row.undone_event_id, ()), link_from_row(row))
        return Projection(records=records, events=events, runs=runs, links=links)

    def _run_tree(self, conn: Connection, scope: RollbackScope) -> set[str]:
        assert scope.run is not None
        found, frontier = {scope.run}, [scope.run]
        while frontier and scope.include_child_runs:
            children: set[str] = set()
            for chunk in chunks(frontier):
                children.update(
                    conn.scalars(select(t.runs.c.run_id).where(t.runs.c.parent_run_id.in_(chunk)))
                )
            frontier = sorted(children - found)
            found.update(frontier)
        return found

    def _runs(self, conn: Connection, run_ids: Sequence[str]) -> dict[str, RunState]:
        points: dict[str, list[Checkpoint]] = {}
        out: dict[str, RunState] = {}
        for chunk in chunks(run_ids):
            for row in conn.execute(
                select(t.checkpoints)
                .where(t.checkpoints.c.run_id.in_(chunk))
                .order_by(t.checkpoints.c.occurred_us)
            ):
                points.setdefault(row.run_id, []).append(
                    Checkpoint(row.run_id, row.name, row.event_id, from_us(row.occurred_us))
                )
            for row in conn.execute(select(t.runs).where(t.runs.c.run_id.in_(chunk))):
                out[row.run_id] = run_from_row(row, tuple(points.get(row.run_id, ())))
        return out

    # --- reading for operators --------------------------------------------------------------
    def record(self, system: str, object_id: str) -> RecordHistory | None:
        """One record's current state and full write history, or None if never seen."""
        key = f"{system}/{object_id}"
        with sql_errors("read a record"), self.engine.connect() as conn:
            found = histories(
                conn.execute(select(t.record_state).where(t.record_state.c.record_key == key)),
                conn.execute(
                    select(*WRITE_SELECT)
                    .where(t.field_writes.c.record_key == key)
                    .order_by(t.field_writes.c.seq)
                ),
            )
        return found.get(key)

    def record_payloads(
        self, system: str, object_id: str, until: datetime | None = None
    ) -> list[bytes]:
        """The raw records of every event on one record, in log order (up to ``until``)."""
        query = select(t.journal.c.payload).where(t.journal.c.record_key == f"{system}/{object_id}")
        if until is not None:
            query = query.where(t.journal.c.occurred_us <= to_us(until))
        with sql_errors("read a record's events"), self.engine.connect() as conn:
            return [bytes(p) for p in conn.scalars(query.order_by(t.journal.c.seq))]

    def steps(self, plan_id: str | None = None) -> dict[str, StepState]:
        """Rollback steps as their started/finished events left them (one plan or all)."""
        query = select(t.rollback_steps)
        if plan_id is not None:
            query = query.where(t.rollback_steps.c.plan_id == plan_id)
        with sql_errors("read rollback steps"), self.engine.connect() as conn:
            return {row.step_id: step_from_row(row) for row in conn.execute(query)}

    def tasks(self, *, status: str | None = "open") -> list[Task]:
        """Manual rollback tasks, oldest first (``status=None``: all)."""
        query = select(t.tasks).order_by(t.tasks.c.created_us, t.tasks.c.task_id)
        if status is not None:
            query = query.where(t.tasks.c.status == status)
        with sql_errors("read tasks"), self.engine.connect() as conn:
            return [task_from_row(row) for row in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Rows per table (events, records, field writes, runs, open tasks)."""
        with sql_errors("count the projection"), self.engine.connect() as conn:

            def count(table: Table, where: ColumnElement[bool] | None = None) -> int:
                query = select(func.count()).select_from(table)
                return int(conn.scalar(query.where(where) if where is not None else query) or 0)

            return {
                "events": count(t.journal),
                "records": count(t.record_state),
                "field_writes": count(t.field_writes),
                "runs": count(t.runs),
                "open_tasks": count(t.tasks, t.tasks.c.status == "open"),
            }

    def known_run(self, run_id: str) -> bool:
        """True when the journal has any event of ``run_id``."""
        with sql_errors("look up a run"), self.engine.connect() as conn:
            return (
                conn.scalar(select(t.journal.c.seq).where(t.journal.c.run_id == run_id).limit(1))
                is not None
            )


def _scope_filter(scope: RollbackScope, run_ids: set[str] | None) -> ColumnElement[bool]:
    """A superset of the scope's events in SQL (the planner applies the exact scope)."""
    j = t.journal.c
    clauses: list[ColumnElement[bool]] = [j.kind == EventKind.TOOL_CALL.value]
    if run_ids is not None:
        clauses.append(j.run_id.in_(sorted(run_ids)))
    if scope.agent is not None:
        clauses.append(j.agent_id == scope.agent)
    if scope.identity is not None:
        clauses.append(j.identity == scope.identity)
    if scope.tenant is not None:
        clauses.append(j.tenant == scope.tenant)
    if scope.since is not None:
        clauses.append(j.occurred_us >= to_us(scope.since))
    if scope.until is not None:
        clauses.append(j.occurred_us <= to_us(scope.until))
    if scope.event_ids:
        clauses.append(j.event_id.in_(sorted(set(scope.event_ids))))
    return and_(true(), *clauses)
