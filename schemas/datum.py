"""Records <-> Avro datums (plain dicts) as fastavro reads and writes them. Pure: no I/O.

The codec itself never builds datums: its compiled code goes from model to bytes and
back. Datums serve fastavro, which resolves records written with an older schema into
the current one (``codec.decode_body``), and the tests that hold the compiled code to
fastavro's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

from pydantic import BaseModel, JsonValue

from backout.schemas.errors import SchemaError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    ControlAction,
    ControlCommand,
    ErrorInfo,
    EventKind,
    Evidence,
    FreezeMode,
    Origin,
    RecordImage,
    Reversibility,
    Severity,
    Signal,
    TargetRef,
)

__all__ = ["FROM_DATUM", "from_avro_json", "from_datum", "to_avro_json", "to_datum"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
RecordT = TypeVar("RecordT", ActionEvent, ControlCommand, Signal)


def to_avro_json(value: JsonValue) -> object:
    """A JSON value as the Avro JsonValue union: scalars native, the rest as JsonText."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return value
    return {"json": json.dumps(value, sort_keys=True, separators=(",", ":"))}


def from_avro_json(value: object) -> JsonValue:
    """Inverse of :func:`to_avro_json`."""
    if type(value) is dict:
        return cast(JsonValue, json.loads(value["json"]))
    return cast(JsonValue, value)


def _map_out(values: dict[str, JsonValue]) -> dict[str, object]:
    return {k: to_avro_json(v) for k, v in values.items()}


def _map_in(values: dict[str, object]) -> dict[str, JsonValue]:
    return {k: from_avro_json(v) for k, v in values.items()}


def _image_out(image: RecordImage | None) -> dict[str, object] | None:
    if image is None:
        return None
    return {
        "exists": image.exists,
        "fields": _map_out(image.fields),
        "version": to_avro_json(image.version),
    }


def _image_in(datum: dict[str, Any] | None) -> RecordImage | None:
    if datum is None:
        return None
    return RecordImage.model_construct(
        exists=datum["exists"],
        fields=_map_in(datum["fields"]),
        version=from_avro_json(datum["version"]),
    )


def _action_out(event: ActionEvent) -> dict[str, object]:
    datum = dict(event.__dict__)
    datum["requested_args"] = _map_out(event.requested_args)
    if event.approved_args is not None:
        datum["approved_args"] = _map_out(event.approved_args)
    if event.target is not None:
        datum["target"] = event.target.__dict__
    datum["before"] = _image_out(event.before)
    datum["after"] = _image_out(event.after)
    datum["result"] = to_avro_json(event.result)
    if event.error is not None:
        datum["error"] = event.error.__dict__
    if event.compensation is not None:
        datum["compensation"] = {
            **event.compensation.__dict__,
            "args": _map_out(event.compensation.args),
        }
    return datum


def _action_in(d: dict[str, Any]) -> ActionEvent:
    d["kind"] = EventKind(d["kind"])
    d["reversibility"] = Reversibility(d["reversibility"])
    d["status"] = CallStatus(d["status"])
    d["origin"] = Origin(d["origin"])
    d["requested_args"] = _map_in(d["requested_args"])
    if d["approved_args"] is not None:
        d["approved_args"] = _map_in(d["approved_args"])
    if d["target"] is not None:
        d["target"] = TargetRef.model_construct(**d["target"])
    d["before"] = _image_in(d["before"])
    d["after"] = _image_in(d["after"])
    d["result"] = from_avro_json(d["result"])
    if d["error"] is not None:
        d["error"] = ErrorInfo.model_construct(**d["error"])
    comp = d["compensation"]
    if comp is not None:
        comp["args"] = _map_in(comp["args"])
        d["compensation"] = Compensation.model_construct(**comp)
    return ActionEvent.model_construct(**d)


def _control_out(command: ControlCommand) -> dict[str, object]:
    datum = dict(command.__dict__)
    if command.approved_args is not None:
        datum["approved_args"] = _map_out(command.approved_args)
    return datum


def _control_in(d: dict[str, Any]) -> ControlCommand:
    d["action"] = ControlAction(d["action"])
    d["mode"] = FreezeMode(d["mode"])
    if d["approved_args"] is not None:
        d["approved_args"] = _map_in(d["approved_args"])
    return ControlCommand.model_construct(**d)


def _signal_out(signal: Signal) -> dict[str, object]:
    datum = dict(signal.__dict__)
    datum["evidence"] = [e.__dict__ for e in signal.evidence]
    return datum


def _signal_in(d: dict[str, Any]) -> Signal:
    d["severity"] = Severity(d["severity"])
    d["evidence"] = [Evidence.model_construct(**e) for e in d["evidence"]]
    return Signal.model_construct(**d)


_TO_DATUM: dict[type[BaseModel], Callable[[Any], dict[str, object]]] = {
    ActionEvent: _action_out,
    ControlCommand: _control_out,
    Signal: _signal_out,
}
FROM_DATUM: dict[type[BaseModel], Callable[[dict[str, Any]], BaseModel]] = {
    ActionEvent: _action_in,
    ControlCommand: _control_in,
    Signal: _signal_in,
}


def to_datum(record: BaseModel) -> dict[str, object]:
    """The Avro datum (plain dict) for a record, as fastavro writes it."""
    try:
        return _TO_DATUM[type(record)](record)
    except KeyError:
        raise SchemaError(f"not a backout record: {type(record).__name__!r}") from None


def from_datum(record_type: type[RecordT], datum: dict[str, Any]) -> RecordT:
    """The record for an Avro datum read with the current schema of ``record_type``."""
    return cast(RecordT, FROM_DATUM[record_type](datum))
