"""Avro binary primitives the compiled readers and writers call. Pure.

Zig-zag varints, timestamps (``timestamp-micros``) and backout's JSON value union
``[null, boolean, long, double, string, JsonText]``. The compiled code in ``avro_fast.py``
inlines the common one-byte cases and calls these for the rest.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "AvroFastError",
    "dump_json_text",
    "load_json_text",
    "read_json",
    "read_long",
    "read_micros",
    "read_span",
    "write_json",
    "write_long",
    "write_micros",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DOUBLE = struct.Struct("<d")
FLOAT = struct.Struct("<f")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class AvroFastError(ValueError):
    """A value does not fit the schema, or bytes are not a valid encoding of it."""


def write_long(n: int, out: bytearray) -> None:
    """Append a zig-zag varint (Avro int/long)."""
    if not INT64_MIN <= n <= INT64_MAX:
        raise AvroFastError(f"{n} does not fit a long")
    z = (n << 1) ^ (n >> 63)
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a zig-zag varint at ``pos``; returns (value, next position)."""
    z = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7
        if shift > 63:
            raise AvroFastError("varint longer than 10 bytes")


def read_span(buf: bytes, pos: int) -> tuple[int, int]:
    """Read the length of bytes or a string at ``pos``; returns where they start and end."""
    size, start = read_long(buf, pos)
    if size < 0:
        raise AvroFastError("negative length")
    end = start + size
    if end > len(buf):
        raise IndexError("truncated record")
    return start, end


# Timestamps of our era (years 1971 to 3100) are 8-byte varints: packed and unpacked in a
# few word operations instead of a loop over bytes.
_LOW, _HIGH = 1 << 49, 1 << 56
_STOPS = 0x0080808080808080
"""The continuation bits of an 8-byte varint: set on bytes 0-6, clear on byte 7."""


def write_micros(value: datetime | int, out: bytearray) -> None:
    """Append a ``timestamp-micros`` (an aware datetime, or microseconds as an int)."""
    if type(value) is int:
        micros = value
    elif not isinstance(value, datetime):
        raise AvroFastError(f"expected a datetime, got {type(value).__name__}")
    elif value.tzinfo is None:
        raise AvroFastError("timestamps must be timezone-aware")
    else:
        delta = value - EPOCH
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    z = (micros << 1) ^ (micros >> 63)
    if not _LOW <= z < _HIGH:
        write_long(micros, out)
        return
    # Spread 56 bits into eight 7-bit groups: 28+28, then 14+14 per half, then 7+7.
    z = (z & 0x0FFFFFFF) | ((z & 0x00FFFFFFF0000000) << 4)
    z = (z & 0x00003FFF00003FFF) | ((z & 0x0FFFC0000FFFC000) << 2)
    z = (z & 0x007F007F007F007F) | ((z & 0x3F803F803F803F80) << 1)
    out += (z | _STOPS).to_bytes(8, "little")


def read_micros(buf: bytes, pos: int) -> tuple[datetime, int]:
    """Read a ``timestamp-micros`` as an aware UTC datetime; returns it and the next position."""
    z = int.from_bytes(buf[pos:pos + 8], "little")
    if z & 0x8080808080808080 != _STOPS:
        micros, pos = read_long(buf, pos)
        return EPOCH + timedelta(0, 0, micros), pos
    # Gather eight 7-bit groups into 56 bits: 7+7, then 14+14, then 28+28.
    z = (z & 0x007F007F007F007F) | ((z & 0x7F007F007F007F00) >> 1)
    z = (z & 0x00003FFF00003FFF) | ((z & 0x3FFF00003FFF0000) >> 2)
    z = (z & 0x0FFFFFFF) | ((z & 0x0FFFFFFF00000000) >> 4)
    return EPOCH + timedelta(0, 0, (z >> 1) ^ -(z & 1)), pos + 8


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_encoder() -> Callable[[Any], str]:
    """Canonical JSON text: ``json.dumps(v, sort_keys=True, separators=(",", ":"))``.

    The C encoder is called directly: ``json.dumps`` builds a JSONEncoder and a C encoder
    per call, which costs more than encoding a small list. Circular values are not
    detected (our JSON values are trees); they end in RecursionError.
    """
    canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C accelerator
        return canonical.encode
    try:
        encode = make(None, _refuse, json.encoder.encode_basestring_ascii, None, ":", ",",
                      True, False, True)
    except TypeError:  # pragma: no cover - another interpreter's signature
        return canonical.encode
    join = "".join

    def dumps(value: Any) -> str:
        return join(encode(value, 0))

    return dumps


dump_json_text = _json_encoder()
"""A JSON value as canonical JSON text (sorted keys, no spaces, ASCII)."""

# The C scanner json.loads ends in; JSONDecoder sets it per instance (typeshed omits it).
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def load_json_text(text: str) -> Any:
    """Exactly ``json.loads(text)``, without its wrappers in the common case."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace or not JSON: json.loads decides
    if end != len(text):
        return json.loads(text)  # trailing whitespace or garbage: json.loads decides
    return value


def write_json(value: Any, out: bytearray) -> None:
    """A JSON value as the union [null, boolean, long, double, string, JsonText]."""
    t = type(value)
    if t is str:
        data = value.encode()
        out.append(8)
        write_long(len(data), out)
        out += data
    elif value is None:
        out.append(0)
    elif t is bool:
        out.append(2)
        out.append(1 if value else 0)
    elif t is int and INT64_MIN <= value <= INT64_MAX:
        out.append(4)
        write_long(value, out)
    elif t is float:
        out.append(6)
        out += DOUBLE.pack(value)
    else:
        data = dump_json_text(value).encode()
        out.append(10)
        write_long(len(data), out)
        out += data


def read_json(buf: bytes, pos: int) -> tuple[Any, int]:
    """Inverse of :func:`write_json`."""
    tag = buf[pos]
    pos += 1
    if tag == 8:
        n, pos = read_long(buf, pos)
        if n < 0:
            raise AvroFastError("negative length")
        end = pos + n
        return buf[pos:end].decode(), end
    if tag == 0:
        return None, pos
    if tag == 2:
        return buf[pos] == 1, pos + 1
    if tag == 4:
        return read_long(buf, pos)
    if tag == 6:
        return DOUBLE.unpack_from(buf, pos)[0], pos + 8
    if tag == 10:
        n, pos = read_long(buf, pos)
        if n < 0:
            raise AvroFastError("negative length")
        end = pos + n
        return load_json_text(buf[pos:end].decode()), end
    raise AvroFastError(f"invalid JSON value union index {tag}")
