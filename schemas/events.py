"""Frozen pydantic models that mirror the Avro records in ``schemas/*.avsc``. Pure: no I/O.

The ``.avsc`` files are the source of truth; ``tests/unit/test_schema_models.py`` proves
every model field maps to its Avro field and back.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeAlias, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue

JsonMap: TypeAlias = dict[str, JsonValue]
"""Field name to JSON value: arguments, before/after images."""


class Reversibility(StrEnum):
    """How an action can be undone."""

    REVERSIBLE = "reversible"
    """The target can restore the previous field values (compare-and-set)."""
    COMPENSATABLE = "compensatable"
    """A declared compensation tool undoes it, within its window."""
    IRREVERSIBLE = "irreversible"
    """Nothing can undo it: a manual task when rolled back."""
    READ_ONLY = "read_only"
    """Changes nothing."""


class CallStatus(StrEnum):
    """Outcome of a tool call as the journal knows it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    """In doubt: a timeout or lost connection; the side effect may or may not have happened."""
    BLOCKED = "blocked"
    """Refused by a freeze or a denied approval; nothing executed."""
    PENDING = "pending"
    """Accepted by the target as an asynchronous job (see ``job_id``), or awaiting approval."""


class Origin(StrEnum):
    """Who caused the action."""

    AGENT = "agent"
    HUMAN = "human"
    SYSTEM = "system"
    ROLLBACK = "rollback"


class EventKind(StrEnum):
    """What an ActionEvent records. Most are tool calls; the rest are run lifecycle facts."""

    TOOL_CALL = "tool_call"
    RUN_STARTED = "run_started"
    RUN_FINISHED = "run_finished"
    CHECKPOINT = "checkpoint"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    ROLLBACK_STEP_STARTED = "rollback_step_started"
    ROLLBACK_STEP_FINISHED = "rollback_step_finished"


class ControlAction(StrEnum):
    """What a control command asks for."""

    FREEZE = "freeze"
    LIFT = "lift"
    APPROVE = "approve"
    DENY = "deny"


class FreezeMode(StrEnum):
    """How much a freeze stops."""

    HALT = "halt"
    """No calls at all in the scope."""
    READ_ONLY = "read_only"
    """Only read-only tools run."""
    QUARANTINE_IDENTITY = "quarantine_identity"
    """No calls with the identity in scope, whoever makes them."""


class Severity(StrEnum):
    """How bad a finding is."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


_FROZEN = ConfigDict(frozen=True, extra="forbid")
ModelT = TypeVar("ModelT", bound=BaseModel)


_new = object.__new__
_set = object.__setattr__


_WRITE_OUTCOMES = frozenset((CallStatus.SUCCEEDED, CallStatus.UNKNOWN, CallStatus.PENDING))


def may_have_written(kind: EventKind, reversibility: Reversibility, status: CallStatus) -> bool:
    """Whether a journaled call may have changed its target: a tool call that is not
    read-only and did not fail or get blocked (succeeded, in doubt or still pending)."""
    return (
        kind is EventKind.TOOL_CALL
        and reversibility is not Reversibility.READ_ONLY
        and status in _WRITE_OUTCOMES
    )


def trusted_model(cls: type[ModelT], state: dict[str, Any], fields_set: set[str]) -> ModelT:
    """A ``cls`` whose fields are ``state``, unvalidated: what ``model_construct`` builds.

    ``state`` must hold every field of ``cls`` (in field order, so the model prints as a
    validated one does) with values already of the right types; ``fields_set`` becomes
    ``model_fields_set``. Both are owned by the model from then on.
    """
    instance = _new(cls)
    _set(instance, "__dict__", state)
    _set(instance, "__pydantic_fields_set__", fields_set)
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance


def trusted_constructor(cls: type[ModelT]) -> Callable[..., ModelT]:
    """A constructor for ``cls`` that skips validation, for values already of the right types.

    Like ``model_construct`` (defaults filled in, nothing checked) but without its per-call
    bookkeeping, which dominates building events on hot paths (the journal, the decoder).
    Only for values produced by our own typed code or read with our own schema.
    """
    fields = cls.model_fields
    defaults = {n: f.default for n, f in fields.items()
                if not f.is_required() and f.default_factory is None}
    factories = {n: f.default_factory for n, f in fields.items() if f.default_factory is not None}

    def construct(**values: Any) -> ModelT:
        state = {**defaults, **values}
        for name, factory in factories.items():
            if name not in values:
                state[name] = factory()  # type: ignore[call-arg]
        return trusted_model(cls, state, set(values))

    return construct


class TargetRef(BaseModel):
    """The record an action touched: ``system/object_id``."""

    model_config = _FROZEN
    system: str
    object_id: str

    @property
    def key(self) -> str:
        """The actions topic key for this record."""
        return f"{self.system}/{self.object_id}"


class RecordImage(BaseModel):
    """A target record's fields and version at one moment."""

    model_config = _FROZEN
    exists: bool
    """False when the record was absent (before a create, after a delete)."""
    fields: JsonMap = Field(default_factory=dict)
    version: JsonValue = None


class ErrorInfo(BaseModel):
    """What went wrong in a failed or in-doubt call."""

    model_config = _FROZEN
    type: str
    message: str
    retryable: bool | None = None


class Compensation(BaseModel):
    """How an action is undone: restore fields, run a compensating tool, or by hand."""

    model_config = _FROZEN
    strategy: str
    """``restore_fields``, ``compensating_tool`` or ``manual``."""
    tool: str | None = None
    args: JsonMap = Field(default_factory=dict)
    allowed_until: datetime | None = None


class ActionEvent(BaseModel):
    """One journaled tool call, or a run lifecycle fact. Immutable."""

    model_config = _FROZEN
    event_id: str
    occurred_at: datetime
    kind: EventKind = EventKind.TOOL_CALL
    run_id: str
    parent_run_id: str | None = None
    agent_id: str
    identity: str
    tenant: str | None = None
    environment: str = "production"
    workflow: str | None = None
    step_id: str
    parent_step_id: str | None = None
    tool: str
    requested_args: JsonMap = Field(default_factory=dict)
    approved_args: JsonMap | None = None
    target: TargetRef | None = None
    reversibility: Reversibility
    before: RecordImage | None = None
    after: RecordImage | None = None
    idempotency_key: str
    status: CallStatus
    job_id: str | None = None
    result: JsonValue = None
    error: ErrorInfo | None = None
    compensation: Compensation | None = None
    origin: Origin = Origin.AGENT
    compensates: str | None = None
    correlation_id: str | None = None
    value: float | None = None
    confidence: float | None = None
    reasoning_summary: str | None = None
    blocked_by: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """The actions topic key: the target record, or the run when there is none."""
        return self.target.key if self.target is not None else self.run_id

    @property
    def is_write(self) -> bool:
        """True for a tool call that may have changed its target (:func:`may_have_written`)."""
        return may_have_written(self.kind, self.reversibility, self.status)


class ControlCommand(BaseModel):
    """A freeze, lift, approve or deny on the control topic. Signed."""

    model_config = _FROZEN
    command_id: str
    issued_at: datetime
    action: ControlAction
    scope: dict[str, str] = Field(default_factory=dict)
    mode: FreezeMode = FreezeMode.HALT
    expires_at: datetime | None = None
    reason: str = ""
    issuer: str = ""
    cause: str | None = None
    refers_to: str | None = None
    approved_args: JsonMap | None = None
    key_id: str | None = None
    signature: bytes | None = None


class Evidence(BaseModel):
    """Where a finding's proof lives on the log."""

    model_config = _FROZEN
    event_id: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


class Signal(BaseModel):
    """A detector finding with its evidence."""

    model_config = _FROZEN
    signal_id: str
    detected_at: datetime
    detector: str
    severity: Severity
    scope: dict[str, str] = Field(default_factory=dict)
    summary: str
    evidence: list[Evidence] = Field(default_factory=list)
    details: dict[str, str] = Field(default_factory=dict)


Record: TypeAlias = Annotated[ActionEvent | ControlCommand | Signal, "any top-level record"]
