"""One tool call in flight, and the ActionEvents that record calls and runs.

The Journal fills a ``ToolCall`` as the call goes (ids, arguments, before-image) and
turns it into its event with ``tool_event``. Events are built from values this package
already typed, without re-validation: building them is on every call's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue

from backout.producers.ids import new_event_id
from backout.producers.registry import ToolSpec, json_args
from backout.producers.run import ANNOTATION
from backout.producers.targets import TargetUnavailable
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    ErrorInfo,
    EventKind,
    JsonMap,
    RecordImage,
    Reversibility,
    TargetRef,
    trusted_model,
)

if TYPE_CHECKING:
    from backout.producers.run import RunContext

IN_DOUBT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    TargetUnavailable,
)
"""Exceptions after which the side effect may or may not have happened: status unknown."""

# What a tool call event states; kind and compensates keep their defaults (not "set").
_TOOL_EVENT_FIELDS = frozenset(ActionEvent.model_fields) - {"kind", "compensates"}
_TARGET_FIELDS = frozenset(TargetRef.model_fields)


@dataclass(frozen=True)
class Pending:
    """Return this from a tool that started an asynchronous job: journaled as pending."""

    job_id: str
    result: Any = None


@dataclass(slots=True)
class ToolCall:
    """One call in flight."""

    spec: ToolSpec
    run: RunContext
    step_id: str
    parent_step_id: str | None
    key: str
    args: dict[str, Any]
    occurred_at: datetime
    object_id: str | None = None
    approved_args: JsonMap | None = None
    before: RecordImage | None = None
    value: float | None = None


def _strategy(name: str) -> Compensation:
    """``Compensation(strategy=name)``, for the strategies that need nothing else."""
    state: dict[str, Any] = {"strategy": name, "tool": None, "args": {}, "allowed_until": None}
    return trusted_model(Compensation, state, {"strategy"})


def compensation_for(call: ToolCall, result: JsonValue) -> tuple[Compensation | None, str | None]:
    """The call's compensation, and why its args builder failed (if it did)."""
    spec = call.spec
    if spec.compensation is not None:
        comp = spec.compensation
        allowed_until = call.occurred_at + comp.window
        try:
            args = json_args(comp.args(**call.args, result=result))
        except Exception as exc:
            # The side effect already happened: journal the call anyway (its undo
            # becomes a manual task) rather than lose the event or the tool's own error.
            problem = f"{type(exc).__name__}: {exc}"[:500]
            manual = Compensation(strategy="manual", tool=comp.tool, allowed_until=allowed_until)
            return manual, problem
        return Compensation(
            strategy="compensating_tool", tool=comp.tool, args=args, allowed_until=allowed_until
        ), None
    if spec.reversibility is Reversibility.REVERSIBLE:
        return _strategy("restore_fields"), None
    if spec.reversibility is Reversibility.IRREVERSIBLE:
        return _strategy("manual"), None
    return None, None


def tool_event(
    call: ToolCall,
    status: CallStatus,
    *,
    after: RecordImage | None = None,
    result: JsonValue = None,
    job_id: str | None = None,
    error: ErrorInfo | None = None,
    blocked_by: str | None = None,
) -> ActionEvent:
    """The ActionEvent recording ``call`` with its outcome."""
    spec, run = call.spec, call.run
    note = ANNOTATION.get()
    labels = dict(note.labels) if note is not None else {}
    compensation = None
    if status is not CallStatus.BLOCKED:
        compensation, problem = compensation_for(call, result)
        if problem is not None:
            labels["compensation_error"] = problem
    target = None
    if spec.system is not None and call.object_id is not None:
        target = trusted_model(
            TargetRef, {"system": spec.system, "object_id": call.object_id}, set(_TARGET_FIELDS)
        )
    parent = run.parent
    state: dict[str, Any] = {
        "event_id": new_event_id(),
        "occurred_at": call.occurred_at,
        "kind": EventKind.TOOL_CALL,
        "run_id": run.run_id,
        "parent_run_id": parent.run_id if parent is not None else None,
        "agent_id": run.agent,
        "identity": run.identity,
        "tenant": run.tenant,
        "environment": run.environment,
        "workflow": run.workflow,
        "step_id": call.step_id,
        "parent_step_id": call.parent_step_id,
        "tool": spec.name,
        "requested_args": json_args(call.args),
        "approved_args": call.approved_args,
        "target": target,
        "reversibility": spec.reversibility,
        "before": call.before,
        "after": after,
        "idempotency_key": call.key,
        "status": status,
        "job_id": job_id,
        "result": result,
        "error": error,
        "compensation": compensation,
        "origin": run.origin,
        "compensates": None,
        "correlation_id": note.correlation_id if note is not None else None,
        "value": call.value,
        "confidence": note.confidence if note is not None else None,
        "reasoning_summary": note.reasoning if note is not None else None,
        "blocked_by": blocked_by,
        "labels": labels,
    }
    return trusted_model(ActionEvent, state, set(_TOOL_EVENT_FIELDS))


def run_fact(
    run: RunContext,
    kind: EventKind,
    step_id: str,
    status: CallStatus,
    *,
    labels: dict[str, str] | None = None,
    error: ErrorInfo | None = None,
) -> ActionEvent:
    """A run lifecycle event: run started or finished, or a checkpoint."""
    return ActionEvent(
        event_id=new_event_id(),
        occurred_at=datetime.now(UTC),
        kind=kind,
        **run.event_fields(),
        step_id=step_id,
        parent_step_id=run.parent_step_id,
        tool=f"backout.{kind.value}",
        reversibility=Reversibility.READ_ONLY,
        idempotency_key=f"{run.run_id}:{kind.value}"
        + (f":{step_id}" if kind is EventKind.CHECKPOINT else ""),
        status=status,
        error=error,
        labels=labels or {},
    )
