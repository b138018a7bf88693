"""Tool declarations are checked when they are made: mistakes are a ConfigError at import
time, not at 4 a.m."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backout.infra.settings import Settings
from backout.producers import (
    Compensate,
    InMemoryEventSink,
    Journal,
    Reversibility,
    SqlTableTarget,
    Target,
)
from backout.producers.registry import declare
from backout.schemas.errors import ConfigError
from backout.schemas.events import JsonMap, RecordImage


@pytest.fixture
def journal() -> Iterator[Journal]:
    journal = Journal(Settings(), sink=InMemoryEventSink())
    yield journal
    journal.close()


@pytest.fixture
def invoices() -> SqlTableTarget:
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (id TEXT PRIMARY KEY, status TEXT)"))
    return SqlTableTarget(engine, "invoices", system="erp")


def set_status(invoice_id: str, status: str) -> None:
    return None


def refund(order_id: str, amount: float) -> str:
    return "refund-1"


class SystemOnly:
    """Names a system but cannot read or restore anything."""

    system = "erp"


class StubTarget:
    """A Target with a constant image (protocol-complete)."""

    system = "stub"

    def read(self, object_id: str) -> RecordImage:
        return RecordImage(exists=True, fields={"x": 1})

    def compare_and_set(self, object_id: str, expected: JsonMap, desired: JsonMap) -> Any:
        raise NotImplementedError

    def delete_if(self, object_id: str, expected: JsonMap) -> Any:
        raise NotImplementedError

    def insert_if_absent(self, object_id: str, fields: JsonMap) -> Any:
        raise NotImplementedError


def _by_id(invoice_id: str, **_: Any) -> str:
    return invoice_id


# --- mistakes ------------------------------------------------------------------------------
def test_mutating_tool_without_object_id(journal: Journal, invoices: SqlTableTarget) -> None:
    for kind in ("reversible", "compensatable", "irreversible"):
        with pytest.raises(ConfigError, match="declares no object_id"):
            journal.tool(
                reversibility=kind,
                target=invoices,
                compensation=Compensate("undo", lambda **_: {}),
            )(set_status)


def test_mutating_tool_without_target_or_system(journal: Journal) -> None:
    with pytest.raises(ConfigError, match="names no target or system"):
        journal.tool(reversibility="irreversible", object_id=_by_id)(set_status)


@pytest.mark.parametrize("kind", ["undoable", "REVERSIBLE", "", "read-only", None])
def test_unknown_reversibility(journal: Journal, kind: Any) -> None:
    with pytest.raises(ConfigError, match="unknown reversibility class") as info:
        journal.tool(reversibility=kind, system="erp", object_id=_by_id)(set_status)
    assert "reversible, compensatable, irreversible, read_only" in str(info.value)


@pytest.mark.parametrize(
    "target", [None, SystemOnly(), "erp"], ids=["no-target", "no-restore", "a-string"]
)
def test_reversible_needs_a_restorable_target(journal: Journal, target: Any) -> None:
    with pytest.raises(ConfigError, match=r"reversible but its target .* cannot restore"):
        journal.tool(
            reversibility=Reversibility.REVERSIBLE, target=target, system="erp", object_id=_by_id
        )(set_status)


def test_compensatable_without_compensation(journal: Journal) -> None:
    with pytest.raises(ConfigError, match="compensatable but declares no compensation"):
        journal.tool(
            reversibility=Reversibility.COMPENSATABLE,
            system="payments",
            object_id=lambda order_id, **_: order_id,
        )(refund)


@pytest.mark.parametrize(
    "builder",
    [
        lambda order_id: {"order_id": order_id},  # no amount, no result
        lambda order_id, amount: {"order_id": order_id},  # no result=
        lambda refund_id, **_: {},  # a parameter the tool does not have
        lambda: {},
    ],
    ids=["missing-params", "missing-result", "unknown-param", "no-params"],
)
def test_compensation_args_with_the_wrong_signature(journal: Journal, builder: Any) -> None:
    with pytest.raises(ConfigError, match=r"compensation args for 'refund' must accept"):
        journal.tool(
            reversibility="compensatable",
            system="payments",
            object_id=lambda order_id, **_: order_id,
            compensation=Compensate("cancel_refund", builder),
        )(refund)


def test_compensation_on_a_tool_that_is_not_compensatable(
    journal: Journal, invoices: SqlTableTarget
) -> None:
    with pytest.raises(ConfigError, match="declares a compensation but is reversible"):
        journal.tool(
            reversibility="reversible",
            target=invoices,
            object_id=_by_id,
            compensation=Compensate("undo", lambda **_: {}),
        )(set_status)


@pytest.mark.parametrize("window", [timedelta(0), timedelta(seconds=-1)])
def test_compensation_window_must_be_positive(journal: Journal, window: timedelta) -> None:
    with pytest.raises(ConfigError, match="window of 'refund' must be positive"):
        journal.tool(
            reversibility="compensatable",
            system="payments",
            object_id=lambda order_id, **_: order_id,
            compensation=Compensate("cancel", lambda **kw: kw, window=window),
        )(refund)


@pytest.mark.parametrize(
    "extractor",
    [
        lambda order_id: order_id,  # not a parameter of set_status
        lambda invoice_id: invoice_id,  # misses status (no **_)
        lambda: "x",
        lambda invoice_id, status, extra: invoice_id,  # requires more than the tool gives
    ],
    ids=["unknown-param", "missing-param", "no-params", "extra-required"],
)
def test_object_id_extractor_with_the_wrong_signature(
    journal: Journal, invoices: SqlTableTarget, extractor: Any
) -> None:
    with pytest.raises(ConfigError, match=r"object_id of tool 'set_status' must accept"):
        journal.tool(reversibility="reversible", target=invoices, object_id=extractor)(set_status)


@pytest.mark.parametrize("option", ["value", "idempotency_key", "requires_approval"])
def test_other_extractors_with_the_wrong_signature(journal: Journal, option: str) -> None:
    with pytest.raises(ConfigError, match=rf"{option} of tool 'set_status' must accept"):
        journal.tool(
            reversibility="irreversible",
            system="erp",
            object_id=_by_id,
            **{option: lambda nope: nope},
        )(set_status)


def test_duplicate_tool_names(journal: Journal, invoices: SqlTableTarget) -> None:
    journal.tool(reversibility="reversible", target=invoices, object_id=_by_id)(set_status)
    with pytest.raises(ConfigError, match="'set_status' is declared twice"):
        journal.tool(reversibility="irreversible", system="erp", object_id=_by_id)(set_status)

    def other(invoice_id: str) -> None: ...

    with pytest.raises(ConfigError, match="'set_status' is declared twice"):
        journal.tool(reversibility="read_only", name="set_status")(other)
    assert list(journal.tools) == ["set_status"]


def test_the_same_name_in_two_journals_is_fine(invoices: SqlTableTarget) -> None:
    a = Journal(Settings(), sink=InMemoryEventSink())
    b = Journal(Settings(), sink=InMemoryEventSink())
    a.tool(reversibility="reversible", target=invoices, object_id=_by_id)(set_status)
    b.tool(reversibility="reversible", target=invoices, object_id=_by_id)(set_status)
    assert "set_status" in a.tools and "set_status" in b.tools


# --- valid declarations ---------------------------------------------------------------------
def test_valid_declarations_pass(journal: Journal, invoices: SqlTableTarget) -> None:
    reversible = journal.tool(
        reversibility=Reversibility.REVERSIBLE, target=invoices, object_id=_by_id
    )(set_status)

    @journal.tool(
        reversibility="compensatable",
        system="payments",
        object_id=lambda order_id, **_: order_id,
        compensation=Compensate(
            tool="cancel_refund",
            args=lambda order_id, amount, result: {"refund_id": result},
            window=timedelta(hours=2),
        ),
        value=lambda amount, **_: amount,
    )
    def issue_refund(order_id: str, amount: float) -> str:
        return "refund-1"

    @journal.tool(reversibility="irreversible", system="mail", object_id=lambda to, **_: to)
    def send_email(to: str, body: str) -> None: ...

    @journal.tool(reversibility="read_only")
    def lookup(invoice_id: str) -> str:
        return invoice_id

    @journal.tool(reversibility="reversible", target=StubTarget(), object_id=lambda **kw: "k")
    def anything(*args: Any, **kwargs: Any) -> None: ...

    @journal.tool(
        reversibility="irreversible",
        system="erp",
        object_id=lambda invoice_id, **_: invoice_id,
        idempotency_key=lambda invoice_id, **_: f"void-{invoice_id}",
        requires_approval=lambda **_: False,
        name="void_invoice",
    )
    def void(invoice_id: str, reason: str = "") -> None: ...

    assert set(journal.tools) == {
        "set_status",
        "issue_refund",
        "send_email",
        "lookup",
        "anything",
        "void_invoice",
    }
    spec = journal.tools["set_status"]
    assert spec.target is invoices and spec.system == "erp" and spec.mutating
    assert spec.parameters == ("invoice_id", "status")
    assert journal.tools["issue_refund"].compensation is not None
    assert journal.tools["issue_refund"].system == "payments"
    assert not journal.tools["lookup"].mutating
    assert journal.tools["anything"].system == "stub"
    assert reversible.__name__ == "set_status"
    assert reversible.__backout_tool__ is spec  # type: ignore[attr-defined]


def test_async_tools_are_recognised(journal: Journal) -> None:
    @journal.tool(reversibility="read_only")
    async def fetch(url: str) -> str:
        return url

    assert journal.tools["fetch"].is_async


def test_reversibility_accepts_enum_and_value() -> None:
    for kind in (Reversibility.IRREVERSIBLE, "irreversible"):
        spec = declare(set_status, reversibility=kind, system="erp", object_id=_by_id)
        assert spec.reversibility is Reversibility.IRREVERSIBLE


def test_sql_table_target_satisfies_the_protocol(invoices: SqlTableTarget) -> None:
    assert isinstance(invoices, Target)
    assert isinstance(StubTarget(), Target)
    assert not isinstance(SystemOnly(), Target)


def test_bind_applies_defaults_and_flattens_var_keywords() -> None:
    def tool(a: int, b: int = 2, **extra: Any) -> None: ...

    spec = declare(tool, reversibility="read_only")
    assert spec.bind((1,), {"c": 3}) == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(TypeError):
        spec.bind((), {})
