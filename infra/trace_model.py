"""The shape of a trace: runs, steps, field diffs, freezes and its summary. Pure values.

Built by :func:`backout.infra.trace.build_trace`; ``Trace.to_dict`` gives the JSON form
that ``backout trace --json`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import JsonValue

from backout.schemas.events import (
    CallStatus,
    EventKind,
    JsonMap,
    Reversibility,
    Signal,
)

Change = Literal["created", "deleted", "updated", "unchanged", "written"]
"""What a step did to its target record (``written``: no before-image to compare)."""
RunStatusText = Literal["running", "succeeded", "failed"]


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One field's value before and after a step (``present`` False: absent)."""

    field: str
    before: JsonValue
    after: JsonValue
    before_present: bool = True
    after_present: bool = True
    before_known: bool = True
    """False when the event carried no before-image."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "field": self.field,
            "before": self.before if self.before_present else None,
            "after": self.after if self.after_present else None,
            "before_present": self.before_present,
            "after_present": self.after_present,
            "before_known": self.before_known,
        }

    def describe(self) -> str:
        """``status: 'open' -> 'void'``."""
        was = (
            (repr(self.before) if self.before_present else "(absent)")
            if (self.before_known)
            else "?"
        )
        now = repr(self.after) if self.after_present else "(absent)"
        return f"{self.field}: {was} -> {now}"


@dataclass(frozen=True, slots=True)
class FreezeInfo:
    """The freeze that blocked a call, as the control topic has it."""

    command_id: str
    found: bool
    """False when the command is not on the control topic (or the guard failed closed)."""
    scope: Mapping[str, str] = field(default_factory=dict)
    mode: str | None = None
    reason: str = ""
    issuer: str = ""
    issued_at: datetime | None = None
    cause: str | None = None

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "command_id": self.command_id,
            "found": self.found,
            "scope": dict(self.scope),
            "mode": self.mode,
            "reason": self.reason,
            "issuer": self.issuer,
            "issued_at": self.issued_at.isoformat() if self.issued_at else None,
            "cause": self.cause,
        }

    def describe(self) -> str:
        """``freeze cmd_1 (agent=billing-bot, halt): rate anomaly``."""
        if not self.command_id:
            return "the guard failed closed (control topic stale)"
        if not self.found:
            return f"freeze {self.command_id} (not on the control topic)"
        scope = ",".join(f"{k}={v}" for k, v in sorted(self.scope.items()))
        why = f": {self.reason}" if self.reason else ""
        return f"freeze {self.command_id} ({scope}, {self.mode}){why}"


@dataclass(frozen=True)
class TraceStep:
    """One journaled call (or checkpoint, approval, rollback step) and what hangs under it."""

    event_id: str
    step_id: str
    parent_step_id: str | None
    occurred_at: datetime
    kind: EventKind
    tool: str
    run_id: str
    agent_id: str
    identity: str
    tenant: str | None
    requested_args: JsonMap
    approved_args: JsonMap | None
    target: str | None
    change: Change | None
    diffs: tuple[FieldDiff, ...]
    status: CallStatus
    reversibility: Reversibility
    origin: str
    error: str | None = None
    blocked_by: FreezeInfo | None = None
    compensation: str | None = None
    compensates: str | None = None
    undone_by: tuple[str, ...] = ()
    """Inverse events (rollback or compensation) that undid this step."""
    rollback: str | None = None
    """The outcome of the latest rollback step about this step (``applied``, ``conflict``,
    ``manual``, ...), or ``started`` while one is unfinished."""
    version_before: JsonValue = None
    version_after: JsonValue = None
    value: float | None = None
    confidence: float | None = None
    reasoning: str | None = None
    job_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    position: str | None = None
    children: tuple[TraceStep, ...] = ()
    child_runs: tuple[TraceRun, ...] = ()

    @property
    def args_narrowed(self) -> tuple[str, ...]:
        """Argument names whose approved value differs from the requested one."""
        if self.approved_args is None:
            return ()
        keys = sorted(set(self.requested_args) | set(self.approved_args))
        return tuple(
            k
            for k in keys
            if self.approved_args.get(k, self.requested_args.get(k)) != self.requested_args.get(k)
        )

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form (nested steps and child runs included)."""
        return {
            "event_id": self.event_id,
            "step_id": self.step_id,
            "parent_step_id": self.parent_step_id,
            "occurred_at": self.occurred_at.isoformat(),
            "kind": self.kind.value,
            "tool": self.tool,
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "identity": self.identity,
            "tenant": self.tenant,
            "requested_args": self.requested_args,
            "approved_args": self.approved_args,
            "args_narrowed": list(self.args_narrowed),
            "target": self.target,
            "change": self.change,
            "diffs": [d.to_dict() for d in self.diffs],
            "version_before": self.version_before,
            "version_after": self.version_after,
            "status": self.status.value,
            "reversibility": self.reversibility.value,
            "origin": self.origin,
            "error": self.error,
            "blocked_by": self.blocked_by.to_dict() if self.blocked_by else None,
            "compensation": self.compensation,
            "compensates": self.compensates,
            "undone_by": list(self.undone_by),
            "rollback": self.rollback,
            "value": self.value,
            "confidence": self.confidence,
            "reasoning": self.reasoning,
            "job_id": self.job_id,
            "labels": dict(self.labels),
            "position": self.position,
            "children": [c.to_dict() for c in self.children],
            "child_runs": [r.to_dict() for r in self.child_runs],
        }


@dataclass(frozen=True)
class TraceRun:
    """One run: who ran it, how it ended, and its steps in causal order."""

    run_id: str
    parent_run_id: str | None
    parent_step_id: str | None
    agent_id: str
    identity: str
    tenant: str | None
    workflow: str | None
    environment: str
    origin: str
    started_at: datetime | None
    finished_at: datetime | None
    status: RunStatusText
    error: str | None = None
    steps: tuple[TraceStep, ...] = ()
    child_runs: tuple[TraceRun, ...] = ()
    """Child runs not started from a known step of this run."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form (steps and child runs included)."""
        return {
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "parent_step_id": self.parent_step_id,
            "agent_id": self.agent_id,
            "identity": self.identity,
            "tenant": self.tenant,
            "workflow": self.workflow,
            "environment": self.environment,
            "origin": self.origin,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "status": self.status,
            "error": self.error,
            "steps": [s.to_dict() for s in self.steps],
            "child_runs": [r.to_dict() for r in self.child_runs],
        }


@dataclass(frozen=True)
class TraceSummary:
    """Counts over the whole tree."""

    runs: int
    steps: int
    writes: int
    blocked: int
    failed: int
    in_doubt: int
    undone: int
    records: tuple[str, ...]
    tenants: tuple[str, ...]
    first_at: datetime | None
    last_at: datetime | None

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "runs": self.runs,
            "steps": self.steps,
            "writes": self.writes,
            "blocked": self.blocked,
            "failed": self.failed,
            "in_doubt": self.in_doubt,
            "undone": self.undone,
            "records": list(self.records),
            "tenants": list(self.tenants),
            "first_at": self.first_at.isoformat() if self.first_at else None,
            "last_at": self.last_at.isoformat() if self.last_at else None,
        }


@dataclass(frozen=True)
class Trace:
    """A run tree with the freezes and signals about it."""

    root: TraceRun
    summary: TraceSummary
    freezes: tuple[FreezeInfo, ...] = ()
    """Freezes that blocked calls of the tree or name its runs, agents or identities."""
    signals: tuple[Signal, ...] = ()
    """Detector findings about the tree."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "run": self.root.to_dict(),
            "summary": self.summary.to_dict(),
            "freezes": [f.to_dict() for f in self.freezes],
            "signals": [s.model_dump(mode="json") for s in self.signals],
        }

    def steps(self) -> list[TraceStep]:
        """Every step of the tree, in time order."""
        out: list[TraceStep] = []
        runs = [self.root]
        while runs:
            run = runs.pop()
            todo = list(run.steps)
            runs.extend(run.child_runs)
            while todo:
                step = todo.pop()
                out.append(step)
                todo.extend(step.children)
                runs.extend(step.child_runs)
        out.sort(key=lambda s: (s.occurred_at, s.event_id))
        return out
