"""Cell values as SQL text and numbers: times and JSON. Pure: no I/O.

Times are integer microseconds since the epoch (UTC), like the Avro ``timestamp-micros``
they come from; JSON values are canonical JSON text (sorted keys, no spaces), with fast
paths for the plain scalars and flat objects most cells hold. ``dump_json`` equals
``json.dumps(value, sort_keys=True, separators=(",", ":"))`` on every value.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from pydantic import JsonValue

from backout.projections.values import ABSENT, CellValue

__all__ = ["cell_in", "dump_json", "from_us", "load_json", "to_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_MICRO = timedelta(microseconds=1)


@lru_cache(maxsize=1 << 16)
def to_us(moment: datetime) -> int:
    """Microseconds since the epoch (naive times are taken as UTC).

    Cached: an event's time is converted for its journal row, each of its field writes
    and its record's state.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICRO


@lru_cache(maxsize=1 << 16)
def from_us(value: int) -> datetime:
    """Inverse of :func:`to_us` (an aware UTC datetime)."""
    return _EPOCH + timedelta(microseconds=value)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _plain(text: str) -> bool:
    """True when ``text`` is JSON-encoded as itself between quotes."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def dump_json(value: JsonValue) -> str:
    """Canonical JSON text (fast paths for the plain scalars most values are, and for
    objects of them such as a record's fields)."""
    kind = type(value)
    if kind is str:
        text = str(value)
        if _plain(text):
            return f'"{text}"'
    elif kind is int:
        return str(value)
    elif value is None:
        return "null"
    elif kind is bool:
        return "true" if value else "false"
    elif kind is dict:
        flat = _flat_object(value)  # type: ignore[arg-type]
        if flat is not None:
            return flat
    return _ENCODER.encode(value)


_KEYS: dict[str, str] = {}
"""``"name":`` of the plain field names seen so far (a bounded cache)."""


def _flat_object(value: dict[str, JsonValue]) -> str | None:
    """An object of plain strings and ints as canonical JSON, else None."""
    parts = []
    for name in sorted(value):
        head = _KEYS.get(name)
        if head is None:
            if type(name) is not str or not _plain(name):
                return None
            head = f'"{name}":'
            if len(_KEYS) < 10_000:
                _KEYS[name] = head
        item = value[name]
        kind = type(item)
        if kind is str and _plain(item):  # type: ignore[arg-type]
            parts.append(f'{head}"{item}"')
        elif kind is int:
            parts.append(f"{head}{item}")
        else:
            return None
    return "{" + ",".join(parts) + "}"


_LITERALS: dict[str, JsonValue] = {"true": True, "false": False, "null": None}


def load_json(text: str) -> JsonValue:
    """``json.loads`` with fast paths for the plain scalars most cells hold."""
    first = text[0]
    if first == '"' and "\\" not in text:
        return text[1:-1]
    if first.isdigit() or (first == "-" and text[1:].isdigit()):
        if text.isdigit() or text[1:].isdigit():
            return int(text)
    elif text in _LITERALS:
        return _LITERALS[text]
    value: JsonValue = json.loads(text)
    return value


def cell_in(text: str | None, present: bool) -> CellValue:
    if not present:
        return ABSENT
    return load_json(text) if text is not None else None
