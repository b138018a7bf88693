"""The Target port's contract, run against the fake and every adapter.

The rollback executor relies on exactly this: reads see the live record, and every
guarded write checks the live record against what the caller expects, writes nothing on
a mismatch (CONFLICT), and says ALREADY when the live record is already as desired.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import JsonValue

from backout.producers.targets import (
    BatchTarget,
    CasOutcome,
    CasResult,
    SqlTableTarget,
    Target,
)
from backout.schemas.errors import ConfigError
from backout.schemas.events import JsonMap
from tests.fakes import InMemoryTarget

Records = dict[str, dict[str, JsonValue]]
START: Records = {"inv1": {"status": "open", "amount": 100}, "inv2": {"status": None, "amount": 5}}


class TargetContract:
    """Subclasses build the target under test (``make``) over the START records."""

    versioned = True

    def make(self, records: Records) -> Target:
        raise NotImplementedError

    @pytest.fixture
    def target(self) -> Iterator[Target]:
        made = self.make(START)
        yield made
        inner = getattr(made, "inner", made)
        engine = getattr(inner, "engine", None)
        if engine is not None:
            engine.dispose()

    def test_reads_live_records(self, target: Target) -> None:
        image = target.read("inv1")
        assert image.exists and image.fields == {"status": "open", "amount": 100}
        assert not target.read("nope").exists

    def test_compare_and_set_applies_when_the_expectation_holds(self, target: Target) -> None:
        before = target.read("inv1").version
        result = target.compare_and_set("inv1", {"status": "open"}, {"status": "void"})
        assert result.outcome is CasOutcome.APPLIED
        assert result.live.fields == {"status": "void", "amount": 100}
        assert target.read("inv1").fields["status"] == "void"
        if self.versioned:
            assert target.read("inv1").version != before

    def test_compare_and_set_conflicts_and_writes_nothing(self, target: Target) -> None:
        result = target.compare_and_set("inv1", {"status": "paid"}, {"status": "void"})
        assert result.outcome is CasOutcome.CONFLICT
        assert result.live.fields["status"] == "open"
        assert target.read("inv1").fields == {"status": "open", "amount": 100}

    def test_compare_and_set_is_already_done(self, target: Target) -> None:
        result = target.compare_and_set("inv1", {"status": "void"}, {"status": "open"})
        assert result.outcome is CasOutcome.ALREADY
        assert target.read("inv1").fields["status"] == "open"

    def test_compare_and_set_on_a_missing_record_conflicts(self, target: Target) -> None:
        result = target.compare_and_set("nope", {"status": "open"}, {"status": "void"})
        assert result.outcome is CasOutcome.CONFLICT and not result.live.exists

    def test_null_is_a_value_to_expect(self, target: Target) -> None:
        result = target.compare_and_set("inv2", {"status": None}, {"status": "open"})
        assert result.outcome is CasOutcome.APPLIED
        back = target.compare_and_set("inv2", {"status": "open"}, {"status": None})
        assert back.outcome is CasOutcome.APPLIED and target.read("inv2").fields["status"] is None

    def test_several_fields_all_or_nothing(self, target: Target) -> None:
        result = target.compare_and_set(
            "inv1", {"status": "open", "amount": 999}, {"status": "void", "amount": 0}
        )
        assert result.outcome is CasOutcome.CONFLICT
        assert target.read("inv1").fields == {"status": "open", "amount": 100}
        ok = target.compare_and_set(
            "inv1", {"status": "open", "amount": 100}, {"status": "void", "amount": 0}
        )
        assert ok.outcome is CasOutcome.APPLIED
        assert target.read("inv1").fields == {"status": "void", "amount": 0}

    def test_delete_if(self, target: Target) -> None:
        conflict = target.delete_if("inv1", {"status": "paid"})
        assert conflict.outcome is CasOutcome.CONFLICT and target.read("inv1").exists
        assert target.delete_if("inv1", {"status": "open"}).outcome is CasOutcome.APPLIED
        assert not target.read("inv1").exists
        assert target.delete_if("inv1", {"status": "open"}).outcome is CasOutcome.ALREADY

    def test_insert_if_absent(self, target: Target) -> None:
        created = target.insert_if_absent("inv9", {"status": "open", "amount": 9})
        assert created.outcome is CasOutcome.APPLIED
        assert target.read("inv9").fields == {"status": "open", "amount": 9}
        same = target.insert_if_absent("inv9", {"status": "open", "amount": 9})
        assert same.outcome is CasOutcome.ALREADY
        other = target.insert_if_absent("inv9", {"status": "void", "amount": 9})
        assert other.outcome is CasOutcome.CONFLICT
        assert target.read("inv9").fields["status"] == "open"


class TestInMemoryTarget(TargetContract):
    def make(self, records: Records) -> Target:
        return InMemoryTarget("erp", records)


def _sql_target(url: str, records: Records) -> SqlTableTarget:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE invoices (id VARCHAR(20) PRIMARY KEY, "
                "status VARCHAR(20), amount INTEGER, "
                "version INTEGER NOT NULL DEFAULT 1)"
            )
        )
        for key, fields in records.items():
            conn.execute(
                sa.text("INSERT INTO invoices (id, status, amount) VALUES (:i, :s, :a)"),
                {"i": key, "s": fields["status"], "a": fields["amount"]},
            )
    return SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")


class BatchedTarget:
    """A BatchTarget whose ``compare_and_set`` goes through ``compare_and_set_many``, so
    the whole Target contract also holds the batched path to the single-record rules."""

    def __init__(self, target: BatchTarget) -> None:
        self.inner = target

    @property
    def system(self) -> str:
        return self.inner.system

    def read(self, object_id: str) -> Any:
        return self.inner.read(object_id)

    def compare_and_set(self, object_id: str, expected: JsonMap, desired: JsonMap) -> CasResult:
        return self.inner.compare_and_set_many([(object_id, expected, desired)])[0]

    def delete_if(self, object_id: str, expected: JsonMap) -> CasResult:
        return self.inner.delete_if(object_id, expected)

    def insert_if_absent(self, object_id: str, fields: JsonMap) -> CasResult:
        return self.inner.insert_if_absent(object_id, fields)


class BatchTargetContract(TargetContract):
    """What ``compare_and_set_many`` adds: many records, each judged alone, in order."""

    def test_is_a_batch_target(self, target: Target) -> None:
        assert isinstance(target, BatchedTarget) and isinstance(target.inner, BatchTarget)

    def test_a_batch_judges_each_record_alone(self, target: Target) -> None:
        assert isinstance(target, BatchedTarget)
        results = target.inner.compare_and_set_many(
            [
                ("inv1", {"status": "open"}, {"status": "void"}),
                ("inv2", {"status": "wrong"}, {"status": "x"}),
                ("nope", {"status": "open"}, {"status": "void"}),
                ("inv2", {"amount": 1}, {"amount": 5}),
            ]
        )
        assert [r.outcome for r in results] == [
            CasOutcome.APPLIED,
            CasOutcome.CONFLICT,
            CasOutcome.CONFLICT,
            CasOutcome.ALREADY,
        ]
        assert [r.live.exists for r in results] == [True, True, False, True]
        assert target.read("inv1").fields == {"status": "void", "amount": 100}
        assert target.read("inv2").fields == {"status": None, "amount": 5}

    def test_an_empty_batch_writes_nothing(self, target: Target) -> None:
        assert isinstance(target, BatchedTarget)
        assert target.inner.compare_and_set_many([]) == []
        assert target.read("inv1").fields == START["inv1"]


class TestSqlTableTargetOnSqlite(TargetContract):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.path = tmp_path

    def make(self, records: Records) -> Target:
        return _sql_target(f"sqlite:///{self.path / 'erp.db'}", records)

    def test_unknown_fields_are_refused(self, target: Target) -> None:
        with pytest.raises(ConfigError, match="not a field"):
            target.compare_and_set("inv1", {"nope": 1}, {"status": "x"})


class TestBatchedSqlWritesOnSqlite(BatchTargetContract, TestSqlTableTargetOnSqlite):
    def make(self, records: Records) -> Target:
        return BatchedTarget(_sql_target(f"sqlite:///{self.path / 'erp.db'}", records))

    def test_unknown_fields_are_refused_before_anything_is_written(self, target: Target) -> None:
        assert isinstance(target, BatchedTarget)
        with pytest.raises(ConfigError, match="not a field"):
            target.inner.compare_and_set_many(
                [("inv1", {"status": "open"}, {"status": "void"}), ("inv2", {"nope": 1}, {})]
            )
        assert target.read("inv1").fields["status"] == "open"


@pytest.mark.postgres
class TestSqlTableTargetOnPostgres(TargetContract):
    @pytest.fixture(autouse=True)
    def _db(self, postgres_db: str) -> None:
        self.url = postgres_db

    def make(self, records: Records) -> Target:
        return _sql_target(self.url, records)


@pytest.mark.postgres
class TestBatchedSqlWritesOnPostgres(BatchTargetContract, TestSqlTableTargetOnPostgres):
    def make(self, records: Records) -> Target:
        return BatchedTarget(_sql_target(self.url, records))
