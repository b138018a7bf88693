"""One small incident, journaled for real, shared by the operator tools' tests.

A billing agent's run ``wf_1`` (tenant acme) reads, writes, calls a tool from inside a
tool, starts a child run (tenant globex) that creates and deletes invoices, sends an
irreversible email and makes a compensatable refund; a detector fires on the refund loop,
a freeze is issued, and the agent's next call is blocked. A human then overwrites one of
the agent's writes, and a rollback undoes two of its writes (one in a child run).

The tool calls go through a real Journal (InMemoryEventSink) against a real SQLite table,
so events carry genuine before/after images; the signal, the freeze and the rollback's
inverse writes are built the way detectors, operators and the executor build them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backout.infra.settings import Settings
from backout.producers import Compensate, Frozen, InMemoryEventSink, Journal, SqlTableTarget
from backout.producers.scope import CallScope
from backout.schemas import ActionEvent, decode
from backout.schemas.events import (
    CallStatus,
    ControlAction,
    ControlCommand,
    EventKind,
    Evidence,
    FreezeMode,
    Origin,
    RecordImage,
    Reversibility,
    Severity,
    Signal,
    TargetRef,
)
from backout.schemas.signing import SigningKey, new_signing_key, sign

FREEZE_ID = "cmd_freeze_1"
SIGNAL_ID = "sig_refund_loop_1"


class SwitchGuard:
    """A CallGuard fake: once ``frozen`` is set, every call raises Frozen(FREEZE_ID)."""

    def __init__(self) -> None:
        self.frozen = False

    def check(self, call: CallScope) -> None:
        if self.frozen:
            raise Frozen("frozen by the test", command_id=FREEZE_ID, reason="refund loop")


@dataclass
class Story:
    """The incident's records."""

    events: list[ActionEvent]
    """Every ActionEvent, in publish order (agent, human, rollback)."""
    commands: list[ControlCommand]
    signals: list[Signal]
    key: SigningKey
    ids: dict[str, str] = field(default_factory=dict)
    """Names of interesting events -> their event ids."""

    def run_events(self, run_id: str) -> list[ActionEvent]:
        return [e for e in self.events if e.run_id == run_id]

    def by_id(self, event_id: str) -> ActionEvent:
        return next(e for e in self.events if e.event_id == event_id)


def _settings() -> Settings:
    return Settings(bootstrap=None, topic_prefix="backout.", schema_registry_url=None)


def build_story(tmp_path: Path, *, run_id: str = "wf_1", child_run: str = "wf_1_child") -> Story:
    """Journal the incident and return its records."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / f'erp_{run_id}.db'}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE invoices (id TEXT PRIMARY KEY, tenant TEXT, status TEXT, "
                "amount INTEGER, version INTEGER NOT NULL DEFAULT 1)"
            )
        )
        for row in (
            ("inv1", "acme", "open", 100),
            ("inv2", "acme", "open", 250),
            ("inv3", "globex", "open", 75),
        ):
            conn.execute(
                sa.text("INSERT INTO invoices VALUES (:i, :t, :s, :a, 1)"),
                dict(zip("itsa", row, strict=True)),
            )
    invoices = SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")
    sink = InMemoryEventSink()
    guard = SwitchGuard()
    journal = Journal(_settings(), sink=sink, guard=guard)
    tools = _declare(journal, engine, invoices)
    ids: dict[str, str] = {}

    def last_id() -> str:
        return decode(sink.records[-1].value, ActionEvent).event_id

    with journal.run(
        run_id,
        agent="billing-agent",
        identity="svc-billing",
        tenant="acme",
        workflow="refunds",
        resume=False,
    ):
        tools["lookup"]("inv1")
        tools["set_status"]("inv1", "void")
        ids["set_inv1"] = last_id()
        tools["batch"](["inv2"])
        ids["batch"] = last_id()
        with journal.run(child_run, tenant="globex", resume=False):
            tools["create"]("inv9", 42)
            ids["create_inv9"] = last_id()
            tools["delete"]("inv3")
            ids["delete_inv3"] = last_id()
        tools["email"]("cfo@acme.test")
        ids["email"] = last_id()
        tools["refund"]("inv2", 250)
        ids["refund"] = last_id()
        guard.frozen = True
        try:
            tools["set_status"]("inv2", "refunded")
        except Frozen:
            ids["blocked"] = last_id()
    agent_events = [decode(r.value, ActionEvent) for r in sink.records]
    ids["set_inv2"] = next(
        e.event_id
        for e in agent_events
        if e.tool == "set_status"
        and e.target is not None
        and e.target.object_id == "inv2"
        and e.status is CallStatus.SUCCEEDED
    )
    first = agent_events[0].occurred_at
    human = _human_write(agent_events, first + timedelta(seconds=5))
    rollback = _rollback_events(agent_events, ids, first + timedelta(seconds=10))
    ids["human"] = human.event_id
    ids["inverse_inv9"] = rollback[1].event_id
    key = new_signing_key()
    signal, freeze = _containment(agent_events, ids, key)
    engine.dispose()
    return Story([*agent_events, human, *rollback], [freeze], [signal], key, ids)


def _declare(journal: Journal, engine: sa.Engine, invoices: SqlTableTarget) -> dict[str, Any]:
    by_id = {"object_id": lambda invoice_id, **_: invoice_id}

    def write(sql: str, **params: object) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), params)

    @journal.tool(reversibility=Reversibility.READ_ONLY)
    def lookup(invoice_id: str) -> str:
        return str(invoices.read(invoice_id).fields.get("status"))

    @journal.tool(reversibility=Reversibility.REVERSIBLE, target=invoices, **by_id)
    def set_status(invoice_id: str, status: str) -> None:
        write(
            "UPDATE invoices SET status = :s, version = version + 1 WHERE id = :i",
            s=status,
            i=invoice_id,
        )

    @journal.tool(reversibility=Reversibility.READ_ONLY)
    def batch(invoice_ids: list[str]) -> int:
        for invoice_id in invoice_ids:
            set_status(invoice_id, "refunded")
        return len(invoice_ids)

    @journal.tool(reversibility=Reversibility.REVERSIBLE, target=invoices, **by_id)
    def create(invoice_id: str, amount: int) -> None:
        write(
            "INSERT INTO invoices (id, tenant, status, amount) VALUES (:i, 'globex', 'draft', :a)",
            i=invoice_id,
            a=amount,
        )

    @journal.tool(reversibility=Reversibility.REVERSIBLE, target=invoices, **by_id)
    def delete(invoice_id: str) -> None:
        write("DELETE FROM invoices WHERE id = :i", i=invoice_id)

    @journal.tool(
        reversibility=Reversibility.IRREVERSIBLE, system="mail", object_id=lambda to, **_: to
    )
    def email(to: str) -> None:
        return None

    @journal.tool(reversibility=Reversibility.READ_ONLY)
    def reverse_refund(invoice_id: str, amount: int) -> None:
        return None

    @journal.tool(
        reversibility=Reversibility.COMPENSATABLE,
        system="payments",
        object_id=lambda invoice_id, **_: invoice_id,
        value=lambda amount, **_: amount,
        compensation=Compensate(
            tool="reverse_refund",
            args=lambda invoice_id, amount, **_: {"invoice_id": invoice_id, "amount": amount},
        ),
    )
    def refund(invoice_id: str, amount: int) -> None:
        return None

    return {
        "lookup": lookup,
        "set_status": set_status,
        "batch": batch,
        "create": create,
        "delete": delete,
        "email": email,
        "refund": refund,
    }


def _event(template: ActionEvent, **changes: Any) -> ActionEvent:
    data = template.model_dump()
    data.update(changes)
    return ActionEvent.model_validate(data)


def _human_write(events: list[ActionEvent], at: datetime) -> ActionEvent:
    """An operator sets inv1's status by hand, journaled by another run."""
    write = next(
        e
        for e in events
        if e.tool == "set_status" and e.target is not None and e.target.object_id == "inv1"
    )
    assert write.after is not None
    after = RecordImage(exists=True, fields={**write.after.fields, "status": "disputed"}, version=3)
    return _event(
        write,
        event_id=f"{write.event_id}H",
        occurred_at=at,
        run_id="human_1",
        parent_run_id=None,
        agent_id="ops-console",
        identity="alice",
        step_id="human_1:1",
        parent_step_id=None,
        origin=Origin.HUMAN,
        before=write.after,
        after=after,
        idempotency_key="human_1:1",
        requested_args={"invoice_id": "inv1", "status": "disputed"},
    )


def _marker(
    original: ActionEvent, kind: EventKind, step: str, at: datetime, labels: dict[str, str]
) -> ActionEvent:
    """A rollback_step_started/finished event as the executor journals it."""
    return _event(
        original,
        event_id=f"{original.event_id}{kind.value[-8:]}",
        occurred_at=at,
        kind=kind,
        run_id="rollback_1",
        parent_run_id=None,
        agent_id="backout",
        identity="backout",
        step_id=f"{step}:{kind.value}",
        parent_step_id=None,
        origin=Origin.ROLLBACK,
        tool=f"backout.{kind.value}",
        reversibility=Reversibility.READ_ONLY,
        before=None,
        after=None,
        requested_args={},
        approved_args=None,
        idempotency_key=f"{step}:{kind.value}",
        status=CallStatus.SUCCEEDED,
        compensation=None,
        compensates=None,
        value=None,
        labels={
            "rollback.plan": "plan_1",
            "rollback.step": step,
            "rollback.undoes": original.event_id,
            **labels,
        },
    )


def _rollback_events(
    events: list[ActionEvent], ids: dict[str, str], at: datetime
) -> list[ActionEvent]:
    """The executor's events for plan_1: inv9's create and inv2's status undone (restored),
    inv3's delete a conflict (someone re-created it outside the log), the email a task."""
    by_id = {e.event_id: e for e in events}
    created, inv2 = by_id[ids["create_inv9"]], by_id[ids["set_inv2"]]
    deleted, email = by_id[ids["delete_inv3"]], by_id[ids["email"]]
    assert inv2.before is not None
    out: list[ActionEvent] = []
    tick = iter(range(100))

    def t() -> datetime:
        return at + timedelta(milliseconds=100 * next(tick))

    for n, (original, after) in enumerate(
        (
            (created, RecordImage(exists=False)),
            (inv2, RecordImage(exists=True, fields=dict(inv2.before.fields), version=3)),
        )
    ):
        step = f"plan_1:{n}"
        out.append(_marker(original, EventKind.ROLLBACK_STEP_STARTED, step, t(), {}))
        out.append(
            _event(
                original,
                event_id=f"{original.event_id}R",
                occurred_at=t(),
                run_id="rollback_1",
                parent_run_id=None,
                agent_id="backout",
                identity="backout",
                step_id=f"{step}:inverse",
                parent_step_id=None,
                origin=Origin.ROLLBACK,
                compensates=original.event_id,
                before=original.after,
                after=after,
                idempotency_key=f"{step}:inverse",
                status=CallStatus.SUCCEEDED,
                labels={
                    "rollback.plan": "plan_1",
                    "rollback.step": step,
                    "rollback.undoes": original.event_id,
                },
            )
        )
        out.append(
            _marker(
                original,
                EventKind.ROLLBACK_STEP_FINISHED,
                step,
                t(),
                {"rollback.outcome": "applied"},
            )
        )
    out.append(_marker(deleted, EventKind.ROLLBACK_STEP_STARTED, "plan_1:2", t(), {}))
    out.append(
        _marker(
            deleted,
            EventKind.ROLLBACK_STEP_FINISHED,
            "plan_1:2",
            t(),
            {
                "rollback.outcome": "conflict",
                "rollback.detail": '{"expected": {}, "live": {"status": "open"}}',
            },
        )
    )
    out.append(
        _marker(
            email,
            EventKind.ROLLBACK_STEP_FINISHED,
            "plan_1:3",
            t(),
            {
                "rollback.outcome": "manual",
                "rollback.reason": "irreversible",
                "rollback.run": email.run_id,
                "rollback.tool": email.tool,
                "rollback.freeze": "cmd_task_freeze",
            },
        )
    )
    return out


def _containment(
    events: list[ActionEvent], ids: dict[str, str], key: SigningKey
) -> tuple[Signal, ControlCommand]:
    """The detector's signal and the freeze, timed between the refund and the blocked call."""
    refund = next(e for e in events if e.event_id == ids["refund"])
    blocked = next(e for e in events if e.event_id == ids["blocked"])
    gap = (blocked.occurred_at - refund.occurred_at) / 3
    signal = Signal(
        signal_id=SIGNAL_ID,
        detected_at=refund.occurred_at + gap,
        detector="retry_loop",
        severity=Severity.HIGH,
        scope={"run": refund.run_id, "agent": refund.agent_id},
        summary="refund repeated on inv2",
        evidence=[Evidence(event_id=ids["set_inv1"]), Evidence(event_id=ids["refund"])],
    )
    freeze = sign(
        ControlCommand(
            command_id=FREEZE_ID,
            issued_at=refund.occurred_at + 2 * gap,
            action=ControlAction.FREEZE,
            scope={"run": refund.run_id},
            mode=FreezeMode.HALT,
            reason="refund loop",
            issuer="processors",
            cause=SIGNAL_ID,
        ),
        key,
    )
    return signal, freeze


def story_kinds(story: Story) -> dict[str, int]:
    """Events per kind (for sanity checks)."""
    out: dict[str, int] = {}
    for e in story.events:
        out[e.kind.value] = out.get(e.kind.value, 0) + 1
    return out


def now() -> datetime:
    return datetime.now(UTC)


__all__ = ["FREEZE_ID", "SIGNAL_ID", "EventKind", "Story", "TargetRef", "build_story", "now"]
