"""The pydantic models mirror the ``.avsc`` files exactly, and the schemas evolve compatibly.

Every model field maps to an Avro field of the same name and shape (type, nullability,
default, enum symbols, nested records) and every Avro field has a model field.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import datetime
from enum import StrEnum
from importlib import resources
from io import BytesIO
from typing import Any

import fastavro
import pytest
from pydantic import BaseModel, JsonValue

from backout.schemas import codec as codec_mod
from backout.schemas.events import ActionEvent, ControlCommand, Signal

JSON_UNION = ["null", "boolean", "long", "double", "string", "JsonText"]
"""How a JSON value is written: native scalars, everything else as canonical JSON text."""

SCALARS: dict[Any, tuple[str, ...]] = {
    str: ("string",),
    bool: ("boolean",),
    int: ("long", "int"),
    float: ("double",),
    bytes: ("bytes",),
}


def _load(name: str) -> dict[str, Any]:
    text = resources.files("backout.schemas").joinpath(name).read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def _history_files() -> list[str]:
    history = resources.files("backout.schemas").joinpath("history")
    return sorted(e.name for e in history.iterdir() if e.name.endswith(".avsc"))


class AvroNames:
    """Named types defined anywhere in a schema, so references by name resolve."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.named: dict[str, dict[str, Any]] = {}
        self._collect(schema)

    def _collect(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self._collect(item)
        elif isinstance(node, dict):
            if node.get("type") in ("record", "enum", "fixed"):
                self.named[node["name"]] = node
            for key in ("fields", "items", "values", "type"):
                if key in node and not isinstance(node[key], str):
                    self._collect(node[key])

    def resolve(self, node: Any) -> Any:
        if isinstance(node, str) and node in self.named:
            return self.named[node]
        if isinstance(node, dict) and isinstance(node.get("type"), str | dict | list):
            if node["type"] in ("record", "enum", "fixed", "map", "array"):
                return node
            if "logicalType" in node:
                return node
            return self.resolve(node["type"])
        return node


def _name_of(node: Any) -> Any:
    return node["name"] if isinstance(node, dict) and "name" in node else node


def check_type(annotation: Any, avro: Any, names: AvroNames, where: str) -> None:
    """Assert that values of ``annotation`` are written as the Avro type ``avro``."""
    avro = names.resolve(avro)
    if annotation is JsonValue:
        assert isinstance(avro, list), where
        assert [_name_of(names.resolve(a)) for a in avro] == JSON_UNION, where
        json_text = names.resolve("JsonText")
        assert [(f["name"], f["type"]) for f in json_text["fields"]] == [("json", "string")]
        return
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert type(None) in typing.get_args(annotation), where
        assert isinstance(avro, list) and avro[0] == "null", f"{where}: nullable needs null first"
        assert len(members) == 1 and len(avro) == 2, where
        check_type(members[0], avro[1], names, where)
        return
    if origin is dict:
        key, value = typing.get_args(annotation)
        assert key is str, where
        assert isinstance(avro, dict) and avro["type"] == "map", where
        check_type(value, avro["values"], names, f"{where}.<value>")
        return
    if origin is list:
        (item,) = typing.get_args(annotation)
        assert isinstance(avro, dict) and avro["type"] == "array", where
        check_type(item, avro["items"], names, f"{where}[]")
        return
    assert not isinstance(avro, list), f"{where}: a union for a non-optional field"
    if annotation in SCALARS:
        assert avro in SCALARS[annotation], f"{where}: {annotation} written as {avro}"
        return
    if annotation is datetime:
        assert avro == {"type": "long", "logicalType": "timestamp-micros"}, where
        return
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        assert isinstance(avro, dict) and avro["type"] == "enum", where
        assert avro["name"] == annotation.__name__, where
        assert avro["symbols"] == [m.value for m in annotation], f"{where}: enum symbols"
        return
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        check_record(annotation, avro, names, where)
        return
    raise AssertionError(f"{where}: no Avro mapping for {annotation!r}")


def _jsonable_default(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value
    return value


def check_record(
    model: type[BaseModel], avro: dict[str, Any], names: AvroNames, where: str
) -> None:
    """Field by field, both ways: names, types, nullability and defaults."""
    assert avro["type"] == "record", where
    assert avro["name"] == model.__name__, where
    avro_fields = {f["name"]: f for f in avro["fields"]}
    model_fields = model.model_fields
    assert list(model_fields) == list(avro_fields), f"{where}: field names or order differ"
    for name, info in model_fields.items():
        field = avro_fields[name]
        path = f"{where}.{name}"
        check_type(info.annotation, field["type"], names, path)
        if info.is_required():
            assert "default" not in field, f"{path}: required in the model, defaulted in Avro"
            continue
        assert "default" in field, f"{path}: defaulted in the model, required in Avro"
        default = info.get_default(call_default_factory=True)
        assert _jsonable_default(default) == field["default"], f"{path}: defaults differ"
        # Nullability follows the default: a field defaulting to None is a null union.
        resolved = names.resolve(field["type"])
        nullable = isinstance(resolved, list) and resolved[0] == "null"
        assert nullable == (default is None), f"{path}: default None iff Avro null union"


@pytest.mark.parametrize("model", [ActionEvent, ControlCommand, Signal])
def test_every_model_field_maps_to_its_avro_field_and_back(model: type[BaseModel]) -> None:
    schema = _load(f"{model.__name__}.avsc")
    assert schema["namespace"] == "backout.v1"
    assert codec_mod.record_name(model) == f"backout.v1.{model.__name__}"
    check_record(model, schema, AvroNames(schema), model.__name__)


@pytest.mark.parametrize("model", [ActionEvent, ControlCommand, Signal])
def test_models_are_frozen_and_reject_unknown_fields(model: type[BaseModel]) -> None:
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"


def test_the_checker_notices_a_mismatch() -> None:
    schema = _load("ActionEvent.avsc")
    broken = json.loads(json.dumps(schema))
    broken["fields"] = [f for f in broken["fields"] if f["name"] != "labels"]
    with pytest.raises(AssertionError):
        check_record(ActionEvent, broken, AvroNames(broken), "ActionEvent")
    retyped = json.loads(json.dumps(schema))
    for field in retyped["fields"]:
        if field["name"] == "tenant":
            field["type"] = "string"
            field.pop("default")
    with pytest.raises(AssertionError):
        check_record(ActionEvent, retyped, AvroNames(retyped), "ActionEvent")
    reordered = json.loads(json.dumps(schema))
    for node in reordered["fields"]:
        if node["name"] == "status":
            node["type"]["symbols"] = list(reversed(node["type"]["symbols"]))
    with pytest.raises(AssertionError):
        check_record(ActionEvent, reordered, AvroNames(reordered), "ActionEvent")
    nested = json.loads(json.dumps(schema))
    for node in nested["fields"]:
        if node["name"] == "error":
            node["type"][1]["fields"].pop()  # ErrorInfo.retryable
    with pytest.raises(AssertionError, match=r"ActionEvent\.error"):
        check_record(ActionEvent, nested, AvroNames(nested), "ActionEvent")


# --- backward compatibility -------------------------------------------------------------
@pytest.mark.parametrize("old_file", _history_files())
def test_every_field_added_since_an_old_version_has_a_default(old_file: str) -> None:
    record_name = old_file.split(".v", 1)[0]
    old = _load(f"history/{old_file}")
    new = _load(f"{record_name}.avsc")
    assert old["name"] == new["name"] and old["namespace"] == new["namespace"]
    old_fields = {f["name"]: f for f in old["fields"]}
    added = [f for f in new["fields"] if f["name"] not in old_fields]
    assert added, f"{old_file} is identical in fields to the current schema"
    for field in added:
        assert "default" in field, f"{field['name']} was added without a default"
    # Enum symbols are only ever appended: the current reader knows every old symbol.
    old_names, new_names = AvroNames(old), AvroNames(new)
    for name, node in old_names.named.items():
        if node["type"] == "enum":
            new_symbols = new_names.named[name]["symbols"]
            assert new_symbols[: len(node["symbols"])] == node["symbols"], name


@pytest.mark.parametrize("old_file", _history_files())
def test_old_writer_schema_resolves_into_the_current_reader(old_file: str) -> None:
    record_name = old_file.split(".v", 1)[0]
    old = fastavro.parse_schema(_load(f"history/{old_file}"))
    new = fastavro.parse_schema(_load(f"{record_name}.avsc"))
    required = {
        f["name"]: f["type"] for f in _load(f"history/{old_file}")["fields"] if "default" not in f
    }
    datum = {name: _smallest(avro_type) for name, avro_type in required.items()}
    buf = BytesIO()
    fastavro.schemaless_writer(buf, old, datum)
    read = fastavro.schemaless_reader(BytesIO(buf.getvalue()), old, new)
    assert isinstance(read, dict)
    current = _load(f"{record_name}.avsc")
    for field in current["fields"]:
        if field["name"] not in required:
            assert read[field["name"]] == field["default"], field["name"]


def _smallest(avro_type: Any) -> Any:
    if avro_type == "string":
        return "x"
    if isinstance(avro_type, dict) and avro_type.get("logicalType") == "timestamp-micros":
        return 0
    if isinstance(avro_type, dict) and avro_type.get("type") == "enum":
        return avro_type["symbols"][0]
    raise AssertionError(f"add a sample value for {avro_type!r}")
