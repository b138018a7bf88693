"""The command ids already on the control topic, so a restarted worker does not resend
them. [adapter]

Command ids derive from findings, so after a crash a worker that reprocesses records
recomputes the same commands. Guards would ignore a resent command (its id is taken)
but count it as a replay; reading the control topic first and skipping ids already on
it keeps the topic free of such duplicates. The ledger reads the topic to its end at
start, then follows it in a background thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from backout.infra.broker import kafka_config
from backout.infra.settings import Settings
from backout.schemas.errors import BackoutError, ConfigError
from backout.schemas.events import ControlCommand
from backout.schemas.registry import make_codec

log = logging.getLogger("backout.processors.ledger")


class ControlLedger:
    """Which command ids the control topic holds.

    Args:
        settings: topic names, codec, client options.
        bootstrap: the broker.
    """

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self._topic = settings.topic("control")
        self._codec = make_codec(settings.schema_registry_url)
        self._consumer = Consumer(
            kafka_config(
                settings,
                bootstrap,
                **{
                    "group.id": f"backout-processors-ledger-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": 10,
                    "enable.partition.eof": True,
                },
            )
        )
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ControlLedger:
        """Read the control topic to its end, then follow it in the background.

        The end is where the broker reports end-of-partition while reading and then a poll
        comes back empty, not the listed high watermark (which some Kafka-compatible
        brokers report wrongly).

        Raises:
            ConfigError: the control topic is missing or unreadable.
        """
        try:
            meta = self._consumer.list_topics(self._topic, timeout=timeout)
            topic = meta.topics.get(self._topic)
            if topic is None or topic.error is not None or not topic.partitions:
                raise ConfigError(f"no control topic {self._topic!r}: run `backout topics ensure`")
            partitions = sorted(topic.partitions)
            self._consumer.assign(
                [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions]
            )
            self._catch_up(set(partitions), timeout)
        except KafkaException as exc:
            raise ConfigError(f"cannot read the control topic {self._topic!r}: {exc}") from exc
        self._thread = threading.Thread(target=self._follow, name="control-ledger", daemon=True)
        self._thread.start()
        return self

    def _catch_up(self, partitions: set[int], timeout: float) -> None:
        # Past end-of-partition, drain until a poll comes back empty: the embedded Tansu
        # reports the base offset of the last batch as the end, so the rest of that batch
        # comes after the end-of-partition event.
        deadline = time.monotonic() + timeout
        while True:
            messages = self._consumer.consume(1000, 0.2)
            if not messages and not partitions:
                return
            for message in messages:
                error = message.error()
                if error is None:
                    self._remember(message.value())
                elif error.code() == KafkaError._PARTITION_EOF:
                    partitions.discard(message.partition())
            if time.monotonic() > deadline:
                if partitions:
                    raise ConfigError(f"timed out reading the control topic {self._topic!r}")
                return  # commands keep coming: the background thread follows them

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self._consumer.consume(500, 0.1)
            except (KafkaException, RuntimeError) as exc:  # closed under us, or broker gone
                if self._stop.is_set():
                    return
                log.warning("control ledger read failed: %s", exc)
                continue
            for message in messages:
                if message.error() is None:
                    self._remember(message.value())

    def _remember(self, raw: bytes | None) -> None:
        if raw is None:
            return
        try:
            command = self._codec.decode(raw, ControlCommand)
        except BackoutError:
            return
        with self._lock:
            self._ids.add(command.command_id)

    def holds(self, command_id: str) -> bool:
        """True when the control topic already has a command with this id."""
        with self._lock:
            return command_id in self._ids

    def add(self, command_id: str) -> None:
        """Record an id this worker just published."""
        with self._lock:
            self._ids.add(command_id)

    def close(self) -> None:
        """Stop following and close the consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._consumer.close()
