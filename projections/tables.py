"""The projection's SQL tables (SQLAlchemy Core; SQLite and PostgreSQL). [adapter]

Times are stored as integer microseconds since the epoch (UTC), like the Avro
``timestamp-micros`` they come from: exact, portable and cheap to index. JSON values are
stored as canonical JSON text. The ``journal`` is append-only; every other table is a
view that ``SqlProjectionStore`` folds from it and can rebuild from offset 0.
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
    Column("occurred_us", BigInteger, nullable=False),
    Column("run_id", _ID, nullable=False),
    Column("parent_run_id", _ID),
    Column("agent_id", _ID, nullable=False),
    Column("identity", _ID, nullable=False),
    Column("tenant", _ID),
    Column("environment", _ID, nullable=False),
    Column("workflow", _ID),
    Column("step_id", _KEY, nullable=False),
    Column("parent_step_id", _KEY),
    Column("tool", _ID, nullable=False),
    Column("system", _ID),
    Column("object_id", _KEY),
    Column("record_key", _KEY, comment="system/object_id of the target record"),
    Column("reversibility", String(20), nullable=False),
    Column("status", String(20), nullable=False),
    Column("origin", String(20), nullable=False),
    Column("compensates", _ID),
    Column("undoes", Text, comment="space-separated event ids this event undoes"),
    Column("compensation", Text, comment="JSON of the declared compensation"),
    Column("labels", Text, comment="JSON object"),
    Column("job_id", _ID),
    Column("has_after", Boolean, nullable=False),
    Column("changes_record", Boolean, nullable=False),
    Column("topic", _ID, nullable=False),
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
    Column("system", _ID, nullable=False),
    Column("object_id", _KEY, nullable=False),
    Column("exists", Boolean, nullable=False),
    Column("known", Boolean, nullable=False),
    Column("fields", Text, nullable=False, comment="JSON object of known field values"),
    Column("version", Text, comment="JSON value"),
    Column("seq", BigInteger, nullable=False, comment="last field_writes.seq of the record"),
    Column("last_event_id", _ID),
    Column("updated_us", BigInteger),
    Column(
        "opaque",
        Text,
        nullable=False,
        default="",
        comment="space-separated events that may have changed it without an after-image",
    ),
    Index("ix_record_state_system", "system", "object_id"),
)

field_writes = Table(
    "field_writes",
    metadata,
    Column("record_key", _KEY, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("field", String(200), primary_key=True, comment="a field name or $exists"),
    Column("event_id", _ID, nullable=False),
    Column("run_id", _ID),
    Column("origin", String(20), comment="null: an unjournaled write"),
    Column("occurred_us", BigInteger, nullable=False),
    Column("before", Text, comment="JSON; null when absent"),
    Column("before_present", Boolean, nullable=False),
    Column("after", Text, comment="JSON; null when absent"),
    Column("after_present", Boolean, nullable=False),
    Column("journaled", Boolean, nullable=False),
    Column("before_known", Boolean, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("parent_run_id", _ID),
    Column("agent_id", _ID, nullable=False),
    Column("identity", _ID, nullable=False),
    Column("tenant", _ID),
    Column("workflow", _ID),
    Column("environment", _ID, nullable=False),
    Column("status", String(20), nullable=False),
    Column("started_us", BigInteger),
    Column("finished_us", BigInteger),
    Column("last_event_us", BigInteger),
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
    Column("occurred_us", BigInteger, nullable=False),
)

compensations = Table(
    "compensations",
    metadata,
    Column("undone_event_id", _ID, primary_key=True),
    Column("inverse_event_id", _ID, primary_key=True),
    Column("origin", String(20), nullable=False),
    Column("occurred_us", BigInteger, nullable=False),
    Column("plan_id", _ID),
    Column("step_id", _KEY),
)

rollback_steps = Table(
    "rollback_steps",
    metadata,
    Column("step_id", _KEY, primary_key=True),
    Column("plan_id", _ID, nullable=False),
    Column("status", String(20), nullable=False),
    Column("outcome", String(40)),
    Column("record_key", _KEY),
    Column("started_us", BigInteger),
    Column("finished_us", BigInteger),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_rollback_steps_plan", "plan_id"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", _KEY, primary_key=True),
    Column("plan_id", _ID, nullable=False),
    Column("status", String(20), nullable=False),
    Column("event_id", _ID),
    Column("system", _ID),
    Column("object_id", _KEY),
    Column("run_id", _ID),
    Column("tool", _ID, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("closed_us", BigInteger),
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
