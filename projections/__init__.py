"""Projections: the log folded into read models.

The fold (``evolve``/``fold`` and its value types) is pure and exported here; the SQL
tables, ``SqlProjectionStore`` and the ``Projector`` are adapters, imported from their
modules (``backout.projections.store``, ``backout.projections.projector``).
"""

from backout.projections.fold import (
    ABSENT,
    EMPTY,
    EXISTS,
    EventInfo,
    FieldWrite,
    Projection,
    RecordHistory,
    RecordState,
    RunState,
    Task,
    evolve,
    fold,
)

__all__ = [
    "ABSENT",
    "EMPTY",
    "EXISTS",
    "EventInfo",
    "FieldWrite",
    "Projection",
    "RecordHistory",
    "RecordState",
    "RunState",
    "Task",
    "evolve",
    "fold",
]
