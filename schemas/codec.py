"""Bytes <-> backout records. Pure: no I/O.

Records are written in Avro single-object encoding by default: ``0xC3 0x01``, the
8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's parsing canonical
form, then the Avro binary body. Any Avro implementation holding the schema can read it.
Older writer schemas (``schemas/history``) stay readable: their fingerprints map to the
old schema, and the body is resolved into the current one.

Bodies are written and read by the specialised code in ``avro_fast.py`` (several times
faster than generic fastavro on our union-heavy records); fastavro reads older writer
schemas, resolving them into the current one (through the datums of ``datum.py``).
Confluent Schema Registry framing (``0x00`` + 4-byte schema id) lives in ``registry.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from io import BytesIO
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import to_parsing_canonical_form
from pydantic import BaseModel

from backout.schemas.avro_fast import (
    READ_ERRORS,
    WRITE_ERRORS,
    AvroFastError,
    Binding,
    CompiledRecord,
    read_error,
)
from backout.schemas.datum import (
    FROM_DATUM,
    RecordT,
    from_avro_json,
    from_datum,
    to_avro_json,
    to_datum,
)
from backout.schemas.errors import DecodeError, SchemaError
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

__all__ = [
    "RECORD_TYPES",
    "SINGLE_OBJECT_MAGIC",
    "WriterSchema",
    "crc64_avro",
    "current_schema",
    "decode",
    "decode_body",
    "encode",
    "encode_body",
    "from_avro_json",
    "from_datum",
    "record_name",
    "schema_catalog",
    "to_avro_json",
    "to_datum",
    "to_parsing_canonical_form",
    "writer_schema",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_HEADER_LEN = 10

RECORD_TYPES: tuple[type[BaseModel], ...] = (ActionEvent, ControlCommand, Signal)


# --- CRC-64-AVRO (Rabin) fingerprint, as the Avro specification defines it -------------
_EMPTY64 = 0xC15D213AA4D7A795


def _fingerprint_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_FP_TABLE = _fingerprint_table()


def crc64_avro(data: bytes) -> int:
    """The 64-bit Rabin fingerprint (CRC-64-AVRO) of ``data``."""
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


# --- schemas ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WriterSchema:
    """A schema some record may have been written with."""

    record_type: type[BaseModel]
    parsed: dict[str, Any]
    canonical: str
    fingerprint: bytes
    """8 bytes, little-endian, as single-object encoding puts it on the wire."""
    is_current: bool


def _load_avsc(name: str) -> dict[str, Any]:
    text = resources.files("backout.schemas").joinpath(name).read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


def writer_schema(raw: dict[str, Any], record_type: type[BaseModel], current: bool) -> WriterSchema:
    parsed = cast(dict[str, Any], parse_schema(raw, _write_hint=True, _force=True))
    canonical = to_parsing_canonical_form(raw)
    fp = crc64_avro(canonical.encode("utf-8")).to_bytes(8, "little")
    return WriterSchema(record_type, parsed, canonical, fp, current)


@cache
def schema_catalog() -> dict[bytes, WriterSchema]:
    """Every known writer schema by fingerprint: the current ones and ``history/*.avsc``."""
    catalog: dict[bytes, WriterSchema] = {}
    for record_type in RECORD_TYPES:
        name = record_type.__name__
        current = writer_schema(_load_avsc(f"{name}.avsc"), record_type, True)
        catalog[current.fingerprint] = current
        history = resources.files("backout.schemas").joinpath("history")
        for entry in sorted(history.iterdir(), key=lambda e: e.name):
            if entry.name.startswith(f"{name}.v") and entry.name.endswith(".avsc"):
                old = writer_schema(json.loads(entry.read_text("utf-8")), record_type, False)
                catalog.setdefault(old.fingerprint, old)
    return catalog


@cache
def current_schema(record_type: type[BaseModel]) -> WriterSchema:
    """The schema records of ``record_type`` are written with now."""
    for schema in schema_catalog().values():
        if schema.record_type is record_type and schema.is_current:
            return schema
    raise SchemaError(f"no schema for {record_type.__name__!r}")


_BINDING = Binding(
    records={"ActionEvent": ActionEvent, "TargetRef": TargetRef, "RecordImage": RecordImage,
             "ErrorInfo": ErrorInfo, "Compensation": Compensation,
             "ControlCommand": ControlCommand, "Signal": Signal, "Evidence": Evidence},
    enums={"EventKind": EventKind, "Reversibility": Reversibility, "CallStatus": CallStatus,
           "Origin": Origin, "ControlAction": ControlAction, "FreezeMode": FreezeMode,
           "Severity": Severity})


@cache
def compiled(record_type: type[BaseModel]) -> CompiledRecord:
    """The specialised writer/reader of ``record_type``'s current schema."""
    return CompiledRecord(_load_avsc(f"{record_type.__name__}.avsc"), _BINDING)


def _writer(record_type: type[BaseModel]) -> Callable[[BaseModel, bytes], bytes]:
    if record_type not in FROM_DATUM:
        raise SchemaError(f"not a backout record: {record_type.__name__!r}")
    return compiled(record_type).writer


def _not_fitting(record: BaseModel, exc: Exception) -> SchemaError:
    detail = exc if isinstance(exc, AvroFastError) else f"value does not fit the schema: {exc!r}"
    return SchemaError(f"{type(record).__name__} does not fit its schema: {detail}")


def _write(record: BaseModel, writer: Callable[[BaseModel, bytes], bytes], head: bytes) -> bytes:
    try:
        return writer(record, head)
    except (AvroFastError, *WRITE_ERRORS) as exc:
        raise _not_fitting(record, exc) from exc


def encode_body(record: BaseModel) -> bytes:
    """The bare Avro binary body of ``record`` (no header), with its current schema."""
    return _write(record, _writer(type(record)), b"")


def decode_body(body: bytes, writer: WriterSchema, *, raw: bytes | None = None) -> BaseModel:
    """Read an Avro body written with ``writer`` into the current model."""
    if writer.is_current:
        try:
            return cast(BaseModel, compiled(writer.record_type).read(body))
        except AvroFastError as exc:
            raise DecodeError(f"corrupt {writer.record_type.__name__} body: {exc}",
                              raw=raw if raw is not None else body) from exc
    reader = current_schema(writer.record_type).parsed
    try:
        datum = schemaless_reader(BytesIO(body), writer.parsed, reader)
        return FROM_DATUM[writer.record_type](cast(dict[str, Any], datum))
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise DecodeError(
            f"corrupt {writer.record_type.__name__} body: {exc!r}",
            raw=raw if raw is not None else body,
        ) from exc


# --- single-object encoding -----------------------------------------------------------
_Reader = Callable[[bytes, int], Any]
_ENCODERS: dict[type[BaseModel], tuple[Callable[[BaseModel, bytes], bytes], bytes]] = {}
_DECODERS: dict[bytes, tuple[type[BaseModel], _Reader]] = {}


def _encoder(record_type: type[BaseModel]) -> tuple[Callable[[BaseModel, bytes], bytes], bytes]:
    found = _ENCODERS.get(record_type)
    if found is None:
        writer = _writer(record_type)
        found = _ENCODERS[record_type] = (
            writer, SINGLE_OBJECT_MAGIC + current_schema(record_type).fingerprint)
    return found


def encode(record: BaseModel) -> bytes:
    """Encode a record in Avro single-object encoding."""
    writer, head = _ENCODERS.get(type(record)) or _encoder(type(record))
    try:
        return writer(record, head)
    except (AvroFastError, *WRITE_ERRORS) as exc:
        raise _not_fitting(record, exc) from exc


def _fast_decoders() -> dict[bytes, tuple[type[BaseModel], _Reader]]:
    """Header -> (record type, compiled reader) for every current schema."""
    if not _DECODERS:
        for record_type in RECORD_TYPES:
            header = SINGLE_OBJECT_MAGIC + current_schema(record_type).fingerprint
            _DECODERS[header] = (record_type, compiled(record_type).reader)
    return _DECODERS


def decode(raw: bytes, expected: type[RecordT] | None = None) -> Any:
    """Decode single-object-encoded bytes into the record they hold.

    Args:
        raw: the bytes, as read from a topic.
        expected: when given, the record must be of this type.

    Raises:
        DecodeError: the bytes are truncated, garbage, of an unknown schema, or not
            of the ``expected`` type. The error keeps ``raw``.
    """
    if type(raw) is bytes:
        # The common case, a current schema: the compiled reader starts after the header.
        fast = (_DECODERS or _fast_decoders()).get(raw[:_HEADER_LEN])
        if fast is not None and (expected is None or fast[0] is expected):
            try:
                return fast[1](raw, _HEADER_LEN)
            except READ_ERRORS as exc:
                raise DecodeError(f"corrupt {fast[0].__name__} body: {read_error(exc)}",
                                  raw=raw) from exc
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(raw).__name__}", raw=b"")
    raw = bytes(raw)
    if len(raw) < _HEADER_LEN or raw[:2] != SINGLE_OBJECT_MAGIC:
        raise DecodeError("not Avro single-object encoding (missing 0xC3 0x01 header)", raw=raw)
    writer = schema_catalog().get(raw[2:_HEADER_LEN])
    if writer is None:
        raise DecodeError(f"unknown schema fingerprint {raw[2:_HEADER_LEN].hex()}", raw=raw)
    if expected is not None and writer.record_type is not expected:
        raise DecodeError(
            f"expected {expected.__name__}, got {writer.record_type.__name__}", raw=raw
        )
    return decode_body(raw[_HEADER_LEN:], writer, raw=raw)


def record_name(record_type: type[BaseModel]) -> str:
    """The Avro full name of a record type, e.g. ``backout.v1.ActionEvent``."""
    return f"backout.v1.{record_type.__name__}"


def enum_symbols(enum_type: type[StrEnum]) -> list[str]:
    """The Avro symbols of one of our enums (its values, in order)."""
    return [member.value for member in enum_type]
