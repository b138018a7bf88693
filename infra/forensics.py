"""Reading backout's topics for forensics: by time, decoded and filtered, no side effects. [adapter]

Nothing here joins a consumer group or commits an offset: partitions are assigned
directly, start offsets come from offsets-for-times (``--since``) or the log start, and a
scan ends at each partition's end (partition-EOF events; the embedded broker's high
watermarks cannot be trusted), so it does not wait for new records.

Reading is made cheap before it is made exact: every backout record body starts with its
id and its time, and an ActionEvent's with its run, parent run and agent. :func:`read_head`
reads those few fields straight from the bytes (no model is built), so records that a
filter rejects are never fully decoded. Records in a schema the head reader does not know
(Schema Registry framing, an unknown writer) are simply decoded in full.

Record timestamps (when a record was appended) bound the scan; the filters then use each
record's own time (``occurred_at``, ``issued_at``, ``detected_at``). An event is appended
after it occurred (a tool call is journaled when it returns), so ``--since`` starts at the
first record appended at or after ``since - SINCE_MARGIN`` and ``--until`` reads on to the
records appended up to ``until + UNTIL_MARGIN``. Offsets-for-times answers are checked
against the record they point at (the embedded broker answers 0 for a time after the end).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from backout.infra.broker import kafka_config
from backout.infra.settings import Settings
from backout.schemas.avro_fast import read_long
from backout.schemas.codec import SINGLE_OBJECT_MAGIC, schema_catalog
from backout.schemas.errors import ConfigError, DecodeError
from backout.schemas.events import ActionEvent, ControlCommand, Signal
from backout.schemas.registry import Codec

__all__ = [
    "SINCE_MARGIN",
    "TOPICS",
    "UNTIL_MARGIN",
    "Found",
    "Head",
    "LogScanner",
    "Position",
    "ReplayFilter",
    "ReplayStats",
    "TopicName",
    "message_position",
    "paused_gc",
    "read_head",
    "record_matches",
    "replay",
]

TopicName = Literal["actions", "control", "signals", "quarantine", "dlq"]
TOPICS: tuple[TopicName, ...] = ("actions", "control", "signals", "quarantine", "dlq")

SINCE_MARGIN = timedelta(minutes=1)
"""Clock skew allowed between a producer's clock and the record's timestamp."""
UNTIL_MARGIN = timedelta(hours=1)
"""How long after it occurred an event may have been appended (a long tool call, a
background Journal riding out a broker outage); ``--until`` misses events appended later."""

_HEADER = 10  # 0xC3 0x01 + 8-byte fingerprint
_ACTION_HEAD = ("event_id", "occurred_at", "kind", "run_id", "parent_run_id", "agent_id")

Record = ActionEvent | ControlCommand | Signal


# --- heads: the first fields of a body, without a full decode ---------------------------------
class Head(NamedTuple):
    """A record's id and time, and for an ActionEvent its run, parent run and agent."""

    record_id: str
    at_us: int
    """The record's own time in microseconds since the epoch."""
    run_id: str | None = None
    parent_run_id: str | None = None
    agent_id: str | None = None


def _head_layouts() -> dict[bytes, bool]:
    """Fingerprint -> True (ActionEvent head layout) / False (id + time only)."""
    layouts: dict[bytes, bool] = {}
    for fingerprint, writer in schema_catalog().items():
        fields = writer.parsed.get("fields", [])
        names = tuple(f["name"] for f in fields)
        if len(fields) < 2 or fields[0]["type"] != "string":
            continue
        if writer.record_type is ActionEvent:
            if names[: len(_ACTION_HEAD)] == _ACTION_HEAD:
                layouts[fingerprint] = True
        else:
            layouts[fingerprint] = False
    return layouts


_LAYOUTS = _head_layouts()


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    n = buf[pos]
    if n < 128 and not n & 1:
        pos += 1
        n >>= 1
    else:
        n, pos = read_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise ValueError("bad string length")
    return buf[pos:end].decode("utf-8"), end


def read_head(raw: bytes) -> Head | None:
    """The head of a single-object-encoded backout record; None when it cannot be read
    cheaply (another framing, an unknown schema, corrupt bytes): decode it in full."""
    action = _LAYOUTS.get(raw[2:_HEADER]) if raw[:2] == SINGLE_OBJECT_MAGIC else None
    if action is None:
        return None
    try:
        record_id, pos = _string(raw, _HEADER)
        b = raw[pos]
        if b < 128:
            at_us, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            at_us, pos = read_long(raw, pos)
        if not action:
            return Head(record_id, at_us)
        pos += 1 if raw[pos] < 128 else read_long(raw, pos)[1] - pos  # kind
        run_id, pos = _string(raw, pos)
        tag = raw[pos]
        if tag == 0:
            agent, _ = _string(raw, pos + 1)
            return Head(record_id, at_us, run_id, None, agent)
        if tag != 2:
            return None
        parent, pos = _string(raw, pos + 1)
        agent, _ = _string(raw, pos)
    except (IndexError, ValueError):
        return None
    return Head(record_id, at_us, run_id, parent, agent)


# --- positions and scanning -------------------------------------------------------------------
class Position(NamedTuple):
    """Where a record lives: topic, partition, offset, and its record timestamp."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int = -1

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


def message_position(msg: Any) -> Position:
    """The position of a consumed confluent-kafka message."""
    _, ts = msg.timestamp()
    return Position(msg.topic() or "", msg.partition() or 0, msg.offset() or 0, ts)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class LogScanner:
    """Reads topics from a start (time or offsets) to the ends seen when the scan began.

    Args:
        settings: the topics and pass-through librdkafka options.
        bootstrap: the broker.
        batch_size: messages per consume call.
        idle_timeout: how long to wait for the next message when none has arrived.
        stall_timeout: a scan that makes no progress for this long fails (ConfigError).
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        batch_size: int = 10_000,
        idle_timeout: float = 0.5,
        stall_timeout: float = 30.0,
    ) -> None:
        self.settings = settings
        self._batch = batch_size
        self._idle = idle_timeout
        self._stall = stall_timeout
        self._consumer = Consumer(
            kafka_config(
                settings,
                bootstrap,
                **{
                    "group.id": "backout-forensics",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 10,
                    "queued.min.messages": 200_000,
                    "max.partition.fetch.bytes": 8 * 1024 * 1024,
                },
            )
        )
        self.scanned = 0
        """Messages read by every scan so far."""

    def close(self) -> None:
        """Release the consumer."""
        self._consumer.close()

    def __enter__(self) -> LogScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions.

        Raises:
            ConfigError: the topic does not exist.
        """
        try:
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise ConfigError(f"cannot read {topic!r}: {exc.args[0].str()}") from exc
        if meta is None or meta.error is not None or not meta.partitions:
            raise ConfigError(f"no topic {topic!r} on the broker (run `backout topics ensure`)")
        return sorted(meta.partitions)

    def _offsets_at(self, topic: str, parts: list[int], at: datetime) -> dict[int, int]:
        """First offset appended at or after ``at`` per partition; -1 where there is none.

        Each answer is checked against the record it points at: the embedded broker (Tansu
        0.6) answers offset 0, not -1, for a time after the last record.
        """
        target = _ms(at)
        found = self._consumer.offsets_for_times(
            [TopicPartition(topic, p, target) for p in parts], timeout=10
        )
        offsets = {tp.partition: int(tp.offset) for tp in found}
        probe = {p: (off, off + 1) for p, off in offsets.items() if off >= 0}
        stamps: dict[int, int] = {}
        for batch in self.scan(topic, ranges=probe, count=False):
            for msg in batch:
                stamps[msg.partition()] = msg.timestamp()[1]
        return {
            p: off if off >= 0 and stamps.get(p, -1) >= target else -1 for p, off in offsets.items()
        }

    def ranges(self, topic: str, *, since: datetime | None = None) -> dict[int, tuple[int, None]]:
        """Partition -> (first offset to read, None): from the first record appended at or
        after ``since - SINCE_MARGIN`` (the log start without ``since``) to the end."""
        parts = self.partitions(topic)
        if since is None:  # no need to ask each partition where it starts
            return {p: (OFFSET_BEGINNING, None) for p in parts}
        found = self._offsets_at(topic, parts, since - SINCE_MARGIN)
        return {p: (off, None) for p, off in found.items() if off >= 0}

    def scan(
        self,
        topic: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        ranges: Mapping[int, tuple[int, int | None]] | None = None,
        count: bool = True,
    ) -> Iterator[list[Any]]:
        """Batches of confluent-kafka messages of ``topic``.

        Args:
            since: start at the first record appended at or after ``since - SINCE_MARGIN``.
            until: stop a partition at its first record appended after
                ``until + UNTIL_MARGIN``.
            ranges: partition -> (start, end or None) offsets, instead of ``since``.
            count: add the messages to :attr:`scanned`.

        The end of a partition is found with partition-EOF events, not the high watermark:
        the embedded broker (Tansu 0.6) reports a high watermark that stops at the first
        record of the last batch, which would cut off the rest of that batch.

        Raises:
            ConfigError: the topic is missing, or the broker stops answering mid-scan.
        """
        todo = dict(ranges) if ranges is not None else self.ranges(topic, since=since)
        ends = {p: end for p, (start, end) in todo.items() if end is None or start < end}
        if not ends:
            return
        stop_ms = _ms(until + UNTIL_MARGIN) if until is not None else None
        consumer = self._consumer
        consumer.assign([TopicPartition(topic, p, todo[p][0]) for p in ends])
        last_progress = time.monotonic()
        try:
            while ends:
                try:
                    # Take what has arrived; when nothing has, wait for the next message or
                    # partition-EOF event (poll returns at once then; a batched consume
                    # would sit out its whole timeout).
                    batch = consumer.consume(self._batch, 0)
                    if not batch:
                        msg = consumer.poll(self._idle)
                        batch = [msg] if msg is not None else []
                except KafkaException as exc:
                    raise ConfigError(f"cannot read {topic!r}: {exc.args[0].str()}") from exc
                good = []
                for msg in batch:
                    partition = msg.partition()
                    if partition not in ends:
                        continue
                    end = ends[partition]
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            self._finish(topic, partition, ends)
                        continue
                    offset = msg.offset() or 0
                    if (end is not None and offset >= end) or (
                        stop_ms is not None and msg.timestamp()[1] > stop_ms
                    ):
                        self._finish(topic, partition, ends)
                        continue
                    good.append(msg)
                    if end is not None and offset + 1 >= end:
                        self._finish(topic, partition, ends)
                if good:
                    if count:
                        self.scanned += len(good)
                    last_progress = time.monotonic()
                    yield good
                elif ends and time.monotonic() - last_progress > self._stall:
                    raise ConfigError(
                        f"reading {topic!r} stalled: no records for {self._stall:.0f}s "
                        f"before the end of partition(s) {sorted(ends)}"
                    )
        finally:
            consumer.unassign()

    def _finish(self, topic: str, partition: int, ends: dict[int, int | None]) -> None:
        if partition in ends:
            del ends[partition]
            self._consumer.incremental_unassign([TopicPartition(topic, partition)])


# --- replay: decode and filter ----------------------------------------------------------------
@dataclass(frozen=True)
class ReplayFilter:
    """Which records a replay keeps. All given criteria must hold."""

    run: str | None = None
    """ActionEvents of this run; commands and signals whose scope names it."""
    agent: str | None = None
    """ActionEvents of this agent; commands and signals whose scope names it."""
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ConfigError(f"--{name} must carry a time zone")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ConfigError(
                f"empty time range: --since {self.since.isoformat()} is after "
                f"--until {self.until.isoformat()}"
            )

    @property
    def since_us(self) -> int | None:
        """``since`` in epoch microseconds."""
        return _us(self.since) if self.since is not None else None

    @property
    def until_us(self) -> int | None:
        """``until`` in epoch microseconds."""
        return _us(self.until) if self.until is not None else None

    @property
    def by_scope(self) -> bool:
        """True when the filter names a run or an agent."""
        return self.run is not None or self.agent is not None


def _us(at: datetime) -> int:
    delta = at - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _record_time(record: Record) -> datetime:
    if isinstance(record, ActionEvent):
        return record.occurred_at
    if isinstance(record, ControlCommand):
        return record.issued_at
    return record.detected_at


def record_matches(record: Record, flt: ReplayFilter) -> bool:
    """True when a decoded record passes the filter. Pure."""
    at = _record_time(record)
    if flt.since is not None and at < flt.since:
        return False
    if flt.until is not None and at > flt.until:
        return False
    if isinstance(record, ActionEvent):
        if flt.run is not None and record.run_id != flt.run:
            return False
        return flt.agent is None or record.agent_id == flt.agent
    scope = record.scope
    if flt.run is not None and scope.get("run") != flt.run:
        return False
    return flt.agent is None or scope.get("agent") == flt.agent


def _head_passes(head: Head, flt: ReplayFilter, lo: int | None, hi: int | None) -> bool:
    if lo is not None and head.at_us < lo:
        return False
    if hi is not None and head.at_us > hi:
        return False
    if head.run_id is not None:  # an ActionEvent head: the filter is exact
        if flt.run is not None and head.run_id != flt.run:
            return False
        if flt.agent is not None and head.agent_id != flt.agent:
            return False
    return True


@dataclass
class ReplayStats:
    """What a replay read and kept."""

    scanned: int = 0
    decoded: int = 0
    matched: int = 0
    undecodable: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Records scanned per second."""
        return self.scanned / self.seconds if self.seconds > 0 else 0.0


class Found(NamedTuple):
    """One replayed record, or the reason it could not be decoded."""

    position: Position
    record: Record | None
    error: DecodeError | None = None


def replay(
    scanner: LogScanner,
    codec: Codec,
    topic: str,
    flt: ReplayFilter,
    stats: ReplayStats | None = None,
) -> Iterator[Found]:
    """The records of ``topic`` that pass ``flt``, in partition order, without side effects.

    Undecodable records are counted, and yielded (with the reason) unless the filter names
    a run or an agent (they cannot be attributed to one).
    """
    stats = stats if stats is not None else ReplayStats()
    started = time.perf_counter()
    lo, hi = flt.since_us, flt.until_us
    needles = [v.encode() for v in (flt.run, flt.agent) if v is not None]
    everything = not flt.by_scope and lo is None and hi is None
    decode = codec.decode
    try:
        for batch in scanner.scan(topic, since=flt.since, until=flt.until):
            stats.scanned += len(batch)
            for msg in batch:
                raw = msg.value() or b""
                if not everything:
                    # A record naming the run or agent holds its UTF-8 bytes (Avro strings).
                    if needles and not all(n in raw for n in needles):
                        continue
                    head = read_head(raw)
                    if head is not None and not _head_passes(head, flt, lo, hi):
                        continue
                try:
                    record = decode(raw)
                except DecodeError as exc:
                    stats.undecodable += 1
                    if not flt.by_scope:
                        yield Found(message_position(msg), None, exc.at(str(message_position(msg))))
                    continue
                stats.decoded += 1
                if everything or record_matches(record, flt):
                    stats.matched += 1
                    yield Found(message_position(msg), record)
    finally:
        stats.seconds += time.perf_counter() - started


@contextlib.contextmanager
def paused_gc(*, freeze: bool = False) -> Iterator[None]:
    """Pause the cyclic garbage collector while decoding many records.

    Decoded records hold no reference cycles, but each one is a tracked object: with
    hundreds of thousands alive the collector's passes cost more than the decoding.

    Args:
        freeze: on exit, move every object alive into the permanent generation
            (``gc.freeze``) before re-enabling the collector, so the first collection does
            not walk them all. For command-line entrypoints, whose objects die with them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if freeze:
                gc.freeze()
            gc.enable()
