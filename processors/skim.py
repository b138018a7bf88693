"""Skim Avro records: find where each record ends and read one string field, without
decoding the rest. Pure: no I/O.

An Avro container block holds records back to back with no length prefix, so finding the
next record means walking the current one. :func:`compile_skimmer` turns a record schema
into Python source that walks it (lengths and union branches only: no strings built, no
models) and returns the end position and the raw bytes of one chosen string field. A
parallel replay uses it to hand each worker only its own agents' records at a fraction of
the cost of decoding the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from backout.schemas.avro_binary import read_long


def _varint_end(buf: bytes, pos: int) -> int:
    while buf[pos] & 0x80:
        pos += 1
    return pos + 1


def _string_end(buf: bytes, pos: int) -> int:
    size, pos = read_long(buf, pos)
    if size < 0:
        raise ValueError("negative length")
    return pos + size


Skimmer = Callable[[bytes, int], tuple[int, bytes]]
"""``(buffer, start) -> (end, raw bytes of the chosen field)``."""

_FIXED_WIDTH = {"null": 0, "boolean": 1, "float": 4, "double": 8}


def _ident(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.named: dict[str, Mapping[str, Any]] = {}
        self.helpers: dict[str, list[str]] = {}

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def long(self, depth: int, into: str | None) -> None:
        """Read a zig-zag varint into ``into`` (or just step over it). One byte holds most
        lengths, counts and branches: that path costs a single test."""
        if into is None:
            self.emit(depth, "pos = pos + 1 if buf[pos] < 0x80 else varint_end(buf, pos)")
            return
        self.emit(depth, f"{into} = buf[pos]")
        self.emit(depth, f"if {into} < 0x80: pos += 1; {into} = ({into} >> 1) ^ -({into} & 1)")
        self.emit(depth, f"else: {into}, pos = varint(buf, pos)")

    def string(self, depth: int) -> None:
        """Step over a length-prefixed string or bytes value."""
        self.emit(depth, "n = buf[pos]")
        # an even byte below 0x80 is a whole non-negative length
        self.emit(depth, "pos = pos + 1 + (n >> 1) if not n & 0x81 else string_end(buf, pos)")

    def skip(self, schema: Any, depth: int, level: int = 0) -> None:
        """Emit code that steps ``pos`` over one value of ``schema``."""
        if isinstance(schema, list):
            self._union(schema, depth, level)
            return
        if isinstance(schema, str):
            if schema in _FIXED_WIDTH:
                if _FIXED_WIDTH[schema]:
                    self.emit(depth, f"pos += {_FIXED_WIDTH[schema]}")
                return
            if schema in ("int", "long"):
                self.long(depth, None)
                return
            if schema in ("string", "bytes"):
                self.string(depth)
                return
            named = self.named.get(schema) or self.named.get(schema.rsplit(".", 1)[-1])
            if named is not None and named["type"] == "enum":
                self.long(depth, None)
            else:
                self.emit(depth, f"pos = skip_{_ident(schema)}(buf, pos)")
            return
        kind = schema["type"]
        if kind == "record":
            self._record(schema)
            self.emit(depth, f"pos = skip_{_ident(schema['name'])}(buf, pos)")
        elif kind == "enum":
            self.named[schema["name"]] = schema
            self.long(depth, None)
        elif kind == "fixed":
            self.emit(depth, f"pos += {int(schema['size'])}")
        elif kind in ("map", "array"):
            self._blocks(schema, depth, level)
        else:
            self.skip(kind, depth, level)  # a primitive with a logical type

    def _union(self, branches: list[Any], depth: int, level: int) -> None:
        # branch k is the one-byte varint 2k (unions have fewer than 64 branches)
        index = f"u{level}"
        self.emit(depth, f"{index} = buf[pos]; pos += 1")
        first = True
        for number, branch in enumerate(branches):
            body: list[str] = []
            saved, self.lines = self.lines, body
            self.skip(branch, depth + 1, level + 1)
            self.lines = saved
            if not body:
                continue
            self.emit(depth, f"{'if' if first else 'elif'} {index} == {2 * number}:")
            self.lines.extend(body)
            first = False
        bad = f"{index} & 1 or {index} >= {2 * len(branches)}"
        self.emit(depth, f"{'if' if first else 'elif'} {bad}: raise ValueError('bad union branch')")

    def _blocks(self, schema: Mapping[str, Any], depth: int, level: int) -> None:
        count = f"c{level}"
        self.long(depth, count)
        self.emit(depth, f"while {count}:")
        self.emit(depth + 1, f"if {count} < 0:")
        self.long(depth + 2, "n")  # a negative count is followed by the block's byte size
        self.emit(depth + 2, "pos += n")
        self.emit(depth + 1, "else:")
        self.emit(depth + 2, f"for _ in range({count}):")
        if schema["type"] == "map":
            self.string(depth + 3)
        self.skip(schema["values" if schema["type"] == "map" else "items"], depth + 3, level + 1)
        self.long(depth + 1, count)

    def _record(self, schema: Mapping[str, Any]) -> None:
        name = schema["name"]
        if name in self.named:
            return
        self.named[name] = schema
        saved, self.lines = self.lines, []
        self.emit(0, f"def skip_{_ident(name)}(buf, pos):")
        for item in schema["fields"]:
            self.skip(item["type"], 1)
        self.emit(1, "return pos")
        self.helpers[name], self.lines = self.lines, saved


def compile_skimmer(schema: Mapping[str, Any], field: str) -> Skimmer:
    """A function that walks one record of ``schema`` and returns its end and the raw
    bytes of the string field ``field`` (a top-level field of type string).

    Raises:
        ValueError: ``field`` is not a top-level string field of ``schema``.
    """
    names = [f["name"] for f in schema["fields"]]
    if field not in names or schema["fields"][names.index(field)]["type"] != "string":
        raise ValueError(f"{field!r} is not a top-level string field of {schema['name']}")
    out = _Writer()
    out.named[schema["name"]] = schema
    out.emit(0, "def skim(buf, pos):")
    for item in schema["fields"]:
        if item["name"] == field:
            out.long(1, "n")
            out.emit(1, "chosen = buf[pos:pos + n]")
            out.emit(1, "pos += n")
        else:
            out.skip(item["type"], 1)
    out.emit(1, "if pos > len(buf): raise ValueError('record runs past the block')")
    out.emit(1, "return pos, chosen")
    source = "\n".join([*(line for body in out.helpers.values() for line in body), *out.lines])
    namespace: dict[str, object] = {
        "varint": read_long,
        "varint_end": _varint_end,
        "string_end": _string_end,
    }
    exec(compile(source, f"<skim {schema['name']}>", "exec"), namespace)
    return cast(Skimmer, namespace["skim"])
