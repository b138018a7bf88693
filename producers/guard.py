"""ControlGuard: the local view of active freezes, checked before every call. [adapter]

At start the guard folds the whole control topic (history is kept forever) into a
:class:`~backout.producers.control.FreezeView`, reading to the high watermark with
signatures deferred (see ``control``), then tails it in a background thread with a short
fetch wait, so a new freeze applies within milliseconds. ``check`` is a few dict lookups
under a lock.

Staleness: between polls the tail asks the broker for the control topic's end offset
every ``min(1 s, control_staleness_s / 4)``; the view is fresh as of the last answer the
tail had caught up with. When it has not been fresh for ``control_staleness_s`` (broker down,
topic unreadable, or never read since start), ``check`` refuses mutating calls with
``Frozen(command_id="")`` saying the control topic is stale, unless ``fail_open``.
Read-only calls still run, checked against the last known view.

Invalid commands (unsigned, forged, replayed, expired, malformed or undecodable) change
nothing and are logged by every guard. Only a guard built with ``report_invalid=True``
publishes a ``control_integrity`` Signal for each one: agents' guards do not, so N agent
processes do not raise N signals. Run one reporting guard per cluster (``backout
control-audit``, or the processors app); signal ids are derived from the record's position,
so a second reporter, or a restarted one that reports history again, repeats the same ids
and signal consumers drop the duplicates. A reporting guard verifies every signature
while rebuilding, so it also reports invalid commands that arrived while it was down.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from backout.infra.broker import kafka_config, resolve_bootstrap
from backout.infra.settings import Settings
from backout.producers.control import FreezeView
from backout.producers.freezes import ControlRecord, Decision, Freeze, Outcome, scope_key
from backout.producers.integrity import integrity_signal
from backout.producers.scope import CallScope
from backout.producers.sink import EventSink
from backout.schemas.errors import DecodeError, Frozen
from backout.schemas.events import ControlCommand, Reversibility
from backout.schemas.registry import Codec, make_codec

log = logging.getLogger("backout.control")

_BATCH = 5000
_SETTLE_STEP = 16
"""Deferred signatures checked per idle poll (~2 ms): a freeze arriving meanwhile waits
at most that long, and a rebuilt view is fully checked within seconds."""
T = TypeVar("T")


def control_consumer_config(settings: Settings, bootstrap: str, **extra: Any) -> dict[str, Any]:
    """librdkafka options for reading the control topic: assigned, never committed, with a
    short fetch wait (a long poll does not return early on some brokers) and quick reconnects."""
    return kafka_config(
        settings,
        bootstrap,
        **{
            "group.id": f"backout-control-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 5,
            "fetch.error.backoff.ms": 20,
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 1000,
            **extra,
        },
    )


def record_of(msg: Message, codec: Codec) -> ControlRecord:
    """A consumed control message as a ControlRecord (undecodable bytes keep the reason)."""
    kind, ts_ms = msg.timestamp()
    at = datetime.fromtimestamp(ts_ms / 1000, UTC) if kind and ts_ms > 0 else datetime.now(UTC)
    topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
    try:
        command = codec.decode(msg.value() or b"", ControlCommand)
    except DecodeError as exc:
        return ControlRecord(topic, partition, offset, at, None, exc.reason)
    return ControlRecord(topic, partition, offset, at, command)


class ControlGuard:
    """Refuses calls covered by an active freeze; the CallGuard of every Journal.

    Args:
        settings: the control topic, trusted keys, staleness bound, fail-open switch.
        bootstrap: the broker (``resolve_bootstrap(settings)`` when omitted).
        report_invalid: publish a Signal for each invalid control command (one process).
        signals: where those Signals go (a KafkaEventSink when omitted and reporting).
        codec: record encoding (from settings when omitted).
        config: extra librdkafka options for the control consumer.
        on_invalid: called (on the guard's thread) with each invalid command's outcome.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str | None = None,
        *,
        report_invalid: bool = False,
        signals: EventSink | None = None,
        codec: Codec | None = None,
        config: dict[str, Any] | None = None,
        on_invalid: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_invalid = on_invalid
        self.topic = settings.topic("control")
        self.report_invalid = report_invalid
        self._bootstrap = bootstrap
        self._codec = codec or make_codec(settings.schema_registry_url)
        self._config = config or {}
        self._signals = signals
        self._owns_signals = False
        self._view = FreezeView(
            settings.trusted_keys, max_age=timedelta(seconds=settings.control_max_age_s)
        )
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._consumer: Consumer | None = None
        self._threads: list[threading.Thread] = []
        self._next: dict[int, int] = {}
        self._pending: tuple[float, dict[int, int]] | None = None
        self._started_at = time.monotonic()
        self._fresh_at: float | None = None
        self.invalid: list[Outcome] = []
        """Invalid commands seen since start, oldest first (bounded to the last 1,000)."""
        self.rebuild_records = 0
        """How many records the start-up rebuild folded."""
        self.rebuild_seconds: float | None = None
        """How long the start-up rebuild took."""

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, *, timeout: float | None = None) -> ControlGuard:
        """Rebuild the view from the control topic and start tailing it.

        Waits up to ``timeout`` (default ``max(control_staleness_s, 15)``) for the rebuild;
        when the topic cannot be read by then, the guard stays stale (see the module doc)
        and keeps trying in the background.
        """
        if self._threads:
            return self
        bootstrap = self._bootstrap or resolve_bootstrap(self.settings)
        self._consumer = Consumer(
            control_consumer_config(self.settings, bootstrap, **self._config),
            logger=logging.getLogger("backout.control.kafka"),
        )
        if self.report_invalid and self._signals is None:
            from backout.producers.kafka import KafkaEventSink

            self._signals = KafkaEventSink(self.settings, bootstrap, background=True)
            self._owns_signals = True
        self._started_at = time.monotonic()
        thread = threading.Thread(target=self._run, name="backout-control-tail", daemon=True)
        thread.start()
        self._threads.append(thread)
        wait = max(self.settings.control_staleness_s, 15.0) if timeout is None else timeout
        if not self._synced.wait(wait):
            log.warning(
                "control topic %r not read within %.1fs; mutating calls fail %s",
                self.topic,
                wait,
                "open" if self.settings.fail_open else "closed",
            )
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop the background thread and release the consumer."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout if timeout is not None else 10.0)
        self._threads.clear()
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._owns_signals and self._signals is not None:
            self._signals.close(timeout)

    def __enter__(self) -> ControlGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the CallGuard protocol -----------------------------------------------------------
    def check(self, call: CallScope) -> None:
        """Return if the call may run.

        Raises:
            Frozen: an active freeze covers the call, or the view is stale and the call is
                mutating (``command_id`` is "" then).
        """
        freeze = self.blocking(call)
        if freeze is not None:
            raise Frozen(
                f"call to {call.tool!r} refused: {describe(freeze)}",
                command_id=freeze.command_id,
                reason=freeze.reason,
            )
        if call.reversibility is not Reversibility.READ_ONLY and not self.settings.fail_open:
            stale = self.stale_reason()
            if stale is not None:
                raise Frozen(f"call to {call.tool!r} refused: {stale}", command_id="", reason=stale)

    def blocking(self, call: CallScope) -> Freeze | None:
        """The freeze refusing this call now, ignoring staleness (None: no freeze)."""
        now = time.time()
        with self._lock:
            return self._view.blocking(call, now)

    # --- freshness --------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """True once the start-up rebuild has read the control topic to its end."""
        return self._synced.is_set()

    def stale_reason(self) -> str | None:
        """Why the view cannot be trusted now, or None while it is fresh."""
        limit = self.settings.control_staleness_s
        fresh_at = self._fresh_at
        now = time.monotonic()
        if fresh_at is None:
            return (
                f"the control topic {self.topic!r} is stale: not read since the guard "
                f"started {now - self._started_at:.1f}s ago (limit {limit:g}s); "
                "mutating calls fail closed (BACKOUT_FAIL_OPEN=true lets them run)"
            )
        if now - fresh_at <= limit:
            return None
        return (
            f"the control topic {self.topic!r} is stale: last read {now - fresh_at:.1f}s ago "
            f"(limit {limit:g}s); mutating calls fail closed (BACKOUT_FAIL_OPEN=true lets "
            "them run)"
        )

    @property
    def stale(self) -> bool:
        """True when the view is older than ``control_staleness_s``."""
        return self.stale_reason() is not None

    # --- queries ----------------------------------------------------------------------------
    def freezes(self) -> list[Freeze]:
        """Every freeze in force now (deferred signatures are checked first)."""
        with self._lock:
            return self._view.active(datetime.now(UTC))

    @property
    def unsettled(self) -> int:
        """Freezes from the rebuild whose signatures are not checked yet (see ``control``)."""
        with self._lock:
            return self._view.unsettled

    def decision(self, request_id: str) -> Decision | None:
        """The decision on an approval request, or None while undecided."""
        with self._lock:
            return self._view.decision(request_id)

    def wait_decision(self, request_id: str, timeout: float) -> Decision | None:
        """Wait up to ``timeout`` seconds for the decision on an approval request."""
        return self._wait(lambda: self._view.decision(request_id), timeout)

    def wait_position(self, offset: int, timeout: float, *, partition: int = 0) -> bool:
        """Wait until the record at ``offset`` of the control topic has been applied."""
        return self._wait(lambda: self._next.get(partition, -1) > offset or None, timeout) is True

    def _wait(self, probe: Callable[[], T | None], timeout: float) -> T | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = probe()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._changed.wait(min(remaining, 0.5))

    # --- background threads -------------------------------------------------------------------
    def _read(self, consumer: Consumer, timeout: float) -> list[Message]:
        # consume() waits for a full batch or its timeout; poll() returns the first record
        # at once, then consume(..., 0) drains what is already fetched.
        first = consumer.poll(timeout)
        if first is None:
            return []
        return [first, *consumer.consume(_BATCH, 0)]

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            self._rebuild(consumer)
            self._tail(consumer)
        except Exception:  # the guard must never die silently: it goes stale instead
            log.exception("control guard stopped; the view goes stale")

    def _partitions(self, consumer: Consumer) -> dict[int, int]:
        """Each partition's end offset (retried until the broker answers or we stop)."""
        while not self._stop.is_set():
            try:
                meta = consumer.list_topics(self.topic, timeout=2.0).topics[self.topic]
                if meta.error is not None:
                    raise KafkaException(meta.error)
                ends = {}
                for p in meta.partitions:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=2.0, cached=False
                    )
                    ends[p] = high
                    self._next.setdefault(p, low)
                return ends
            except KafkaException as exc:
                log.debug("control topic not readable yet: %s", exc)
                self._stop.wait(0.2)
        return {}

    def _rebuild(self, consumer: Consumer) -> None:
        began_wall, began = time.monotonic(), time.perf_counter()
        ends = self._partitions(consumer)
        if self._stop.is_set():
            return
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
        count = invalid = 0
        verify = self.report_invalid
        while not self._stop.is_set():
            if self._caught_up(consumer, ends):
                break
            batch = self._read(consumer, 0.2)
            with self._changed:
                for msg in batch:
                    outcome = self._apply(msg, verify=verify)
                    count += 1
                    if outcome is not None and outcome.invalid:
                        invalid += 1
                        self._invalid(outcome, live=False)
                self._changed.notify_all()
        if self._stop.is_set():
            return
        with self._lock:
            self._fresh_at = began_wall
        self.rebuild_records = count
        self.rebuild_seconds = time.perf_counter() - began
        self._synced.set()
        log.info(
            "control view rebuilt from %d records in %.2fs (%d invalid ignored)",
            count,
            self.rebuild_seconds,
            invalid,
        )

    def _caught_up(self, consumer: Consumer, ends: dict[int, int]) -> bool:
        for partition, end in ends.items():
            _, cached_high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), cached=True
            )
            # Some brokers answer ListOffsets with a batch's base offset; the fetch
            # response's high watermark is then the better bound.
            if self._next.get(partition, 0) < max(end, cached_high or 0):
                return False
        return True

    def _tail(self, consumer: Consumer) -> None:
        interval = min(1.0, self.settings.control_staleness_s / 4)
        last_prune = last_beat = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_beat >= interval:
                last_beat = time.monotonic()
                self._beat(consumer, min(interval, 0.5))
            # While deferred signatures remain, poll briefly and check a few between polls.
            try:
                batch = self._read(consumer, 0.001 if self._view.unsettled else 0.1)
            except KafkaException as exc:
                log.warning("control topic read failed: %s", exc)
                self._stop.wait(0.1)
                continue
            with self._changed:
                for msg in batch:
                    outcome = self._apply(msg, verify=True)
                    if outcome is not None and outcome.invalid:
                        self._invalid(outcome, live=True)
                if not batch and self._view.unsettled:
                    self._view.settle(limit=_SETTLE_STEP)
                for late in self._view.drain_late():
                    self._invalid(late, live=True)
                if self._pending is not None:
                    self._mark_fresh(*self._pending)
                self._changed.notify_all()
            if time.monotonic() - last_prune > 1.0:
                last_prune = time.monotonic()
                with self._lock:
                    self._view.prune(datetime.now(UTC))

    def _apply(self, msg: Message, *, verify: bool) -> Outcome | None:
        """Fold one message (the lock is held)."""
        if msg.error() is not None:
            log.debug("control consumer: %s", msg.error())
            return None
        record = record_of(msg, self._codec)
        self._next[record.partition] = record.offset + 1
        return self._view.apply(record, verify=verify)

    def _invalid(self, outcome: Outcome, *, live: bool) -> None:
        self.invalid.append(outcome)
        del self.invalid[:-1000]
        if self._on_invalid is not None:
            self._on_invalid(outcome)
        if live:
            log.warning(
                "ignored %s control command %s at %s: %s",
                outcome.verdict.value,
                outcome.command_id,
                outcome.position,
                outcome.reason,
            )
        if self.report_invalid and self._signals is not None:
            signal = integrity_signal(outcome)
            key = scope_key(signal.scope) if signal.scope else "control"
            try:
                self._signals.publish(
                    self.settings.topic("signals"),
                    key.encode(),
                    self._codec.encode(signal),
                    confirm=False,
                )
            except Exception:
                log.exception("cannot publish the signal for %s", outcome.position)

    def _beat(self, consumer: Consumer, timeout: float) -> None:
        """Ask the broker for the topic's end; fresh once the tail has read up to it.

        Runs on the tail thread: a confluent-kafka consumer must not be queried from
        another thread while it polls (the call can hang).
        """
        asked = time.monotonic()
        try:
            ends = {
                p: consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=timeout, cached=False
                )[1]
                for p in list(self._next)
            }
        except KafkaException as exc:
            log.debug("control heartbeat failed: %s", exc)
            return
        with self._lock:
            self._mark_fresh(asked, ends)

    def _mark_fresh(self, asked: float, ends: dict[int, int]) -> None:
        """The view is fresh as of ``asked`` once the tail has read up to ``ends`` (locked)."""
        if all(self._next.get(p, 0) >= end for p, end in ends.items()):
            if self._fresh_at is None or asked > self._fresh_at:
                self._fresh_at = asked
            self._pending = None
        else:
            self._pending = (asked, ends)


def describe(freeze: Freeze) -> str:
    """One line naming a freeze: id, mode, scope, reason."""
    scope = "everything" if freeze.is_global else scope_key(freeze.scope_map)
    return f"frozen by {freeze.command_id} ({freeze.mode.value} on {scope}): {freeze.reason}"
