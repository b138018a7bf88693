"""Avro binary encoding of backout's records, compiled per schema into Python code. Pure.

fastavro resolves every union value by validating it against each branch, which makes
our union-heavy records (optional fields, JSON value maps) cost several times their
bytes. Our schemas are fixed, so this module turns each one, once, into a specialised
writer (model -> bytes) and reader (bytes -> model) that pick union branches by Python
type and inline the primitive encodings. It implements the Avro binary encoding for the
types our schemas use (null, boolean, int, long, float, double, bytes, string, enum,
array, map, union, record, timestamp-micros); the tests check it against fastavro in both
directions. Reading an older writer schema (schema resolution) is left to fastavro.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from backout.schemas.events import trusted_constructor

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_JSON_UNION = ["null", "boolean", "long", "double", "string", "JsonText"]


class AvroFastError(ValueError):
    """A value does not fit the schema, or bytes are not a valid encoding of it."""


def write_long(n: int, out: bytearray) -> None:
    """Append a zig-zag varint (Avro int/long)."""
    if not _INT64_MIN <= n <= _INT64_MAX:
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


def write_json(value: Any, out: bytearray) -> None:
    """A JSON value as the union [null, boolean, long, double, string, JsonText]."""
    t = type(value)
    if t is str:
        data = value.encode("utf-8")
        n = len(data)
        if n < 64:
            out.append(8)
            out.append(n << 1)
        else:
            out.append(8)
            write_long(n, out)
        out += data
    elif value is None:
        out.append(0)
    elif t is bool:
        out.append(2)
        out.append(1 if value else 0)
    elif t is int and _INT64_MIN <= value <= _INT64_MAX:
        out.append(4)
        write_long(value, out)
    elif t is float:
        out.append(6)
        out += _DOUBLE.pack(value)
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
        out.append(10)
        write_long(len(data), out)
        out += data


def read_json(buf: bytes, pos: int) -> tuple[Any, int]:
    """Inverse of :func:`write_json`."""
    tag = buf[pos]
    pos += 1
    if tag == 8:
        n, pos = read_long(buf, pos)
        end = pos + n
        return buf[pos:end].decode("utf-8"), end
    if tag == 0:
        return None, pos
    if tag == 2:
        return buf[pos] == 1, pos + 1
    if tag == 4:
        return read_long(buf, pos)
    if tag == 6:
        return _DOUBLE.unpack_from(buf, pos)[0], pos + 8
    if tag == 10:
        n, pos = read_long(buf, pos)
        end = pos + n
        return json.loads(buf[pos:end].decode("utf-8")), end
    raise AvroFastError(f"invalid JSON value union index {tag}")


def _micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise AvroFastError("timestamps must be timezone-aware")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _datetime(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class Binding:
    """How records and enums of a schema map to Python classes.

    Args:
        records: Avro record name -> class with ``model_construct`` (pydantic) whose
            attributes carry the fields.
        enums: Avro enum name -> enum class whose values are the symbols.
    """

    def __init__(self, records: dict[str, type[Any]], enums: dict[str, type[Any]]) -> None:
        self.records = records
        self.enums = enums


class _Gen:
    """Emits Python source for one schema's writer and reader."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.named: dict[str, Any] = {}
        self.lines: list[str] = []
        self.env: dict[str, Any] = {
            "write_long": write_long, "read_long": read_long, "write_json": write_json,
            "read_json": read_json, "_DOUBLE": _DOUBLE, "_FLOAT": _FLOAT, "_micros": _micros,
            "_datetime": _datetime, "AvroFastError": AvroFastError, "datetime": datetime}
        self.counter = 0

    def var(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema in self.named:
            return self.named[schema]
        if isinstance(schema, dict) and schema.get("type") in ("record", "enum"):
            self.named[schema["name"]] = schema
            self.named.setdefault(f"backout.v1.{schema['name']}", schema)
        return schema

    @staticmethod
    def kind(schema: Any) -> str:
        if isinstance(schema, str):
            return schema
        if isinstance(schema, list):
            return "union"
        if schema.get("logicalType") == "timestamp-micros":
            return "timestamp"
        return str(schema["type"])

    def is_json_union(self, schema: Any) -> bool:
        if not isinstance(schema, list):
            return False
        names = [b if isinstance(b, str) else b.get("name", b.get("type")) for b in schema]
        return [n.rsplit(".", 1)[-1] for n in names] == _JSON_UNION

    # --- writing ------------------------------------------------------------------------
    def write(self, schema: Any, expr: str, ind: int) -> None:
        if self.is_json_union(schema):
            for b in schema:
                self.resolve(b)
            self.emit(ind, f"write_json({expr}, out)")
            return
        schema = self.resolve(schema)
        kind = self.kind(schema)
        if kind == "null":
            return
        if kind == "boolean":
            self.emit(ind, f"out.append(1 if {expr} else 0)")
        elif kind in ("int", "long"):
            x = self.var("x")
            self.emit(ind, f"{x} = {expr}")
            self.write_size(x, ind, signed=True)
        elif kind == "timestamp":
            v = self.var("t")
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"write_long(_micros({v}) if isinstance({v}, datetime) else {v}, out)")
        elif kind == "double":
            self.emit(ind, f"out += _DOUBLE.pack({expr})")
        elif kind == "float":
            self.emit(ind, f"out += _FLOAT.pack({expr})")
        elif kind in ("string", "bytes"):
            d = self.var("d")
            enc = ".encode('utf-8')" if kind == "string" else ""
            self.emit(ind, f"{d} = {expr}{enc}")
            self.write_size(f"len({d})", ind)
            self.emit(ind, f"out += {d}")
        elif kind == "enum":
            table = self.var("ENUM")
            self.env[table] = {s: i << 1 for i, s in enumerate(schema["symbols"])}
            self.emit(ind, f"out.append({table}[{expr}])")
        elif kind == "array":
            a, item = self.var("a"), self.var("i")
            self.emit(ind, f"{a} = {expr}")
            self.emit(ind, f"if {a}:")
            self.emit(ind + 1, f"write_long(len({a}), out)")
            self.emit(ind + 1, f"for {item} in {a}:")
            self.write(schema["items"], item, ind + 2)
            self.emit(ind, "out.append(0)")
        elif kind == "map":
            m, k, val, d = self.var("m"), self.var("k"), self.var("v"), self.var("d")
            self.emit(ind, f"{m} = {expr}")
            self.emit(ind, f"if {m}:")
            self.emit(ind + 1, f"write_long(len({m}), out)")
            self.emit(ind + 1, f"for {k}, {val} in {m}.items():")
            self.emit(ind + 2, f"{d} = {k}.encode('utf-8')")
            self.write_size(f"len({d})", ind + 2)
            self.emit(ind + 2, f"out += {d}")
            self.write(schema["values"], val, ind + 2)
            self.emit(ind, "out.append(0)")
        elif kind == "union":
            self.write_union(schema, expr, ind)
        elif kind == "record":
            r = self.var("r")
            self.emit(ind, f"{r} = {expr}")
            for field in schema["fields"]:
                self.write(field["type"], f"{r}.{field['name']}", ind)
        else:
            raise AvroFastError(f"unsupported schema type {kind!r}")

    def write_size(self, expr: str, ind: int, *, signed: bool = False) -> None:
        """Write a long, inlining the one-byte case (0 <= n < 64)."""
        n = self.var("n")
        self.emit(ind, f"{n} = {expr}")
        self.emit(ind, f"if {'0 <= ' if signed else ''}{n} < 64:")
        self.emit(ind + 1, f"out.append({n} << 1)")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"write_long({n}, out)")

    def write_union(self, branches: list[Any], expr: str, ind: int) -> None:
        resolved = [self.resolve(b) for b in branches]
        kinds = [self.kind(b) for b in resolved]
        if len(branches) != 2 or kinds[0] != "null":
            raise AvroFastError(f"unsupported union {kinds}: only [null, X] and JSON values")
        u = self.var("u")
        self.emit(ind, f"{u} = {expr}")
        self.emit(ind, f"if {u} is None:")
        self.emit(ind + 1, "out.append(0)")
        self.emit(ind, "else:")
        self.emit(ind + 1, "out.append(2)")
        self.write(branches[1], u, ind + 1)

    # --- reading ------------------------------------------------------------------------
    def read(self, schema: Any, target: str, ind: int) -> None:
        """Emit code that reads one value into the local ``target``."""
        if self.is_json_union(schema):
            # Short strings, doubles, small longs and nulls inline; the rest via read_json.
            n, tag = self.var("n"), self.var("tag")
            self.emit(ind, f"{tag} = buf[pos]")
            self.emit(ind, f"{n} = buf[pos + 1] if {tag} else 1")
            self.emit(ind, f"if {tag} == 8 and {n} < 128 and not {n} & 1:")
            self.emit(ind + 1, f"{n} >>= 1")
            self.emit(ind + 1, f"{target} = buf[pos + 2:pos + 2 + {n}].decode('utf-8')")
            self.emit(ind + 1, f"pos += 2 + {n}")
            self.emit(ind, f"elif {tag} == 6:")
            self.emit(ind + 1, f"{target} = _DOUBLE.unpack_from(buf, pos + 1)[0]")
            self.emit(ind + 1, "pos += 9")
            self.emit(ind, f"elif {tag} == 4 and {n} < 128:")
            self.emit(ind + 1, f"{target} = ({n} >> 1) ^ -({n} & 1)")
            self.emit(ind + 1, "pos += 2")
            self.emit(ind, f"elif {tag} == 0:")
            self.emit(ind + 1, f"{target} = None")
            self.emit(ind + 1, "pos += 1")
            self.emit(ind, "else:")
            self.emit(ind + 1, f"{target}, pos = read_json(buf, pos)")
            return
        schema = self.resolve(schema)
        kind = self.kind(schema)
        if kind == "null":
            self.emit(ind, f"{target} = None")
        elif kind == "boolean":
            self.emit(ind, f"{target} = buf[pos] == 1")
            self.emit(ind, "pos += 1")
        elif kind in ("int", "long"):
            self.read_long(target, ind)
        elif kind == "timestamp":
            self.emit(ind, f"{target}, pos = read_long(buf, pos)")
            self.emit(ind, f"{target} = _datetime({target})")
        elif kind == "double":
            self.emit(ind, f"{target} = _DOUBLE.unpack_from(buf, pos)[0]")
            self.emit(ind, "pos += 8")
        elif kind == "float":
            self.emit(ind, f"{target} = _FLOAT.unpack_from(buf, pos)[0]")
            self.emit(ind, "pos += 4")
        elif kind in ("string", "bytes"):
            n = self.var("n")
            self.read_size(n, ind)
            dec = ".decode('utf-8')" if kind == "string" else ""
            self.emit(ind, f"{target} = buf[pos:pos + {n}]{dec}")
            self.emit(ind, f"pos += {n}")
        elif kind == "enum":
            members = self.var("MEMBERS")
            enum_cls = self.binding.enums.get(schema["name"])
            self.env[members] = [enum_cls(s) if enum_cls else s for s in schema["symbols"]]
            idx = self.var("e")
            self.read_size(idx, ind)
            self.emit(ind, f"{target} = {members}[{idx}]")
        elif kind in ("array", "map"):
            self.read_block(schema, kind, target, ind)
        elif kind == "union":
            resolved = [self.resolve(b) for b in schema]
            tag = self.var("tag")
            self.emit(ind, f"{tag} = buf[pos]")
            self.emit(ind, "pos += 1")
            self.emit(ind, f"if {tag} == 0:")
            self.emit(ind + 1, f"{target} = None")
            self.emit(ind, f"elif {tag} == 2:")
            self.read(resolved[1], target, ind + 1)
            self.emit(ind, "else:")
            self.emit(ind + 1, f"raise AvroFastError('invalid union index ' + str({tag}))")
        elif kind == "record":
            cls = self.binding.records.get(schema["name"])
            names = []
            for field in schema["fields"]:
                local = self.var("f")
                self.read(field["type"], local, ind)
                names.append(f"{field['name']}={local}")
            ctor = self.var("CLS")
            self.env[ctor] = trusted_constructor(cls) if cls is not None else dict
            self.emit(ind, f"{target} = {ctor}({', '.join(names)})")
        else:
            raise AvroFastError(f"unsupported schema type {kind!r}")

    def read_long(self, target: str, ind: int) -> None:
        """Read a long, inlining the one-byte case."""
        b = self.var("b")
        self.emit(ind, f"{b} = buf[pos]")
        self.emit(ind, f"if {b} < 128:")
        self.emit(ind + 1, f"{target} = ({b} >> 1) ^ -({b} & 1)")
        self.emit(ind + 1, "pos += 1")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"{target}, pos = read_long(buf, pos)")

    def read_size(self, target: str, ind: int) -> None:
        """Read a non-negative long (a length or an index); a negative one is corrupt."""
        self.emit(ind, f"{target} = buf[pos]")
        self.emit(ind, f"if {target} < 128 and not {target} & 1:")
        self.emit(ind + 1, f"{target} >>= 1")
        self.emit(ind + 1, "pos += 1")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"{target}, pos = read_long(buf, pos)")
        self.emit(ind + 1, f"if {target} < 0:")
        self.emit(ind + 2, "raise AvroFastError('negative length or index')")

    def read_block(self, schema: Any, kind: str, target: str, ind: int) -> None:
        count, i, item, key = self.var("c"), self.var("i"), self.var("x"), self.var("k")
        self.emit(ind, f"{target} = {'[]' if kind == 'array' else '{}'}")
        self.emit(ind, "while True:")
        self.read_long(count, ind + 1)
        self.emit(ind + 1, f"if {count} == 0:")
        self.emit(ind + 2, "break")
        self.emit(ind + 1, f"if {count} < 0:")
        self.emit(ind + 2, f"{count} = -{count}")
        self.emit(ind + 2, "_, pos = read_long(buf, pos)")
        self.emit(ind + 1, f"for {i} in range({count}):")
        if kind == "array":
            self.read(schema["items"], item, ind + 2)
            self.emit(ind + 2, f"{target}.append({item})")
        else:
            self.read("string", key, ind + 2)
            self.read(schema["values"], item, ind + 2)
            self.emit(ind + 2, f"{target}[{key}] = {item}")


class CompiledRecord:
    """A record schema compiled into ``write(model) -> bytes`` and ``read(bytes) -> model``."""

    def __init__(self, schema: dict[str, Any], binding: Binding) -> None:
        gen = _Gen(binding)
        gen.emit(0, "def write(value):")
        gen.emit(1, "out = bytearray()")
        gen.write(schema, "value", 1)
        gen.emit(1, "return bytes(out)")
        gen.emit(0, "def read(buf):")
        gen.emit(1, "pos = 0")
        gen.read(schema, "result", 1)
        gen.emit(1, "if pos != len(buf):")
        gen.emit(2, "raise AvroFastError(f'{len(buf) - pos} byte(s) left over or missing')")
        gen.emit(1, "return result")
        self.source = "\n".join(gen.lines)
        namespace = dict(gen.env)
        exec(compile(self.source, f"<avro_fast {schema['name']}>", "exec"), namespace)
        self._write: Callable[[Any], bytes] = namespace["write"]
        self._read: Callable[[bytes], Any] = namespace["read"]

    def write(self, value: Any) -> bytes:
        """The Avro binary body of ``value``.

        Raises:
            AvroFastError: the value does not fit the schema.
        """
        try:
            return self._write(value)
        except AvroFastError:
            raise
        except (KeyError, AttributeError, TypeError, struct.error, OverflowError) as exc:
            raise AvroFastError(f"value does not fit the schema: {exc!r}") from exc

    def read(self, body: bytes) -> Any:
        """Decode one record that must use exactly all of ``body``.

        Raises:
            AvroFastError: truncated, trailing or invalid bytes.
        """
        try:
            return self._read(body)
        except AvroFastError:
            raise
        except IndexError:
            raise AvroFastError("truncated record") from None
        except (UnicodeDecodeError, struct.error, json.JSONDecodeError, ValueError,
                OverflowError) as exc:
            raise AvroFastError(f"corrupt record: {exc}") from None
