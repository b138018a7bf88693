"""The processor stages and the supervisor on in-memory fakes (no broker, no Faust)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field

import pytest

from backout.processors.engine import Engine
from backout.processors.envelope import pack, partition_for, route_fields, unpack
from backout.processors.findings import DEFAULT_SEVERITY
from backout.processors.policy import Policy
from backout.processors.stages import (
    DLQ_CONSUMER,
    DLQ_FROM,
    DLQ_REASON,
    DetectStage,
    Emitter,
    Headers,
    Record,
    RouteStage,
    Stats,
    agent_key,
    run_key,
)
from backout.processors.supervisor import Supervisor
from backout.producers.targets import TargetUnavailable
from backout.schemas import codec
from backout.schemas.events import ActionEvent, ControlCommand, FreezeMode, RecordImage, Signal
from backout.schemas.registry import make_codec
from backout.schemas.signing import new_signing_key, verify
from tests.detection_kit import Clock, policy

KEY = new_signing_key()
TRUSTED = {KEY.key_id: KEY.public_b64}
CODEC = make_codec(None)
POLICY = policy("""
defaults:
  limits: {retry_loop: 3}
  allow: {tenants: [acme]}
responses:
  default: {medium: [read_only], high: [halt]}
""")


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    partition: int | None = None


@dataclass
class FakeOutbox:
    sent: list[Sent] = field(default_factory=list)

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Awaitable[object]:
        self.sent.append(Sent(topic, key, value, list(headers or []), partition))
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def on(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]


@dataclass
class FakeStore:
    data: dict[bytes, bytes] = field(default_factory=dict)
    puts: int = 0
    seals: list[list[int]] = field(default_factory=list)

    def read(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes, partition: int) -> Awaitable[object]:
        self.puts += 1
        self.data[key] = value
        return asyncio.sleep(0)

    def drop(self, key: bytes, partition: int) -> Awaitable[object] | None:
        return asyncio.sleep(0) if self.data.pop(key, None) is not None else None

    async def seal(self, partitions: Iterable[int]) -> None:
        self.seals.append(list(partitions))


@dataclass
class FakeLedger:
    ids: set[str] = field(default_factory=set)

    def holds(self, command_id: str) -> bool:
        return command_id in self.ids

    def add(self, command_id: str) -> None:
        self.ids.add(command_id)


def _emitter(outbox: FakeOutbox, ledger: FakeLedger | None = None) -> Emitter:
    return Emitter(
        outbox,
        CODEC,
        KEY,
        signals="t.signals",
        control="t.control",
        dlq="t.dlq",
        ledger=ledger,
        stats=Stats(),
    )


def _records(events: list[ActionEvent], *, partition: int = 0) -> list[Record]:
    return [
        Record("t.actions", partition, i, e.key.encode(), codec.encode(e))
        for i, e in enumerate(events)
    ]


# --- envelope ---------------------------------------------------------------------------
def test_route_fields_read_the_first_fields_of_the_avro_body() -> None:
    clock = Clock()
    for event in (
        clock.event(),
        clock.event(parent_run_id="parent", agent_id="x" * 300),
        clock.lifecycle(),
    ):
        assert route_fields(codec.encode(event)) == (event.event_id, event.agent_id)


@pytest.mark.parametrize(
    "raw",
    [b"", b"garbage", b"\xc3\x01" + b"\x00" * 8 + b"\x02", codec.encode(Clock().event())[:14]],
)
def test_route_fields_give_up_on_other_bytes(raw: bytes) -> None:
    assert route_fields(raw) is None


def test_envelopes_round_trip_and_refuse_garbage() -> None:
    items = [(0, 5, b"abc"), (2, 2**40, b""), (1, 0, bytes(range(256)))]
    assert unpack(pack(items)) == items
    with pytest.raises(ValueError, match="version"):
        unpack(b"\x07abc")
    with pytest.raises(ValueError, match="truncated"):
        unpack(pack(items)[:-3])


# --- route --------------------------------------------------------------------------------
async def test_route_batches_records_per_partition_of_their_agent() -> None:
    clock = Clock()
    agents = [f"agent-{n}" for n in range(12)]
    events = [clock.event(agent_id=a) for a in agents * 2]
    outbox = FakeOutbox()
    stage = RouteStage(outbox, _emitter(outbox), CODEC, routed="t.routed", partitions=3)
    records = _records(events, partition=2)
    await stage.handle(records)
    batches = outbox.on("t.routed")
    assert len(batches) == len({partition_for(a, 3) for a in agents}) <= 3
    for batch in batches:
        assert batch.partition is not None and batch.key is None
        items = unpack(batch.value)
        assert [o for _, o, _ in items] == sorted(o for _, o, _ in items)  # in order
        for source, offset, raw in items:
            assert (source, raw) == (2, records[offset].value)
            assert partition_for(events[offset].agent_id, 3) == batch.partition
    assert sum(len(unpack(b.value)) for b in batches) == len(events)


def test_an_agent_always_goes_to_the_same_partition() -> None:
    assert partition_for("billing-bot", 6) == partition_for("billing-bot", 6)
    assert {partition_for(f"a{n}", 6) for n in range(100)} == set(range(6))


async def test_route_splits_large_batches() -> None:
    clock = Clock()
    events = [clock.event() for _ in range(40)]
    outbox = FakeOutbox()
    stage = RouteStage(
        outbox, _emitter(outbox), CODEC, routed="t.routed", partitions=1, envelope_bytes=2000
    )
    await stage.handle(_records(events))
    batches = outbox.on("t.routed")
    assert len(batches) > 4
    assert all(len(b.value) <= 2000 for b in batches)
    assert sum(len(unpack(b.value)) for b in batches) == 40


async def test_route_dead_letters_what_it_cannot_read_and_goes_on() -> None:
    outbox = FakeOutbox()
    emitter = _emitter(outbox)
    stage = RouteStage(outbox, emitter, CODEC, routed="t.routed", partitions=3)
    good = Clock().event()
    await stage.handle(
        [
            Record("t.actions", 1, 7, b"k", b"not avro"),
            Record("t.actions", 1, 8, b"k2", None),
            _records([good], partition=1)[0],
        ]
    )
    letters = outbox.on("t.dlq")
    assert [(d.key, d.value) for d in letters] == [(b"k", b"not avro"), (b"k2", b"")]
    headers = dict(letters[0].headers)
    assert headers[DLQ_REASON].startswith(b"not Avro single-object encoding")
    assert headers[DLQ_FROM] == b"t.actions/1@7"
    assert headers[DLQ_CONSUMER] == b"processors:route"
    assert len(outbox.on("t.routed")) == 1
    assert emitter.stats.dead_letters == 2


# --- detect -------------------------------------------------------------------------------
def _detector(
    outbox: FakeOutbox, store: FakeStore, ledger: FakeLedger | None = None, pol: Policy = POLICY
) -> DetectStage:
    return DetectStage(Engine(pol), _emitter(outbox, ledger), store, CODEC, actions="t.actions")


def _routed(events: list[ActionEvent], *, offset: int = 0, partition: int = 0) -> Record:
    items = [(0, offset + i, codec.encode(e)) for i, e in enumerate(events)]
    return Record("t.routed", partition, offset, events[0].agent_id.encode(), pack(items))


async def test_detect_publishes_a_signal_and_signed_freezes_with_evidence() -> None:
    events = [Clock().event(tenant="evil")]
    outbox, store = FakeOutbox(), FakeStore()
    await _detector(outbox, store).handle([_routed(events, offset=41)])
    [signal_rec] = outbox.on("t.signals")
    signal = codec.decode(signal_rec.value, Signal)
    assert signal.detector == "policy_violation"
    assert signal_rec.key == b"run=run-1"
    assert [(e.event_id, e.topic, e.partition, e.offset) for e in signal.evidence] == [
        (events[0].event_id, "t.actions", 0, 41)
    ]
    [control] = outbox.on("t.control")
    command = codec.decode(control.value, ControlCommand)
    verify(command, TRUSTED)
    assert (command.scope, command.mode, command.cause) == (
        {"run": "run-1"},
        FreezeMode.HALT,
        signal.signal_id,
    )
    assert control.key == b"run=run-1"
    assert store.read(agent_key("billing-bot")) is not None
    assert store.read(run_key("billing-bot", "run-1")) is not None


async def test_redelivered_records_change_nothing() -> None:
    clock = Clock()
    events = [clock.event(object_id="x", requested_args={}) for _ in range(3)]
    outbox, store = FakeOutbox(), FakeStore()
    await _detector(outbox, store).handle([_routed(events)])
    assert len(outbox.on("t.signals")) == 1
    # a restarted worker: fresh stage, states from the store, same records again
    again = FakeOutbox()
    await _detector(again, store).handle([_routed(events)])
    assert again.sent == []


async def test_commands_already_on_the_control_topic_are_not_sent_again() -> None:
    events = [Clock().event(tenant="evil")]
    outbox, ledger = FakeOutbox(), FakeLedger()
    await _detector(outbox, FakeStore(), ledger).handle([_routed(events)])
    [sent] = outbox.on("t.control")
    # lost state (e.g. a crash before the checkpoint): recomputed, recognised, not resent
    again = FakeOutbox()
    stage = _detector(again, FakeStore(), ledger)
    await stage.handle([_routed(events)])
    assert again.on("t.control") == []
    assert len(again.on("t.signals")) == 1
    assert codec.decode(sent.value, ControlCommand).command_id in ledger.ids


async def test_a_corrupt_record_in_a_batch_is_dead_lettered_with_its_source() -> None:
    good = Clock().event(tenant="evil")
    blob = pack([(2, 10, b"\xc3\x01broken-record"), (2, 11, codec.encode(good))])
    outbox = FakeOutbox()
    await _detector(outbox, FakeStore()).handle([Record("t.routed", 0, 0, b"a", blob)])
    [letter] = outbox.on("t.dlq")
    assert letter.value == b"\xc3\x01broken-record"
    assert dict(letter.headers)[DLQ_FROM] == b"t.actions/2@10"
    assert dict(letter.headers)[DLQ_CONSUMER] == b"processors:detect"
    assert len(outbox.on("t.signals")) == 1


async def test_states_are_written_once_per_checkpoint_not_per_batch() -> None:
    clock = Clock()
    outbox, store = FakeOutbox(), FakeStore()
    stage = _detector(outbox, store)
    for n in range(5):
        await asyncio.gather(*stage.process([_routed([clock.event()], offset=n)]))
    assert store.puts == 0 and stage.dirty == 2
    await stage.checkpoint()()
    assert store.puts == 2 and stage.dirty == 0
    # each checkpoint ends with one seal on the partition it wrote to, none when unchanged
    assert store.seals == [[0]]
    await stage.checkpoint()()
    assert store.seals == [[0]]


# --- supervisor -------------------------------------------------------------------------
class FakeTarget:
    system = "erp"

    def __init__(self, live: dict[str, RecordImage] | None = None, down: int = 0) -> None:
        self.live = live or {}
        self.reads = 0
        self.down = down

    def read(self, object_id: str) -> RecordImage:
        self.reads += 1
        if self.down:
            self.down -= 1
            raise TargetUnavailable("erp is down")
        return self.live.get(object_id, RecordImage(exists=False))

    def compare_and_set(self, *args: object) -> None:
        raise NotImplementedError

    delete_if = insert_if_absent = compare_and_set


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _supervisor(outbox: FakeOutbox, target: FakeTarget, clock: FakeClock) -> Supervisor:
    pol = policy(
        "supervisor: {share: 1.0, recheck_after: 30s}\n"
        "responses: {supervisor_drift: {high: [read_only]}}"
    )
    return Supervisor(
        pol.supervisor,
        [target],
        Engine(pol),
        _emitter(outbox),
        CODEC,
        actions="t.actions",
        severity=DEFAULT_SEVERITY["supervisor_drift"],
        confirm_after_s=2.0,
        clock=clock,
    )


def _observe(sup: Supervisor, event: ActionEvent, offset: int = 0) -> None:
    record = Record("t.actions", 0, offset, event.key.encode(), codec.encode(event))
    sup.observe(record, event.event_id, None)


async def test_a_write_that_drifted_on_the_target_is_reported_after_confirmation() -> None:
    event = Clock().event(object_id="inv_1")
    target = FakeTarget({"inv_1": RecordImage(exists=True, fields={"status": "paid"})})
    outbox, clock = FakeOutbox(), FakeClock()
    sup = _supervisor(outbox, target, clock)
    _observe(sup, event)
    await sup.tick()
    assert target.reads == 0  # not due yet
    clock.now = 31.0
    await sup.tick()
    assert target.reads == 1 and outbox.sent == []  # drift seen, waiting for late events
    clock.now = 34.0
    await sup.tick()
    [signal_rec] = outbox.on("t.signals")
    signal = codec.decode(signal_rec.value, Signal)
    assert signal.detector == "supervisor_drift"
    assert signal.details["field.status"] == "expected 'void', live 'paid'"
    assert [codec.decode(c.value, ControlCommand).mode for c in outbox.on("t.control")] == [
        FreezeMode.READ_ONLY
    ]
    assert sup.pending == 0


async def test_a_matching_record_is_no_drift() -> None:
    event = Clock().event(object_id="inv_1")
    target = FakeTarget({"inv_1": RecordImage(exists=True, fields={"status": "void"})})
    outbox, clock = FakeOutbox(), FakeClock()
    sup = _supervisor(outbox, target, clock)
    _observe(sup, event)
    clock.now = 40.0
    await sup.tick()
    assert outbox.sent == [] and sup.pending == 0


async def test_a_later_journaled_write_replaces_the_check() -> None:
    clock_events = Clock()
    first = clock_events.event(object_id="inv_1")
    second = clock_events.event(
        object_id="inv_1", after=RecordImage(exists=True, fields={"status": "paid"})
    )
    target = FakeTarget({"inv_1": RecordImage(exists=True, fields={"status": "paid"})})
    outbox, clock = FakeOutbox(), FakeClock()
    sup = _supervisor(outbox, target, clock)
    _observe(sup, first)
    clock.now = 31.0
    await sup.tick()  # drift against the first write, held for confirmation
    _observe(sup, second, offset=1)  # ... then its journal event arrives
    clock.now = 70.0
    await sup.tick()
    assert outbox.sent == [] and sup.pending == 0


async def test_an_unreachable_target_is_retried() -> None:
    event = Clock().event(object_id="inv_1")
    target = FakeTarget({"inv_1": RecordImage(exists=True, fields={"status": "x"})}, down=1)
    outbox, clock = FakeOutbox(), FakeClock()
    sup = _supervisor(outbox, target, clock)
    _observe(sup, event)
    clock.now = 31.0
    await sup.tick()
    assert sup.pending == 1 and target.reads == 1
    clock.now = 62.0
    await sup.tick()
    clock.now = 65.0
    await sup.tick()
    assert [s.topic for s in outbox.sent][:1] == ["t.signals"]


async def test_reads_failures_and_unknown_systems_are_not_sampled() -> None:
    clock = Clock()
    outbox, fake_clock = FakeOutbox(), FakeClock()
    sup = _supervisor(outbox, FakeTarget(), fake_clock)
    _observe(sup, clock.read())
    _observe(sup, clock.event(status="failed"))
    _observe(sup, clock.event(system="crm"))
    assert sup.pending == 0
    _observe(sup, clock.event())
    assert sup.pending == 1
    sup.forget([0])
    assert sup.pending == 0
