"""Downstream containment: a consumer wrapper that parks records from frozen scopes. [adapter]

``FreezeAwareConsumer`` wraps a confluent-kafka ``Consumer`` of the actions topic (or a
topic derived from it). Each record's scope (by default: the decoded ActionEvent's tool,
agent, identity, run and its known ancestors, workflow, tenant, environment) is checked
against the local freeze view. A record a freeze covers is parked on the quarantine topic
(original key, value and headers, plus headers naming the freeze, see ``quarantine``)
and is not handed to the service; the broker acknowledges the parked copy before the
wrapper moves on. Child runs of a frozen run are frozen too: the wrapper learns parent
links from the events it sees.

Records it cannot attribute (not an ActionEvent, and no ``scope_of`` given) are handed on
unchanged. While the view is stale (see ``guard``) records of mutating calls are held:
the wrapper seeks back and hands nothing on until the view is fresh again, unless
``fail_open``.

Offsets: with ``manage_offsets=True`` (what ``from_settings`` sets, together with
``enable.auto.offset.store=false``) the wrapper stores the offset of each record it hands
on or has parked, never of a held one, so committed offsets never skip a record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from backout.infra.broker import kafka_config, resolve_bootstrap
from backout.infra.kafkaio import offset_of, partition_of, position_of
from backout.infra.settings import Settings
from backout.producers.freezes import Freeze
from backout.producers.guard import ControlGuard
from backout.producers.ids import new_event_id
from backout.producers.lineage import RunLineage
from backout.producers.quarantine import (
    Headers,
    Marker,
    ParkedRecord,
    journal_event,
    marker_headers,
    parked_headers,
    plan_discard,
    plan_release,
    read_parked,
    released_headers,
)
from backout.producers.scope import CallScope
from backout.producers.sink import EventSink
from backout.schemas.errors import ControlError, DecodeError, PublishError
from backout.schemas.events import ActionEvent, Reversibility
from backout.schemas.registry import Codec, make_codec

log = logging.getLogger("backout.downstream")

ScopeOf = Callable[[Message], CallScope | None]


class _Screen(Enum):
    DELIVER = "deliver"
    PARKED = "parked"
    HELD = "held"


class FreezeSource(Protocol):
    """What the wrapper asks about freezes (a started ControlGuard)."""

    def blocking(self, call: CallScope) -> Freeze | None: ...

    def stale_reason(self) -> str | None: ...


def headers_of(msg: Message) -> Headers:
    """A message's headers as a list of ``(name, bytes)`` (a missing value reads as b"")."""
    raw = msg.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    out: Headers = []
    for name, value in items:
        out.append((name, value.encode() if isinstance(value, str) else (value or b"")))
    return out


def event_scope(event: ActionEvent, lineage: RunLineage) -> CallScope:
    """The call scope of a journaled event; ancestors as far as ``lineage`` knows them."""
    lineage.observe(event.run_id, event.parent_run_id)
    ancestors = lineage.ancestors(event.run_id)
    if event.parent_run_id is not None and event.parent_run_id not in ancestors:
        ancestors = (event.parent_run_id, *ancestors)
    return CallScope(
        event.tool,
        event.agent_id,
        event.identity,
        event.run_id,
        ancestors,
        event.workflow,
        event.tenant,
        event.environment,
        event.reversibility,
    )


class FreezeAwareConsumer:
    """A confluent-kafka Consumer that parks records from frozen scopes.

    Every attribute it does not define (``subscribe``, ``assign``, ``commit``, ...) is the
    wrapped consumer's.

    Args:
        consumer: the service's consumer.
        guard: the freeze view (a started ControlGuard).
        sink: publishes parked records to the quarantine topic.
        settings: topic names and the fail-open switch.
        scope_of: a record's call scope (default: decode an ActionEvent); None hands the
            record on unchecked.
        manage_offsets: store offsets of handed-on and parked records (the consumer must
            have ``enable.auto.offset.store=false``).
        group: the consumer group, recorded on parked records.
        owns: objects closed with the wrapper (the guard and sink ``from_settings`` made).
    """

    def __init__(
        self,
        consumer: Consumer,
        guard: FreezeSource,
        sink: EventSink,
        settings: Settings,
        *,
        scope_of: ScopeOf | None = None,
        manage_offsets: bool = False,
        group: str | None = None,
        codec: Codec | None = None,
        owns: tuple[Any, ...] = (),
    ) -> None:
        self._consumer = consumer
        self._guard = guard
        self._sink = sink
        self._settings = settings
        self._codec = codec or make_codec(settings.schema_registry_url)
        self._scope_of = scope_of or self._event_scope
        self._manage = manage_offsets
        self._group = group
        self._owns = owns
        self._lineage = RunLineage()
        self.quarantine_topic = settings.topic("quarantine")
        self.parked = 0
        """Records parked so far."""
        self.held = 0
        """Times a record was held back because the view was stale."""

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        config: dict[str, Any],
        *,
        topics: list[str] | None = None,
        bootstrap: str | None = None,
        scope_of: ScopeOf | None = None,
    ) -> FreezeAwareConsumer:
        """A wrapper with its own consumer (``config``: librdkafka options, with
        ``group.id``), ControlGuard and quarantine producer; subscribed to ``topics``."""
        from backout.producers.kafka import KafkaEventSink

        bootstrap = bootstrap or resolve_bootstrap(settings)
        consumer = Consumer(
            kafka_config(settings, bootstrap, **{**config, "enable.auto.offset.store": False})
        )
        guard = ControlGuard(settings, bootstrap).start()
        sink = KafkaEventSink(settings, bootstrap)
        wrapper = cls(
            consumer,
            guard,
            sink,
            settings,
            scope_of=scope_of,
            manage_offsets=True,
            group=str(config.get("group.id", "")) or None,
            owns=(guard, sink),
        )
        if topics:
            consumer.subscribe(topics)
        return wrapper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    # --- consuming ---------------------------------------------------------------------------
    def poll(self, timeout: float | None = None) -> Message | None:
        """The next record the service may process (None when none came in ``timeout``).

        Raises:
            PublishError: a record could not be parked; it is redelivered by the next poll.
        """
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self._consumer.poll(remaining)
            if msg is None:
                return None
            screened = _Screen.DELIVER if msg.error() is not None else self._screen(msg)
            if screened is _Screen.DELIVER:
                return msg
            # A parked record makes room for the next one at once; a held one comes back
            # on every poll, so stop at the deadline.
            if screened is _Screen.HELD and deadline is not None and time.monotonic() >= deadline:
                return None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` records the service may process (parked ones left out)."""
        out: list[Message] = []
        held: set[tuple[str | None, int | None]] = set()
        for msg in self._consumer.consume(num_messages, timeout):
            where = (msg.topic(), msg.partition())
            if where in held:
                continue  # already seeked back to an earlier record of this partition
            screened = _Screen.DELIVER if msg.error() is not None else self._screen(msg)
            if screened is _Screen.DELIVER:
                out.append(msg)
            elif screened is _Screen.HELD:
                held.add(where)
        return out

    def _screen(self, msg: Message) -> _Screen:
        """Hand the record on, or park it, or hold it (seek back) while the view is stale."""
        scope = self._scope_of(msg)
        if scope is None:
            self._store(msg)
            return _Screen.DELIVER
        freeze = self._guard.blocking(scope)
        if freeze is not None:
            self._park(msg, freeze, scope)
            return _Screen.PARKED
        if scope.reversibility is not Reversibility.READ_ONLY and not self._settings.fail_open:
            stale = self._guard.stale_reason()
            if stale is not None:
                self._hold(msg, stale)
                return _Screen.HELD
        self._store(msg)
        return _Screen.DELIVER

    def _event_scope(self, msg: Message) -> CallScope | None:
        try:
            event = self._codec.decode(msg.value() or b"", ActionEvent)
        except DecodeError:
            return None
        return event_scope(event, self._lineage)

    def _park(self, msg: Message, freeze: Freeze, scope: CallScope) -> None:
        position = position_of(msg)
        headers = parked_headers(
            headers_of(msg),
            freeze,
            scope,
            topic=msg.topic() or "",
            position=position,
            parked_at=datetime.now(UTC),
            group=self._group,
        )
        try:
            self._sink.publish(
                self.quarantine_topic, msg.key(), msg.value() or b"", headers=headers, confirm=True
            )
        except PublishError:
            self._seek_back(msg)
            raise
        self.parked += 1
        self._store(msg)
        log.info("parked %s (frozen by %s)", position, freeze.command_id)

    def _hold(self, msg: Message, reason: str) -> None:
        self.held += 1
        self._seek_back(msg)
        if self.held == 1 or self.held % 1000 == 0:
            log.warning("holding records: %s", reason)
        time.sleep(0.05)  # the view needs the control topic back; do not spin

    def _seek_back(self, msg: Message) -> None:
        self._consumer.seek(TopicPartition(msg.topic() or "", partition_of(msg), offset_of(msg)))

    def _store(self, msg: Message) -> None:
        if self._manage:
            self._consumer.store_offsets(message=msg)

    def close(self, timeout: float | None = None) -> None:
        """Close the consumer, then what this wrapper owns (guard, producer)."""
        self._consumer.close()
        for owned in self._owns:
            owned.close(timeout)

    def __enter__(self) -> FreezeAwareConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- release and discard (the CLI's `backout release` / `backout discard`) ---------------
@dataclass
class Disposition:
    """What a release or discard did (or would do, on a dry run)."""

    kind: str
    handled: list[ParkedRecord] = field(default_factory=list)
    still_frozen: list[tuple[ParkedRecord, str]] = field(default_factory=list)
    settled_before: int = 0
    event_id: str | None = None
    """The journaled ActionEvent (None on a dry run or when nothing was handled)."""


def scan_topic(
    consumer: Consumer, topic: str, *, since: datetime | None = None, timeout: float = 15.0
) -> Iterator[Message]:
    """The records of ``topic`` from its start (or from ``since``) to its end as of now.

    Raises:
        ControlError: the topic cannot be read in ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        listed: dict[int, int] = {}
        starts: list[TopicPartition] = []
        stamp = int(since.timestamp() * 1000) if since is not None else 0
        wanted = [TopicPartition(topic, p, stamp) for p in meta.partitions]
        found = consumer.offsets_for_times(wanted, timeout=timeout) if since else wanted
        for tp in found:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout, cached=False
            )
            start = low if since is None else (max(tp.offset, low) if tp.offset >= 0 else high)
            listed[tp.partition] = high
            starts.append(TopicPartition(topic, tp.partition, start))
    except (KafkaException, KeyError) as exc:
        raise ControlError(f"cannot read topic {topic!r}: {exc}") from exc
    next_offset = {tp.partition: tp.offset for tp in starts}
    consumer.assign(starts)
    fetched = False  # one fetch first: it learns the true ends (see _end)
    while not fetched or any(next_offset[p] < _end(consumer, topic, p, listed[p]) for p in listed):
        if time.monotonic() > deadline:
            raise ControlError(f"timed out reading topic {topic!r}")
        first = consumer.poll(0.05 if fetched else 0.3)
        fetched = True
        if first is None:
            continue
        for msg in [first, *consumer.consume(5000, 0)]:
            if msg.error() is None:
                next_offset[partition_of(msg)] = offset_of(msg) + 1
                yield msg


def read_to_end(consumer: Consumer, topic: str, *, timeout: float = 15.0) -> list[Message]:
    """Every record of ``topic`` from its start to its current end (see :func:`scan_topic`)."""
    return list(scan_topic(consumer, topic, timeout=timeout))


def _end(consumer: Consumer, topic: str, partition: int, listed: int) -> int:
    # Some brokers answer ListOffsets with a batch's base offset; a fetch knows better.
    _, cached = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
    return max(listed, cached or 0)


def read_quarantine(settings: Settings, bootstrap: str) -> list[ParkedRecord | Marker]:
    """The quarantine topic's parked records and markers, in topic order per partition."""
    consumer = Consumer(
        kafka_config(
            settings,
            bootstrap,
            **{
                "group.id": "backout-quarantine-reader",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            },
        ),
        logger=logging.getLogger("backout.downstream.kafka"),
    )
    try:
        messages = read_to_end(consumer, settings.topic("quarantine"))
    finally:
        consumer.close()
    items: list[ParkedRecord | Marker] = []
    for msg in messages:
        item = read_parked(position_of(msg), msg.key(), msg.value() or b"", headers_of(msg))
        if item is not None:
            items.append(item)
    return items


def release_parked(
    settings: Settings,
    sink: EventSink,
    records: list[ParkedRecord | Marker],
    freezes: FreezeSource,
    *,
    active_ids: set[str],
    freeze_ids: set[str] | None = None,
    to: str | None = None,
    issuer: str = "operator",
    reason: str = "",
    dry_run: bool = False,
) -> Disposition:
    """Send parked records whose scope no freeze covers any more back to their topic
    (or ``to``), mark each released, and journal what was done.

    Args:
        active_ids: ids of the freezes in force now (for records without a scope header).
    """

    def blocker(parked: ParkedRecord) -> str | None:
        if parked.scope is None:
            return parked.freeze_id if parked.freeze_id in active_ids else None
        freeze = freezes.blocking(parked.scope)
        return freeze.command_id if freeze is not None else None

    plan = plan_release(records, blocker, freeze_ids=freeze_ids)
    done = Disposition("release", plan.release, plan.still_frozen, plan.settled)
    if dry_run or not plan.release:
        return done
    event_id = new_event_id()
    quarantine = settings.topic("quarantine")
    for parked in plan.release:
        # The record first, then its marker: a crash in between releases it twice (at
        # least once), never zero times. Consumers dedupe by event id.
        sink.publish(
            to or parked.topic,
            parked.key,
            parked.value,
            headers=released_headers(parked),
            confirm=True,
        )
        sink.publish(
            quarantine,
            parked.key,
            b"",
            headers=marker_headers("released", parked, event_id),
            confirm=False,
        )
    sink.flush()
    _journal(
        settings,
        sink,
        "release",
        plan.release,
        event_id,
        issuer=issuer,
        reason=reason,
        details={"to": to, "still_frozen": len(plan.still_frozen)},
    )
    done.event_id = event_id
    return done


def discard_parked(
    settings: Settings,
    sink: EventSink,
    records: list[ParkedRecord | Marker],
    *,
    freeze_ids: set[str] | None,
    issuer: str = "operator",
    reason: str = "",
    dry_run: bool = False,
) -> Disposition:
    """Mark parked records (of ``freeze_ids``; all when None) as discarded: they stay on
    the quarantine topic as evidence but are never released. Journaled."""
    chosen, settled = plan_discard(records, freeze_ids=freeze_ids)
    done = Disposition("discard", chosen, [], settled)
    if dry_run or not chosen:
        return done
    event_id = new_event_id()
    quarantine = settings.topic("quarantine")
    for parked in chosen:
        sink.publish(
            quarantine,
            parked.key,
            b"",
            headers=marker_headers("discarded", parked, event_id),
            confirm=False,
        )
    sink.flush()
    _journal(settings, sink, "discard", chosen, event_id, issuer=issuer, reason=reason, details={})
    done.event_id = event_id
    return done


def _journal(
    settings: Settings,
    sink: EventSink,
    kind: str,
    handled: list[ParkedRecord],
    event_id: str,
    *,
    issuer: str,
    reason: str,
    details: dict[str, str | int | None],
) -> None:
    event = journal_event(
        kind,
        handled,
        issuer=issuer,
        environment=settings.environment,
        reason=reason,
        details=details,
        event_id=event_id,
    )
    codec = make_codec(settings.schema_registry_url)
    sink.publish(settings.topic("actions"), event.key.encode(), codec.encode(event), confirm=True)
