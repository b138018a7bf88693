"""Loading targets (module:attr or TOML) and compensating tools for the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backout.producers.targets import SqlTableTarget
from backout.rollback.targets_config import load_compensators, load_targets
from backout.schemas.errors import ConfigError
from tests.fakes import InMemoryTarget

TARGETS = [InMemoryTarget("erp"), InMemoryTarget("crm")]
ONE = InMemoryTarget("solo")
NOT_TARGETS = [object()]
DUPLICATES = [InMemoryTarget("erp"), InMemoryTarget("erp")]
NUMBER = 42


def make_targets() -> list[InMemoryTarget]:
    return [InMemoryTarget("made")]


def refund(amount: int) -> int:
    return amount


COMPENSATORS = {"refund": refund}
TOOL_LIST = [refund]


class FakeJournal:
    def __init__(self) -> None:
        self.tools = {"refund": refund}


JOURNAL = FakeJournal()
HERE = "tests.unit.test_targets_config"


@pytest.mark.parametrize(
    ("attr", "systems"),
    [("TARGETS", {"erp", "crm"}), ("ONE", {"solo"}), ("make_targets", {"made"})],
)
def test_targets_from_code(attr: str, systems: set[str]) -> None:
    assert set(load_targets(f"{HERE}:{attr}")) == systems


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"{HERE}:NOT_TARGETS", "is not a Target"),
        (f"{HERE}:DUPLICATES", "two targets for system 'erp'"),
        (f"{HERE}:NUMBER", "expected an iterable of Target"),
        (f"{HERE}:MISSING", "has no 'MISSING'"),
        ("no_such_module_xyz:T", "cannot import 'no_such_module_xyz'"),
        ("justaname", "use module:attribute or a .toml file"),
    ],
)
def test_bad_target_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_targets(spec)


def test_targets_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "targets.toml"
    path.write_text(f"""
[[targets]]
system = "erp"
url = "sqlite:///{tmp_path / "erp.db"}"
table = "invoices"
version = "version"

[[targets]]
system = "crm"
url = "sqlite:///{tmp_path / "erp.db"}"
table = "contacts"
key = "email"
fields = ["name"]
""")
    found = load_targets(str(path))
    erp, crm = found["erp"], found["crm"]
    assert isinstance(erp, SqlTableTarget) and isinstance(crm, SqlTableTarget)
    assert (erp.table_name, erp.key, erp.version) == ("invoices", "id", "version")
    assert (crm.key, crm.field_names) == ("email", ["name"])
    assert erp.engine is crm.engine  # one engine per URL


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"declares no \[\[targets\]\]"),
        ("[[targets]]\nsystem = 'x'\nurl = 'sqlite://'\n", "'table' is required"),
        (
            "[[targets]]\nsystem = 'x'\nurl = 'sqlite://'\ntable = 't'\ncolour = 'red'\n",
            "unknown setting 'colour'",
        ),
        (
            "[[targets]]\nsystem = 'x'\nurl = 'sqlite://'\ntable = 't'\nfields = 'a'\n",
            "'fields' must be a list",
        ),
        ("[[targets]]\nsystem = 'x'\nurl = 'nope://'\ntable = 't'\n", "bad database url"),
        ("not toml at all [", "not valid TOML"),
        (
            "[[targets]]\nsystem = 'x'\nurl = 'sqlite://'\ntable = 't'\n"
            "[[targets]]\nsystem = 'x'\nurl = 'sqlite://'\ntable = 'u'\n",
            "two targets",
        ),
    ],
)
def test_bad_toml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_targets(str(path))


def test_missing_toml_file() -> None:
    with pytest.raises(ConfigError, match="cannot read targets file"):
        load_targets("/nonexistent/targets.toml")


@pytest.mark.parametrize("attr", ["COMPENSATORS", "TOOL_LIST", "JOURNAL"])
def test_compensators(attr: str) -> None:
    tools: dict[str, Any] = load_compensators(f"{HERE}:{attr}")
    assert tools["refund"](3) == 3


def test_bad_compensators() -> None:
    with pytest.raises(ConfigError, match="expected a Journal"):
        load_compensators(f"{HERE}:NUMBER")
