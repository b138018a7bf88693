"""The projector: the actions topic folded into the SQL projection. [adapter]

It assigns itself the partitions of the actions topic (no consumer group to join) and
seeks each to the offset after the one its store last applied, so positions live in the
projection's own transaction and a restart resumes exactly; Kafka offset commits are
never needed. Records are read in batches (``consume(num_messages=...)``) and applied one
batch per transaction. A record that cannot be decoded goes to the dead-letter topic with
the reason in its headers, and the projector keeps going.

Decoding is CPU-bound Python, so ``workers=N`` splits the partitions over N processes,
each with its own consumer and store connection (a record's events share a partition, so
each record is folded by one process; rows shared between partitions, such as runs, are
read under the write lock).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from backout.infra.broker import kafka_config
from backout.infra.kafkaio import offset_of, partition_of, position_of, value_of
from backout.infra.settings import Settings
from backout.producers.sink import EventSink
from backout.projections.reader import ActionReader
from backout.projections.store import Positioned, SqlProjectionStore, paused_gc
from backout.schemas.errors import ConfigError, DecodeError, ProjectionError
from backout.schemas.registry import Codec, make_codec

__all__ = ["DLQ_CONSUMER", "DLQ_FROM", "DLQ_REASON", "Projector", "ProjectorStats"]

DLQ_REASON = "backout-dlq-reason"
"""Dead-letter header: why the record could not be projected."""
DLQ_FROM = "backout-dlq-from"
"""Dead-letter header: ``topic/partition@offset`` the record was read at."""
DLQ_CONSUMER = "backout-dlq-consumer"
"""Dead-letter header: which consumer gave up on it."""


@dataclass
class ProjectorStats:
    """What the projector did since it started (or in one ``catch_up``)."""

    events: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def records(self) -> int:
        """Records read (events, duplicates and dead letters)."""
        return self.events + self.duplicates + self.dead_lettered

    @property
    def rate(self) -> float:
        """Records per second."""
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: ProjectorStats) -> None:
        """Add another worker's counts (not its seconds)."""
        self.events += other.events
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.batches += other.batches


class Projector:
    """Consumes the actions topic into a :class:`SqlProjectionStore`.

    Args:
        settings: topic names, librdkafka pass-through options.
        bootstrap: the broker.
        store: where the projection lives (its ``consumer`` name keys the positions).
        dlq: where undecodable records go (a KafkaEventSink on the same broker by default).
        codec: record decoding; from settings when omitted.
        batch_size: records per transaction at most.
        partitions: only these partitions of the actions topic (default: all).
        workers: processes to split the partitions over (needs a store made from a URL
            of a file or server database).
        config: extra librdkafka consumer options.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        store: SqlProjectionStore,
        dlq: EventSink | None = None,
        codec: Codec | None = None,
        batch_size: int = 20_000,
        partitions: Sequence[int] | None = None,
        workers: int = 1,
        config: dict[str, Any] | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError("workers must be at least 1")
        self.settings = settings
        self.store = store
        self.topic = settings.topic("actions")
        self.dlq_topic = settings.topic("dlq")
        self.codec = codec or make_codec(settings.schema_registry_url)
        self._reader = ActionReader(self.codec)
        self.batch_size = batch_size
        self.workers = workers
        self._only = sorted(partitions) if partitions is not None else None
        self._bootstrap = bootstrap
        self._config = dict(config or {})
        self._dlq = dlq
        self._owns_dlq = dlq is None
        self._consumer: Consumer | None = None
        self._positions: dict[int, int] = {}
        self.stats = ProjectorStats()

    # --- lifecycle --------------------------------------------------------------------------
    def _new_consumer(self) -> Consumer:
        return Consumer(
            kafka_config(
                self.settings,
                self._bootstrap,
                **{
                    "group.id": f"backout-projector-{self.store.consumer}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "enable.partition.eof": False,
                    "fetch.wait.max.ms": 10,
                    "fetch.min.bytes": 1,
                    "queued.max.messages.kbytes": 262144,
                    "max.partition.fetch.bytes": 16777216,
                    **self._config,
                },
            )
        )

    def start(self) -> dict[int, int]:
        """Create the tables if needed and assign the partitions at their stored positions.

        Returns:
            The last applied offset per partition (-1: nothing yet).
        """
        self.store.create()
        if self._consumer is None:
            self._consumer = self._new_consumer()
        stored = self.store.positions(self.topic)
        partitions = self._partitions(self._consumer)
        self._positions = {p: stored.get(p, -1) for p in partitions}
        self._consumer.assign(
            [
                TopicPartition(self.topic, p, o + 1 if o >= 0 else OFFSET_BEGINNING)
                for p, o in sorted(self._positions.items())
            ]
        )
        return dict(self._positions)

    def close(self) -> None:
        """Leave the topic and flush the dead-letter sink."""
        try:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
        finally:
            if self._owns_dlq and self._dlq is not None:
                self._dlq.close()
                self._dlq = None

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _partitions(self, consumer: Consumer) -> list[int]:
        try:
            meta = consumer.list_topics(self.topic, timeout=10)
        except KafkaException as exc:
            raise ProjectionError(f"cannot read metadata of {self.topic!r}: {exc}") from exc
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ProjectionError(
                f"topic {self.topic!r} does not exist (run `backout topics ensure`)"
            )
        found = sorted(topic.partitions)
        if self._only is None:
            return found
        missing = sorted(set(self._only) - set(found))
        if missing:
            raise ProjectionError(f"topic {self.topic!r} has no partition {missing[0]}")
        return list(self._only)

    # --- reading ----------------------------------------------------------------------------
    def high_watermarks(self) -> dict[int, int]:
        """The end of each assigned partition right now (the next offset to be written)."""
        consumer = self._require_consumer()
        ends = {}
        for p in self._positions:
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=10, cached=False
                )
            except KafkaException as exc:
                raise ProjectionError(f"cannot read the end of {self.topic}/{p}: {exc}") from exc
            ends[p] = int(high)
        return ends

    def catch_up(self, *, timeout: float = 120.0) -> ProjectorStats:
        """Project everything up to the end of the log as it is now, then return.

        The end is the high watermark when it starts, raised by what fetches report (some
        brokers answer ListOffsets with the last batch's base offset): it returns once
        every partition passed its end and a poll came back empty (a short poll once the
        end is reached).

        Raises:
            ProjectionError: the end was not reached within ``timeout`` seconds.
        """
        if self.workers > 1:
            return self._parallel("catch_up", timeout=timeout)
        if self._consumer is None:
            self.start()
        ends = self.high_watermarks()
        stats = ProjectorStats()
        started = time.monotonic()
        reached = False
        while True:
            # Once at the end, one short empty poll confirms nothing more has arrived.
            read = self.poll(stats, timeout=0.05 if reached else 0.2)
            ends = self._raise_ends(ends)
            reached = self._reached(ends)
            if read == 0 and reached:
                break
            if time.monotonic() - started > timeout:
                behind = {
                    p: end - 1 - self._positions[p]
                    for p, end in ends.items()
                    if self._positions[p] < end - 1
                }
                raise ProjectionError(
                    f"the projection did not reach the end of {self.topic} in {timeout}s "
                    f"(records behind per partition: {behind})"
                )
        stats.seconds = time.monotonic() - started
        return stats

    def _raise_ends(self, ends: dict[int, int]) -> dict[int, int]:
        consumer = self._require_consumer()
        out = {}
        for p, end in ends.items():
            try:
                _, cached = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), cached=True
                )
            except KafkaException:
                cached = None
            out[p] = max(end, cached or 0)
        return out

    def _reached(self, ends: dict[int, int]) -> bool:
        behind = [p for p, end in ends.items() if self._positions[p] < end - 1]
        if not behind:
            return True
        # Offsets may have gaps (transaction markers): trust the fetch position too.
        try:
            fetched = self._require_consumer().position(
                [TopicPartition(self.topic, p) for p in behind]
            )
        except KafkaException:
            return False
        return all(tp.offset >= ends[tp.partition] for tp in fetched)

    def run_forever(
        self,
        stop: threading.Event | Any | None = None,
        *,
        on_batch: Callable[[ProjectorStats], None] | None = None,
    ) -> ProjectorStats:
        """Project new records as they arrive until ``stop`` is set."""
        if self.workers > 1:
            return self._parallel("forever", stop=stop)
        if self._consumer is None:
            self.start()
        stop = stop or threading.Event()
        stats = ProjectorStats()
        started = time.monotonic()
        while not stop.is_set():
            if self.poll(stats, timeout=0.5) and on_batch is not None:
                stats.seconds = time.monotonic() - started
                on_batch(stats)
        stats.seconds = time.monotonic() - started
        return stats

    def poll(self, stats: ProjectorStats | None = None, *, timeout: float = 0.5) -> int:
        """Read one batch and apply it; returns the number of records handled."""
        consumer = self._require_consumer()
        try:
            messages = consumer.consume(num_messages=self.batch_size, timeout=timeout)
        except KafkaException as exc:
            raise ProjectionError(f"cannot read {self.topic!r}: {exc}") from exc
        if not messages:
            return 0
        with paused_gc():
            count = self._apply(messages, stats)
            # Free the batch before the collector runs again: it would scan it for nothing.
            del messages
        return count

    def _apply(self, messages: list[Any], stats: ProjectorStats | None) -> int:
        batch: list[Positioned] = []
        marks: dict[tuple[str, int], int] = {}
        dead = 0
        decode = self._reader
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise ProjectionError(f"cannot read {self.topic!r}: {error.str()}")
            partition, offset, raw = partition_of(msg), offset_of(msg), value_of(msg)
            try:
                event = decode(raw)
            except DecodeError as exc:
                self._dead_letter(msg, exc.reason)
                marks[(self.topic, partition)] = offset
                dead += 1
                continue
            batch.append(Positioned(event, raw, self.topic, partition, offset))
        result = self.store.apply(batch, marks)
        for (_, partition), offset in result.positions.items():
            self._positions[partition] = max(self._positions.get(partition, -1), offset)
        for target in (stats, self.stats):
            if target is not None:
                target.events += result.applied
                target.duplicates += result.duplicates
                target.dead_lettered += dead
                target.batches += 1
        return len(messages)

    def _require_consumer(self) -> Consumer:
        if self._consumer is None:
            raise ProjectionError("the projector is not started")
        return self._consumer

    def _dead_letter(self, msg: Any, reason: str) -> None:
        if self._dlq is None:
            from backout.producers.kafka import KafkaEventSink

            self._dlq = KafkaEventSink(self.settings, self._bootstrap)
        self._dlq.publish(
            self.dlq_topic,
            msg.key(),
            value_of(msg),
            headers=[
                *(msg.headers() or []),
                (DLQ_REASON, reason.encode()),
                (DLQ_FROM, position_of(msg).encode()),
                (DLQ_CONSUMER, f"projector:{self.store.consumer}".encode()),
            ],
            confirm=True,
        )

    @property
    def positions(self) -> dict[int, int]:
        """The last applied offset per partition."""
        return dict(self._positions)

    # --- several processes ------------------------------------------------------------------
    def _parallel(
        self, mode: str, *, timeout: float = 120.0, stop: threading.Event | Any | None = None
    ) -> ProjectorStats:
        url = self.store.engine.url
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ConfigError("workers > 1 need a file or server database, not in-memory SQLite")
        self.store.create()
        consumer = self._new_consumer()
        try:
            partitions = self._partitions(consumer)
        finally:
            consumer.close()
        groups = [g for g in (partitions[i :: self.workers] for i in range(self.workers)) if g]
        self.store.engine.dispose()  # children open their own connections
        ctx = multiprocessing.get_context("fork")
        results: Any = ctx.Queue()
        halt = ctx.Event()
        args = (
            self.settings,
            self._bootstrap,
            url.render_as_string(hide_password=False),
            self.store.consumer,
            self.batch_size,
            self._config,
            mode,
            timeout,
            halt,
            results,
        )
        children = [
            ctx.Process(target=_worker, args=(group, *args), daemon=True) for group in groups
        ]
        started = time.monotonic()
        for child in children:
            child.start()
        watcher = None
        if stop is not None:
            watcher = threading.Thread(target=_relay, args=(stop, halt, children), daemon=True)
            watcher.start()
        total, errors = ProjectorStats(), []
        try:
            for _ in children:
                outcome = results.get()
                if isinstance(outcome, str):
                    errors.append(outcome)
                    halt.set()
                else:
                    total.add(outcome)
        finally:
            halt.set()
            for child in children:
                child.join(timeout=30)
        total.seconds = time.monotonic() - started
        self.stats.add(total)
        if errors:
            raise ProjectionError(f"a projector worker failed: {errors[0]}")
        return total


def _relay(stop: Any, halt: Any, children: list[Any]) -> None:
    while not stop.is_set() and any(c.is_alive() for c in children):
        stop.wait(0.2)
    halt.set()


def _worker(
    partitions: list[int],
    settings: Settings,
    bootstrap: str,
    url: str,
    consumer: str,
    batch_size: int,
    config: dict[str, Any],
    mode: str,
    timeout: float,
    halt: Any,
    results: Any,
) -> None:
    """One projector process over some partitions (runs in a child process)."""
    try:
        store = SqlProjectionStore(url, consumer=consumer)
        with Projector(
            settings,
            bootstrap,
            store=store,
            batch_size=batch_size,
            partitions=partitions,
            config=config,
        ) as projector:
            projector.start()
            stats = (
                projector.catch_up(timeout=timeout)
                if mode == "catch_up"
                else projector.run_forever(halt)
            )
        results.put(stats)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: a stop, not a failure
        results.put(ProjectorStats())
    except BaseException as exc:  # report every failure to the parent, then exit
        results.put(f"{type(exc).__name__}: {exc}")
