"""Approval gates with the in-memory fakes: request, approve (narrowed), deny, timeout,
and a restarted agent finding its request again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backout.infra.settings import Settings
from backout.producers.approval import (
    REQUEST_HEADER,
    ApprovalGate,
    LocalDecisions,
    SinkRequestLookup,
    narrowed_args,
    request_id_for,
)
from backout.producers.freezes import Decision
from backout.producers.journal import Journal
from backout.producers.sink import InMemoryEventSink
from backout.schemas.codec import decode
from backout.schemas.errors import ApprovalDenied, Frozen
from backout.schemas.events import ActionEvent, CallStatus, EventKind, Reversibility
from tests.containment_helpers import Commands, Log, wait_until


class Agent:
    """One agent process: a Journal with an approval gate over shared fakes."""

    def __init__(
        self,
        sink: InMemoryEventSink,
        decisions: LocalDecisions,
        *,
        timeout: float = 5.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        settings = Settings(approval_timeout_s=timeout)
        journal = Journal(settings, sink=sink)
        gate = ApprovalGate(
            settings,
            decisions,
            lookup=SinkRequestLookup(sink, journal.codec, journal.topic),
            **({"clock": clock} if clock else {}),
        )
        journal.approvals = gate
        self.journal = journal
        self.refunds: list[tuple[str, Any]] = []

        @journal.tool(
            reversibility=Reversibility.IRREVERSIBLE,
            system="bank",
            object_id=lambda order, **_: order,
            requires_approval=lambda amount, **_: amount > 500,
        )
        def refund(order: str, amount: Any) -> str:
            self.refunds.append((order, amount))
            return f"refunded {amount}"

        self.refund = refund

    def call(self, order: str, amount: Any, *, key: str | None = None) -> str:
        with self.journal.run(agent="billing-bot", identity="svc-billing", tenant="acme"):
            if key is None:
                return str(self.refund(order, amount))
            with self.journal.idempotency_key(key):
                return str(self.refund(order, amount))


@pytest.fixture
def ops() -> Commands:
    return Commands(issued_at=datetime.now(UTC))


@pytest.fixture
def sink() -> InMemoryEventSink:
    return InMemoryEventSink()


class CountingDecisions(LocalDecisions):
    """Counts the gates waiting, so a test knows when an agent is blocked on a decision."""

    waits = 0

    def wait_decision(self, request_id: str, timeout: float) -> Decision | None:
        self.waits += 1
        return super().wait_decision(request_id, timeout)


@pytest.fixture
def decisions(ops: Commands) -> CountingDecisions:
    return CountingDecisions(ops.trusted)


def events(sink: InMemoryEventSink, kind: EventKind | None = None) -> list[ActionEvent]:
    found = [decode(r.value, ActionEvent) for r in sink.on("backout.actions")]
    return [e for e in found if kind is None or e.kind is kind]


def requests(sink: InMemoryEventSink) -> list[ActionEvent]:
    return events(sink, EventKind.APPROVAL_REQUESTED)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_calls_below_the_threshold_need_no_approval(
    sink: InMemoryEventSink, decisions: LocalDecisions
) -> None:
    agent = Agent(sink, decisions)
    assert agent.call("o1", 100) == "refunded 100"
    assert requests(sink) == []


def test_approved_with_narrowed_arguments(
    sink: InMemoryEventSink, decisions: LocalDecisions, ops: Commands
) -> None:
    agent = Agent(sink, decisions)
    thread, out = in_thread(lambda: agent.call("o1", 800))
    wait_until(lambda: requests(sink))
    request = requests(sink)[0]
    assert request.status is CallStatus.PENDING and request.requested_args["amount"] == 800
    assert request.event_id.startswith("apr_")
    assert (REQUEST_HEADER, request.event_id.encode()) in sink.on("backout.actions")[-1].headers
    decisions.apply(Log()(ops.approve(request.event_id, {"amount": 500})))
    thread.join(5)
    assert out == {"result": "refunded 500"}
    assert agent.refunds == [("o1", 500)]
    decided = events(sink, EventKind.APPROVAL_DECIDED)
    assert len(decided) == 1 and decided[0].status is CallStatus.SUCCEEDED
    assert decided[0].approved_args == {"order": "o1", "amount": 500}
    assert decided[0].requested_args == {"order": "o1", "amount": 800}
    assert decided[0].labels["approval_request"] == request.event_id
    call = events(sink, EventKind.TOOL_CALL)[-1]
    assert call.status is CallStatus.SUCCEEDED and call.approved_args == {"amount": 500}
    assert call.requested_args == {"order": "o1", "amount": 800}


def test_approved_as_requested(
    sink: InMemoryEventSink, decisions: LocalDecisions, ops: Commands
) -> None:
    agent = Agent(sink, decisions)
    thread, out = in_thread(lambda: agent.call("o1", 800))
    wait_until(lambda: requests(sink))
    decisions.apply(Log()(ops.approve(requests(sink)[0].event_id)))
    thread.join(5)
    assert out == {"result": "refunded 800"}
    assert events(sink, EventKind.TOOL_CALL)[-1].approved_args == {}


def test_denied(sink: InMemoryEventSink, decisions: LocalDecisions, ops: Commands) -> None:
    agent = Agent(sink, decisions)
    thread, out = in_thread(lambda: agent.call("o1", 800))
    wait_until(lambda: requests(sink))
    deny = ops.deny(requests(sink)[0].event_id)
    decisions.apply(Log()(deny))
    thread.join(5)
    assert isinstance(out["error"], ApprovalDenied) and not out["error"].timed_out
    assert agent.refunds == []
    decided = events(sink, EventKind.APPROVAL_DECIDED)[0]
    assert decided.status is CallStatus.BLOCKED and decided.blocked_by == deny.command_id
    assert [e for e in events(sink, EventKind.TOOL_CALL)] == []


def test_no_decision_in_time_is_a_denial(
    sink: InMemoryEventSink, decisions: LocalDecisions
) -> None:
    agent = Agent(sink, decisions, timeout=0.2)
    with pytest.raises(ApprovalDenied, match="denied by default") as denied:
        agent.call("o1", 800)
    assert denied.value.timed_out and denied.value.request_id == requests(sink)[0].event_id
    assert agent.refunds == []
    assert events(sink, EventKind.APPROVAL_DECIDED)[0].status is CallStatus.BLOCKED


def test_forged_approval_is_ignored(
    sink: InMemoryEventSink, decisions: LocalDecisions, ops: Commands
) -> None:
    agent = Agent(sink, decisions, timeout=0.5)
    thread, out = in_thread(lambda: agent.call("o1", 800))
    wait_until(lambda: requests(sink))
    rogue = Commands()  # the agent has no trusted key
    decisions.apply(Log()(rogue.approve(requests(sink)[0].event_id)))
    thread.join(5)
    assert isinstance(out["error"], ApprovalDenied) and out["error"].timed_out


def test_an_approval_naming_unknown_arguments_is_refused(
    sink: InMemoryEventSink, decisions: LocalDecisions, ops: Commands
) -> None:
    agent = Agent(sink, decisions)
    thread, out = in_thread(lambda: agent.call("o1", 800))
    wait_until(lambda: requests(sink))
    decisions.apply(Log()(ops.approve(requests(sink)[0].event_id, {"account": "mine"})))
    thread.join(5)
    assert isinstance(out["error"], ApprovalDenied)
    assert "unknown argument 'account'" in str(out["error"])


def test_a_restarted_agent_keeps_waiting_on_its_request(
    sink: InMemoryEventSink, decisions: CountingDecisions, ops: Commands
) -> None:
    first = Agent(sink, decisions)
    thread, out = in_thread(lambda: first.call("o1", 800, key="refund-o1"))
    wait_until(lambda: decisions.waits == 1)
    # The process "restarts": a new Journal and gate make the same call.
    second = Agent(sink, decisions)
    thread2, out2 = in_thread(lambda: second.call("o1", 800, key="refund-o1"))
    wait_until(lambda: decisions.waits == 2)
    request_id = requests(sink)[0].event_id
    assert request_id == request_id_for("refund", "refund-o1")
    decisions.apply(Log()(ops.approve(request_id, {"amount": 300})))
    thread.join(5)
    thread2.join(5)
    assert out == out2 == {"result": "refunded 300"}
    assert len(requests(sink)) == 1  # found again, not requested twice


def test_a_restarted_agent_waits_only_until_the_original_deadline(
    sink: InMemoryEventSink, decisions: LocalDecisions
) -> None:
    first = Agent(sink, decisions, timeout=0.2)
    with pytest.raises(ApprovalDenied):
        first.call("o1", 800, key="refund-o1")
    later = datetime.now(UTC) + timedelta(hours=1)
    second = Agent(sink, decisions, timeout=0.2, clock=lambda: later)
    with pytest.raises(ApprovalDenied) as denied:
        second.call("o1", 800, key="refund-o1")
    assert denied.value.timed_out
    assert len(requests(sink)) == 1


def test_a_restarted_agent_picks_up_a_decision_made_meanwhile(
    sink: InMemoryEventSink, decisions: LocalDecisions, ops: Commands
) -> None:
    first = Agent(sink, decisions, timeout=0.2)
    with pytest.raises(ApprovalDenied):
        first.call("o1", 800, key="refund-o1")
    decisions.apply(Log()(ops.approve(request_id_for("refund", "refund-o1"))))
    second = Agent(sink, decisions, timeout=0.2)
    assert second.call("o1", 800, key="refund-o1") == "refunded 800"
    assert len(requests(sink)) == 1


def test_narrowed_args() -> None:
    decision = Decision(
        "apr_1", "c1", True, {"amount": 5, "order": "o1"}, "op", "", datetime.now(UTC)
    )
    assert narrowed_args({"order": "o1", "amount": 9}, decision) == {"amount": 5}
    with pytest.raises(ValueError, match="unknown argument"):
        narrowed_args({"order": "o1"}, decision)


def test_request_ids_are_stable_and_distinct() -> None:
    assert request_id_for("refund", "k1") == request_id_for("refund", "k1")
    assert request_id_for("refund", "k1") != request_id_for("refund", "k2")
    assert request_id_for("refund", "k1") != request_id_for("void", "k1")


class SwitchGuard:
    """A CallGuard that refuses every call once frozen."""

    frozen = False

    def check(self, call: object) -> None:
        if self.frozen:
            raise Frozen("frozen while waiting", command_id="cmd_f", reason="incident")


def test_a_freeze_during_the_wait_still_refuses_the_approved_call(
    sink: InMemoryEventSink, decisions: CountingDecisions, ops: Commands
) -> None:
    agent = Agent(sink, decisions)
    guard = SwitchGuard()
    agent.journal.guard = guard
    thread, out = in_thread(lambda: agent.call("o1", 800))
    wait_until(lambda: decisions.waits == 1)
    guard.frozen = True  # the agent is frozen while its call waits for approval
    decisions.apply(Log()(ops.approve(requests(sink)[0].event_id)))
    thread.join(5)
    assert isinstance(out["error"], Frozen) and agent.refunds == []
    blocked = events(sink, EventKind.TOOL_CALL)[-1]
    assert blocked.status is CallStatus.BLOCKED and blocked.blocked_by == "cmd_f"
