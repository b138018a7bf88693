"""SqlTableTarget: object ids (always text in events) become values of the key column."""

from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy as sa

from backout.producers.targets import CasOutcome, SqlTableTarget
from backout.schemas.errors import ConfigError


def _target(key_type: str, ids: list[object]) -> SqlTableTarget:
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE items (id {key_type} PRIMARY KEY, status TEXT)"))
        for value in ids:
            conn.execute(
                sa.text("INSERT INTO items (id, status) VALUES (:i, 'open')"), {"i": value}
            )
    return SqlTableTarget(engine, "items", key="id")


def test_integer_keys_take_integer_ids() -> None:
    target = _target("INTEGER", [7])
    assert target._key_value("7") == 7 and type(target._key_value("7")) is int
    assert target.read("7").exists and not target.read("8").exists
    cas = target.compare_and_set("7", {"status": "open"}, {"status": "void"})
    assert cas.outcome is CasOutcome.APPLIED
    [again] = target.compare_and_set_many([("7", {"status": "void"}, {"status": "open"})])
    assert again.outcome is CasOutcome.APPLIED and target.read("7").fields["status"] == "open"


def test_an_id_that_is_not_a_key_value_is_a_config_error() -> None:
    target = _target("INTEGER", [7])
    with pytest.raises(ConfigError, match=r"'abc' is not a value of key column items\.id"):
        target.read("abc")


def test_numeric_keys_take_decimal_ids() -> None:
    target = _target("NUMERIC(10, 2)", [])
    assert target._key_value("1.50") == Decimal("1.50")


def test_text_keys_keep_the_id_as_it_is() -> None:
    target = _target("VARCHAR(20)", ["007"])
    assert target._key_value("007") == "007"
    assert target.read("007").exists and not target.read("7").exists


def test_untyped_keys_compare_as_text() -> None:
    target = _target("", ["a1"])  # SQLite: no declared type (reflected as NullType)
    assert isinstance(target.table.c.id.type, sa.types.NullType)
    assert target._key_value("a1") == "a1" and target.read("a1").exists
