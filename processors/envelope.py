"""How the processors' first stage hands records to the second. Pure: no I/O.

The actions topic is keyed by record; detectors need every event of an agent (and so of
each of its runs, which belong to one agent) on one partition. The route stage reads
each record's ``agent_id`` straight from the first fields of its Avro body
(:func:`agent_of`, a few microseconds instead of a full decode) and forwards the
*original bytes* with their source position in batches, one batch per routed partition
per poll (:func:`pack`); an agent's records always go to partition
:func:`partition_for` of the routed topic, where its (and its runs') state lives. The
detect stage unpacks them (:func:`unpack`) and decodes each record once with the codec.
Batching keeps the per-message cost of the stream engine off the second hop.

Batch format, version 1: ``0x01`` then, per record, three Avro longs (source partition,
source offset, length) and the record's bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from functools import cache

from backout.schemas.avro_fast import read_long, write_long
from backout.schemas.codec import SINGLE_OBJECT_MAGIC, schema_catalog
from backout.schemas.events import ActionEvent

ENVELOPE_VERSION = 1
Routed = tuple[int, int, bytes]
"""A forwarded record: source partition, source offset, original bytes."""

_HEADER = 10
_PREFIX = (
    ("event_id", "string"),
    ("occurred_at", "long"),
    ("kind", "enum"),
    ("run_id", "string"),
    ("parent_run_id", "null|string"),
    ("agent_id", "string"),
)


def partition_for(agent: str, partitions: int) -> int:
    """The routed partition of an agent: stable across processes and restarts."""
    return zlib.crc32(agent.encode()) % partitions


def pack(items: Iterable[Routed]) -> bytes:
    """Frame forwarded records into one message value."""
    out = bytearray((ENVELOPE_VERSION,))
    for partition, offset, raw in items:
        write_long(partition, out)
        write_long(offset, out)
        write_long(len(raw), out)
        out += raw
    return bytes(out)


def unpack(blob: bytes) -> list[Routed]:
    """Inverse of :func:`pack`.

    Raises:
        ValueError: not a batch of a version this code reads, or truncated.
    """
    if not blob or blob[0] != ENVELOPE_VERSION:
        raise ValueError("not a routed batch (unknown version byte)")
    items: list[Routed] = []
    pos, end = 1, len(blob)
    try:
        while pos < end:
            partition, pos = read_long(blob, pos)
            offset, pos = read_long(blob, pos)
            size, pos = read_long(blob, pos)
            if size < 0 or pos + size > end:
                raise ValueError("truncated routed batch")
            items.append((partition, offset, blob[pos : pos + size]))
            pos += size
    except IndexError:
        raise ValueError("truncated routed batch") from None
    return items


@cache
def _prefix_fingerprints() -> frozenset[bytes]:
    """Writer schemas of ActionEvent whose first fields are the ones agent_of reads."""
    found = set()
    for fingerprint, writer in schema_catalog().items():
        if writer.record_type is not ActionEvent:
            continue
        fields = writer.parsed["fields"][: len(_PREFIX)]
        if [(f["name"], _shape(f["type"])) for f in fields] == list(_PREFIX):
            found.add(fingerprint)
    return frozenset(found)


def _shape(avro_type: object) -> str:
    if isinstance(avro_type, list):
        return "|".join(_shape(t) for t in avro_type)
    if isinstance(avro_type, dict):
        return str(avro_type["type"])
    return str(avro_type)


def agent_of(raw: bytes) -> str | None:
    """The ``agent_id`` of an encoded ActionEvent, or None (see :func:`route_fields`)."""
    fields = route_fields(raw)
    return fields[1] if fields is not None else None


def route_fields(raw: bytes) -> tuple[str, str] | None:
    """``(event_id, agent_id)`` of a single-object-encoded ActionEvent, from its first fields.

    Returns None when this shortcut does not apply (other framing, a schema whose first
    fields differ, or corrupt bytes): decode the record fully instead.
    """
    if raw[:2] != SINGLE_OBJECT_MAGIC or raw[2:_HEADER] not in _prefix_fingerprints():
        return None
    try:
        size, pos = read_long(raw, _HEADER)  # event_id
        if size < 0 or pos + size > len(raw):
            return None
        event_id = raw[pos : pos + size].decode("utf-8")
        pos += size
        _, pos = read_long(raw, pos)  # occurred_at
        _, pos = read_long(raw, pos)  # kind
        pos = _skip_string(raw, pos)  # run_id
        branch, pos = read_long(raw, pos)  # parent_run_id
        if branch == 1:
            pos = _skip_string(raw, pos)
        elif branch != 0:
            return None
        size, pos = read_long(raw, pos)  # agent_id
        if size < 0 or pos + size > len(raw):
            return None
        return event_id, raw[pos : pos + size].decode("utf-8")
    except (IndexError, ValueError):
        return None


def _skip_string(raw: bytes, pos: int) -> int:
    size, pos = read_long(raw, pos)
    if size < 0 or pos + size > len(raw):
        raise ValueError("truncated string")
    return pos + size
