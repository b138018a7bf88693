"""A run tree and everything the log says about it; consumer groups' positions. [adapter]

:func:`load_runs` reads the actions topic once (record heads first, so only the events it
keeps are decoded) and collects a run with every run started inside it, the events about
the same records (rollback's inverse writes and steps, later writes by others), and the
control commands and signals about them. :func:`consumer_group_offsets` asks the admin API
which consumer groups have read how far. The incident report's material comes from here
too: every control record (:func:`read_control`, checked by :func:`valid_freezes` the way
guards check them), every signal, and the runs that cited or blocked events belong to.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from backout.infra.broker import kafka_config
from backout.infra.forensics import LogScanner, Position, message_position, paused_gc, read_head
from backout.infra.settings import Settings
from backout.producers.control import fold as fold_control
from backout.producers.freezes import ControlRecord, Verdict
from backout.projections.fold import LABEL_PLAN
from backout.schemas.errors import ConfigError, DecodeError
from backout.schemas.events import ActionEvent, ControlAction, ControlCommand, Origin, Signal
from backout.schemas.registry import Codec

__all__ = [
    "GroupOffsets",
    "Located",
    "Related",
    "RunLog",
    "consumer_group_offsets",
    "load_runs",
    "read_control",
    "read_signals",
    "runs_of",
    "valid_freezes",
]

Related = Literal["all", "rollback"]
_ROLLBACK_LABEL = LABEL_PLAN.encode()  # every event the rollback executor journals has it


class Located(NamedTuple):
    """A decoded ActionEvent and where it lives."""

    position: Position
    event: ActionEvent


@dataclass
class RunLog:
    """A run tree as the log holds it.

    Attributes:
        roots: the runs asked for.
        runs: the roots and every run started inside them, transitively.
        events: the runs' own events, ordered by time.
        related: other events about the same records or runs: rollback's inverse writes and
            steps, later writes by others (for blast radius and "what is still exposed").
        commands: control commands that blocked the runs' calls or name their runs,
            agents or identities, with their positions.
        signals: detector findings that name the runs or agents or cite their events.
        scanned: records read.
    """

    roots: tuple[str, ...]
    runs: set[str] = field(default_factory=set)
    events: list[Located] = field(default_factory=list)
    related: list[Located] = field(default_factory=list)
    commands: list[tuple[Position, ControlCommand]] = field(default_factory=list)
    signals: list[tuple[Position, Signal]] = field(default_factory=list)
    scanned: int = 0
    seconds: float = 0.0


class _RunCollector:
    """One pass over the actions topic collecting a run tree and related events.

    Related events are found by key: rollback's inverse writes and steps, and later writes
    by others, are about the records the tree wrote, so they carry the same key (and sit
    later on the same partition).
    """

    def __init__(self, roots: Iterable[str], codec: Codec, *, related: Related) -> None:
        self.codec = codec
        self.only_rollback = related == "rollback"
        self.runs: set[str] = set(roots)
        self.keys: set[bytes] = set()
        self.taken: dict[tuple[int, int], Located] = {}
        self.related: dict[tuple[int, int], Located] = {}
        self.pending: dict[str, str] = {}
        """Runs with a parent not (yet) known to be in the tree: run -> parent."""
        self.pending_at: dict[str, dict[int, int]] = {}
        """Where those runs' events start: run -> partition -> first offset."""

    def add_run(self, run_id: str) -> None:
        self.runs.add(run_id)

    def feed(self, msg: Any) -> None:
        raw = msg.value() or b""
        head = read_head(raw)
        if head is None or head.run_id is None:
            self._full(msg, raw)
            return
        if head.run_id in self.runs:
            self._take(msg, raw)
        elif head.parent_run_id is not None and head.parent_run_id in self.runs:
            self.add_run(head.run_id)
            self._take(msg, raw)
        elif msg.key() in self.keys:
            self._relate(msg, raw)
        elif head.parent_run_id is not None:
            self._defer(msg, head.run_id, head.parent_run_id)

    def _decode(self, raw: bytes) -> ActionEvent | None:
        try:
            record = self.codec.decode(raw)
        except DecodeError:
            return None
        return record if isinstance(record, ActionEvent) else None

    def _full(self, msg: Any, raw: bytes) -> None:
        event = self._decode(raw)
        if event is None:
            return
        if event.run_id in self.runs or event.parent_run_id in self.runs:
            self.add_run(event.run_id)
            self._keep(msg, event, self.taken)
        elif msg.key() in self.keys and (not self.only_rollback or event.origin is Origin.ROLLBACK):
            self._keep(msg, event, self.related)
        elif event.parent_run_id is not None:
            self._defer(msg, event.run_id, event.parent_run_id)

    def _take(self, msg: Any, raw: bytes) -> None:
        event = self._decode(raw)
        if event is not None:
            self._keep(msg, event, self.taken)

    def _relate(self, msg: Any, raw: bytes) -> None:
        if self.only_rollback and _ROLLBACK_LABEL not in raw:
            return  # another writer's event: not needed, not decoded
        event = self._decode(raw)
        if event is not None and (not self.only_rollback or event.origin is Origin.ROLLBACK):
            self._keep(msg, event, self.related)

    def _keep(self, msg: Any, event: ActionEvent, into: dict[tuple[int, int], Located]) -> None:
        position = message_position(msg)
        into[(position.partition, position.offset)] = Located(position, event)
        if into is self.taken and event.target is not None:
            self.keys.add(event.key.encode())

    def _defer(self, msg: Any, run_id: str, parent: str) -> None:
        self.pending[run_id] = parent
        starts = self.pending_at.setdefault(run_id, {})
        partition, offset = msg.partition(), msg.offset()
        if offset < starts.get(partition, offset + 1):
            starts[partition] = offset

    def resolve(self) -> dict[int, int]:
        """Adopt deferred runs whose ancestry reaches the tree; where to re-read from."""
        rescan: dict[int, int] = {}
        changed = True
        while changed:
            changed = False
            for run_id, parent in list(self.pending.items()):
                if parent in self.runs:
                    self.add_run(run_id)
                    del self.pending[run_id]
                    changed = True
                    for p, off in self.pending_at.pop(run_id, {}).items():
                        rescan[p] = min(off, rescan.get(p, off))
        return rescan


def load_runs(
    scanner: LogScanner,
    codec: Codec,
    roots: Iterable[str],
    *,
    since: datetime | None = None,
    with_control: bool = True,
    related: Related = "all",
) -> RunLog:
    """Collect run trees from the actions topic, and the commands and signals about them.

    Args:
        roots: run ids; each with every run started inside it.
        since: ignore records appended before this time (faster on a long log).
        with_control: also read the control and signals topics.
        related: ``all`` other events on the runs' records, or only ``rollback``'s (inverse
            writes and steps, recognised by their ``rollback.*`` labels before decoding).
    """
    with paused_gc():
        return _load_runs(
            scanner, codec, tuple(roots), since=since, with_control=with_control, related=related
        )


def _load_runs(
    scanner: LogScanner,
    codec: Codec,
    roots: tuple[str, ...],
    *,
    since: datetime | None,
    with_control: bool,
    related: Related,
) -> RunLog:
    started = time.perf_counter()
    settings = scanner.settings
    topic = settings.topic("actions")
    collector = _RunCollector(roots, codec, related=related)
    before = scanner.scanned
    ranges = scanner.ranges(topic, since=since)
    for batch in scanner.scan(topic, ranges=ranges):
        for msg in batch:
            collector.feed(msg)
    rescan = collector.resolve()
    if rescan:  # child runs whose events came before we knew their parent was ours
        again: dict[int, tuple[int, int | None]] = {
            p: (off, None) for p, off in rescan.items() if p in ranges
        }
        for batch in scanner.scan(topic, ranges=again):
            for msg in batch:
                if (msg.partition(), msg.offset()) not in collector.taken:
                    collector.related.pop((msg.partition(), msg.offset()), None)
                    collector.feed(msg)
    events = sorted(
        collector.taken.values(), key=lambda e: (e.event.occurred_at, e.position.offset)
    )
    ids = {e.event.event_id for e in events}
    others = [
        r
        for r in sorted(collector.related.values(), key=lambda e: e.event.occurred_at)
        if (r.position.partition, r.position.offset) not in collector.taken
        and _is_related(r.event, collector.runs, ids, collector.keys)
    ]
    log = RunLog(tuple(roots), set(collector.runs), events, others)
    if with_control and events:
        _attach_control(scanner, codec, log)
    log.scanned = scanner.scanned - before
    log.seconds = time.perf_counter() - started
    return log


def _is_related(event: ActionEvent, runs: set[str], ids: set[str], keys: set[bytes]) -> bool:
    if event.target is not None and event.key.encode() in keys:
        return True
    if event.compensates is not None and event.compensates in ids:
        return True
    return any(v in runs or v in ids for v in event.labels.values()) or any(
        part in ids for v in event.labels.values() for part in v.split()
    )


def _attach_control(scanner: LogScanner, codec: Codec, log: RunLog) -> None:
    settings = scanner.settings
    blocked = {e.event.blocked_by for e in log.events if e.event.blocked_by}
    names = {n.encode() for n in log.runs}
    names |= {e.event.agent_id.encode() for e in log.events}
    names |= {e.event.identity.encode() for e in log.events}
    ids = {e.event.event_id for e in log.events}
    texts = {n.decode() for n in names}
    for batch in scanner.scan(settings.topic("control")):
        for msg in batch:
            raw = msg.value() or b""
            head = read_head(raw)
            if (
                head is not None
                and head.record_id not in blocked
                and not any(n in raw for n in names)
            ):
                continue
            try:
                command = codec.decode(raw, ControlCommand)
            except DecodeError:
                continue
            if command.command_id in blocked or set(command.scope.values()) & texts:
                log.commands.append((message_position(msg), command))
    for batch in scanner.scan(settings.topic("signals")):
        for msg in batch:
            raw = msg.value() or b""
            if read_head(raw) is not None and not any(n in raw for n in names):
                continue
            try:
                signal = codec.decode(raw, Signal)
            except DecodeError:
                continue
            cited = any(e.event_id in ids for e in signal.evidence)
            named = bool(set(signal.scope.values()) & texts)
            if cited or named:
                log.signals.append((message_position(msg), signal))


# --- downstream consumer groups ----------------------------------------------------------------
@dataclass(frozen=True)
class GroupOffsets:
    """A consumer group's committed offsets on one topic."""

    group: str
    offsets: dict[int, int]
    """Partition -> committed offset (the next record the group will read)."""
    state: str = "unknown"


def consumer_group_offsets(
    settings: Settings, bootstrap: str, topic: str, *, timeout: float = 10.0
) -> list[GroupOffsets]:
    """Every consumer group with committed offsets on ``topic`` (Kafka admin API).

    Raises:
        ConfigError: the broker does not answer the admin requests.
    """
    admin = AdminClient(kafka_config(settings, bootstrap))
    try:
        listed = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
        groups = sorted(g.group_id for g in listed.valid)
        states = {g.group_id: str(getattr(g.state, "name", g.state)).lower() for g in listed.valid}
        meta = admin.list_topics(topic, timeout=timeout).topics.get(topic)
        parts = sorted(meta.partitions) if meta is not None and meta.error is None else []
        out = []
        for group in groups:
            request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in parts])
            futures = admin.list_consumer_group_offsets([request], request_timeout=timeout)
            result = futures[group].result(timeout)
            offsets = {
                tp.partition: int(tp.offset)
                for tp in result.topic_partitions
                if tp.topic == topic and tp.offset >= 0 and tp.error is None
            }
            if offsets:
                out.append(GroupOffsets(group, offsets, states.get(group, "unknown")))
        return out
    except KafkaException as exc:
        raise ConfigError(f"cannot list consumer groups: {exc.args[0].str()}") from exc


# --- incident material: control commands, signals, cited events -----------------------------
def read_control(scanner: LogScanner, codec: Codec) -> list[ControlRecord]:
    """Every record of the control topic, decoded or not, with when it was appended."""
    topic = scanner.settings.topic("control")
    records = []
    for batch in scanner.scan(topic):
        for msg in batch:
            _, ts = msg.timestamp()
            at = datetime.fromtimestamp(ts / 1000, UTC) if ts > 0 else datetime.now(UTC)
            try:
                command = codec.decode(msg.value() or b"", ControlCommand)
            except DecodeError as exc:
                records.append(
                    ControlRecord(topic, msg.partition(), msg.offset(), at, None, exc.reason)
                )
                continue
            records.append(ControlRecord(topic, msg.partition(), msg.offset(), at, command))
    return records


def valid_freezes(
    settings: Settings, records: list[ControlRecord], notes: list[str]
) -> tuple[list[ControlCommand], dict[str, datetime]]:
    """Freeze commands guards would have applied, and when each was appended."""
    appended = {r.command.command_id: r.at for r in records if r.command is not None}
    if not settings.trusted_keys:
        notes.append("signatures not checked: BACKOUT_TRUSTED_KEYS is not set here")
        return [
            r.command
            for r in records
            if r.command is not None and r.command.action is ControlAction.FREEZE
        ], appended
    _, outcomes = fold_control(
        records, settings.trusted_keys, max_age=timedelta(seconds=settings.control_max_age_s)
    )
    valid = []
    for outcome in outcomes:
        command = outcome.command
        if command is None or command.action is not ControlAction.FREEZE:
            continue
        if outcome.verdict in (Verdict.APPLIED, Verdict.DEFERRED):
            valid.append(command)
        else:
            notes.append(
                f"ignored {outcome.verdict.value} freeze {command.command_id} "
                f"at {outcome.position}: {outcome.reason}"
            )
    return valid, appended


def read_signals(scanner: LogScanner, codec: Codec) -> list[Signal]:
    """Every decodable Signal on the signals topic."""
    out = []
    for batch in scanner.scan(scanner.settings.topic("signals")):
        for msg in batch:
            try:
                out.append(codec.decode(msg.value() or b"", Signal))
            except DecodeError:
                continue
    return out


def runs_of(
    scanner: LogScanner, codec: Codec, event_ids: Iterable[str], freeze_ids: Iterable[str]
) -> list[str]:
    """Runs of the cited events and of the calls the freezes blocked (one pass)."""
    ids, needles = set(event_ids), [f.encode() for f in freeze_ids]
    runs: list[str] = []
    for batch in scanner.scan(scanner.settings.topic("actions")):
        for msg in batch:
            raw = msg.value() or b""
            head = read_head(raw)
            cited = head is None or head.record_id in ids
            if not cited and not any(n in raw for n in needles):
                continue
            try:
                event = codec.decode(raw, ActionEvent)
            except DecodeError:
                continue
            if event.event_id in ids or (event.blocked_by and event.blocked_by.encode() in needles):
                runs.append(event.run_id)
    return list(dict.fromkeys(runs))
