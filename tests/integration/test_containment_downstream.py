"""FreezeAwareConsumer, release and discard on a real broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Message, TopicPartition

from backout.infra.broker import Broker
from backout.infra.settings import Settings
from backout.producers.downstream import (
    FreezeAwareConsumer,
    discard_parked,
    read_quarantine,
    release_parked,
)
from backout.producers.guard import ControlGuard
from backout.producers.ids import new_event_id
from backout.producers.kafka import KafkaEventSink
from backout.producers.quarantine import (
    MARKER,
    PARKED_BY,
    PARKED_FROM,
    RELEASED_FROM,
)
from backout.schemas.codec import decode, encode
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Origin,
    Reversibility,
    TargetRef,
)
from tests.containment_helpers import (
    Commands,
    close_publishers,  # noqa: F401
    containment_settings,
    publish,
    read_all,
)


@pytest.fixture
def ops() -> Commands:
    return Commands(issued_at=datetime.now(UTC))


@pytest.fixture
def settings(broker: Broker, tmp_path: Path, ops: Commands) -> Settings:
    return containment_settings(broker.bootstrap, tmp_path, ops)


@pytest.fixture
def guard(settings: Settings, broker: Broker) -> Iterator[ControlGuard]:
    with ControlGuard(settings, broker.bootstrap) as started:
        yield started


def event(
    run: str, *, agent: str = "billing-bot", parent: str | None = None, order: str = "o1"
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
        requested_args={"order": order},
        target=TargetRef(system="bank", object_id=order),
        reversibility=Reversibility.IRREVERSIBLE,
        idempotency_key=f"{run}:1",
        status=CallStatus.SUCCEEDED,
        origin=Origin.AGENT,
    )


def produce(settings: Settings, bootstrap: str, events: list[ActionEvent]) -> None:
    sink = KafkaEventSink(settings, bootstrap)
    try:
        for e in events:
            sink.publish(
                settings.topic("actions"),
                e.key.encode(),
                encode(e),
                headers=[("trace-id", e.event_id.encode())],
            )
    finally:
        sink.close()


def wrapper_for(settings: Settings, bootstrap: str) -> FreezeAwareConsumer:
    wrapped = FreezeAwareConsumer.from_settings(
        settings,
        {"group.id": "billing-sync", "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10},
    )
    topic = settings.topic("actions")
    wrapped.assign([TopicPartition(topic, p) for p in range(settings.actions_partitions)])
    return wrapped


def drain(
    wrapped: FreezeAwareConsumer, expect: int, *, parked: int = 0, timeout: float = 15.0
) -> list[Message]:
    """Poll until ``expect`` records were handed on and ``parked`` parked, then a little
    longer to catch strays."""
    import time

    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while (len(got) < expect or wrapped.parked < parked) and time.monotonic() < deadline:
        msg = wrapped.poll(0.2)
        if msg is not None and msg.error() is None:
            got.append(msg)
    extra = wrapped.poll(0.5)
    assert extra is None, "more records than expected were handed on"
    assert wrapped.parked == parked
    return got


def ids(messages: list[Message]) -> list[str]:
    return sorted(decode(m.value(), ActionEvent).event_id for m in messages)


def test_records_from_frozen_scopes_are_parked_and_released_after_the_lift(
    guard: ControlGuard, settings: Settings, broker: Broker, ops: Commands
) -> None:
    freeze = ops.freeze(run="run_bad", reason="bad run")
    published = publish(settings, broker.bootstrap, freeze)
    assert guard.wait_position(published.offset or 0, 10.0)
    bad = event("run_bad")
    child = event("run_child", parent="run_bad", agent="fan")
    grandchild = event("run_gc", parent="run_child", agent="fan")
    good = event("run_good", agent="other-bot", order="o2")
    produce(settings, broker.bootstrap, [bad, child, grandchild, good])

    wrapped = wrapper_for(settings, broker.bootstrap)
    try:
        delivered = drain(wrapped, 1, parked=3)
        assert ids(delivered) == [good.event_id]
        wrapped.commit(asynchronous=False)
        committed = wrapped.committed(
            [TopicPartition(settings.topic("actions"), p) for p in range(3)], timeout=10
        )
        assert sum(max(tp.offset, 0) for tp in committed) == 4  # offsets moved on past parked
    finally:
        wrapped.close()

    parked = [m for m in read_all(settings, broker.bootstrap, "quarantine")]
    assert sorted(decode(m.value(), ActionEvent).event_id for m in parked) == sorted(
        e.event_id for e in (bad, child, grandchild)
    )
    for m in parked:
        headers = dict(m.headers() or [])
        original = decode(m.value(), ActionEvent)
        assert headers[PARKED_BY] == freeze.command_id.encode()
        assert headers["trace-id"] == original.event_id.encode()  # original headers kept
        assert m.key() == original.key.encode()
        assert headers[PARKED_FROM].startswith(settings.topic("actions").encode())

    # Still frozen: nothing goes back.
    sink = KafkaEventSink(settings, broker.bootstrap)
    try:
        records = read_quarantine(settings, broker.bootstrap)
        active = {f.command_id for f in guard.freezes()}
        held = release_parked(settings, sink, records, guard, active_ids=active)
        assert held.handled == [] and len(held.still_frozen) == 3 and held.event_id is None

        lift = publish(settings, broker.bootstrap, ops.lift(freeze.command_id))
        assert guard.wait_position(lift.offset or 0, 10.0)
        done = release_parked(
            settings, sink, records, guard, active_ids=set(), issuer="oncall", reason="fixed"
        )
        assert len(done.handled) == 3 and done.event_id is not None
        again = release_parked(
            settings, sink, read_quarantine(settings, broker.bootstrap), guard, active_ids=set()
        )
        assert again.handled == [] and again.settled_before == 3
    finally:
        sink.close()

    actions = read_all(settings, broker.bootstrap, "actions")
    released = [m for m in actions if RELEASED_FROM in dict(m.headers() or [])]
    assert sorted(decode(m.value(), ActionEvent).event_id for m in released) == sorted(
        e.event_id for e in (bad, child, grandchild)
    )
    journal = [
        decode(m.value(), ActionEvent)
        for m in actions
        if m.value() and decode(m.value(), ActionEvent).tool == "backout.release"
    ]
    assert len(journal) == 1 and journal[0].origin is Origin.HUMAN
    assert journal[0].identity == "oncall" and journal[0].requested_args["count"] == 3
    assert journal[0].event_id == done.event_id

    # The service, consuming on from its committed offsets, now gets the released records
    # (and the journal event of the release itself).
    wrapped = wrapper_for(settings, broker.bootstrap)
    try:
        assert ids(drain(wrapped, 4)) == sorted(
            [bad.event_id, child.event_id, grandchild.event_id, done.event_id]
        )
        assert wrapped.parked == 0
    finally:
        wrapped.close()


def test_discarded_records_are_never_released(
    guard: ControlGuard, settings: Settings, broker: Broker, ops: Commands
) -> None:
    freeze = ops.freeze(agent="billing-bot")
    assert guard.wait_position(publish(settings, broker.bootstrap, freeze).offset or 0, 10.0)
    produce(settings, broker.bootstrap, [event("run_1"), event("run_2", order="o9")])
    wrapped = wrapper_for(settings, broker.bootstrap)
    try:
        assert drain(wrapped, 0, parked=2) == []
    finally:
        wrapped.close()
    sink = KafkaEventSink(settings, broker.bootstrap)
    try:
        records = read_quarantine(settings, broker.bootstrap)
        preview = discard_parked(
            settings, sink, records, freeze_ids={freeze.command_id}, dry_run=True
        )
        assert len(preview.handled) == 2 and preview.event_id is None
        done = discard_parked(
            settings,
            sink,
            records,
            freeze_ids={freeze.command_id},
            reason="rolled back",
            issuer="oncall",
        )
        assert len(done.handled) == 2 and done.event_id is not None
        assert guard.wait_position(
            publish(settings, broker.bootstrap, ops.lift(freeze.command_id)).offset or 0, 10.0
        )
        after = release_parked(
            settings, sink, read_quarantine(settings, broker.bootstrap), guard, active_ids=set()
        )
        assert after.handled == [] and after.settled_before == 2
    finally:
        sink.close()
    markers = [
        m
        for m in read_all(settings, broker.bootstrap, "quarantine")
        if MARKER in dict(m.headers() or [])
    ]
    assert [dict(m.headers() or [])[MARKER] for m in markers] == [b"discarded"] * 2
    journal = [
        decode(m.value(), ActionEvent) for m in read_all(settings, broker.bootstrap, "actions")
    ]
    assert [e.tool for e in journal if e.tool.startswith("backout.")] == ["backout.discard"]
