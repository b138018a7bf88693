"""Confluent Schema Registry framing, used instead of single-object encoding when a
registry URL is configured. [adapter]

Wire format: ``0x00``, the 4-byte big-endian schema id, then the Avro binary body.
Subjects follow the record-name strategy (``backout.v1.ActionEvent``), so one topic can
carry several record types. ``mock://`` URLs use confluent-kafka's in-memory registry.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from backout.schemas import codec
from backout.schemas.errors import DecodeError, SchemaError
from backout.schemas.events import ActionEvent, ControlCommand, Signal

RecordT = TypeVar("RecordT", ActionEvent, ControlCommand, Signal)
_MAGIC = b"\x00"


class Codec(Protocol):
    """Turns records into bytes for a topic, and back."""

    def encode(self, record: BaseModel) -> bytes: ...

    def decode(self, raw: bytes, expected: type[RecordT] | None = None) -> Any: ...


class SingleObjectCodec:
    """Avro single-object encoding (the default)."""

    # The module's functions themselves: no extra call on every record.
    encode = staticmethod(codec.encode)
    decode = staticmethod(codec.decode)


class RegistryCodec:
    """Confluent Schema Registry framing over the same Avro bodies."""

    def __init__(self, url: str, *, config: dict[str, str] | None = None) -> None:
        # Imported here: the registry client is heavy and most deployments do not use it.
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient.new_client({"url": url, **(config or {})})
        self._ids: dict[type[BaseModel], bytes] = {}
        self._writers: dict[int, codec.WriterSchema] = {}
        self._lock = threading.Lock()

    def _schema_id(self, record_type: type[BaseModel]) -> bytes:
        cached = self._ids.get(record_type)
        if cached is not None:
            return cached
        with self._lock:
            current = codec.current_schema(record_type)
            try:
                schema_id = self._client.register_schema(
                    codec.record_name(record_type), _avro_schema(current.canonical)
                )
            except Exception as exc:
                raise SchemaError(f"cannot register {record_type.__name__!r}: {exc}") from exc
            self._writers[schema_id] = current
            self._ids[record_type] = schema_id.to_bytes(4, "big")
            return self._ids[record_type]

    def _writer(self, schema_id: int, raw: bytes) -> codec.WriterSchema:
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        try:
            schema_str = self._client.get_schema(schema_id).schema_str
        except Exception as exc:
            raise DecodeError(f"unknown schema id {schema_id}: {exc}", raw=raw) from exc
        name = json.loads(schema_str or "{}").get("name", "")
        for record_type in codec.RECORD_TYPES:
            if record_type.__name__ == name.rsplit(".", 1)[-1]:
                known = {s.canonical: s for s in codec.schema_catalog().values()}
                canonical = codec.to_parsing_canonical_form(json.loads(schema_str or "{}"))
                writer = known.get(canonical) or codec.writer_schema(
                    json.loads(schema_str or "{}"), record_type, False
                )
                self._writers[schema_id] = writer
                return writer
        raise DecodeError(f"schema id {schema_id} is not a backout record ({name!r})", raw=raw)

    def encode(self, record: BaseModel) -> bytes:
        return _MAGIC + self._schema_id(type(record)) + codec.encode_body(record)

    def decode(self, raw: bytes, expected: type[RecordT] | None = None) -> Any:
        raw = bytes(raw)
        if len(raw) < 5 or raw[:1] != _MAGIC:
            raise DecodeError(
                "not Confluent Schema Registry framing (missing 0x00 header)", raw=raw
            )
        writer = self._writer(int.from_bytes(raw[1:5], "big"), raw)
        if expected is not None and writer.record_type is not expected:
            raise DecodeError(
                f"expected {expected.__name__}, got {writer.record_type.__name__}", raw=raw
            )
        return codec.decode_body(raw[5:], writer, raw=raw)


def _avro_schema(text: str) -> Any:
    from confluent_kafka.schema_registry import Schema

    return Schema(text, "AVRO")


def make_codec(schema_registry_url: str | None) -> Codec:
    """The codec settings ask for: registry framing when a URL is set, else single-object."""
    if schema_registry_url:
        return RegistryCodec(schema_registry_url)
    return SingleObjectCodec()
