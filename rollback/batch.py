"""Batched compare-and-set on a SqlTableTarget: many restores in one transaction. [adapter]

Same semantics as ``SqlTableTarget.compare_and_set`` called once per record (a contract
test holds them equal), but each record costs one guarded UPDATE instead of a
transaction with three statements, which is what lets a rollback restore thousands of
records a second. Every UPDATE carries its own guard (``WHERE key = ? AND field = <value
the log says> ...``), so a concurrent writer can only make a row a conflict, never get
overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Connection, and_, bindparam, select, update
from sqlalchemy.exc import OperationalError

from backout.producers.targets import CasOutcome, CasResult, SqlTableTarget, TargetUnavailable
from backout.schemas.events import JsonMap, RecordImage

__all__ = ["CasItem", "SqlBatchWriter"]

CasItem = tuple[str, JsonMap, JsonMap]
"""``(object_id, expected, desired)``, as ``compare_and_set`` takes them."""

_CHUNK = 500


class SqlBatchWriter:
    """Applies many compare-and-sets to one SqlTableTarget in one transaction."""

    def __init__(self, target: SqlTableTarget) -> None:
        self.target = target
        self._statements: dict[tuple[tuple[str, bool], ...], Any] = {}

    def compare_and_set_many(self, items: Sequence[CasItem]) -> list[CasResult]:
        """``compare_and_set`` for each item, in one transaction.

        Raises:
            TargetUnavailable: the database cannot be reached (nothing was written).
        """
        target = self.target
        for _, expected, desired in items:
            target._check_fields(expected, desired)
        try:
            with target.engine.begin() as conn:
                written = [self._update(conn, *item) for item in items]
                images = self._images(conn, [object_id for object_id, _, _ in items])
        except OperationalError as exc:
            raise TargetUnavailable(f"{target.system}: {exc.orig}") from exc
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

    def _update(
        self, conn: Connection, object_id: str, expected: JsonMap, desired: JsonMap
    ) -> bool:
        shape = tuple(sorted((k, v is None) for k, v in expected.items())) + tuple(
            sorted((f"={k}", False) for k in desired)
        )
        stmt = self._statements.get(shape)
        if stmt is None:
            stmt = self._statements[shape] = self._statement(expected, desired)
        params: dict[str, object] = {"_key": self.target._key_value(object_id)}
        params.update({f"_e_{k}": v for k, v in expected.items() if v is not None})
        params.update({f"_d_{k}": v for k, v in desired.items()})
        return conn.execute(stmt, params).rowcount == 1

    def _statement(self, expected: JsonMap, desired: JsonMap) -> Any:
        table, version = self.target.table, self.target.version
        key: Column[Any] = table.c[self.target.key]
        clauses = [key == bindparam("_key")]
        for name, value in sorted(expected.items()):
            column = table.c[name]
            clauses.append(column.is_(None) if value is None else column == bindparam(f"_e_{name}"))
        values: dict[str, Any] = {name: bindparam(f"_d_{name}") for name in desired}
        if version:
            values[version] = table.c[version] + 1
        return update(table).where(and_(*clauses)).values(values)

    def _images(self, conn: Connection, object_ids: Sequence[str]) -> dict[str, RecordImage]:
        target = self.target
        key = target.table.c[target.key]
        out: dict[str, RecordImage] = {}
        ids = list(dict.fromkeys(object_ids))
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            by_value = {target._key_value(i): i for i in chunk}
            for row in conn.execute(select(target.table).where(key.in_(list(by_value)))):
                mapping = dict(row._mapping)
                out[by_value[mapping[target.key]]] = target._image(mapping)
        return out
