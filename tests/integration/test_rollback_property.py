"""The surgical-rollback property through the real stack, on SQLite and PostgreSQL.

Random interleavings of writes by the run (journaled), another run (journaled) and humans
writing straight to the table (not journaled), creates and deletes included, on a real
SQL table, through the Journal, the broker, the projector and the executor. See
``tests/surgical.py`` for the properties checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, assume, given, settings

from backout.infra.broker import Broker
from backout.infra.settings import Settings
from backout.producers import Journal, Reversibility, SqlTableTarget
from backout.producers.kafka import KafkaEventSink
from backout.projections.projector import Projector
from backout.projections.store import SqlProjectionStore
from backout.rollback.executor import RollbackExecutor
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from tests.surgical import FIELDS, RECORDS, History, Row, Write, check, check_again, histories, step


class World:
    """A real table, a Journal writing it, a projector and an executor, shared by examples
    (each example uses its own record ids and run ids)."""

    def __init__(
        self, settings: Settings, bootstrap: str, table_url: str, projection_url: str
    ) -> None:
        self.engine = sa.create_engine(table_url)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE recs (id VARCHAR(40) PRIMARY KEY, a INTEGER, "
                    "b INTEGER, version INTEGER NOT NULL DEFAULT 1)"
                )
            )
        self.target = SqlTableTarget(self.engine, "recs", key="id", version="version", system="db")
        self.sink = KafkaEventSink(settings, bootstrap)
        self.journal = Journal(settings, sink=self.sink)
        self.store = SqlProjectionStore(projection_url)
        self.projector = Projector(settings, bootstrap, store=self.store)
        self.executor = RollbackExecutor(settings, sink=self.sink, targets=[self.target])
        self.examples = itertools.count()
        self._declare()

    def _declare(self) -> None:
        @self.journal.tool(
            reversibility=Reversibility.REVERSIBLE,
            target=self.target,
            object_id=lambda record, **_: record,
        )
        def put(record: str, fields: dict[str, int]) -> None:
            with self.engine.begin() as conn:
                self._write(conn, record, fields)

        @self.journal.tool(
            reversibility=Reversibility.REVERSIBLE,
            target=self.target,
            object_id=lambda record, **_: record,
        )
        def remove(record: str) -> None:
            with self.engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM recs WHERE id = :i"), {"i": record})

        self.put, self.remove = put, remove

    def _write(self, conn: sa.Connection, record: str, fields: dict[str, int]) -> None:
        found = conn.execute(sa.text("SELECT 1 FROM recs WHERE id = :i"), {"i": record}).first()
        if found is None:
            conn.execute(
                sa.text("INSERT INTO recs (id, a, b) VALUES (:i, :a, :b)"), {"i": record, **fields}
            )
        else:
            sets = ", ".join(f"{f} = :{f}" for f in fields)
            conn.execute(
                sa.text(f"UPDATE recs SET {sets}, version = version + 1 WHERE id = :i"),
                {"i": record, **fields},
            )

    def rows(self, prefix: str) -> dict[str, Row]:
        with self.engine.connect() as conn:
            found = {
                r.id: {"a": r.a, "b": r.b}
                for r in conn.execute(
                    sa.text("SELECT * FROM recs WHERE id LIKE :p"), {"p": f"{prefix}%"}
                )
            }
        return {r: found.get(f"{prefix}{r}") for r in RECORDS}

    def play(self, history: History, prefix: str, runs: dict[str, str]) -> None:
        with self.engine.begin() as conn:
            for record, row in history.initial.items():
                if row is not None:
                    self._write(conn, f"{prefix}{record}", row)
        current = dict(history.initial)
        for op in history.ops:
            before, record = current[op.record], f"{prefix}{op.record}"
            after = step(before, op)
            if op.actor == "human":
                with self.engine.begin() as conn:
                    if after is None:
                        conn.execute(sa.text("DELETE FROM recs WHERE id = :i"), {"i": record})
                    else:
                        self._write(conn, record, after)
            else:
                with self.journal.run(
                    runs[op.actor], agent=op.actor, identity=op.actor, resume=False
                ):
                    if after is None:
                        self.remove(record)
                    else:
                        self.put(record, {f: after[f] for f in FIELDS})
            current[op.record] = after
            history.actual.append(Write(op.actor, op.record, before, after))

    def close(self) -> None:
        self.projector.close()
        self.journal.close()
        self.sink.close()
        self.store.engine.dispose()
        self.engine.dispose()


def surgical(world: World, history: History) -> None:
    n = next(world.examples)
    prefix, runs = f"x{n}-", {"run": f"run-{n}", "other": f"other-{n}"}
    world.play(history, prefix, runs)
    scope = RollbackScope(run=runs["run"])
    world.projector.catch_up(timeout=60)
    before = world.rows(prefix)
    plan = plan_rollback(world.store.load(scope), scope, now=datetime.now(UTC))
    report = world.executor.apply(plan)
    after = world.rows(prefix)
    check(history, before, after, plan, report, _journaled(world, prefix), runs["run"], prefix)
    world.projector.catch_up(timeout=60)
    again = plan_rollback(world.store.load(scope), scope, now=datetime.now(UTC))
    second = world.executor.apply(again, prior=world.store.steps(again.plan_id))
    check_again(after, world.rows(prefix), again, second)


def _journaled(world: World, prefix: str) -> list[Any]:
    """The ActionEvents of the example's records, decoded from the journal's payloads."""
    from backout.schemas.codec import decode
    from backout.schemas.events import ActionEvent

    out = []
    for record in RECORDS:
        for raw in world.store.record_payloads("db", f"{prefix}{record}"):
            out.append(decode(raw, ActionEvent))
    return out


@pytest.fixture
def sqlite_world(kafka_settings: Settings, broker: Broker, tmp_path: Path) -> Iterator[World]:
    world = World(
        kafka_settings,
        broker.bootstrap,
        f"sqlite:///{tmp_path / 'table.db'}",
        f"sqlite:///{tmp_path / 'projection.db'}",
    )
    yield world
    world.close()


@pytest.fixture
def postgres_world(kafka_settings: Settings, broker: Broker, postgres_db: str) -> Iterator[World]:
    world = World(kafka_settings, broker.bootstrap, postgres_db, postgres_db)
    yield world
    world.close()


PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(history=histories)
def test_rollback_is_surgical_on_sqlite(sqlite_world: World, history: History) -> None:
    assume(any(op.actor == "run" for op in history.ops))
    surgical(sqlite_world, history)


@pytest.mark.postgres
@settings(PROPERTY, max_examples=15)
@given(history=histories)
def test_rollback_is_surgical_on_postgresql(postgres_world: World, history: History) -> None:
    assume(any(op.actor == "run" for op in history.ops))
    surgical(postgres_world, history)
