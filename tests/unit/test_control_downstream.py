"""FreezeAwareConsumer's screening with fakes, and the pure release/discard planning."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from confluent_kafka import TopicPartition

from backout.infra.settings import Settings
from backout.producers.control import FreezeView
from backout.producers.downstream import FreezeAwareConsumer, event_scope
from backout.producers.freezes import Freeze
from backout.producers.ids import new_event_id
from backout.producers.lineage import RunLineage
from backout.producers.quarantine import (
    MARKER,
    PARKED_BY,
    PARKED_SCOPE,
    Marker,
    ParkedRecord,
    journal_event,
    marker_headers,
    parked_headers,
    plan_discard,
    plan_release,
    read_parked,
    released_headers,
    scope_from_json,
    scope_json,
)
from backout.producers.scope import CallScope
from backout.producers.sink import InMemoryEventSink
from backout.schemas.codec import decode, encode
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    FreezeMode,
    Origin,
    Reversibility,
)
from tests.containment_helpers import Commands, Log, call


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes
    _headers: list[tuple[str, bytes]] = field(default_factory=list)

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def error(self) -> None:
        return None


class FakeConsumer:
    """One partition's records; seek rewinds; stored offsets are recorded."""

    def __init__(self, messages: list[FakeMessage]) -> None:
        self.messages = messages
        self.position = 0
        self.stored: list[int] = []
        self.closed = False

    def poll(self, timeout: float | None = None) -> FakeMessage | None:
        if self.position >= len(self.messages):
            return None
        self.position += 1
        return self.messages[self.position - 1]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        out = self.messages[self.position : self.position + num_messages]
        self.position += len(out)
        return out

    def seek(self, tp: TopicPartition) -> None:
        self.position = tp.offset

    def store_offsets(self, message: FakeMessage) -> None:
        self.stored.append(message.offset())

    def close(self) -> None:
        self.closed = True


class FakeGuard:
    def __init__(self, view: FreezeView) -> None:
        self.view = view
        self.stale: str | None = None

    def blocking(self, scope: CallScope) -> Freeze | None:
        return self.view.blocking(scope, datetime.now(UTC))

    def stale_reason(self) -> str | None:
        return self.stale


def action(
    run: str,
    *,
    agent: str = "billing-bot",
    parent: str | None = None,
    reversibility: Reversibility = Reversibility.IRREVERSIBLE,
) -> ActionEvent:
    return ActionEvent(
        event_id=new_event_id(),
        occurred_at=datetime.now(UTC),
        run_id=run,
        parent_run_id=parent,
        agent_id=agent,
        identity="svc-billing",
        tenant="acme",
        step_id=f"{run}:1",
        tool="refund",
        reversibility=reversibility,
        idempotency_key=f"{run}:1",
        status=CallStatus.SUCCEEDED,
    )


def messages(events: list[ActionEvent | bytes]) -> list[FakeMessage]:
    return [
        FakeMessage(
            "backout.actions",
            0,
            i,
            e.key.encode() if isinstance(e, ActionEvent) else None,
            encode(e) if isinstance(e, ActionEvent) else e,
            [("trace", b"t")],
        )
        for i, e in enumerate(events)
    ]


@pytest.fixture
def ops() -> Commands:
    return Commands(issued_at=datetime.now(UTC))


def wrapper(
    ops: Commands,
    events: list[ActionEvent | bytes],
    *freezes: object,
    settings: Settings | None = None,
) -> tuple[FreezeAwareConsumer, FakeConsumer, InMemoryEventSink, FakeGuard]:
    view = FreezeView(ops.trusted)
    log = Log(at=datetime.now(UTC))
    for command in freezes:
        view.apply(log(command))  # type: ignore[arg-type]
    consumer, sink, guard = FakeConsumer(messages(events)), InMemoryEventSink(), FakeGuard(view)
    wrapped = FreezeAwareConsumer(
        consumer,
        guard,
        sink,
        settings or Settings(),  # type: ignore[arg-type]
        manage_offsets=True,
        group="svc",
    )
    return wrapped, consumer, sink, guard


def handed_on(wrapped: FreezeAwareConsumer) -> list[str]:
    out = []
    while (msg := wrapped.poll(0)) is not None:
        out.append(decode(msg.value(), ActionEvent).run_id)
    return out


def test_frozen_runs_and_their_descendants_are_parked(ops: Commands) -> None:
    freeze = ops.freeze(run="r1", reason="bad run")
    events: list[ActionEvent | bytes] = [
        action("r1"),
        action("r2"),
        action("r1c", parent="r1", agent="helper"),
        action("r1gc", parent="r1c", agent="helper"),
        action("r3"),
    ]
    wrapped, consumer, sink, _ = wrapper(ops, events, freeze)
    assert handed_on(wrapped) == ["r2", "r3"]
    assert wrapped.parked == 3
    parked = sink.on("backout.quarantine")
    assert [decode(p.value, ActionEvent).run_id for p in parked] == ["r1", "r1c", "r1gc"]
    first = parked[0]
    assert first.key == events[0].key.encode()  # type: ignore[union-attr]
    assert first.value == encode(events[0])  # type: ignore[arg-type]
    headers = dict(first.headers)
    assert headers["trace"] == b"t" and headers[PARKED_BY] == freeze.command_id.encode()
    assert scope_from_json(headers[PARKED_SCOPE]).run == "r1"
    assert consumer.stored == [0, 1, 2, 3, 4]  # every offset moves on


def test_read_only_freeze_parks_writes_only(ops: Commands) -> None:
    freeze = ops.freeze(FreezeMode.READ_ONLY, agent="billing-bot")
    events: list[ActionEvent | bytes] = [
        action("r1"),
        action("r2", reversibility=Reversibility.READ_ONLY),
    ]
    wrapped, *_ = wrapper(ops, events, freeze)
    assert handed_on(wrapped) == ["r2"] and wrapped.parked == 1


def test_records_that_are_not_action_events_are_handed_on(ops: Commands) -> None:
    wrapped, *_ = wrapper(ops, [b"not avro", action("r1")], ops.stop_all())
    msg = wrapped.poll(0)
    assert msg is not None and msg.value() == b"not avro"
    assert wrapped.poll(0) is None and wrapped.parked == 1


def test_stale_view_holds_writes_and_lets_reads_through(ops: Commands) -> None:
    events: list[ActionEvent | bytes] = [
        action("r0", reversibility=Reversibility.READ_ONLY),
        action("r1"),
        action("r2"),
    ]
    wrapped, consumer, _, guard = wrapper(ops, events)
    guard.stale = "the control topic is stale"
    assert handed_on(wrapped) == ["r0"]
    assert wrapped.held >= 1 and consumer.position == 1  # seeked back to r1
    assert consumer.stored == [0]
    guard.stale = None
    assert handed_on(wrapped) == ["r1", "r2"]
    assert consumer.stored == [0, 1, 2]


def test_fail_open_hands_writes_on_while_stale(ops: Commands) -> None:
    wrapped, _, _, guard = wrapper(ops, [action("r1")], settings=Settings(fail_open=True))
    guard.stale = "stale"
    assert handed_on(wrapped) == ["r1"]


def test_consume_batches_skip_parked_and_stop_at_held(ops: Commands) -> None:
    events: list[ActionEvent | bytes] = [action("r1"), action("bad"), action("r2")]
    wrapped, *_ = wrapper(ops, events, ops.freeze(run="bad"))
    got = wrapped.consume(10, 0)
    assert [decode(m.value(), ActionEvent).run_id for m in got] == ["r1", "r2"]
    wrapped2, consumer2, _, guard2 = wrapper(ops, [action("r1"), action("r2")])
    guard2.stale = "stale"
    assert wrapped2.consume(10, 0) == [] and consumer2.position == 0


def test_wrapper_delegates_and_closes(ops: Commands) -> None:
    wrapped, consumer, _, _ = wrapper(ops, [])
    assert wrapped.position == 0  # the wrapped consumer's attribute
    wrapped.close()
    assert consumer.closed


def test_event_scope_learns_lineage() -> None:
    lineage = RunLineage()
    event_scope(action("child", parent="root"), lineage)
    scope = event_scope(action("grandchild", parent="child"), lineage)
    assert scope.ancestor_runs == ("child", "root")
    assert scope.agent == "billing-bot" and scope.tool == "refund"


# --- pure planning ------------------------------------------------------------------------
def parked(position: str, freeze_id: str, scope: CallScope | None = None) -> ParkedRecord:
    return ParkedRecord(
        position,
        b"k",
        b"v",
        [("trace", b"t")],
        freeze_id,
        "r",
        "backout.actions",
        "backout.actions/0@1",
        scope,
        "",
    )


def test_release_plan_keeps_what_is_still_frozen_and_skips_settled() -> None:
    a, b, c = parked("q/0@0", "f1"), parked("q/0@1", "f1"), parked("q/0@2", "f2")
    records = [a, b, c, Marker("discarded", "q/0@1", "e1")]
    plan = plan_release(records, lambda p: "f2" if p.freeze_id == "f2" else None)
    assert plan.release == [a] and plan.still_frozen == [(c, "f2")] and plan.settled == 1
    only_f2 = plan_release(records, lambda p: None, freeze_ids={"f2"})
    assert only_f2.release == [c]


def test_discard_plan() -> None:
    a, b = parked("q/0@0", "f1"), parked("q/0@1", "f2")
    assert plan_discard([a, b, Marker("released", "q/0@0", "e")], freeze_ids=None) == ([b], 1)
    assert plan_discard([a, b], freeze_ids={"f1"}) == ([a], 0)


def test_headers_round_trip(ops: Commands) -> None:
    view = FreezeView(ops.trusted)
    command = ops.freeze(agent="billing-bot", reason="why")
    view.apply(Log(at=datetime.now(UTC))(command))
    freeze = view.get(command.command_id)
    assert freeze is not None
    scope = call(ancestors=("p",))
    headers = parked_headers(
        [("trace", b"t")],
        freeze,
        scope,
        topic="backout.actions",
        position="backout.actions/2@9",
        parked_at=datetime.now(UTC),
        group="svc",
    )
    record = read_parked("backout.quarantine/0@4", b"k", b"v", headers)
    assert isinstance(record, ParkedRecord)
    assert record.headers == [("trace", b"t")] and record.freeze_id == command.command_id
    assert record.topic == "backout.actions" and record.scope == scope
    assert record.parked_from == "backout.actions/2@9" and record.reason == "why"
    assert released_headers(record)[-1] == ("backout-released-from", b"backout.quarantine/0@4")
    marker = read_parked(
        "backout.quarantine/0@5", b"k", b"", marker_headers("released", record, "e1")
    )
    assert marker == Marker("released", "backout.quarantine/0@4", "e1")
    assert dict(marker_headers("released", record, "e1"))[MARKER] == b"released"
    assert read_parked("x/0@0", None, b"", [("other", b"1")]) is None
    assert scope_from_json(scope_json(scope)) == scope
    with pytest.raises(ValueError):
        scope_from_json(b"{}")


def test_journal_event_records_what_was_done() -> None:
    records = [parked(f"q/0@{i}", "f1") for i in range(3)]
    event = journal_event(
        "release",
        records,
        issuer="oncall",
        environment="production",
        reason="fixed",
        details={"to": None},
    )
    assert event.origin is Origin.HUMAN and event.tool == "backout.release"
    assert event.requested_args["count"] == 3 and event.requested_args["freezes"] == ["f1"]
    assert event.requested_args["records"] == ["q/0@0", "q/0@1", "q/0@2"]
    assert decode(encode(event)) == event
