"""The processors worker: a Faust app around the route and detect stages. [adapter]

Topology (``P`` = ``settings.topic_prefix``)::

    P.actions ──route──► P.processors-by-agent ──detect──► P.signals   (Signals)
      (keyed by record)   (partition by agent, batched) └──► P.control  (signed freezes)
                                                        └──► P.dlq       (undecodable records)
    detector state: Faust table "state" (changelog P.processors-state-changelog),
    one entry per agent and per run, partitioned like the routed topic.

Faust's consumer hands each fetch to the two stages as it comes, one list per
partition (bulk delivery, :meth:`~backout.processors.transport.TunedApp.bulk`: no
per-record messages, events or stream buffers), in offset order. The broker-free stages
in :mod:`backout.processors.stages` process a batch at once and queue its outputs; a
:class:`Pipeline` per stage acknowledges records (so Faust may commit their offsets)
only when their outputs, and the state checkpoint that covers them, are durable. The
transport is tuned in :mod:`backout.processors.transport`. Every worker with the same
``topic_prefix`` joins one consumer group, so more workers split the partitions; a
restarted worker recovers the table from its changelog and resumes from the committed
offsets.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, cast

import faust
from faust.types import TP

from backout.infra.settings import Settings
from backout.processors.engine import Engine
from backout.processors.findings import DEFAULT_SEVERITY
from backout.processors.policy import Policy
from backout.processors.stages import (
    DetectStage,
    Emitter,
    Headers,
    Ledger,
    RouteStage,
    Stats,
    Store,
)
from backout.processors.supervisor import Supervisor
from backout.processors.transport import LeanMonitor, RawSchema, TunedApp, TunedConsumer, Tuning
from backout.processors.writes import DirectSender, StateTable
from backout.producers.targets import Target
from backout.schemas.registry import make_codec
from backout.schemas.signing import SigningKey

log = logging.getLogger("backout.processors")

ROUTED_TOPIC = "processors-by-agent"
"""Short name of the routed topic (the full name has the topic prefix)."""
STATE_TABLE = "state"


class FaustOutbox:
    """The ``Outbox`` port on the app's producer (:class:`DirectSender`)."""

    def __init__(self, app: faust.App) -> None:
        self._sender = DirectSender(app)

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Awaitable[object]:
        return self._sender.send(topic, key, value, headers, partition)


class Pipeline:
    """Acknowledges a stage's records once their outputs and states are durable.

    Batches accumulate; every ``interval_s`` (or sooner when ``soft_limit`` records
    wait) one settle task snapshots the stage's states (``checkpoint``), waits for the
    outputs of every batch it covers, stores the snapshot and acknowledges the records.
    :meth:`submit` blocks while ``4 * soft_limit`` records wait.
    """

    def __init__(
        self,
        app: faust.App,
        name: str,
        *,
        checkpoint: Callable[[], Store] | None,
        interval_s: float,
        soft_limit: int,
    ) -> None:
        self._app = app
        self.name = name
        self._checkpoint = checkpoint
        self._interval = interval_s
        self._soft = soft_limit
        self._batches: list[tuple[Callable[[], None], int, list[Awaitable[object]]]] = []
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def submit(
        self, acknowledge: Callable[[], None], count: int, outputs: list[Awaitable[object]]
    ) -> None:
        """Add a processed batch of ``count`` records (call right after processing it,
        before any await); ``acknowledge`` is called once it is settled."""
        self._batches.append((acknowledge, count, outputs))
        self._waiting += count
        if self._ticker is None:
            self._ticker = asyncio.ensure_future(self._tick())
        if self._waiting >= self._soft:
            self._start()
        if self._waiting >= 4 * self._soft and self._task is not None:
            await asyncio.shield(self._task)

    async def drain(self) -> None:
        """Settle everything submitted so far."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._batches:
            self._start()
            assert self._task is not None
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Settle everything submitted so far and stop the periodic settling."""
        try:
            await self.drain()
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._settle())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._batches:
                self._start()

    async def _settle(self) -> None:
        # Everything processed so far is in _batches: take it and snapshot the states
        # together, before the first await.
        batches, self._batches = self._batches, []
        store = self._checkpoint() if self._checkpoint is not None else None
        try:
            await asyncio.gather(*(o for _, _, outputs in batches for o in outputs))
            if store is not None:
                await store()
            for acknowledge, count, _ in batches:
                acknowledge()
                self._waiting -= count
        except Exception as exc:  # outputs not durable: crash, the records are redone
            log.exception("%s: cannot settle %d batches", self.name, len(batches))
            await self._app.crash(exc)
            raise


class Processors:
    """One worker: the Faust app, its two agents, the supervisor and the stats.

    Args:
        settings: topics, partitions, codec.
        bootstrap: the broker.
        policy: limits and responses.
        key: signs control commands.
        ledger: command ids already on the control topic (None: send every command).
        targets: live systems for supervisor sampling.
        tuning: batching and transport knobs.
        datadir: where Faust keeps its files (one per worker).
        on_batch: called after each batch with the stage name and record count.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        policy: Policy,
        key: SigningKey,
        *,
        ledger: Ledger | None = None,
        targets: Iterable[Target] = (),
        tuning: Tuning | None = None,
        datadir: Path | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        tuning = tuning or Tuning()
        self.tuning = tuning
        self.stats = Stats()
        self._on_batch = on_batch
        self.app = app = _faust_app(settings, bootstrap, tuning, datadir)
        codec = make_codec(settings.schema_registry_url)
        actions = settings.topic("actions")
        outbox = FaustOutbox(app)
        emitter = Emitter(
            outbox,
            codec,
            key,
            signals=settings.topic("signals"),
            control=settings.topic("control"),
            dlq=settings.topic("dlq"),
            ledger=ledger,
            stats=self.stats,
        )
        engine = Engine(policy)
        self.supervisor = Supervisor(
            policy.supervisor,
            targets,
            engine,
            emitter,
            codec,
            actions=actions,
            severity=policy.severity.get("supervisor_drift", DEFAULT_SEVERITY["supervisor_drift"]),
        )
        routed = settings.topic(ROUTED_TOPIC)
        self.router = RouteStage(
            outbox,
            emitter,
            codec,
            routed=routed,
            partitions=settings.actions_partitions,
            envelope_bytes=tuning.envelope_bytes,
            sampler=self.supervisor if self.supervisor.active else None,
        )
        self.table = StateTable(
            app,
            name=STATE_TABLE,
            partitions=settings.actions_partitions,
            default=None,
            key_type=bytes,
            value_type=bytes,
            help="detector state per agent and run",
        )
        app.tables.add(self.table)
        self.detector = DetectStage(engine, emitter, self.table, codec, actions=actions)
        self._routing = Pipeline(
            app,
            "route",
            checkpoint=None,
            interval_s=tuning.checkpoint_s,
            soft_limit=tuning.settle_records,
        )
        self._detecting = Pipeline(
            app,
            "detect",
            checkpoint=self.detector.checkpoint,
            interval_s=tuning.checkpoint_s,
            soft_limit=tuning.settle_records,
        )
        app.bulk(app.topic(actions, schema=RawSchema()), self._route)
        app.bulk(
            app.topic(
                routed,
                schema=RawSchema(),
                internal=True,
                partitions=settings.actions_partitions,
                replicas=settings.replication_factor,
            ),
            self._detect,
        )
        if self.supervisor.active:
            app.task(self._supervise)
        app.timer(interval=30.0)(self._report)
        app.on_partitions_revoked.connect(self._revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._assigned)  # type: ignore[arg-type]
        app.on_before_shutdown.connect(self._shutdown)  # type: ignore[arg-type]

    @property
    def _consumer(self) -> TunedConsumer:
        return cast(TunedConsumer, self.app.consumer)

    async def _route(self, tp: TP, records: list[Any]) -> None:
        acknowledge = self._consumer.acknowledger(tp, records[0].offset, records[-1].offset)
        await self._routing.submit(acknowledge, len(records), self.router.process(records))
        self._batch("route", len(records))

    async def _detect(self, tp: TP, records: list[Any]) -> None:
        acknowledge = self._consumer.acknowledger(tp, records[0].offset, records[-1].offset)
        await self._detecting.submit(acknowledge, len(records), self.detector.process(records))
        self._batch("detect", len(records))

    async def _supervise(self) -> None:
        await self.supervisor.run()

    async def _report(self) -> None:
        s = self.stats
        log.info(
            "routed=%d detected=%d skipped=%d findings=%d commands=%d known=%d "
            "dead_letters=%d sampled=%d rechecked=%d drifted=%d",
            s.routed,
            s.detected,
            s.skipped,
            s.findings,
            s.commands,
            s.commands_known,
            s.dead_letters,
            s.sampled,
            s.rechecked,
            s.drifted,
        )

    async def _assigned(self, app: Any, assigned: Any, **_: Any) -> None:
        actions = self.settings.topic("actions")
        mine = sorted(tp.partition for tp in assigned if tp.topic == actions)
        log.info("assigned partitions of %s: %s", actions, mine)

    async def _revoked(self, app: Any, revoked: Any, **_: Any) -> None:
        actions = self.settings.topic("actions")
        self.supervisor.forget(tp.partition for tp in revoked if tp.topic == actions)
        await self._routing.drain()
        await self._detecting.drain()
        self.detector.reset()

    async def _shutdown(self, app: Any, **_: Any) -> None:
        # The consumer has stopped and the producer still runs: settle what was
        # processed, so its outputs and states are stored before the producer closes.
        for pipeline in (self._routing, self._detecting):
            try:
                await pipeline.close()
            except Exception:  # already logged; the records are redone after a restart
                log.warning("%s: not settled at shutdown", pipeline.name)

    def _batch(self, stage: str, count: int) -> None:
        if self._on_batch is not None:
            self._on_batch(stage, count)


def _faust_app(
    settings: Settings, bootstrap: str, tuning: Tuning, datadir: Path | None
) -> TunedApp:
    datadir = datadir or settings.state_dir / "processors"
    datadir.mkdir(parents=True, exist_ok=True)
    app = TunedApp(
        f"{settings.topic_prefix}processors",
        broker=[f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()],
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=settings.actions_partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=tuning.session_timeout_s,
        broker_heartbeat_interval=tuning.heartbeat_s,
        broker_request_timeout=max(30.0, tuning.session_timeout_s * 2),
        broker_rebalance_timeout=max(60.0, tuning.session_timeout_s * 4),
        broker_commit_interval=tuning.commit_interval_s,
        broker_max_poll_records=tuning.max_poll_records,
        consumer_auto_offset_reset="earliest",
        producer_linger_ms=tuning.linger_ms,
        producer_acks=-1,
        producer_max_request_size=4 * tuning.envelope_bytes,
        table_standby_replicas=0,
        worker_redirect_stdouts=False,
        Monitor=LeanMonitor,
    )
    app.tuning = tuning
    return app


GC_THRESHOLDS = (50_000, 20, 20)
"""Collector thresholds of a worker process (CPython's defaults: 700, 10, 10)."""


def lighten_gc() -> None:
    """Collect cyclic garbage less often in this process, and never rescan what is alive now.

    A worker allocates many short-lived objects per batch (records, decoded events,
    states), almost none in cycles; with the default thresholds the collector ran every
    700 allocations and took about a third of the worker's CPU, mostly rescanning the
    long-lived objects of the libraries. Those are frozen here (``gc.freeze``).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_worker(processors: Processors, *, loglevel: str = "info") -> None:
    """Run ``processors`` in this process until SIGINT/SIGTERM (Faust's worker)."""
    worker = faust.Worker(processors.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust's progress spinner sets the root logger to DEBUG (for loglevels from warning
    # up) and keeps it there: every debug call of faust and aiokafka built a record.
    worker.spinner = None
    lighten_gc()
    worker.execute_from_commandline()


async def serve(processors: Processors, stop: asyncio.Event) -> None:
    """Run ``processors`` on the running loop until ``stop`` is set (benchmarks, tests).

    Build ``processors`` on this loop: a Faust app binds to the loop it is created on.

    Lightens this process's garbage collector as a worker's (:func:`lighten_gc`).
    """
    app = processors.app
    lighten_gc()
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()
