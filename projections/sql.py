"""SQL plumbing of the projection store: engines, bulk writes, errors. [adapter]"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, create_engine, delete, event, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from backout.schemas.errors import ProjectionError

__all__ = ["CHUNK", "BulkSql", "chunks", "make_engine", "paused_gc", "sql_errors"]

CHUNK = 500
"""Ids per ``IN (...)``."""


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    """``items`` in slices of at most :data:`CHUNK`."""
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL mode and wait for the write lock.

    New SQLite files get 16 KiB pages: the journal's rows and its seven indexes take fewer
    page splits per batch (``page_size`` has no effect on an existing WAL file).
    """
    if url.startswith("sqlite"):
        # Several projector processes may share a file: wait for the write lock.
        engine = create_engine(url, connect_args={"timeout": 60})
    else:
        engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA page_size=16384")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


class BulkSql:
    """Many-row inserts and upserts, each one pre-rendered statement run with executemany.

    SQLite and PostgreSQL get hand-rendered ``INSERT ... ON CONFLICT DO UPDATE`` run on the
    driver directly (tuples in, no per-row SQLAlchemy processing: the projection's hot
    path); other dialects go through SQLAlchemy Core (upsert as delete + insert).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
        self.fast = dialect.name in ("sqlite", "postgresql") and self.mark is not None
        self._sql: dict[tuple[str, str, tuple[str, ...]], str] = {}

    def insert(
        self, conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        if not rows:
            return
        if not self.fast:
            conn.execute(insert(table), [dict(zip(columns, r, strict=True)) for r in rows])
            return
        conn.exec_driver_sql(self._render("insert", table, columns), rows)

    def upsert(
        self, conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        if not rows:
            return
        if not self.fast:
            keys = list(table.primary_key.columns)
            for row in rows:
                values = dict(zip(columns, row, strict=True))
                conn.execute(delete(table).where(and_(*(c == values[c.name] for c in keys))))
            conn.execute(insert(table), [dict(zip(columns, r, strict=True)) for r in rows])
            return
        conn.exec_driver_sql(self._render("upsert", table, columns), rows)

    def _render(self, kind: str, table: Table, columns: tuple[str, ...]) -> str:
        cache_key = (kind, table.name, columns)
        found = self._sql.get(cache_key)
        if found is not None:
            return found
        quote = self.dialect.identifier_preparer.quote
        names = ", ".join(quote(c) for c in columns)
        marks = ", ".join(self.mark or "?" for _ in columns)
        sql = f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})"
        if kind == "upsert":
            keys = [c.name for c in table.primary_key.columns]
            updates = ", ".join(
                f"{quote(c)} = excluded.{quote(c)}" for c in columns if c not in keys
            )
            sql += f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
        self._sql[cache_key] = sql
        return sql


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic collector for a bulk job (a load, a batch): such jobs build
    many small objects next to a large heap, and the collector would scan that heap again
    and again for nothing. It runs again when the job is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def sql_errors(doing: str) -> Iterator[None]:
    """Turn database failures into ProjectionError saying what we were ``doing``."""
    try:
        yield
    except OperationalError as exc:
        raise ProjectionError(f"cannot {doing}: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        raise ProjectionError(f"cannot {doing}: {exc}") from exc
