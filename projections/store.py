"""SqlProjectionStore: the projection in SQL, written one batch per transaction. [adapter]

``apply`` folds a batch of events into the view tables with the pure steps of
``projections.fold`` and writes the consumer's topic positions in the same transaction,
so a restart resumes exactly where the last commit ended. An event already in the journal
is skipped: reprocessing is a no-op. ``load`` reads back the part of the projection a
rollback scope needs (its events, the full histories of the records they touched, the
links that undid any of them, the run tree) as a pure :class:`Projection` for planning.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from backout.projections import tables as t
from backout.projections.fold import (
    LABEL_STEP,
    Checkpoint,
    CompensationLink,
    Projection,
    RecordHistory,
    RecordState,
    RunState,
    StepState,
    Task,
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
    INFO_COLUMNS,
    JOURNAL_COLUMNS,
    STATE_COLUMNS,
    WRITE_COLUMNS,
    WRITE_SELECT,
    InfoDecoder,
    Positioned,
    from_us,
    histories,
    journal_row,
    link_from_row,
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
from backout.rollback.scope import RollbackScope
from backout.schemas.errors import ProjectionError
from backout.schemas.events import ActionEvent, EventKind

__all__ = ["ApplyResult", "Positioned", "SqlProjectionStore", "from_us", "paused_gc", "to_us"]

_CHUNK = 500
_CHECKPOINT = EventKind.CHECKPOINT
_STATE_CACHE = 500_000
"""Record states a store keeps in memory between batches, at most."""


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


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
        self.engine = _engine(engine) if isinstance(engine, str) else engine
        self.consumer = consumer
        self._sql = _Sql(self.engine.dialect)
        self._states: dict[str, tuple[RecordState, str]] = {}
        """Record states as last committed by this store, by record key."""

    def __repr__(self) -> str:
        return f"SqlProjectionStore({self.engine.url!r}, consumer={self.consumer!r})"

    # --- schema -----------------------------------------------------------------------------
    def create(self) -> None:
        """Create missing tables (idempotent)."""
        with _errors("create the projection tables"):
            t.metadata.create_all(self.engine)

    def drop(self) -> None:
        """Drop every projection table (``--rebuild``)."""
        self._states.clear()
        with _errors("drop the projection tables"):
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
        with _errors("read positions"), self.engine.connect() as conn:
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
        with _errors("apply a batch to the projection"), self.engine.begin() as conn:
            # This projector owns the batch's partitions: the records and event ids it
            # reads belong to it alone, so it folds them before taking the write lock.
            fresh = self._fresh(conn, batch)
            work = _Batch(conn, self._sql, self._states)
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
        for chunk in _chunks(ids):
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
        with _errors("load the projection"), paused_gc(), self.engine.connect() as conn:
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
            for chunk in _chunks(missing):
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
            for chunk in _chunks(frontier):
                children.update(
                    conn.scalars(select(t.runs.c.run_id).where(t.runs.c.parent_run_id.in_(chunk)))
                )
            frontier = sorted(children - found)
            found.update(frontier)
        return found

    def _runs(self, conn: Connection, run_ids: Sequence[str]) -> dict[str, RunState]:
        points: dict[str, list[Checkpoint]] = {}
        out: dict[str, RunState] = {}
        for chunk in _chunks(run_ids):
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
        with _errors("read a record"), self.engine.connect() as conn:
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
        with _errors("read a record's events"), self.engine.connect() as conn:
            return [bytes(p) for p in conn.scalars(query.order_by(t.journal.c.seq))]

    def steps(self, plan_id: str | None = None) -> dict[str, StepState]:
        """Rollback steps as their started/finished events left them (one plan or all)."""
        query = select(t.rollback_steps)
        if plan_id is not None:
            query = query.where(t.rollback_steps.c.plan_id == plan_id)
        with _errors("read rollback steps"), self.engine.connect() as conn:
            return {row.step_id: step_from_row(row) for row in conn.execute(query)}

    def tasks(self, *, status: str | None = "open") -> list[Task]:
        """Manual rollback tasks, oldest first (``status=None``: all)."""
        query = select(t.tasks).order_by(t.tasks.c.created_us, t.tasks.c.task_id)
        if status is not None:
            query = query.where(t.tasks.c.status == status)
        with _errors("read tasks"), self.engine.connect() as conn:
            return [task_from_row(row) for row in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Rows per table (events, records, field writes, runs, open tasks)."""
        with _errors("count the projection"), self.engine.connect() as conn:

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
        with _errors("look up a run"), self.engine.connect() as conn:
            return (
                conn.scalar(select(t.journal.c.seq).where(t.journal.c.run_id == run_id).limit(1))
                is not None
            )


# --- writing one batch -------------------------------------------------------------------------
class _Batch:
    """The rows one batch adds or changes, computed with the pure fold steps.

    ``records`` folds the records (their rows belong to this projector's partitions, so no
    lock is needed); ``shared`` folds runs, steps and tasks, which events from every
    partition touch, and writes everything; call it holding the write lock.
    """

    def __init__(
        self, conn: Connection, sql: _Sql, cached: Mapping[str, tuple[RecordState, str]]
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
        runs = _load(conn, t.runs, t.runs.c.run_id, run_ids, lambda r: run_from_row(r, ()))
        for run_id, mine in by_run.items():
            runs[run_id] = fold_run(runs.get(run_id), mine)
        # Most events are plain tool calls: only labelled, compensating and checkpoint
        # events can touch steps, tasks, links or checkpoints.
        special = [
            e for e in events if e.labels or e.compensates is not None or e.kind is _CHECKPOINT
        ]
        step_ids = sorted({s for e in special if (s := e.labels.get(LABEL_STEP))})
        steps = _load(conn, t.rollback_steps, t.rollback_steps.c.step_id, step_ids, step_from_row)
        task_ids = sorted({k for e in special if (k := task_key(e))})
        tasks = _load(conn, t.tasks, t.tasks.c.task_id, task_ids, task_from_row)
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
        for chunk in _chunks(missing):
            for row in self.conn.execute(
                select(t.record_state).where(t.record_state.c.record_key.in_(chunk))
            ):
                out[row.record_key] = (state_from_row(row), row.opaque or "")
        return out


def _load(
    conn: Connection, table: Table, column: Any, ids: Sequence[str], build: Callable[[Any], Any]
) -> dict[str, Any]:
    """Rows by id, locked for this transaction where the database can (``FOR UPDATE``;
    ids are sorted, so concurrent projector processes lock in the same order)."""
    out: dict[str, Any] = {}
    for chunk in _chunks(sorted(ids)):
        for row in conn.execute(select(table).where(column.in_(chunk)).with_for_update()):
            out[getattr(row, column.name)] = build(row)
    return out


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


# --- engines and dialects ----------------------------------------------------------------------
def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Several projector processes may share a file: wait for the write lock.
        engine = create_engine(url, connect_args={"timeout": 60})
    else:
        engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


class _Sql:
    """Many-row inserts and upserts, each one pre-rendered statement run with executemany.

    SQLite and PostgreSQL get hand-rendered ``INSERT ... ON CONFLICT DO UPDATE`` run on the
    driver directly (tuples in, no per-row SQLAlchemy processing: the projection's hot
    path); other dialects go through SQLAlchemy Core (upsert as delete + insert).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
        self.fast = dialect.name in ("sqlite", "postgresql") and self.mark is not None
        self._sql: dict[tuple[str, str, tuple[str, ...]], str] = {}

    def insert(
        self, conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        if not rows:
            return
        if not self.fast:
            conn.execute(insert(table), [dict(zip(columns, r, strict=True)) for r in rows])
            return
        conn.exec_driver_sql(self._render("insert", table, columns), rows)

    def upsert(
        self, conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        if not rows:
            return
        if not self.fast:
            keys = list(table.primary_key.columns)
            for row in rows:
                values = dict(zip(columns, row, strict=True))
                conn.execute(delete(table).where(and_(*(c == values[c.name] for c in keys))))
            conn.execute(insert(table), [dict(zip(columns, r, strict=True)) for r in rows])
            return
        conn.exec_driver_sql(self._render("upsert", table, columns), rows)

    def _render(self, kind: str, table: Table, columns: tuple[str, ...]) -> str:
        cache_key = (kind, table.name, columns)
        found = self._sql.get(cache_key)
        if found is not None:
            return found
        quote = self.dialect.identifier_preparer.quote
        names = ", ".join(quote(c) for c in columns)
        marks = ", ".join(self.mark or "?" for _ in columns)
        sql = f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})"
        if kind == "upsert":
            keys = [c.name for c in table.primary_key.columns]
            updates = ", ".join(
                f"{quote(c)} = excluded.{quote(c)}" for c in columns if c not in keys
            )
            sql += f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
        self._sql[cache_key] = sql
        return sql


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic collector for a bulk job (a load, a batch): such jobs build
    many small objects next to a large heap, and the collector would scan that heap again
    and again for nothing. It runs again when the job is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _errors:
    """Turn database failures into ProjectionError with what we were doing."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, OperationalError):
            raise ProjectionError(f"cannot {self.doing}: {exc.orig}") from exc
        if isinstance(exc, SQLAlchemyError):
            raise ProjectionError(f"cannot {self.doing}: {exc}") from exc
