"""The projection's SQL tables (SQLAlchemy Core; SQLite and PostgreSQL). [adapter]

Times are stored as integer microseconds since the epoch (UTC), like the Avro
``timestamp-micros`` they come from: exact, portable and cheap to index. JSON values are
stored as canonical JSON text. The ``journal`` is append-only; every other table is a
view that ``SqlProjectionStore`` folds from it and can rebuild from offset 0.

On SQLite, ``field_writes`` and ``record_state`` are ``WITHOUT ROWID`` tables: rows live
in their primary-key B-tree, so each write updates one tree fewer.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "checkpoints",
    "compensations",
    "field_writes",
    "journal",
    "metadata",
    "positions",
    "record_state",
    "rollback_steps",
    "runs",
    "tasks",
]

metadata = MetaData()

_ID = String(200)
_KEY = String(600)
_SEQ = BigInteger().with_variant(Integer, "sqlite")
"""Autoincrementing ids: SQLite only autoincrements INTEGER PRIMARY KEY."""


# --- column groups several tables share ----------------------------------------------------
def _ids(*names: str, required: bool = False) -> list[Column[str]]:
    """Id columns (runs, agents, events...)."""
    return [Column(name, _ID, nullable=not required) for name in names]


def _times(*names: str, required: bool = False) -> list[Column[int]]:
    """Moments as integer microseconds since the epoch (UTC)."""
    return [Column(name, BigInteger, nullable=not required) for name in names]


def _flags(*names: str) -> list[Column[bool]]:
    return [Column(name, Boolean, nullable=False) for name in names]


def _actor() -> list[Column[str]]:
    """Who acted: the agent, the identity it acted as, and the tenant."""
    return [*_ids("agent_id", "identity", required=True), *_ids("tenant")]


def _target(*, required: bool = False) -> list[Column[str]]:
    """The target record: ``system`` and ``object_id``."""
    return [
        Column("system", _ID, nullable=not required),
        Column("object_id", _KEY, nullable=not required),
    ]


def _json(name: str, comment: str, *, required: bool = False) -> Column[str]:
    """A JSON value as canonical text."""
    return Column(name, Text, nullable=not required, comment=comment)


def _state(*values: str) -> Column[str]:
    """A short status text (one of ``values``)."""
    return Column("status", String(20), nullable=False, comment=" | ".join(values))


journal = Table(
    "journal",
    metadata,
    Column(
        "seq",
        _SEQ,
        primary_key=True,
        autoincrement=True,
        comment="ingestion order (per partition this is log order)",
    ),
    Column("event_id", _ID, nullable=False, unique=True),
    Column("kind", String(40), nullable=False),
    *_times("occurred_us", required=True),
    *_ids("run_id", required=True),
    *_ids("parent_run_id"),
    *_actor(),
    *_ids("environment", required=True),
    *_ids("workflow"),
    Column("step_id", _KEY, nullable=False),
    Column("parent_step_id", _KEY),
    *_ids("tool", required=True),
    *_target(),
    Column("record_key", _KEY, comment="system/object_id of the target record"),
    Column("reversibility", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("origin", String(20), nullable=False),
    *_ids("compensates"),
    Column("undoes", Text, comment="space-separated event ids this event undoes"),
    _json("compensation", "JSON of the declared compensation"),
    _json("labels", "JSON object"),
    *_ids("job_id"),
    *_flags("has_after", "changes_record"),
    *_ids("topic", required=True),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=False, comment="the record as read from the topic"),
    Index("ix_journal_run", "run_id"),
    Index("ix_journal_agent", "agent_id"),
    Index("ix_journal_identity", "identity"),
    Index("ix_journal_tenant", "tenant"),
    Index("ix_journal_record", "record_key", "seq"),
    Index("ix_journal_time", "occurred_us"),
)

record_state = Table(
    "record_state",
    metadata,
    Column("record_key", _KEY, primary_key=True),
    *_target(required=True),
    *_flags("exists", "known"),
    _json("fields", "JSON object of known field values", required=True),
    _json("version", "JSON value"),
    Column("seq", BigInteger, nullable=False, comment="last field_writes.seq of the record"),
    *_ids("last_event_id"),
    *_times("updated_us"),
    Column(
        "opaque",
        Text,
        nullable=False,
        default="",
        comment="space-separated events that may have changed it without an after-image",
    ),
    Index("ix_record_state_system", "system", "object_id"),
    sqlite_with_rowid=False,
)

field_writes = Table(
    "field_writes",
    metadata,
    Column("record_key", _KEY, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("field", String(200), primary_key=True, comment="a field name or $exists"),
    *_ids("event_id", required=True),
    *_ids("run_id"),
    Column("origin", String(20), comment="null: an unjournaled write"),
    *_times("occurred_us", required=True),
    _json("before", "JSON; null when absent"),
    *_flags("before_present"),
    _json("after", "JSON; null when absent"),
    *_flags("after_present", "journaled", "before_known"),
    sqlite_with_rowid=False,
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", _ID, primary_key=True),
    *_ids("parent_run_id"),
    *_actor(),
    *_ids("workflow"),
    *_ids("environment", required=True),
    _state("running", "finished", "failed"),
    *_times("started_us", "finished_us", "last_event_us"),
    Column("calls", BigInteger, nullable=False),
    Column("writes", BigInteger, nullable=False),
    Index("ix_runs_parent", "parent_run_id"),
    Index("ix_runs_agent", "agent_id"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("event_id", _ID, primary_key=True),
    Column("name", String(400), nullable=False),
    *_times("occurred_us", required=True),
)

compensations = Table(
    "compensations",
    metadata,
    Column("undone_event_id", _ID, primary_key=True),
    Column("inverse_event_id", _ID, primary_key=True),
    Column("origin", String(20), nullable=False),
    *_times("occurred_us", required=True),
    *_ids("plan_id"),
    Column("step_id", _KEY),
)

rollback_steps = Table(
    "rollback_steps",
    metadata,
    Column("step_id", _KEY, primary_key=True),
    *_ids("plan_id", required=True),
    _state("started", "finished"),
    Column("outcome", String(40)),
    Column("record_key", _KEY),
    *_times("started_us", "finished_us"),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_rollback_steps_plan", "plan_id"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", _KEY, primary_key=True),
    *_ids("plan_id", required=True),
    _state("open", "done"),
    *_ids("event_id"),
    *_target(),
    *_ids("run_id"),
    *_ids("tool", required=True),
    Column("reason", Text, nullable=False),
    *_times("created_us", required=True),
    *_times("closed_us"),
    Column("freeze", Text, nullable=False, default=""),
    Index("ix_tasks_status", "status"),
)

positions = Table(
    "positions",
    metadata,
    Column("consumer", _ID, primary_key=True),
    Column("topic", _ID, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, nullable=False, comment="the last offset applied"),
)
