"""The demo's pieces that need no broker: its policy, its world, its expectations, its timeline."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from backout.infra.demo import AGENT, demo_policy
from backout.infra.demo_checks import timeline
from backout.infra.demo_world import Expected, World, declare_tools
from backout.infra.settings import Settings
from backout.processors.policy import parse_policy
from backout.producers import InMemoryEventSink, Journal
from backout.schemas.codec import decode
from backout.schemas.events import (
    ActionEvent,
    ControlAction,
    ControlCommand,
    EventKind,
    Origin,
)
from tests.harden_story import Builder


def test_the_demo_policy_is_the_default_with_one_tenant_for_the_billing_agent() -> None:
    policy = parse_policy(demo_policy())
    agent = policy.limits_for(_event(agent=AGENT))
    other = policy.limits_for(_event(agent="dunning-job"))
    assert agent.agent.tenants == 1
    assert other.agent.tenants == 20
    assert agent.run == other.run


def _event(*, agent: str) -> ActionEvent:
    return Builder().add("r", "set_invoice_status", obj="INV-A1", agent=agent)


def test_tools_write_the_world_and_expected_sees_every_difference(tmp_path: Path) -> None:
    world = World.create(tmp_path)
    expected = Expected(world)
    sink = InMemoryEventSink()
    journal = Journal(Settings(), sink=sink)
    tools = declare_tools(journal, world)
    with journal.run("t1", agent=AGENT, identity="svc", tenant="acme", resume=False):
        tools.issue_refund("INV-A1", 120.0, "RF-1")
        tools.set_invoice_status("INV-A4", "void")
        tools.add_reminder("INV-A4")
        tools.send_email("ada@acme.test", "refund_confirmation")
    events = [decode(r.value, ActionEvent) for r in sink.records]
    refund = next(e for e in events if e.tool == "issue_refund")
    assert refund.value == 120.0 and refund.compensation is not None
    assert refund.compensation.args == {"refund_id": "RF-1"}
    assert refund.after is not None and refund.after.fields["status"] == "issued"
    assert tools.outbox == [("ada@acme.test", "refund_confirmation")]
    assert sorted(expected.differences(world)) == [
        "invoices/INV-A4: status 'void' (expected 'open'), reminders 1 (expected 0)",
        "refunds/RF-1: unexpected row",
    ]
    expected.set("invoices", "INV-A4", status="void", reminders=1)
    expected.add(
        "refunds",
        "RF-1",
        {
            "id": "RF-1",
            "tenant": "acme",
            "invoice_id": "INV-A1",
            "amount": 120.0,
            "status": "issued",
        },
    )
    assert expected.differences(world) == []
    world.hotfix("INV-A1", "disputed")
    assert expected.differences(world) == ["invoices/INV-A1: status 'disputed' (expected 'paid')"]
    world.dispose()


def test_the_timeline_hides_bookkeeping_and_orders_by_time() -> None:
    b = Builder()
    started = b.lifecycle("r", EventKind.RUN_STARTED)
    write = b.add("r", "set_invoice_status", obj="INV-A1")
    undo = b.add("rollback-x", "set_invoice_status", obj="INV-A1").model_copy(
        update={"origin": Origin.ROLLBACK}
    )
    freeze = ControlCommand(
        command_id="cmd_1",
        issued_at=write.occurred_at + timedelta(milliseconds=5),
        action=ControlAction.FREEZE,
        scope={"agent": AGENT},
        reason="blast_radius (high): too many tenants",
        issuer="backout-processors",
    )
    rows = timeline([freeze, undo, write, started])
    assert [r["kind"] for r in rows] == ["action", "freeze"]
    assert rows[0]["t"] == 0.0 and rows[1]["t"] == 0.005
    assert rows[1]["what"] == "FREEZE halt" and rows[1]["target"] == f"agent={AGENT}"
    assert rows[1]["result"] == "cmd_1 (blast_radius (high))"
