"""The processors' tuned faust plumbing, without a broker: pausing in aiokafka, the
direct sender and the acknowledging pipeline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import faust
import pytest
from aiokafka import TopicPartition
from faust.types import TP

from backout.processors.app import Pipeline
from backout.processors.transport import _pause_idle
from backout.processors.writes import DirectSender

A0, A1 = TopicPartition("actions", 0), TopicPartition("actions", 1)
C0 = TopicPartition("state-changelog", 0)


@dataclass
class FakeFetcher:
    _records: dict[TopicPartition, object] = field(default_factory=dict)


@dataclass
class FakeConsumer:
    """The part of aiokafka's consumer that ``_pause_idle`` uses."""

    assigned: set[TopicPartition]
    paused_tps: set[TopicPartition] = field(default_factory=set)
    _fetcher: FakeFetcher = field(default_factory=FakeFetcher)
    calls: list[tuple[str, set[TopicPartition]]] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)

    def pause(self, *tps: TopicPartition) -> None:
        assert all(isinstance(tp, TopicPartition) for tp in tps)
        self.calls.append(("pause", set(tps)))
        self.paused_tps |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.calls.append(("resume", set(tps)))
        self.paused_tps -= set(tps)


def test_partitions_faust_does_not_read_are_paused_and_their_prefetch_dropped() -> None:
    consumer = FakeConsumer({A0, A1, C0})
    consumer._fetcher._records = {C0: "prefetched", A0: "prefetched"}
    _pause_idle(consumer, {TP("actions", 0), TP("actions", 1)})  # faust's own TP type
    assert consumer.paused_tps == {C0}
    assert consumer._fetcher._records == {A0: "prefetched"}
    _pause_idle(consumer, {TP("actions", 0), TP("actions", 1)})
    assert len(consumer.calls) == 1, "nothing to change the second time"
    # recovery reads the changelog again, and pauses the streams meanwhile
    _pause_idle(consumer, {TP("state-changelog", 0)})
    assert consumer.paused_tps == {A0, A1}
    assert consumer.calls[-2:] == [("resume", {C0}), ("pause", {A0, A1})]


class FakeProducer:
    """``send`` as faust's aiokafka producer: queues, returns a delivery future."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.deliveries: list[asyncio.Future[str]] = []
        self.fail_on = fail_on

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> asyncio.Future[str]:
        if value == self.fail_on:
            raise RuntimeError("buffer closed")
        self.sent.append((topic, key, value, partition))
        delivery: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.deliveries.append(delivery)
        return delivery


@dataclass
class FakeApp:
    producer: FakeProducer
    crashed: list[BaseException] = field(default_factory=list)

    async def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


async def test_the_direct_sender_keeps_call_order_and_reports_each_delivery() -> None:
    producer = FakeProducer(fail_on=b"bad")
    sender = DirectSender(cast(Any, FakeApp(producer)))
    first = sender.send("t", b"k", b"1", partition=2)
    bad = sender.send("t", b"k", b"bad")
    tombstone = sender.send("t", b"k", None)
    await asyncio.sleep(0)
    assert producer.sent == [("t", b"k", b"1", 2), ("t", b"k", None, None)]
    assert not first.done(), "done only once the broker acknowledged it"
    producer.deliveries[0].set_result("meta-1")
    producer.deliveries[1].set_exception(RuntimeError("broker said no"))
    assert await first == "meta-1"
    with pytest.raises(RuntimeError, match="buffer closed"):
        await bad
    with pytest.raises(RuntimeError, match="broker said no"):
        await tombstone


async def test_the_pipeline_acknowledges_only_after_outputs_and_checkpoint() -> None:
    loop = asyncio.get_running_loop()
    order: list[str] = []
    output: asyncio.Future[None] = loop.create_future()

    def checkpoint() -> Any:
        order.append("snapshot")

        async def store() -> None:
            order.append("stored")

        return store

    pipeline = Pipeline(
        cast(faust.App, FakeApp(FakeProducer())),
        "detect",
        checkpoint=checkpoint,
        interval_s=3600,
        soft_limit=1000,
    )
    await pipeline.submit(lambda: order.append("ack 1"), 3, [output])
    await pipeline.submit(lambda: order.append("ack 2"), 2, [])
    draining = asyncio.ensure_future(pipeline.drain())
    await asyncio.sleep(0.01)
    assert order == ["snapshot"], "waits for the outputs"
    output.set_result(None)
    await draining
    assert order == ["snapshot", "stored", "ack 1", "ack 2"]


async def test_the_pipeline_crashes_the_app_when_an_output_fails() -> None:
    app = FakeApp(FakeProducer())
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    failed.set_exception(RuntimeError("not durable"))
    acked: list[int] = []
    pipeline = Pipeline(
        cast(faust.App, app), "route", checkpoint=None, interval_s=3600, soft_limit=1000
    )
    await pipeline.submit(lambda: acked.append(1), 1, [failed])
    with pytest.raises(RuntimeError):
        await pipeline.drain()
    assert acked == [] and [str(e) for e in app.crashed] == ["not durable"]
