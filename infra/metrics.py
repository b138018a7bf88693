"""Prometheus metrics for the processors and the projector (prometheus-client). [adapter]

The incident figures of ``backout report`` as live metrics: detection latency, time to
containment, rollback coverage and success rate, recovery, blast radius; plus the usual
health of a stream component (records, decode errors, batch time, lag).

How a component uses it (the processors and the projector each call these; one process
serves one endpoint on ``settings.metrics_port``, nothing when it is unset)::

    from backout.infra.metrics import metrics_for

    metrics = metrics_for(settings)                   # once at start; serves the port
    # per batch of consumed records
    metrics.batch("processors", records=len(batch), seconds=elapsed, decode_errors=bad)
    metrics.lag("processors", partition, high_watermark - position)
    # the figures: feed what the component sees
    metrics.figures.action(event)                     # each ActionEvent (projector)
    metrics.figures.signal(signal)                    # each Signal emitted (processors)
    metrics.figures.command(command)                  # each ControlCommand issued (processors)

:class:`FigureTracker` keeps the little state the figures need (bounded): when each recent
event occurred, which consequential actions exist and which were undone, the records each
open run wrote. ``backout up`` also runs a :class:`MetricsTap`, which tails the actions,
signals and control topics into a tracker, so the figures are served even by components
that do not feed them themselves.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from backout.infra.settings import Settings
from backout.projections.fold import LABEL_OUTCOME, changes_record, undone_ids
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    EventKind,
    Origin,
    Reversibility,
    Signal,
)

__all__ = ["FigureTracker", "Metrics", "MetricsTap", "metrics_for", "serve"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LONG = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)
_DONE = frozenset({"applied", "already", "compensated"})
_UNDOABLE = (Reversibility.REVERSIBLE, Reversibility.COMPENSATABLE)


class Metrics:
    """backout's instruments on one registry (a fresh one unless given).

    Args:
        registry: where the instruments live (tests pass their own).
        max_tracked: bound of the figure tracker's memory (events remembered).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_tracked: int = 1_000_000
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "backout_records_processed", "Records a component consumed.", ["component"], registry=r
        )
        self.decode_errors = Counter(
            "backout_decode_errors",
            "Records that could not be decoded (dead-lettered).",
            ["component"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "backout_batch_seconds",
            "Time to process one batch.",
            ["component"],
            buckets=_LATENCY,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "backout_consumer_lag_records",
            "Records behind the end of a partition.",
            ["component", "partition"],
            registry=r,
        )
        self.actions = Counter(
            "backout_actions",
            "ActionEvents seen, by status and origin.",
            ["status", "origin"],
            registry=r,
        )
        self.consequential = Counter(
            "backout_consequential_actions",
            "Calls that may have changed a record, by reversibility.",
            ["reversibility"],
            registry=r,
        )
        self.blocked = Counter("backout_blocked_calls", "Calls refused by a freeze.", registry=r)
        self.signals = Counter(
            "backout_signals", "Detector findings.", ["detector", "severity"], registry=r
        )
        self.commands = Counter(
            "backout_control_commands", "Control commands issued.", ["action", "mode"], registry=r
        )
        self.detection_latency = Histogram(
            "backout_detection_latency_seconds",
            "First offending event (a signal's earliest evidence) to the signal.",
            buckets=_LATENCY,
            registry=r,
        )
        self.time_to_containment = Histogram(
            "backout_time_to_containment_seconds",
            "First offending event (the cause signal's earliest evidence) to the freeze.",
            buckets=_LATENCY,
            registry=r,
        )
        self.rollback_steps = Counter(
            "backout_rollback_steps",
            "Rollback steps finished, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.inverse_writes = Counter(
            "backout_inverse_writes",
            "Inverse writes (compensates set), by origin.",
            ["origin"],
            registry=r,
        )
        self.coverage = Gauge(
            "backout_rollback_coverage_ratio",
            "Consequential actions "
            "declared reversible or compensatable whose inverse was "
            "exercised, over all consequential actions seen.",
            registry=r,
        )
        self.success = Gauge(
            "backout_rollback_success_ratio",
            "Rollback steps restored, "
            "already restored or compensated, over steps finished "
            "(manual hand-offs excluded).",
            registry=r,
        )
        self.recovery = Histogram(
            "backout_recovery_seconds",
            "An action to the inverse write that undid it.",
            buckets=_LONG,
            registry=r,
        )
        self.blast_records = Gauge(
            "backout_blast_radius_max_records",
            "The most distinct "
            "records one run (with its child runs) wrote, among the "
            "runs tracked.",
            registry=r,
        )
        self.blast_tenants = Gauge(
            "backout_blast_radius_max_tenants",
            "The most distinct "
            "tenants one run (with its child runs) wrote in, among the "
            "runs tracked.",
            registry=r,
        )
        self.figures = FigureTracker(self, max_tracked=max_tracked)

    def batch(
        self, component: str, *, records: int, seconds: float, decode_errors: int = 0
    ) -> None:
        """Count one processed batch."""
        self.records.labels(component).inc(records)
        self.batch_seconds.labels(component).observe(seconds)
        if decode_errors:
            self.decode_errors.labels(component).inc(decode_errors)

    def lag(self, component: str, partition: int, records: int) -> None:
        """Set how far one partition is behind."""
        self.consumer_lag.labels(component, str(partition)).set(max(records, 0))


class _Bounded(OrderedDict[str, Any]):
    """An insertion-ordered map that forgets its oldest entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        if len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class _Action:
    at: datetime
    undoable: bool
    undone: bool = False


class FigureTracker:
    """Turns records into the incident figures of :class:`Metrics`. Thread-safe."""

    def __init__(self, metrics: Metrics, *, max_tracked: int = 1_000_000) -> None:
        self._m = metrics
        self._lock = threading.Lock()
        self._seen: _Bounded = _Bounded(max_tracked)  # event id -> occurred_at
        self._actions: _Bounded = _Bounded(max_tracked)  # consequential id -> _Action
        self._signals: _Bounded = _Bounded(100_000)  # signal id -> first evidence time
        self._runs: _Bounded = _Bounded(100_000)  # root run -> (records, tenants)
        self._parent: _Bounded = _Bounded(max_tracked)  # run -> root run
        self._consequential = 0
        self._undone = 0
        self._steps_done = 0
        self._steps_total = 0
        self._max_records = 0
        self._max_tenants = 0

    def action(self, event: ActionEvent) -> None:
        """Feed one ActionEvent (every one, in log order per record)."""
        m = self._m
        m.actions.labels(event.status.value, event.origin.value).inc()
        with self._lock:
            self._seen.put(event.event_id, event.occurred_at)
            if event.status is CallStatus.BLOCKED:
                m.blocked.inc()
            if (
                event.origin is not Origin.ROLLBACK
                and event.kind is EventKind.TOOL_CALL
                and (changes_record(event) or event.is_write)
            ):
                self._consequential_action(event)
            if event.compensates is not None:
                self._inverse(event)
            if event.kind is EventKind.ROLLBACK_STEP_FINISHED and LABEL_OUTCOME in event.labels:
                self._step(event.labels[LABEL_OUTCOME])
            self._blast(event)

    def _consequential_action(self, event: ActionEvent) -> None:
        self._m.consequential.labels(event.reversibility.value).inc()
        if event.event_id not in self._actions:
            self._consequential += 1
        self._actions.put(
            event.event_id, _Action(event.occurred_at, event.reversibility in _UNDOABLE)
        )
        self._m.coverage.set(self._undone / self._consequential)

    def _inverse(self, event: ActionEvent) -> None:
        self._m.inverse_writes.labels(event.origin.value).inc()
        for target in undone_ids(event.compensates, event.labels):
            action = self._actions.get(target)
            if action is None or action.undone:
                continue
            action.undone = True
            self._m.recovery.observe(max((event.occurred_at - action.at).total_seconds(), 0.0))
            if action.undoable:
                self._undone += 1
        if self._consequential:
            self._m.coverage.set(self._undone / self._consequential)

    def _step(self, outcome: str) -> None:
        self._m.rollback_steps.labels(outcome).inc()
        if outcome == "manual":
            return
        self._steps_total += 1
        self._steps_done += outcome in _DONE
        self._m.success.set(self._steps_done / self._steps_total)

    def _blast(self, event: ActionEvent) -> None:
        parent = event.parent_run_id
        root = (self._parent.get(parent) or parent) if parent else event.run_id
        self._parent.put(event.run_id, root)
        if event.origin is Origin.ROLLBACK or event.target is None or not changes_record(event):
            return
        seen: tuple[set[str], set[str]] = self._runs.get(root) or (set(), set())
        records, tenants = seen
        records.add(event.target.key)
        if event.tenant:
            tenants.add(event.tenant)
        self._runs.put(root, (records, tenants))
        # Kept up to date on every write, so the figure does not depend on the order in
        # which partitions deliver a run's events and its end.
        if len(records) > self._max_records:
            self._max_records = len(records)
            self._m.blast_records.set(self._max_records)
        if len(tenants) > self._max_tenants:
            self._max_tenants = len(tenants)
            self._m.blast_tenants.set(self._max_tenants)

    def signal(self, signal: Signal) -> None:
        """Feed one Signal (detection latency from its earliest evidence seen)."""
        self._m.signals.labels(signal.detector, signal.severity.value).inc()
        with self._lock:
            first = self._first(e.event_id for e in signal.evidence)
            self._signals.put(signal.signal_id, first)
        if first is not None:
            self._m.detection_latency.observe(
                max((signal.detected_at - first).total_seconds(), 0.0)
            )

    def command(self, command: ControlCommand) -> None:
        """Feed one ControlCommand (time to containment for a freeze with a known cause)."""
        self._m.commands.labels(command.action.value, command.mode.value).inc()
        if command.action is not ControlAction.FREEZE or not command.cause:
            return
        with self._lock:
            first = self._signals.get(command.cause)
        if first is not None:
            self._m.time_to_containment.observe(
                max((command.issued_at - first).total_seconds(), 0.0)
            )

    def _first(self, event_ids: Iterable[str]) -> datetime | None:
        times = [self._seen[i] for i in event_ids if i in self._seen]
        return min(times) if times else None


# --- serving -----------------------------------------------------------------------------------
_served: dict[int, Any] = {}
_process_metrics: Metrics | None = None
_lock = threading.Lock()


def serve(metrics: Metrics, port: int, *, addr: str = "0.0.0.0") -> Any:
    """Serve ``metrics`` on ``port`` (once per port per process); returns the HTTP server.

    Raises:
        ConfigError: the port is taken.
    """
    with _lock:
        if port in _served:
            return _served[port]
        try:
            server, _ = start_http_server(port, addr=addr, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror}") from exc
        _served[port] = server
        return server


def stop_serving(port: int) -> None:
    """Stop the metrics server on ``port`` started by :func:`serve`, if any."""
    with _lock:
        server = _served.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()


def metrics_for(settings: Settings) -> Metrics:
    """This process's Metrics, served on ``settings.metrics_port`` when it is set."""
    global _process_metrics
    with _lock:
        if _process_metrics is None:
            _process_metrics = Metrics()
        metrics = _process_metrics
    if settings.metrics_port is not None:
        serve(metrics, settings.metrics_port)
    return metrics


# --- the tap: the figures from the topics themselves ----------------------------------------------
class MetricsTap:
    """Tails the actions, signals and control topics into a :class:`FigureTracker`.

    Reads from the start of each topic (assigned partitions, no consumer group, no commits),
    then follows, in a background thread, until :meth:`close`.

    Args:
        settings: topics and librdkafka options.
        bootstrap: the broker.
        metrics: whose figures to feed.
    """

    def __init__(self, settings: Settings, bootstrap: str, metrics: Metrics) -> None:
        self._settings, self._bootstrap, self._metrics = settings, bootstrap, metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.records = 0
        """Records read so far."""
        self.error: str | None = None
        """Why the tap stopped early, if it did."""

    def start(self) -> MetricsTap:
        """Start tailing in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="backout-metrics-tap", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop tailing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

        from backout.infra.broker import kafka_config
        from backout.schemas.registry import make_codec

        settings = self._settings
        codec = make_codec(settings.schema_registry_url)
        consumer = Consumer(
            kafka_config(
                settings,
                self._bootstrap,
                **{
                    "group.id": "backout-metrics-tap",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": 50,
                    "enable.partition.eof": True,
                },
            )
        )

        def partitions(name: str) -> list[Any]:
            topic = settings.topic(name)
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                return []
            return [TopicPartition(topic, p, 0) for p in meta.partitions]

        try:
            # The actions history first: signals cite events, freezes cite signals, so the
            # figures come out the same whatever order the topics would deliver in.
            behind = {tp.partition for tp in partitions("actions")}
            consumer.assign(partitions("actions"))
            later = False
            while not self._stop.is_set():
                if not behind and not later:
                    consumer.incremental_assign(partitions("signals") + partitions("control"))
                    later = True
                for msg in consumer.consume(1000, 0.2):
                    error = msg.error()
                    if error is None:
                        self._feed(codec, msg.value() or b"")
                    elif error.code() == KafkaError._PARTITION_EOF and not later:
                        behind.discard(msg.partition())
        except KafkaException as exc:
            self.error = exc.args[0].str()
        finally:
            consumer.close()

    def _feed(self, codec: Any, raw: bytes) -> None:
        from backout.schemas.errors import DecodeError

        self.records += 1
        try:
            record = codec.decode(raw)
        except DecodeError:
            self._metrics.decode_errors.labels("metrics-tap").inc()
            return
        figures = self._metrics.figures
        if isinstance(record, ActionEvent):
            figures.action(record)
        elif isinstance(record, Signal):
            figures.signal(record)
        elif isinstance(record, ControlCommand):
            figures.command(record)
