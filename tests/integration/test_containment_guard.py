"""ControlGuard on a real broker: rebuild, tailing, overlaps, invalid commands, the Journal."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backout.infra.broker import Broker
from backout.infra.settings import Settings
from backout.producers.guard import ControlGuard
from backout.producers.integrity import INTEGRITY_DETECTOR
from backout.producers.journal import Journal
from backout.producers.kafka import KafkaEventSink
from backout.schemas.codec import decode, encode
from backout.schemas.errors import Frozen
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    FreezeMode,
    Reversibility,
    Signal,
)
from backout.schemas.signing import new_signing_key, sign
from tests.containment_helpers import (
    Commands,
    call,
    close_publishers,  # noqa: F401 - an autouse fixture
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


def _applied(guard: ControlGuard, settings: Settings, bootstrap: str, command: object) -> None:
    published = publish(settings, bootstrap, command)  # type: ignore[arg-type]
    assert published.offset is not None
    assert guard.wait_position(published.offset, 10.0)


def test_rebuilds_the_view_from_history(settings: Settings, broker: Broker, ops: Commands) -> None:
    first, second = ops.freeze(agent="billing-bot"), ops.freeze(tenant="acme", reason="tenant")
    for command in (first, second, ops.lift(first.command_id)):
        publish(settings, broker.bootstrap, command)
    with ControlGuard(settings, broker.bootstrap) as guard:
        assert guard.synced and guard.rebuild_records == 3
        with pytest.raises(Frozen) as refused:
            guard.check(call())
        assert refused.value.command_id == second.command_id
        assert refused.value.reason == "tenant"
        assert [f.command_id for f in guard.freezes()] == [second.command_id]
        guard.check(call(tenant="globex"))


def test_a_new_freeze_and_its_lift_apply_while_tailing(
    guard: ControlGuard, settings: Settings, broker: Broker, ops: Commands
) -> None:
    guard.check(call())
    freeze = ops.freeze(FreezeMode.READ_ONLY, agent="billing-bot", reason="refund loop")
    _applied(guard, settings, broker.bootstrap, freeze)
    with pytest.raises(Frozen, match="refund loop") as refused:
        guard.check(call())
    assert refused.value.command_id == freeze.command_id
    guard.check(call(reversibility=Reversibility.READ_ONLY))
    _applied(guard, settings, broker.bootstrap, ops.lift(freeze.command_id))
    guard.check(call())


def test_overlapping_freezes_and_the_global_stop(
    guard: ControlGuard, settings: Settings, broker: Broker, ops: Commands
) -> None:
    by_agent, by_tool = ops.freeze(agent="billing-bot"), ops.freeze(tool="refund")
    stop = ops.stop_all()
    for command in (by_agent, by_tool, stop):
        _applied(guard, settings, broker.bootstrap, command)
    with pytest.raises(Frozen) as refused:
        guard.check(call(agent="someone-else", tool="lookup", identity="x"))
    assert refused.value.command_id == stop.command_id
    _applied(guard, settings, broker.bootstrap, ops.lift(stop.command_id))
    _applied(guard, settings, broker.bootstrap, ops.lift(by_agent.command_id))
    with pytest.raises(Frozen) as refused:
        guard.check(call())
    assert refused.value.command_id == by_tool.command_id
    guard.check(call(tool="lookup"))


def test_invalid_commands_change_nothing_and_raise_one_signal_each(
    settings: Settings, broker: Broker, ops: Commands
) -> None:
    # Two guards run, as two agent processes would; only the reporter raises signals.
    reporter = ControlGuard(settings, broker.bootstrap, report_invalid=True).start()
    agent_guard = ControlGuard(settings, broker.bootstrap).start()
    try:
        valid = ops.freeze(agent="other-bot")
        _applied(reporter, settings, broker.bootstrap, valid)
        lift = ops.lift(valid.command_id)
        intruder = new_signing_key()
        bad: list[object] = [
            ops.freeze(agent="billing-bot").model_copy(update={"signature": None}),  # unsigned
            ops.freeze(agent="billing-bot").model_copy(update={"reason": "edited"}),  # tampered
            sign(
                ops.freeze(agent="billing-bot").model_copy(update={"signature": None}), intruder
            ),  # a key nobody trusts (an agent signing its own command)
            ops.freeze(agent="billing-bot", expires_at=datetime.now(UTC) - timedelta(minutes=1)),
            ops.freeze(planet="mars"),  # malformed scope
            b"\xc3\x01garbage that is not avro",  # undecodable
            valid,  # replayed
            lift.model_copy(update={"reason": "let me out"}),  # forged lift
        ]
        for command in bad:
            _applied(reporter, settings, broker.bootstrap, command)
        last = publish(settings, broker.bootstrap, ops.freeze(agent="after-the-noise"))
        assert last.offset is not None
        for guard in (reporter, agent_guard):
            assert guard.wait_position(last.offset, 10.0)  # both consumers kept running
            with pytest.raises(Frozen):
                guard.check(call(agent="after-the-noise"))
            with pytest.raises(Frozen):
                guard.check(call(agent="other-bot"))  # the forged lift lifted nothing
            guard.check(call())  # none of the bad freezes applies
            assert len(guard.invalid) == len(bad)
        verdicts = [o.verdict.value for o in reporter.invalid]
        assert verdicts == [
            "unsigned",
            "forged",
            "forged",
            "expired",
            "malformed",
            "malformed",
            "replayed",
            "forged",
        ]
    finally:
        agent_guard.close()
        reporter.close()  # flushes the signals
    signals = [decode(m.value(), Signal) for m in read_all(settings, broker.bootstrap, "signals")]
    assert len(signals) == len(bad)
    assert {s.detector for s in signals} == {INTEGRITY_DETECTOR}
    assert len({s.signal_id for s in signals}) == len(bad)


def test_a_restarted_reporter_repeats_the_same_signal_ids(
    settings: Settings, broker: Broker, ops: Commands
) -> None:
    publish(
        settings, broker.bootstrap, ops.freeze(agent="x").model_copy(update={"signature": None})
    )
    for _ in range(2):
        ControlGuard(settings, broker.bootstrap, report_invalid=True).start().close()
    signals = [decode(m.value(), Signal) for m in read_all(settings, broker.bootstrap, "signals")]
    assert len(signals) == 2 and signals[0].signal_id == signals[1].signal_id


def test_the_journal_refuses_and_journals_a_frozen_call(
    guard: ControlGuard, settings: Settings, broker: Broker, ops: Commands
) -> None:
    sink = KafkaEventSink(settings, broker.bootstrap)
    journal = Journal(settings, sink=sink, guard=guard)
    ran: list[str] = []

    @journal.tool(
        reversibility=Reversibility.IRREVERSIBLE, system="bank", object_id=lambda order, **_: order
    )
    def refund(order: str, amount: int) -> None:
        ran.append(order)

    freeze = ops.freeze(agent="billing-bot", reason="refund loop")
    _applied(guard, settings, broker.bootstrap, freeze)
    with (
        journal.run("run_1", agent="billing-bot", identity="svc-billing", resume=False),
        pytest.raises(Frozen),
    ):
        refund("o1", 900)
    with journal.run("run_2", agent="other-bot", identity="svc-other", resume=False):
        refund("o2", 10)
    journal.close()
    sink.close()
    assert ran == ["o2"]
    events = [
        decode(m.value(), ActionEvent) for m in read_all(settings, broker.bootstrap, "actions")
    ]
    blocked = [e for e in events if e.status is CallStatus.BLOCKED]
    assert len(blocked) == 1 and blocked[0].blocked_by == freeze.command_id
    assert blocked[0].requested_args == {"order": "o1", "amount": 900}


def test_journal_from_settings_builds_a_guard(
    settings: Settings, broker: Broker, ops: Commands
) -> None:
    freeze = ops.freeze(agent="billing-bot")
    publish(settings, broker.bootstrap, freeze)
    journal = Journal.from_settings(settings)
    try:
        assert isinstance(journal.guard, ControlGuard) and journal.guard.synced
        assert journal.approvals is not None

        @journal.tool(reversibility=Reversibility.READ_ONLY)
        def lookup(order: str) -> str:
            return order

        with journal.run(agent="billing-bot", identity="svc"), pytest.raises(Frozen):
            lookup("o1")
    finally:
        journal.close()
    assert not journal.guard._threads  # closed with the journal


def test_raw_encoded_command_round_trips(ops: Commands) -> None:
    command = ops.freeze(agent="a")
    assert decode(encode(command)) == command
