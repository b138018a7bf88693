"""Finding a run's finished calls on the log, so a resumed run does not repeat side effects.

What is completed is known from the actions topic, not from the agent's memory, so it
survives the loss of the agent's machine.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

from confluent_kafka import Consumer, TopicPartition

from backout.infra.broker import kafka_config
from backout.infra.kafkaio import offset_of, partition_of, value_of
from backout.infra.settings import Settings
from backout.producers.sink import InMemoryEventSink
from backout.schemas.errors import DecodeError
from backout.schemas.events import ActionEvent, CallStatus, EventKind
from backout.schemas.registry import Codec


class CompletedCalls(Protocol):
    """Looks up a run's succeeded tool calls by idempotency key."""

    def load(self, run_id: str) -> dict[str, ActionEvent]: ...


def _index(events: list[ActionEvent], run_id: str) -> dict[str, ActionEvent]:
    done: dict[str, ActionEvent] = {}
    for event in events:
        if (
            event.run_id == run_id
            and event.kind is EventKind.TOOL_CALL
            and event.status is CallStatus.SUCCEEDED
        ):
            done[event.idempotency_key] = event
    return done


class SinkCompletedCalls:
    """Reads an InMemoryEventSink: the fake for unit tests."""

    def __init__(self, sink: InMemoryEventSink, codec: Codec, topic: str) -> None:
        self._sink, self._codec, self._topic = sink, codec, topic

    def load(self, run_id: str) -> dict[str, ActionEvent]:
        events = [self._codec.decode(r.value, ActionEvent) for r in self._sink.on(self._topic)]
        return _index(events, run_id)


class KafkaCompletedCalls:
    """Scans the actions topic (from ``lookback`` ago to its end) for a run's calls. [adapter]

    Args:
        lookback: how far back a resumed run may have started; bounds the scan with
            offsets-for-times so resuming does not read the whole history.
        quiet_s: how long the scan waits for records it expects before giving up.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        codec: Codec,
        *,
        lookback: timedelta = timedelta(days=7),
        quiet_s: float = 5.0,
    ) -> None:
        self._settings, self._bootstrap, self._codec = settings, bootstrap, codec
        self._lookback = lookback
        self._quiet_s = quiet_s

    def load(self, run_id: str) -> dict[str, ActionEvent]:
        topic = self._settings.topic("actions")
        consumer = Consumer(
            kafka_config(
                self._settings,
                self._bootstrap,
                **{
                    "group.id": "backout-resume",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 10,
                },
            )
        )
        try:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            since_ms = int((datetime.now(UTC) - self._lookback).timestamp() * 1000)
            wanted = [TopicPartition(topic, p, since_ms) for p in meta.partitions]
            starts = consumer.offsets_for_times(wanted, timeout=10)
            ends: dict[int, int] = {}
            assign = []
            for tp in starts:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, tp.partition), timeout=10
                )
                # offsets_for_times answers -1 when nothing is newer than the lookback.
                start = max(tp.offset, low) if tp.offset >= 0 else high
                if start < high:
                    ends[tp.partition] = high
                    assign.append(TopicPartition(topic, tp.partition, start))
            events: list[ActionEvent] = []
            if assign:
                consumer.assign(assign)
            quiet_since = time.monotonic()
            while assign:
                batch = consumer.consume(num_messages=1000, timeout=1.0 if ends else 0.2)
                if not batch:
                    # End offsets alone cannot end the scan: a high watermark can lag the last
                    # batch (the embedded Tansu reports a batch's base offset), and transaction
                    # markers at a partition's end are never consumed. Stop when every end was
                    # passed and a poll is empty, or when the log stays silent.
                    if not ends or time.monotonic() - quiet_since > self._quiet_s:
                        break
                    continue
                quiet_since = time.monotonic()
                for msg in batch:
                    if msg.error():
                        continue
                    if offset_of(msg) + 1 >= ends.get(partition_of(msg), 0):
                        ends.pop(partition_of(msg), None)
                    try:
                        events.append(self._codec.decode(value_of(msg), ActionEvent))
                    except DecodeError:
                        continue  # the dead-letter path is the projector's job
            return _index(events, run_id)
        finally:
            consumer.close()
