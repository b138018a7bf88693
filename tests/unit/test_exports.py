"""The public surface is explicit and stable: ``__all__`` is pinned here.

Changing what a package exports is a deliberate act: update the lists below with it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

SCHEMAS_ALL = [
    "ActionEvent",
    "ApprovalDenied",
    "BackoutError",
    "CallStatus",
    "Compensation",
    "CompensationFailed",
    "ConfigError",
    "ControlAction",
    "ControlCommand",
    "ControlError",
    "DecodeError",
    "ErrorInfo",
    "EventKind",
    "Evidence",
    "FreezeMode",
    "Frozen",
    "JsonMap",
    "Origin",
    "PlanningError",
    "ProjectionError",
    "PublishError",
    "RecordImage",
    "Reversibility",
    "RollbackError",
    "SchemaError",
    "Severity",
    "Signal",
    "SkipEvent",
    "TargetRef",
    "decode",
    "encode",
]

PRODUCERS_ALL = [
    "ApprovalDenied",
    "CallGuard",
    "CallScope",
    "CasOutcome",
    "CasResult",
    "Compensate",
    "ControlGuard",
    "EventSink",
    "FreezeAwareConsumer",
    "Frozen",
    "InMemoryEventSink",
    "Journal",
    "Pending",
    "PublishError",
    "Reversibility",
    "RunContext",
    "SqlTableTarget",
    "Target",
    "TargetUnavailable",
    "ToolSpec",
]


@pytest.mark.parametrize(
    ("package", "expected"),
    [("backout.schemas", SCHEMAS_ALL), ("backout.producers", PRODUCERS_ALL)],
)
def test_all_is_pinned_and_importable(package: str, expected: list[str]) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(expected)
    assert len(set(module.__all__)) == len(module.__all__), "duplicates in __all__"
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    assert set(expected) <= namespace.keys()


def test_the_design_public_surface_imports() -> None:
    from backout.producers import Frozen, Journal, Reversibility, SqlTableTarget
    from backout.schemas import ActionEvent, ControlCommand, DecodeError, Signal, decode, encode

    assert callable(encode) and callable(decode)
    assert issubclass(DecodeError, Exception) and issubclass(Frozen, Exception)
    assert {ActionEvent.__name__, ControlCommand.__name__, Signal.__name__} == {
        "ActionEvent",
        "ControlCommand",
        "Signal",
    }
    assert callable(Journal.from_settings)
    assert Reversibility("reversible") is Reversibility.REVERSIBLE
    assert SqlTableTarget.__name__ == "SqlTableTarget"


def test_shared_names_are_the_same_objects() -> None:
    import backout.producers as producers
    import backout.schemas as schemas

    for name in ("Frozen", "PublishError", "ApprovalDenied", "Reversibility"):
        assert getattr(producers, name) is getattr(schemas, name), name


def test_importing_schemas_pulls_in_no_kafka_or_sql() -> None:
    code = (
        "import sys, backout.schemas\n"
        "bad = [m for m in ('confluent_kafka', 'sqlalchemy', 'faust') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pure_producer_modules_load_without_the_journal() -> None:
    # backout.producers resolves its names on first use: a pure module of the package
    # (what the operator commands import) does not drag in SQLAlchemy or Kafka.
    code = (
        "import sys, backout.producers.freezes, backout.producers.control\n"
        "bad = [m for m in ('confluent_kafka', 'sqlalchemy', 'faust',\n"
        "                   'backout.producers.journal') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "from backout.producers import Journal\n"
        "assert 'backout.producers.journal' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_unknown_producers_name_is_an_attribute_error() -> None:
    import backout.producers as producers

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = producers.Nope  # type: ignore[attr-defined]
