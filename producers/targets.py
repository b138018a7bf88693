"""Targets: the live systems agents write to, seen as records of fields with a version.

A Target reads a record (fields + version, or its absence) and applies the three
guarded writes rollback needs: a field-level compare-and-set, a guarded delete and a
re-insert. Every guarded write checks the live record against what the log says it
should be and writes nothing when they differ (``CasOutcome.CONFLICT``).

To add an HTTP or SaaS target, implement :class:`Target`: ``system`` names it,
``read`` returns a :class:`RecordImage` (``exists=False`` when absent), and the three
writes return a :class:`CasResult`. Raise ``TargetUnavailable`` when the system cannot
be reached, so callers can tell "could not try" from "tried and the values differed".
A target that can restore many records in one round trip also implements
:class:`BatchTarget` (``compare_and_set_many``); the rollback executor then sends it
consecutive restores in batches. ``tests/contract/test_target_contract.py`` holds every
adapter to these rules.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Protocol, TypeAlias, runtime_checkable

from pydantic import JsonValue
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    Numeric,
    Table,
    Uuid,
    and_,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, NoSuchTableError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

from backout.schemas.errors import BackoutError, ConfigError
from backout.schemas.events import JsonMap, RecordImage

_CHUNK = 500
"""Keys per ``IN (...)`` when reading many records back."""


class TargetUnavailable(BackoutError):
    """The target system could not be reached; nothing is known to have changed."""


class CasOutcome(StrEnum):
    """What a guarded write did."""

    APPLIED = "applied"
    """The live record matched the expectation and the write happened."""
    ALREADY = "already"
    """The live record already has the desired state; nothing was written."""
    CONFLICT = "conflict"
    """The live record differs from the expectation; nothing was written."""


@dataclass(frozen=True)
class CasResult:
    """Outcome of a guarded write, with the live image it was judged against."""

    outcome: CasOutcome
    live: RecordImage


@runtime_checkable
class Target(Protocol):
    """A system of records backout can read and restore with compare-and-set."""

    @property
    def system(self) -> str:
        """The system name used in ``TargetRef.system`` (``erp``, ``crm``)."""
        ...

    def read(self, object_id: str) -> RecordImage:
        """The record's fields and version now; ``exists=False`` when absent."""
        ...

    def compare_and_set(self, object_id: str, expected: JsonMap, desired: JsonMap) -> CasResult:
        """Set ``desired`` fields if every field in ``expected`` has that live value."""
        ...

    def delete_if(self, object_id: str, expected: JsonMap) -> CasResult:
        """Delete the record if its fields in ``expected`` have those live values."""
        ...

    def insert_if_absent(self, object_id: str, fields: JsonMap) -> CasResult:
        """Re-create the record with ``fields`` if it does not exist."""
        ...


CasItem: TypeAlias = tuple[str, JsonMap, JsonMap]
"""``(object_id, expected, desired)``, as ``compare_and_set`` takes them."""


@runtime_checkable
class BatchTarget(Target, Protocol):
    """A Target that can also apply many compare-and-sets in one round trip (optional)."""

    def compare_and_set_many(self, items: Sequence[CasItem]) -> list[CasResult]:
        """``compare_and_set`` for each item, judged and reported item by item.

        Each item is guarded on its own: one conflict leaves the others to apply. The
        results are in the order of ``items``.

        Raises:
            TargetUnavailable: the system cannot be reached (nothing was written).
        """
        ...


class SqlTableTarget:
    """A SQL table as a Target (SQLAlchemy Core).

    Args:
        engine: where the table lives.
        table: the table name (reflected on first use).
        key: the primary key column; ``object_id`` is its value as text.
        version: an optional integer version column, bumped on every guarded write.
        system: the system name in events; defaults to the table name.
        fields: columns captured in images; defaults to every column but key and version.
    """

    def __init__(
        self,
        engine: Engine,
        table: str,
        *,
        key: str = "id",
        version: str | None = None,
        system: str | None = None,
        fields: list[str] | None = None,
    ) -> None:
        self.engine = engine
        self.table_name = table
        self.key = key
        self.version = version
        self._system = system or table
        self._fields = fields
        self._table: Table | None = None
        self._statements: dict[tuple[tuple[str, bool], ...], Any] = {}

    @property
    def system(self) -> str:
        return self._system

    def __repr__(self) -> str:
        return f"SqlTableTarget({self.table_name!r}, system={self._system!r}, key={self.key!r})"

    @property
    def table(self) -> Table:
        """The reflected table."""
        if self._table is None:
            try:
                self._table = Table(self.table_name, MetaData(), autoload_with=self.engine)
            except NoSuchTableError as exc:
                raise ConfigError(f"no table {self.table_name!r} in {self.engine.url!r}") from exc
            except OperationalError as exc:
                raise TargetUnavailable(f"{self._system}: {exc.orig}") from exc
            for name in [
                self.key,
                *([self.version] if self.version else []),
                *(self._fields or []),
            ]:
                if name not in self._table.c:
                    raise ConfigError(f"table {self.table_name!r} has no column {name!r}")
        return self._table

    @property
    def field_names(self) -> list[str]:
        """The columns captured in images."""
        if self._fields is not None:
            return list(self._fields)
        return [c.name for c in self.table.c if c.name not in (self.key, self.version)]

    def _key_value(self, object_id: str) -> object:
        """``object_id`` as a value of the key column (events carry ids as text)."""
        kind = self.table.c[self.key].type
        try:
            if isinstance(kind, Integer):
                return int(object_id)
            if isinstance(kind, Numeric):
                return Decimal(object_id) if kind.asdecimal else float(object_id)
            if isinstance(kind, Uuid) and kind.as_uuid:
                return uuid.UUID(object_id)
        except (ValueError, InvalidOperation) as exc:
            raise ConfigError(
                f"{self._system}: {object_id!r} is not a value of key column "
                f"{self.table_name}.{self.key} ({kind})"
            ) from exc
        return object_id  # text and every other type compare as text

    def _image(self, row: dict[str, object] | None) -> RecordImage:
        if row is None:
            return RecordImage(exists=False)
        fields: dict[str, JsonValue] = {n: _json(row[n]) for n in self.field_names}
        version = _json(row[self.version]) if self.version else None
        return RecordImage(exists=True, fields=fields, version=version)

    def _read_row(self, conn: object, object_id: str) -> dict[str, object] | None:
        stmt = select(self.table).where(self.table.c[self.key] == self._key_value(object_id))
        row = conn.execute(stmt).mappings().first()  # type: ignore[attr-defined]
        return dict(row) if row is not None else None

    def read(self, object_id: str) -> RecordImage:
        try:
            with self.engine.connect() as conn:
                return self._image(self._read_row(conn, object_id))
        except OperationalError as exc:
            raise TargetUnavailable(f"{self._system}: {exc.orig}") from exc

    def _guard(self, object_id: str, expected: JsonMap) -> ColumnElement[bool]:
        clauses = [self.table.c[self.key] == self._key_value(object_id)]
        for name, value in expected.items():
            column = self.table.c[name]
            clauses.append(column.is_(None) if value is None else column == value)
        return and_(*clauses)

    def compare_and_set(self, object_id: str, expected: JsonMap, desired: JsonMap) -> CasResult:
        self._check_fields(expected, desired)
        try:
            with self.engine.begin() as conn:
                live_row = self._read_row(conn, object_id)
                live = self._image(live_row)
                if live.exists and all(live.fields.get(k) == v for k, v in desired.items()):
                    return CasResult(CasOutcome.ALREADY, live)
                if not live.exists:
                    return CasResult(CasOutcome.CONFLICT, live)
                values: dict[str, object] = dict(desired)
                if self.version:
                    values[self.version] = self.table.c[self.version] + 1
                result = conn.execute(
                    update(self.table).where(self._guard(object_id, expected)).values(values)
                )
                if result.rowcount != 1:
                    return CasResult(CasOutcome.CONFLICT, live)
                return CasResult(CasOutcome.APPLIED, self._image(self._read_row(conn, object_id)))
        except OperationalError as exc:
            raise TargetUnavailable(f"{self._system}: {exc.orig}") from exc

    def delete_if(self, object_id: str, expected: JsonMap) -> CasResult:
        self._check_fields(expected)
        try:
            with self.engine.begin() as conn:
                live = self._image(self._read_row(conn, object_id))
                if not live.exists:
                    return CasResult(CasOutcome.ALREADY, live)
                result = conn.execute(delete(self.table).where(self._guard(object_id, expected)))
                if result.rowcount != 1:
                    return CasResult(CasOutcome.CONFLICT, live)
                return CasResult(CasOutcome.APPLIED, RecordImage(exists=False))
        except OperationalError as exc:
            raise TargetUnavailable(f"{self._system}: {exc.orig}") from exc

    def insert_if_absent(self, object_id: str, fields: JsonMap) -> CasResult:
        self._check_fields(fields)
        try:
            with self.engine.begin() as conn:
                live = self._image(self._read_row(conn, object_id))
                if live.exists:
                    same = all(live.fields.get(k) == v for k, v in fields.items())
                    return CasResult(CasOutcome.ALREADY if same else CasOutcome.CONFLICT, live)
                values: dict[str, object] = {self.key: self._key_value(object_id), **fields}
                if self.version:
                    values[self.version] = 1
                conn.execute(insert(self.table).values(values))
                return CasResult(CasOutcome.APPLIED, self._image(self._read_row(conn, object_id)))
        except OperationalError as exc:
            raise TargetUnavailable(f"{self._system}: {exc.orig}") from exc
        except IntegrityError:  # a concurrent insert won the race
            return CasResult(CasOutcome.CONFLICT, self.read(object_id))

    def compare_and_set_many(self, items: Sequence[CasItem]) -> list[CasResult]:
        """``compare_and_set`` for each item, in one transaction (:class:`BatchTarget`).

        Each record costs one guarded UPDATE (``WHERE key = ? AND field = <expected>``)
        instead of a transaction of three statements; the live images are read once
        afterwards to tell APPLIED, ALREADY and CONFLICT apart. A concurrent writer can
        only turn an item into a conflict, never be overwritten.

        Raises:
            TargetUnavailable: the database cannot be reached (nothing was written).
        """
        for _, expected, desired in items:
            self._check_fields(expected, desired)
        try:
            with self.engine.begin() as conn:
                written = [self._guarded_update(conn, *item) for item in items]
                images = self._images(conn, [object_id for object_id, _, _ in items])
        except OperationalError as exc:
            raise TargetUnavailable(f"{self._system}: {exc.orig}") from exc
        out = []
        for (object_id, _, desired), wrote in zip(items, written, strict=True):
            live = images.get(object_id, RecordImage(exists=False))
            if wrote:
                out.append(CasResult(CasOutcome.APPLIED, live))
            elif live.exists and all(live.fields.get(k) == v for k, v in desired.items()):
                out.append(CasResult(CasOutcome.ALREADY, live))
            else:
                out.append(CasResult(CasOutcome.CONFLICT, live))
        return out

    def _guarded_update(
        self, conn: Connection, object_id: str, expected: JsonMap, desired: JsonMap
    ) -> bool:
        # One compiled statement per shape of guard (which fields, which expect NULL).
        shape = tuple(sorted((k, v is None) for k, v in expected.items())) + tuple(
            sorted((f"={k}", False) for k in desired)
        )
        stmt = self._statements.get(shape)
        if stmt is None:
            stmt = self._statements[shape] = self._update_statement(expected, desired)
        params: dict[str, object] = {"_key": self._key_value(object_id)}
        params.update({f"_e_{k}": v for k, v in expected.items() if v is not None})
        params.update({f"_d_{k}": v for k, v in desired.items()})
        return bool(conn.execute(stmt, params).rowcount == 1)

    def _update_statement(self, expected: JsonMap, desired: JsonMap) -> Any:
        table, version = self.table, self.version
        key: Column[Any] = table.c[self.key]
        clauses = [key == bindparam("_key")]
        for name, value in sorted(expected.items()):
            column = table.c[name]
            clauses.append(column.is_(None) if value is None else column == bindparam(f"_e_{name}"))
        values: dict[str, Any] = {name: bindparam(f"_d_{name}") for name in desired}
        if version:
            values[version] = table.c[version] + 1
        return update(table).where(and_(*clauses)).values(values)

    def _images(self, conn: Connection, object_ids: Sequence[str]) -> dict[str, RecordImage]:
        key = self.table.c[self.key]
        out: dict[str, RecordImage] = {}
        ids = list(dict.fromkeys(object_ids))
        for start in range(0, len(ids), _CHUNK):
            by_value = {self._key_value(i): i for i in ids[start : start + _CHUNK]}
            for row in conn.execute(select(self.table).where(key.in_(list(by_value)))):
                mapping = dict(row._mapping)
                out[by_value[mapping[self.key]]] = self._image(mapping)
        return out

    def _check_fields(self, *maps: JsonMap) -> None:
        for values in maps:
            for name in values:
                if name not in self.table.c or name in (self.key, self.version):
                    raise ConfigError(
                        f"{self._system}: {name!r} is not a field of table {self.table_name!r}"
                    )


def _json(value: object) -> JsonValue:
    """A column value as JSON (dates and decimals become text, which SQL compares back)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | dict):
        return value
    return str(value)
