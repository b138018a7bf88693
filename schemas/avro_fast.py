"""Avro binary encoding of backout's records, compiled per schema into Python code. Pure.

fastavro resolves every union value by validating it against each branch, which makes
our union-heavy records (optional fields, JSON value maps) cost several times their
bytes. Our schemas are fixed, so this module turns each one, once, into a specialised
writer (model -> bytes) and reader (bytes -> model) that pick union branches by Python
type and inline the primitive encodings (``avro_binary.py`` holds the rest). It
implements the Avro binary encoding for the types our schemas use (null, boolean, int,
long, float, double, bytes, string, enum, array, map, union, record, timestamp-micros);
the tests check it against fastavro in both directions. Reading an older writer schema
(schema resolution) is left to fastavro.

Records are built as ``model_construct`` would build them with every field given (no
validation, every field in ``model_fields_set``), but with the field values put in place
directly: the bytes were written with the model's own schema.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from backout.schemas.avro_binary import (
    DOUBLE,
    EPOCH,
    FLOAT,
    AvroFastError,
    load_json_text,
    read_json,
    read_long,
    read_micros,
    read_span,
    write_json,
    write_long,
    write_micros,
)
from backout.schemas.events import trusted_constructor

__all__ = ["AvroFastError", "Binding", "CompiledRecord", "read_json", "read_long",
           "write_json", "write_long"]

_JSON_UNION = ["null", "boolean", "long", "double", "string", "JsonText"]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The two bytes that start a short string (tag 8, then its length) and a small long (tag 4,
# then its zig-zag byte) in the JSON value union, so one += writes both.
_JSON_STR = [bytes((8, n << 1)) for n in range(64)]
_JSON_INT = [bytes((4, ((v << 1) ^ (v >> 63)) & 0xFF)) for v in range(-64, 64)]
_JSON_BOOL = (b"\x02\x00", b"\x02\x01")
# A length's first byte -> the length when that byte is all of it, else -1 (read it whole).
_SIZE = [-1 if b & 0x81 else b >> 1 for b in range(256)]
# A long's first byte -> its value when that byte is all of it, else None (read it whole).
_ZIGZAG = [None if b & 0x80 else (b >> 1) ^ -(b & 1) for b in range(256)]


def _ends(skip: int) -> list[int]:
    """A string's length byte -> where the string ends, counted from ``skip + 1`` bytes
    before that byte; 0 when the length takes more than one byte (or is invalid)."""
    return [0 if b & 0x81 else (b >> 1) + skip + 1 for b in range(256)]


# Pydantic models keep their state in four slots; setting them through their descriptors
# skips the attribute lookup ``object.__setattr__`` does each time.
_SLOTS = vars(BaseModel)
_SET_DICT = _SLOTS["__dict__"].__set__
_SET_FIELDS_SET = _SLOTS["__pydantic_fields_set__"].__set__
_SET_EXTRA = _SLOTS["__pydantic_extra__"].__set__
_SET_PRIVATE = _SLOTS["__pydantic_private__"].__set__


def _micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise AvroFastError("timestamps must be timezone-aware")
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _datetime(micros: int) -> datetime:
    return EPOCH + timedelta(0, 0, micros)


class Binding:
    """How records and enums of a schema map to Python classes.

    Args:
        records: Avro record name -> pydantic model class; records without a class are
            read as plain dicts.
        enums: Avro enum name -> enum class whose values are the symbols.
    """

    def __init__(self, records: dict[str, type[Any]], enums: dict[str, type[Any]]) -> None:
        self.records = records
        self.enums = enums


def _at(skip: int) -> str:
    """The position expression ``skip`` bytes past ``pos``."""
    return f"pos + {skip}" if skip else "pos"


class _Gen:
    """Emits Python source for one schema's writer and reader.

    ``read(schema, target, ind)`` emits code that reads one value at ``pos`` in ``buf``
    into the local ``target`` and advances ``pos``; ``write(schema, expr, ind)`` emits
    code appending ``expr`` to the bytearray ``out``, whose ``append`` it expects bound
    to the local ``_ap``. The names the code uses are in ``env`` (``exec`` the joined
    ``lines`` in a copy of it).
    """

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.named: dict[str, Any] = {}
        self.lines: list[str] = []
        self.env: dict[str, Any] = {
            "write_long": write_long, "read_long": read_long, "write_json": write_json,
            "read_json": read_json, "load_json_text": load_json_text,
            "write_micros": write_micros, "read_micros": read_micros,
            "_DOUBLE": DOUBLE, "_FLOAT": FLOAT, "_EPOCH": EPOCH, "_td": timedelta,
            "_micros": _micros, "_datetime": _datetime, "AvroFastError": AvroFastError,
            "datetime": datetime, "_JSON_STR": _JSON_STR, "_JSON_INT": _JSON_INT,
            "_JSON_BOOL": _JSON_BOOL, "_SIZE": _SIZE, "_ZIGZAG": _ZIGZAG,
            "read_span": read_span, "_new": object.__new__, "_set_dict": _SET_DICT,
            "_set_fields_set": _SET_FIELDS_SET, "_set_extra": _SET_EXTRA,
            "_set_private": _SET_PRIVATE}
        self.counter = 0

    def var(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def local(self, expr: str, prefix: str, ind: int) -> str:
        """``expr`` itself when it is a plain name, else a new local holding it."""
        if _NAME.fullmatch(expr):
            return expr
        name = self.var(prefix)
        self.emit(ind, f"{name} = {expr}")
        return name

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
        if [n.rsplit(".", 1)[-1] for n in names] != _JSON_UNION:
            return False
        for branch in schema:
            self.resolve(branch)
        return True

    # --- writing ------------------------------------------------------------------------
    def write(self, schema: Any, expr: str, ind: int) -> None:
        if self.is_json_union(schema):
            self.write_json(expr, ind)
            return
        schema = self.resolve(schema)
        kind = self.kind(schema)
        if kind == "null":
            return
        if kind == "boolean":
            self.emit(ind, f"_ap(1 if {expr} else 0)")
        elif kind in ("int", "long"):
            self.write_size(expr, ind, signed=True)
        elif kind == "timestamp":
            self.emit(ind, f"write_micros({expr}, out)")
        elif kind == "double":
            self.emit(ind, f"out += _DOUBLE.pack({expr})")
        elif kind == "float":
            self.emit(ind, f"out += _FLOAT.pack({expr})")
        elif kind in ("string", "bytes"):
            self.write_bytes(f"{expr}.encode()" if kind == "string" else expr, ind)
        elif kind == "enum":
            table = self.var("ENUM")
            self.env[table] = {s: i << 1 for i, s in enumerate(schema["symbols"])}
            self.emit(ind, f"_ap({table}[{expr}])")
        elif kind in ("array", "map"):
            self.write_block(schema, kind, expr, ind)
        elif kind == "union":
            self.write_union(schema, expr, ind)
        elif kind == "record":
            r = self.local(expr, "r", ind)
            for field in schema["fields"]:
                self.write(field["type"], f"{r}.{field['name']}", ind)
        else:
            raise AvroFastError(f"unsupported schema type {kind!r}")

    def write_size(self, expr: str, ind: int, *, signed: bool = False) -> None:
        """Write a long, inlining the one-byte case (0 <= n < 64)."""
        n = self.local(expr, "n", ind)
        self.emit(ind, f"if {'0 <= ' if signed else ''}{n} < 64:")
        self.emit(ind + 1, f"_ap({n} << 1)")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"write_long({n}, out)")

    def write_bytes(self, expr: str, ind: int) -> None:
        d = self.var("d")
        self.emit(ind, f"{d} = {expr}")
        self.write_size(f"len({d})", ind)
        self.emit(ind, f"out += {d}")

    def write_json(self, expr: str, ind: int) -> None:
        """A JSON value, by Python type: common scalars inline, the rest via write_json."""
        v, t, d, n = self.local(expr, "v", ind), self.var("t"), self.var("d"), self.var("n")
        self.emit(ind, f"{t} = type({v})")
        self.emit(ind, f"if {t} is str:")
        self.emit(ind + 1, f"{d} = {v}.encode()")
        self.emit(ind + 1, f"{n} = len({d})")
        self.emit(ind + 1, f"if {n} < 64:")
        self.emit(ind + 2, f"out += _JSON_STR[{n}]")
        self.emit(ind + 1, "else:")
        self.emit(ind + 2, "_ap(8)")
        self.emit(ind + 2, f"write_long({n}, out)")
        self.emit(ind + 1, f"out += {d}")
        self.emit(ind, f"elif {v} is None:")
        self.emit(ind + 1, "_ap(0)")
        self.emit(ind, f"elif {t} is bool:")
        self.emit(ind + 1, f"out += _JSON_BOOL[{v}]")
        self.emit(ind, f"elif {t} is int and -64 <= {v} < 64:")
        self.emit(ind + 1, f"out += _JSON_INT[{v} + 64]")
        self.emit(ind, f"elif {t} is float:")
        self.emit(ind + 1, "_ap(6)")
        self.emit(ind + 1, f"out += _DOUBLE.pack({v})")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"write_json({v}, out)")

    def write_block(self, schema: Any, kind: str, expr: str, ind: int) -> None:
        m, item = self.local(expr, "m", ind), self.var("x")
        self.emit(ind, f"if {m}:")
        self.write_size(f"len({m})", ind + 1)
        if kind == "array":
            self.emit(ind + 1, f"for {item} in {m}:")
        else:
            key = self.var("k")
            self.emit(ind + 1, f"for {key}, {item} in {m}.items():")
            self.write_bytes(f"{key}.encode()", ind + 2)
        self.write(schema["items" if kind == "array" else "values"], item, ind + 2)
        self.emit(ind, "_ap(0)")

    def write_union(self, branches: list[Any], expr: str, ind: int) -> None:
        resolved = [self.resolve(b) for b in branches]
        kinds = [self.kind(b) for b in resolved]
        if len(branches) != 2 or kinds[0] != "null":
            raise AvroFastError(f"unsupported union {kinds}: only [null, X] and JSON values")
        u = self.local(expr, "u", ind)
        self.emit(ind, f"if {u} is None:")
        self.emit(ind + 1, "_ap(0)")
        self.emit(ind, "else:")
        self.emit(ind + 1, "_ap(2)")
        self.write(branches[1], u, ind + 1)

    # --- reading ------------------------------------------------------------------------
    def read(self, schema: Any, target: str, ind: int, skip: int = 0) -> None:
        """Emit code that reads one value at ``pos + skip`` into the local ``target``."""
        if self.is_json_union(schema):
            self.read_json(target, ind, skip)
            return
        schema = self.resolve(schema)
        kind = self.kind(schema)
        at = _at(skip)
        if kind == "null":
            self.emit(ind, f"{target} = None")
            self.advance(ind, skip)
        elif kind == "boolean":
            self.emit(ind, f"{target} = buf[{at}] == 1")
            self.advance(ind, skip + 1)
        elif kind in ("int", "long"):
            self.read_long(target, ind, skip)
        elif kind == "timestamp":
            self.emit(ind, f"{target}, pos = read_micros(buf, {at})")
        elif kind in ("double", "float"):
            self.emit(ind, f"{target} = _{kind.upper()}.unpack_from(buf, {at})[0]")
            self.advance(ind, skip + (8 if kind == "double" else 4))
        elif kind in ("string", "bytes"):
            self.read_bytes(target, ind, skip, text=kind == "string")
        elif kind == "enum":
            self.read_enum(schema, target, ind, skip)
        elif kind in ("array", "map"):
            self.advance(ind, skip)
            self.read_block(schema, kind, target, ind)
        elif kind == "union":
            resolved = [self.resolve(b) for b in schema]
            tag = self.var("tag")
            self.emit(ind, f"{tag} = buf[{at}]")
            self.emit(ind, f"if {tag} == 0:")
            self.emit(ind + 1, f"{target} = None")
            self.advance(ind + 1, skip + 1)
            self.emit(ind, f"elif {tag} == 2:")
            self.read(resolved[1], target, ind + 1, skip + 1)
            self.emit(ind, "else:")
            self.emit(ind + 1, f"raise AvroFastError('invalid union index ' + str({tag}))")
        elif kind == "record":
            self.advance(ind, skip)
            self.read_record(schema, target, ind)
        else:
            raise AvroFastError(f"unsupported schema type {kind!r}")

    def advance(self, ind: int, skip: int) -> None:
        if skip:
            self.emit(ind, f"pos += {skip}")

    def read_long(self, target: str, ind: int, skip: int = 0) -> None:
        """Read a long, inlining the one-byte case."""
        self.emit(ind, f"{target} = _ZIGZAG[buf[{_at(skip)}]]")
        self.emit(ind, f"if {target} is None:")
        self.emit(ind + 1, f"{target}, pos = read_long(buf, {_at(skip)})")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"pos += {skip + 1}")

    def read_size(self, target: str, ind: int, skip: int = 0) -> None:
        """Read a non-negative long (a length) and move ``pos`` past it."""
        self.emit(ind, f"{target} = _SIZE[buf[{_at(skip)}]]")
        self.emit(ind, f"if {target} >= 0:")
        self.emit(ind + 1, f"pos += {skip + 1}")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"{target}, pos = read_long(buf, {_at(skip)})")
        self.emit(ind + 1, f"if {target} < 0:")
        self.emit(ind + 2, "raise AvroFastError('negative length or index')")

    def read_bytes(self, target: str, ind: int, skip: int, *, text: bool) -> None:
        """Read bytes or a string, inlining the one-byte length: the slice's end is the
        new ``pos``, assigned in the slice itself."""
        ends, e, start = f"_ENDS{skip}", self.var("e"), self.var("s")
        self.env.setdefault(ends, _ends(skip))
        decode = ".decode()" if text else ""
        self.emit(ind, f"if {e} := {ends}[buf[{_at(skip)}]]:")
        if text:
            # ``text`` is ``buf`` read as Latin-1, one character per byte: an ASCII slice
            # of it is the string, anything else is decoded from the bytes as UTF-8.
            self.emit(ind + 1, f"{target} = text[pos + {skip + 1}:(pos := pos + {e})]")
            self.emit(ind + 1, f"if not {target}.isascii():")
            self.emit(ind + 2, f"{target} = buf[pos - len({target}):pos].decode()")
        else:
            self.emit(ind + 1, f"{target} = buf[pos + {skip + 1}:(pos := pos + {e})]")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"{start}, pos = read_span(buf, {_at(skip)})")
        self.emit(ind + 1, f"{target} = buf[{start}:pos]{decode}")

    def read_enum(self, schema: Any, target: str, ind: int, skip: int) -> None:
        enum_cls = self.binding.enums.get(schema["name"])
        members = [enum_cls(s) if enum_cls else s for s in schema["symbols"]]
        table = self.var("MEMBERS")
        if len(members) > 64:
            self.env[table] = members
            idx = self.var("e")
            self.read_size(idx, ind, skip)
            self.emit(ind, f"{target} = {table}[{idx}]")
            return
        # Indexed by the raw one-byte varint: members at even bytes, None elsewhere.
        by_byte: list[Any] = [None] * 256
        for i, member in enumerate(members):
            by_byte[i << 1] = member
        self.env[table] = by_byte
        self.emit(ind, f"{target} = {table}[buf[{_at(skip)}]]")
        self.emit(ind, f"if {target} is None:")
        self.emit(ind + 1, "raise AvroFastError('invalid enum index')")
        self.advance(ind, skip + 1)

    def read_json(self, target: str, ind: int, skip: int) -> None:
        """A JSON value, each branch inline (invalid tags raise in read_json)."""
        tag, n = self.var("tag"), self.var("n")
        self.emit(ind, f"{tag} = buf[{_at(skip)}]")
        self.emit(ind, f"if {tag} == 8:")
        self.read_bytes(target, ind + 1, skip + 1, text=True)
        self.emit(ind, f"elif {tag} == 0:")
        self.emit(ind + 1, f"{target} = None")
        self.emit(ind + 1, f"pos += {skip + 1}")
        self.emit(ind, f"elif {tag} == 6:")
        self.emit(ind + 1, f"{target} = _DOUBLE.unpack_from(buf, pos + {skip + 1})[0]")
        self.emit(ind + 1, f"pos += {skip + 9}")
        self.emit(ind, f"elif {tag} == 4:")
        self.read_long(target, ind + 1, skip + 1)
        self.emit(ind, f"elif {tag} == 2:")
        self.emit(ind + 1, f"{target} = buf[pos + {skip + 1}] == 1")
        self.emit(ind + 1, f"pos += {skip + 2}")
        self.emit(ind, f"elif {tag} == 10:")
        self.read_bytes(n, ind + 1, skip + 1, text=True)
        self.emit(ind + 1, f"{target} = load_json_text({n})")
        self.emit(ind, "else:")
        self.emit(ind + 1, f"{target}, pos = read_json(buf, {_at(skip)})")

    def read_block(self, schema: Any, kind: str, target: str, ind: int) -> None:
        count, item, key = self.var("c"), self.var("x"), self.var("k")
        self.emit(ind, f"{target} = {'[]' if kind == 'array' else '{}'}")
        self.emit(ind, "while True:")
        self.read_long(count, ind + 1)
        self.emit(ind + 1, f"if {count} == 0:")
        self.emit(ind + 2, "break")
        self.emit(ind + 1, f"if {count} < 0:")
        self.emit(ind + 2, f"{count} = -{count}")
        self.emit(ind + 2, "_, pos = read_long(buf, pos)")
        self.emit(ind + 1, f"for _ in range({count}):")
        if kind == "array":
            self.read(schema["items"], item, ind + 2)
            self.emit(ind + 2, f"{target}.append({item})")
        else:
            self.read_bytes(key, ind + 2, 0, text=True)
            self.read(schema["values"], item, ind + 2)
            self.emit(ind + 2, f"{target}[{key}] = {item}")

    def read_record(self, schema: dict[str, Any], target: str, ind: int) -> None:
        names = [field["name"] for field in schema["fields"]]
        values = []
        for field in schema["fields"]:
            local = self.var("f")
            self.read(field["type"], local, ind)
            values.append(f"{field['name']!r}: {local}")
        state = "{" + ", ".join(values) + "}"
        cls = self.binding.records.get(schema["name"])
        if cls is None:
            self.emit(ind, f"{target} = {state}")
            return
        ctor = self.var("CLS")
        if set(cls.model_fields) != set(names):
            # The model and its schema differ: let the model fill in what is missing.
            self.env[ctor] = trusted_constructor(cls)
            self.emit(ind, f"{target} = {ctor}(**{state})")
            return
        fields_set = self.var("FIELDS")
        self.env[ctor], self.env[fields_set] = cls, frozenset(names)
        self.emit(ind, f"{target} = _new({ctor})")
        self.emit(ind, f"_set_dict({target}, {state})")
        self.emit(ind, f"_set_fields_set({target}, {{*{fields_set}}})")
        self.emit(ind, f"_set_extra({target}, None)")
        self.emit(ind, f"_set_private({target}, None)")


WRITE_ERRORS = (KeyError, AttributeError, TypeError, struct.error, OverflowError, RecursionError)
"""What the compiled writer raises for a value that does not fit the schema."""
READ_ERRORS = (IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError,
               RecursionError)
"""What the compiled reader raises for bytes that are not a valid record (a JSONDecodeError
is a ValueError)."""


def read_error(exc: Exception) -> AvroFastError:
    """The AvroFastError for an exception out of a compiled reader."""
    if isinstance(exc, AvroFastError):
        return exc
    if isinstance(exc, IndexError):
        return AvroFastError("truncated record")
    return AvroFastError(f"corrupt record: {exc}")


class CompiledRecord:
    """A record schema compiled into ``write(model) -> bytes`` and ``read(bytes) -> model``.

    ``writer(value, head)``, ``reader(buf, pos)`` and ``read_from(buf, text, pos)`` are the
    compiled functions themselves, for callers that handle their exceptions
    (``WRITE_ERRORS``/``READ_ERRORS``) in place: the writer returns ``head`` followed by
    the body, the reader reads a record from ``pos`` that must end exactly at the end of
    ``buf``.
    """

    def __init__(self, schema: dict[str, Any], binding: Binding) -> None:
        gen = _Gen(binding)
        gen.emit(0, "def write(value, head=b''):")
        gen.emit(1, "out = bytearray(head)")
        gen.emit(1, "_ap = out.append")
        gen.write(schema, "value", 1)
        gen.emit(1, "return bytes(out)")
        gen.emit(0, "def read(buf, pos=0):")
        gen.emit(1, "text = buf.decode('latin-1')")
        gen.read(schema, "result", 1)
        gen.emit(1, "if pos != len(buf):")
        gen.emit(2, "raise AvroFastError(f'{len(buf) - pos} byte(s) left over or missing')")
        gen.emit(1, "return result")
        gen.emit(0, "def read_from(buf, text, pos):")
        gen.read(schema, "result", 1)
        gen.emit(1, "return result, pos")
        self.source = "\n".join(gen.lines)
        namespace = dict(gen.env)
        exec(compile(self.source, f"<avro_fast {schema['name']}>", "exec"), namespace)
        self.writer: Callable[[Any, bytes], bytes] = namespace["write"]
        self.reader: Callable[[bytes, int], Any] = namespace["read"]
        self.read_from: Callable[[bytes, str, int], tuple[Any, int]] = namespace["read_from"]
        """Read one record at ``pos`` of a buffer holding records back to back; returns it
        and where it ends. ``text`` is the whole buffer decoded as Latin-1 (read once per
        buffer); errors are as for ``reader``."""

    def write(self, value: Any) -> bytes:
        """The Avro binary body of ``value``.

        Raises:
            AvroFastError: the value does not fit the schema.
        """
        try:
            return self.writer(value, b"")
        except AvroFastError:
            raise
        except WRITE_ERRORS as exc:
            raise AvroFastError(f"value does not fit the schema: {exc!r}") from exc

    def read(self, body: bytes) -> Any:
        """Decode one record that must use exactly all of ``body``.

        Raises:
            AvroFastError: truncated, trailing or invalid bytes.
        """
        try:
            return self.reader(body, 0)
        except READ_ERRORS as exc:
            raise read_error(exc) from None

