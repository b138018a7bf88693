"""Fast reading of ActionEvents for the projector. [adapter]

The projector reads every event once and decodes nothing else, so decoding dominates its
cost. Records in Avro single-object encoding with the current ActionEvent schema are
read by a reader compiled (``schemas.avro_fast``) to produce plain dicts, then turned
into the very same frozen models ``codec.decode`` returns, without per-field keyword
packing. Anything else (Schema Registry framing, older writer schemas, other record
types, garbage) goes through the configured codec, which also raises the DecodeError a
dead letter needs. ``tests/unit/test_projection_reader.py`` holds the two paths equal.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, TypeVar

from pydantic import BaseModel

from backout.schemas import codec as avro
from backout.schemas.avro_fast import AvroFastError, Binding, CompiledRecord
from backout.schemas.errors import DecodeError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    ErrorInfo,
    EventKind,
    Origin,
    RecordImage,
    Reversibility,
    TargetRef,
)
from backout.schemas.registry import Codec

__all__ = ["ActionReader"]

ModelT = TypeVar("ModelT", bound=BaseModel)
_NEW = object.__new__
_SET = object.__setattr__
_HEADER = 10


def _model(cls: type[ModelT], values: dict[str, Any]) -> ModelT:
    """A model from values read with its own schema (every field present, types right)."""
    instance = _NEW(cls)
    _SET(instance, "__dict__", values)
    _SET(instance, "__pydantic_fields_set__", set(values))
    _SET(instance, "__pydantic_extra__", None)
    _SET(instance, "__pydantic_private__", None)
    return instance


@cache
def _compiled() -> tuple[bytes, CompiledRecord]:
    text = resources.files("backout.schemas").joinpath("ActionEvent.avsc").read_text("utf-8")
    binding = Binding(
        records={},
        enums={
            "EventKind": EventKind,
            "Reversibility": Reversibility,
            "CallStatus": CallStatus,
            "Origin": Origin,
        },
    )
    header = avro.SINGLE_OBJECT_MAGIC + avro.current_schema(ActionEvent).fingerprint
    return header, CompiledRecord(json.loads(text), binding)


class ActionReader:
    """Decodes ActionEvents: fast for current single-object records, else by ``codec``."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.header, self.compiled = _compiled()

    def __call__(self, raw: bytes) -> ActionEvent:
        """The event in ``raw``.

        Raises:
            DecodeError: not an ActionEvent this codec can read.
        """
        if raw[:_HEADER] != self.header:
            event: ActionEvent = self.codec.decode(raw, ActionEvent)
            return event
        try:
            values = self.compiled.read(raw[_HEADER:])
        except AvroFastError as exc:
            raise DecodeError(f"corrupt ActionEvent body: {exc}", raw=raw) from exc
        target = values["target"]
        if target is not None:
            values["target"] = _model(TargetRef, target)
        before, after = values["before"], values["after"]
        if before is not None:
            values["before"] = _model(RecordImage, before)
        if after is not None:
            values["after"] = _model(RecordImage, after)
        error, compensation = values["error"], values["compensation"]
        if error is not None:
            values["error"] = _model(ErrorInfo, error)
        if compensation is not None:
            values["compensation"] = _model(Compensation, compensation)
        return _model(ActionEvent, values)
