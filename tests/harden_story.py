"""A small incident for the harden tests: a billing agent's refund loop that crosses tenants.

Baseline ``wf_0``: the agent reads an invoice, issues one refund and emails the customer.
Incident ``wf_1``: the same job up to its checkpoint ``ticket-resolved``, then a loop of
refunds and status rewrites in acme, then a child run in globex. The policy in force is the
bundled default plus ``agent.tenants: 1`` for the agent, so it freezes the agent only when
the loop crosses into globex.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    EventKind,
    Reversibility,
    TargetRef,
)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
AGENT = "billing-agent"
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "infra" / "policies" / "default.yaml"
POLICY = (
    DEFAULT_POLICY.read_text("utf-8")
    + """
agents:
  billing-agent:            # one tenant per minute
    limits:
      agent: {tenants: 1}
"""
)


class Builder:
    """Appends ActionEvents one second apart."""

    def __init__(self, start: datetime = T0) -> None:
        self.clock = start
        self.ids = itertools.count(1)
        self.events: list[ActionEvent] = []

    def add(
        self,
        run: str,
        tool: str,
        *,
        kind: EventKind = EventKind.TOOL_CALL,
        reversibility: Reversibility = Reversibility.REVERSIBLE,
        system: str | None = "erp.invoices",
        obj: str | None = None,
        tenant: str | None = "acme",
        agent: str = AGENT,
        value: float | None = None,
        parent: str | None = None,
        status: CallStatus = CallStatus.SUCCEEDED,
        confidence: float | None = None,
        labels: dict[str, str] | None = None,
    ) -> ActionEvent:
        self.clock += timedelta(seconds=1)
        n = next(self.ids)
        event = ActionEvent(
            event_id=f"ev{n:04d}",
            occurred_at=self.clock,
            kind=kind,
            run_id=run,
            parent_run_id=parent,
            agent_id=agent,
            identity="svc-billing",
            tenant=tenant,
            step_id=f"{run}:{n}",
            tool=tool,
            target=TargetRef(system=system, object_id=obj) if system and obj else None,
            reversibility=reversibility,
            idempotency_key=f"key{n}",
            status=status,
            value=value,
            confidence=confidence,
            labels=labels or {},
        )
        self.events.append(event)
        return event

    def lifecycle(self, run: str, kind: EventKind, **extra: object) -> ActionEvent:
        return self.add(
            run,
            f"backout.{kind.value}",
            kind=kind,
            reversibility=Reversibility.READ_ONLY,
            system=None,
            **extra,  # type: ignore[arg-type]
        )

    def ticket(self, run: str, invoice: str, amount: float) -> None:
        """The normal job: read the invoice, refund it, email the customer."""
        self.add(run, "get_invoice", reversibility=Reversibility.READ_ONLY, obj=invoice)
        self.add(run, "issue_refund", system="erp.refunds", obj=f"rf_{invoice}", value=amount)
        self.add(
            run,
            "send_email",
            reversibility=Reversibility.IRREVERSIBLE,
            system="mail",
            obj=f"customer-of-{invoice}",
        )


def baseline() -> list[ActionEvent]:
    """Normal traffic: two ordinary tickets of the agent in acme."""
    b = Builder(T0 - timedelta(hours=1))
    for run, invoice, amount in (("wf_0", "inv_a0", 80.0), ("wf_00", "inv_a9", 150.0)):
        b.lifecycle(run, EventKind.RUN_STARTED)
        b.ticket(run, invoice, amount)
        b.lifecycle(run, EventKind.RUN_FINISHED)
        b.clock += timedelta(minutes=5)
    return b.events


def incident(loop: int = 6) -> list[ActionEvent]:
    """The incident run ``wf_1`` and its globex child run, in time order."""
    b = Builder()
    b.lifecycle("wf_1", EventKind.RUN_STARTED)
    b.ticket("wf_1", "inv_a1", 120.0)
    b.lifecycle("wf_1", EventKind.CHECKPOINT, labels={"checkpoint": "ticket-resolved"})
    for i in range(loop):
        b.add("wf_1", "issue_refund", system="erp.refunds", obj=f"rf_a{i + 2}", value=400.0)
        b.add("wf_1", "set_status", obj=f"inv_a{i + 2}")
    child = "wf_1.globex"
    b.lifecycle(child, EventKind.RUN_STARTED, tenant="globex", parent="wf_1")
    for i in range(3):
        b.add(
            child,
            "issue_refund",
            system="erp.refunds",
            obj=f"rf_g{i}",
            value=900.0,
            tenant="globex",
            parent="wf_1",
        )
    return b.events


def index_of(events: list[ActionEvent], predicate: object) -> int:
    """1-based number of the first event matching ``predicate``."""
    return next(n for n, e in enumerate(events, 1) if predicate(e))  # type: ignore[operator]
