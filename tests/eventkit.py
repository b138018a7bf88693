"""Test helper: write histories of ActionEvents tersely, as a journal would record them.

``Log`` simulates the target records so before/after images come out right; writes by
humans that are not journaled change the simulated record without an event, as they do
in real life.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from backout.producers.sink import InMemoryEventSink
from backout.schemas.codec import decode
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    EventKind,
    Origin,
    RecordImage,
    Reversibility,
    TargetRef,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DELETE = None
"""Pass as ``fields`` to delete the record."""


class Log:
    """A growing, ordered history of ActionEvents over simulated records."""

    def __init__(self, *, start: datetime = T0, system: str = "erp") -> None:
        self.events: list[ActionEvent] = []
        self.records: dict[str, dict[str, Any] | None] = {}
        self.system = system
        self.clock = start
        self._ids = itertools.count(1)
        self._steps: dict[str, itertools.count[int]] = {}

    def tick(self, seconds: float = 1.0) -> datetime:
        self.clock += timedelta(seconds=seconds)
        return self.clock

    def image(self, object_id: str) -> RecordImage:
        fields = self.records.get(object_id)
        if fields is None:
            return RecordImage(exists=False)
        return RecordImage(exists=True, fields=dict(fields), version=None)

    def seed(self, object_id: str, **fields: Any) -> None:
        """A record that existed before anything was journaled."""
        self.records[object_id] = dict(fields)

    def human(self, object_id: str, fields: dict[str, Any] | None) -> None:
        """An unjournaled change straight to the table."""
        if fields is None:
            self.records[object_id] = None
        else:
            self.records[object_id] = {**(self.records.get(object_id) or {}), **fields}

    def _step(self, run: str) -> str:
        counter = self._steps.setdefault(run, itertools.count(1))
        return f"{run}:{next(counter)}"

    def write(
        self,
        run: str,
        object_id: str,
        fields: dict[str, Any] | None,
        *,
        agent: str | None = None,
        identity: str | None = None,
        origin: Origin = Origin.AGENT,
        tool: str = "set",
        reversibility: Reversibility = Reversibility.REVERSIBLE,
        compensation: Compensation | None = None,
        status: CallStatus = CallStatus.SUCCEEDED,
        parent_run: str | None = None,
        parent_step: str | None = None,
        compensates: str | None = None,
        labels: dict[str, str] | None = None,
        capture_after: bool = True,
        apply: bool = True,
        tenant: str | None = "acme",
        event_id: str | None = None,
    ) -> ActionEvent:
        """A journaled tool call on one record; ``fields=None`` deletes it."""
        before = self.image(object_id)
        if apply:
            if fields is None:
                self.records[object_id] = None
            elif before.exists:
                self.records[object_id] = {**before.fields, **fields}
            else:
                self.records[object_id] = dict(fields)
        after = self.image(object_id) if capture_after else None
        event = ActionEvent(
            event_id=event_id or f"e{next(self._ids):04d}",
            occurred_at=self.tick(),
            run_id=run,
            parent_run_id=parent_run,
            agent_id=agent or f"agent-{run}",
            identity=identity or f"id-{run}",
            tenant=tenant,
            step_id=self._step(run),
            parent_step_id=parent_step,
            tool=tool,
            target=TargetRef(system=self.system, object_id=object_id),
            reversibility=reversibility,
            before=before,
            after=after,
            idempotency_key=f"k{len(self.events)}",
            status=status,
            compensation=compensation,
            origin=origin,
            compensates=compensates,
            labels=labels or {},
        )
        self.events.append(event)
        return event

    def call(
        self,
        run: str,
        tool: str,
        *,
        reversibility: Reversibility = Reversibility.IRREVERSIBLE,
        compensation: Compensation | None = None,
        status: CallStatus = CallStatus.SUCCEEDED,
        parent_step: str | None = None,
        compensates: str | None = None,
        origin: Origin = Origin.AGENT,
        labels: dict[str, str] | None = None,
    ) -> ActionEvent:
        """A journaled tool call without a target record (an email, a payment)."""
        event = ActionEvent(
            event_id=f"e{next(self._ids):04d}",
            occurred_at=self.tick(),
            run_id=run,
            agent_id=f"agent-{run}",
            identity=f"id-{run}",
            tenant="acme",
            step_id=self._step(run),
            parent_step_id=parent_step,
            tool=tool,
            reversibility=reversibility,
            idempotency_key=f"k{len(self.events)}",
            status=status,
            compensation=compensation,
            compensates=compensates,
            origin=origin,
            labels=labels or {},
        )
        self.events.append(event)
        return event

    def fact(
        self,
        run: str,
        kind: EventKind,
        *,
        parent_run: str | None = None,
        status: CallStatus = CallStatus.SUCCEEDED,
        name: str | None = None,
    ) -> ActionEvent:
        """A run lifecycle fact (run started/finished, checkpoint)."""
        event = ActionEvent(
            event_id=f"e{next(self._ids):04d}",
            occurred_at=self.tick(),
            kind=kind,
            run_id=run,
            parent_run_id=parent_run,
            agent_id=f"agent-{run}",
            identity=f"id-{run}",
            tenant="acme",
            step_id=self._step(run),
            tool=f"backout.{kind.value}",
            reversibility=Reversibility.READ_ONLY,
            idempotency_key=f"k{len(self.events)}",
            status=status,
            labels={"checkpoint": name} if name else {},
        )
        self.events.append(event)
        return event

    def checkpoint(self, run: str, name: str) -> ActionEvent:
        return self.fact(run, EventKind.CHECKPOINT, name=name)


def restore_fields() -> Compensation:
    return Compensation(strategy="restore_fields")


def compensating(tool: str, until: datetime | None = None, **args: Any) -> Compensation:
    return Compensation(strategy="compensating_tool", tool=tool, args=args, allowed_until=until)


def journaled(sink: InMemoryEventSink, topic: str) -> list[ActionEvent]:
    """The ActionEvents an in-memory sink holds for ``topic``, in order."""
    return [decode(r.value, ActionEvent) for r in sink.on(topic)]


def live(log: Log) -> dict[str, dict[str, Any]]:
    """The simulated records that exist now (to seed a Target)."""
    return {k: dict(v) for k, v in log.records.items() if v is not None}
