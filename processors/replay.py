"""Replay: the live detectors over a recorded stream, without side effects. [adapter: reads
files and topics; publishes nothing]

A recording is an Avro object container file of ActionEvents (:func:`write_container`
writes one; any fastavro writer with the ActionEvent schema does) or a range of a
topic. :func:`replay` folds it through the same :class:`~backout.processors.engine.Engine`
as the workers and returns every finding and every command that would have been issued,
each with the event at which it fired. Same input, same output: events of a file are
replayed in file order; events of a topic in ``(occurred_at, partition, offset)`` order.
Supervisor sampling reads live targets, so replay reports which writes would have been
sampled but does not re-check them.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from fastavro import block_reader, reader
from fastavro.schema import to_parsing_canonical_form

from backout.infra.broker import kafka_config
from backout.infra.settings import Settings
from backout.processors.engine import Engine, signal_of
from backout.processors.findings import EventRef, Finding, ScopeState
from backout.processors.policy import Policy
from backout.processors.sampling import samplable, sampled
from backout.schemas import codec
from backout.schemas.avro_fast import write_long
from backout.schemas.errors import ConfigError, DecodeError
from backout.schemas.events import ActionEvent, ControlCommand
from backout.schemas.registry import make_codec

_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A record replay could not read."""

    position: str
    reason: str


@dataclass
class ReplayResult:
    """What a recorded stream leads to."""

    events: int = 0
    findings: list[Finding] = field(default_factory=list)
    commands: list[tuple[ControlCommand, Finding]] = field(default_factory=list)
    """Unsigned commands, each with the finding that caused it."""
    position: dict[str, int] = field(default_factory=dict)
    """Event id -> its index in the replayed order, for the events that fired."""
    undecodable: list[Undecodable] = field(default_factory=list)
    sampled: int = 0
    """Writes supervisor sampling would have re-checked (not re-checked in replay)."""

    def to_json(self) -> dict[str, Any]:
        """A plain, stable JSON form (what ``backout detect --json`` prints)."""
        return {
            "events": self.events,
            "findings": [_finding_json(f, self.position) for f in self.findings],
            "commands": [_command_json(c, f, self.position) for c, f in self.commands],
            "undecodable": [{"position": u.position, "reason": u.reason} for u in self.undecodable],
            "sampled": self.sampled,
        }


def _finding_json(finding: Finding, position: dict[str, int]) -> dict[str, Any]:
    signal = signal_of(finding)
    return {
        "finding_id": finding.finding_id,
        "detector": finding.detector,
        "severity": finding.severity.value,
        "at": finding.at.isoformat(),
        "subject": f"{finding.subject[0]}={finding.subject[1]}",
        "event_id": finding.trigger.event_id,
        "event_index": position.get(finding.trigger.event_id),
        "summary": finding.summary,
        "scope": signal.scope,
        "evidence": [e.event_id for e in signal.evidence],
        "details": signal.details,
    }


def _command_json(
    command: ControlCommand, finding: Finding, position: dict[str, int]
) -> dict[str, Any]:
    return {
        "command_id": command.command_id,
        "action": command.action.value,
        "mode": command.mode.value,
        "scope": command.scope,
        "expires_at": command.expires_at.isoformat() if command.expires_at else None,
        "cause": command.cause,
        "event_id": finding.trigger.event_id,
        "event_index": position.get(finding.trigger.event_id),
        "reason": command.reason,
    }


@dataclass
class FoldedShare:
    """What folding some events found, keyed by each event's index in the whole stream
    (so shares folded apart, one per set of agents, merge into one ordered result)."""

    events: int = 0
    sampled: int = 0
    fired: list[tuple[int, int, Finding]] = field(default_factory=list)
    """(event index, order found, finding)."""
    issued: list[tuple[int, int, ControlCommand, Finding]] = field(default_factory=list)
    """(event index, order issued, command, the finding that caused it)."""


def replay(
    events: Iterable[tuple[ActionEvent, EventRef]],
    policy: Policy,
    *,
    undecodable: Sequence[Undecodable] = (),
) -> ReplayResult:
    """Fold ``events`` (in order) through the detectors and the policy.

    An agent's detectors see only that agent's events, so each agent's events are folded
    on their own, in chunks; findings and commands come back in the order of the events
    that fired them, as if folded one by one.
    """
    indexed = ((i, event, ref) for i, (event, ref) in enumerate(events))
    return merge_shares([fold_share(indexed, policy)], undecodable=undecodable)


def fold_share(
    events: Iterable[tuple[int, ActionEvent, EventRef]], policy: Policy
) -> FoldedShare:
    """Fold ``(index, event, ref)`` items, in index order, through the detectors.

    ``events`` may hold only some agents of a stream (every event of each of them): an
    agent's detectors see nothing of other agents.
    """
    engine = Engine(policy)
    share = policy.supervisor.share
    folded = FoldedShare()
    fired, issued = folded.fired, folded.issued
    agents: dict[str, ScopeState] = {}
    runs: dict[tuple[str, str], ScopeState] = {}
    chunks: dict[str, list[tuple[ActionEvent, EventRef]]] = {}
    indexes: dict[str, list[int]] = {}

    def flush(agent_id: str) -> None:
        chunk, where = chunks.pop(agent_id), indexes.pop(agent_id)
        mine = {
            e.run_id: runs[(agent_id, e.run_id)] for e, _ in chunk if (agent_id, e.run_id) in runs
        }
        step = engine.step(agents.get(agent_id, ScopeState()), mine, chunk)
        agents[agent_id] = step.agent
        for run_id, state in step.runs.items():
            runs[(agent_id, run_id)] = state
        for run_id in step.expired_runs:
            runs.pop((agent_id, run_id), None)
        if not (step.findings or step.commands):
            return
        at = {e.event_id: i for (e, _), i in zip(chunk, where, strict=True)}
        for finding in step.findings:
            fired.append((at[finding.trigger.event_id], len(fired), finding))
        for command, finding in step.commands:
            issued.append((at[finding.trigger.event_id], len(issued), command, finding))

    count = 0
    for index, event, ref in events:
        chunk = chunks.setdefault(event.agent_id, [])
        chunk.append((event, ref))
        indexes.setdefault(event.agent_id, []).append(index)
        count += 1
        if share > 0 and samplable(event) and sampled(event.event_id, share):
            folded.sampled += 1
        if len(chunk) >= _CHUNK:
            flush(event.agent_id)
    for agent_id in list(chunks):
        flush(agent_id)
    folded.events = count
    return folded


def merge_shares(
    shares: Iterable[FoldedShare], *, undecodable: Sequence[Undecodable] = ()
) -> ReplayResult:
    """One result from shares folded apart: findings and commands in event order."""
    result = ReplayResult(undecodable=list(undecodable))
    fired: list[tuple[int, int, Finding]] = []
    issued: list[tuple[int, int, ControlCommand, Finding]] = []
    for share in shares:
        result.events += share.events
        result.sampled += share.sampled
        fired += share.fired
        issued += share.issued
    # an event belongs to one share, so (index, order within its share) is a total order
    fired.sort(key=lambda item: (item[0], item[1]))
    issued.sort(key=lambda item: (item[0], item[1]))
    result.findings = [f for _, _, f in fired]
    result.commands = [(c, f) for _, _, c, f in issued]
    result.position = {f.trigger.event_id: i for i, _, f in fired}
    return result


# --- recordings: Avro container files --------------------------------------------------
def write_container(
    path: str | Path,
    events: Iterable[ActionEvent],
    *,
    compression: str = "null",
    block_records: int = 4096,
) -> int:
    """Write ``events`` to an Avro object container file; returns how many.

    Bodies come from the codec's compiled writer; the file is a standard container (any
    Avro reader, fastavro included, reads it). Same events, same bytes: the sync marker
    derives from the schema.

    Args:
        compression: ``null`` or ``deflate``.
        block_records: records per container block.
    """
    if compression not in ("null", "deflate"):
        raise ConfigError(f"unknown Avro container codec {compression!r}: null or deflate")
    schema = _avsc().encode()
    sync = hashlib.blake2b(schema, digest_size=16).digest()
    header = bytearray(b"Obj\x01")
    write_long(2, header)
    for key, value in ((b"avro.schema", schema), (b"avro.codec", compression.encode())):
        write_long(len(key), header)
        header += key
        write_long(len(value), header)
        header += value
    write_long(0, header)
    header += sync
    count = 0
    with open(path, "wb") as out:
        out.write(header)
        block = bytearray()
        in_block = 0
        for event in events:
            block += codec.encode_body(event)
            in_block += 1
            count += 1
            if in_block >= block_records:
                _write_block(out, block, in_block, compression, sync)
                block, in_block = bytearray(), 0
        if in_block:
            _write_block(out, block, in_block, compression, sync)
    return count


def _write_block(
    out: BinaryIO, data: bytearray, records: int, compression: str, sync: bytes
) -> None:
    payload = bytes(data)
    if compression == "deflate":
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        payload = packer.compress(payload) + packer.flush()
    frame = bytearray()
    write_long(records, frame)
    write_long(len(payload), frame)
    out.write(frame)
    out.write(payload)
    out.write(sync)


@cache
def _avsc() -> str:
    return resources.files("backout.schemas").joinpath("ActionEvent.avsc").read_text("utf-8")


@cache
def _read_from() -> Callable[[bytes, str, int], tuple[ActionEvent, int]]:
    # A container block holds records back to back: read each where the last one ended.
    return cast(Callable[[bytes, str, int], tuple[ActionEvent, int]],
                codec.compiled(ActionEvent).read_from)


def read_container(path: str | Path) -> Iterator[tuple[ActionEvent, EventRef]]:
    """The events of an Avro container file, in file order.

    Files written with the current ActionEvent schema are decoded with the compiled
    reader; older schemas are resolved into the current one by fastavro.

    Raises:
        ConfigError: the file cannot be read or is not a container of ActionEvents.
    """
    path = Path(path)
    try:
        stream: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in finally
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    try:
        yield from _container_events(stream, path)
    except (ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(path)!r} is not an Avro container of ActionEvents: {exc}") from exc
    finally:
        stream.close()


def _container_events(stream: BinaryIO, path: Path) -> Iterator[tuple[ActionEvent, EventRef]]:
    blocks = block_reader(stream)
    written = blocks.writer_schema
    if not isinstance(written, dict) or written.get("name", "").rsplit(".", 1)[-1] != (
        "ActionEvent"
    ):
        raise ValueError("its schema is not an ActionEvent record")
    index = 0
    if to_parsing_canonical_form(written) == codec.current_schema(ActionEvent).canonical:
        read_from = _read_from()
        for block in blocks:
            data = block.bytes_.getvalue()  # type: ignore[attr-defined]  # fastavro Block
            text, pos = data.decode("latin-1"), 0
            for _ in range(block.num_records):
                event, pos = read_from(data, text, pos)
                yield event, EventRef(event.event_id, None, None, index)
                index += 1
        return
    stream.seek(0)
    current = codec.current_schema(ActionEvent).parsed
    for datum in reader(stream, reader_schema=current):
        event = codec.from_datum(ActionEvent, cast(dict[str, Any], datum))
        yield event, EventRef(event.event_id, None, None, index)
        index += 1


# --- recordings: topic ranges -----------------------------------------------------------
def read_topic(
    settings: Settings,
    bootstrap: str,
    topic: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    timeout: float = 15.0,
) -> tuple[list[tuple[ActionEvent, EventRef]], list[Undecodable]]:
    """The ActionEvents of ``topic`` appended from ``since`` up to ``until`` (or its end now).

    Only reads: no consumer group offsets are committed. A partition's end is where the
    broker reports end-of-partition while reading (not its listed high watermark, which
    some Kafka-compatible brokers report wrongly); ``since``/``until`` are checked against
    each record's timestamp. Events come back in ``(occurred_at, partition, offset)`` order.

    Raises:
        ConfigError: the topic does not exist or cannot be read.
    """
    decoder = make_codec(settings.schema_registry_url)
    consumer = Consumer(
        kafka_config(
            settings,
            bootstrap,
            **{
                "group.id": "backout-detect-replay",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10,
                "enable.partition.eof": True,
            },
        )
    )
    since_ms = int(since.timestamp() * 1000) if since is not None else None
    until_ms = int(until.timestamp() * 1000) if until is not None else None
    events: list[tuple[ActionEvent, EventRef]] = []
    bad: list[Undecodable] = []
    try:
        remaining = set(_assign(consumer, topic, since_ms, timeout))
        idle = 0.0
        while remaining:
            batch = consumer.consume(2000, 0.5)
            idle = 0.0 if batch else idle + 0.5
            if idle > timeout:
                raise ConfigError(f"timed out reading {topic!r}")
            for msg in batch:
                p = msg.partition()
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(p)
                        continue
                    raise ConfigError(f"cannot read {topic!r}: {error.str()}")
                if p not in remaining:
                    continue
                stamp = msg.timestamp()[1]
                if since_ms is not None and stamp < since_ms:
                    continue
                if until_ms is not None and stamp > until_ms:
                    remaining.discard(p)
                    continue
                offset = msg.offset()
                try:
                    event = decoder.decode(msg.value() or b"", ActionEvent)
                except DecodeError as exc:
                    bad.append(Undecodable(f"{topic}/{p}@{offset}", exc.reason))
                    continue
                events.append((event, EventRef(event.event_id, topic, p, offset)))
    except KafkaException as exc:
        raise ConfigError(f"cannot read {topic!r}: {exc}") from exc
    finally:
        consumer.close()
    events.sort(key=lambda item: (item[0].occurred_at, item[1].partition, item[1].offset))
    return events, bad


def _assign(consumer: Consumer, topic: str, since_ms: int | None, timeout: float) -> list[int]:
    meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise ConfigError(f"no topic {topic!r}")
    partitions = sorted(meta.partitions)
    starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
    if since_ms is not None:  # a hint only: records before ``since`` are skipped anyway
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in partitions], timeout=timeout
        )
        starts = [
            TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in found
        ]
    consumer.assign(starts)
    return partitions
