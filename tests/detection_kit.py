"""Test helper for the detection tests: terse ActionEvents on a simulated clock."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from backout.processors.engine import Engine
from backout.processors.findings import EventRef, Finding, ScopeState
from backout.processors.policy import Policy, parse_policy
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlCommand,
    EventKind,
    RecordImage,
    Reversibility,
    TargetRef,
)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


class Clock:
    """Makes events one after another, ``step`` seconds apart by default."""

    def __init__(self, *, start: datetime = T0, step: float = 0.1) -> None:
        self.now = start
        self.step = step
        self._ids = itertools.count(1)

    def event(
        self, *, at: datetime | None = None, advance: float | None = None, **fields: Any
    ) -> ActionEvent:
        """An ActionEvent: a succeeded reversible write by ``agent`` in ``run`` unless told."""
        self.now = at or self.now + timedelta(seconds=self.step if advance is None else advance)
        n = next(self._ids)
        object_id = fields.pop("object_id", f"inv_{n}")
        system = fields.pop("system", "erp")
        base: dict[str, Any] = {
            "event_id": f"ev{n:06d}",
            "occurred_at": self.now,
            "run_id": "run-1",
            "agent_id": "billing-bot",
            "identity": "svc-billing",
            "tenant": "acme",
            "workflow": "close-books",
            "step_id": f"step-{n}",
            "tool": "set_status",
            "requested_args": {"invoice_id": object_id, "status": "void"},
            "target": TargetRef(system=system, object_id=object_id),
            "reversibility": Reversibility.REVERSIBLE,
            "before": RecordImage(exists=True, fields={"status": "open"}, version=1),
            "after": RecordImage(exists=True, fields={"status": "void"}, version=2),
            "idempotency_key": f"idem-{n}",
            "status": CallStatus.SUCCEEDED,
        }
        base.update(fields)
        return ActionEvent(**base)

    def read(self, **fields: Any) -> ActionEvent:
        """A read-only call."""
        fields.setdefault("reversibility", Reversibility.READ_ONLY)
        fields.setdefault("tool", "get_invoice")
        fields.setdefault("after", None)
        fields.setdefault("before", None)
        return self.event(**fields)

    def lifecycle(self, kind: EventKind = EventKind.RUN_STARTED, **fields: Any) -> ActionEvent:
        """A run lifecycle fact (no target)."""
        fields.setdefault("tool", "")
        fields.setdefault("target", None)
        fields.setdefault("reversibility", Reversibility.READ_ONLY)
        return self.event(kind=kind, **fields)


def policy(text: str = "version: 1\n") -> Policy:
    """A policy from YAML text."""
    return parse_policy(text, source="<test>")


def refs(
    events: Iterable[ActionEvent], *, partition: int | None = 0, topic: str | None = "t.actions"
) -> list[tuple[ActionEvent, EventRef]]:
    """Events with positions: offsets in order on one partition."""
    return [(e, EventRef(e.event_id, topic, partition, i)) for i, e in enumerate(events)]


def fold(
    pol: Policy, events: Iterable[ActionEvent], *, batch: int | None = None
) -> tuple[list[Finding], list[tuple[ControlCommand, Finding]]]:
    """Fold ``events`` through an engine per agent, ``batch`` events at a time (all: None)."""
    engine = Engine(pol)
    agents: dict[str, ScopeState] = {}
    runs: dict[tuple[str, str], ScopeState] = {}
    findings: list[Finding] = []
    commands: list[tuple[ControlCommand, Finding]] = []
    items = refs(events)
    size = batch or max(1, len(items))
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        by_agent: dict[str, list[tuple[ActionEvent, EventRef]]] = {}
        for item in chunk:
            by_agent.setdefault(item[0].agent_id, []).append(item)
        for agent_id, mine in by_agent.items():
            states = {
                e.run_id: runs[(agent_id, e.run_id)]
                for e, _ in mine
                if (agent_id, e.run_id) in runs
            }
            step = engine.step(agents.get(agent_id, ScopeState()), states, mine)
            agents[agent_id] = step.agent
            for run_id, state in step.runs.items():
                runs[(agent_id, run_id)] = state
            for run_id in step.expired_runs:
                runs.pop((agent_id, run_id), None)
            findings += step.findings
            commands += step.commands
    return findings, commands


def detectors(findings: Iterable[Finding]) -> list[tuple[str, str, str]]:
    """(detector, severity, trigger event id) of each finding, in order."""
    return [(f.detector, f.severity.value, f.trigger.event_id) for f in findings]
