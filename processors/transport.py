"""Faust plumbing tuned for throughput and latency. [adapter]

Stock faust-streaming 0.15 with aiokafka has costs that dominate a detector worker;
each is changed here, and nothing else:

1. Its consumer asks the broker to hold a fetch up to 1.5 s (``fetch_max_wait_ms`` is
   hard-coded). Brokers that do not answer a long poll early when data arrives (Tansu,
   the embedded broker) then add up to 1.5 s to every record's latency.
   :class:`TunedConsumerThread` sets the wait from :class:`Tuning`.
2. Every record becomes a message, an event, a stream buffer entry and a per-offset
   acknowledgement (about 60 us of CPU per record), and its fetch loop hands each record
   over through ``Service.wait_first`` (four asyncio tasks per record). The processors
   forward or decode whole batches anyway: :class:`TunedConsumer` hands each fetch to a
   bulk handler per partition (:meth:`TunedApp.bulk`), in offset order, and takes the
   acknowledgement of the whole range at once.
3. It "pauses" partitions only in its own bookkeeping, so aiokafka's prefetched but
   unread records stalled the fetches (:class:`TunedConsumerThread`).

The write side (outputs, table state) is tuned in :mod:`backout.processors.writes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import faust
from faust.sensors import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message


@dataclass(frozen=True)
class Tuning:
    """Knobs of the tuned transport and of the processors' batching."""

    fetch_wait_ms: int = 10
    """How long the broker may hold a fetch that has no data yet."""
    poll_timeout_s: float = 0.05
    """How long one fetch loop iteration waits for records before re-checking flow."""
    max_poll_records: int = 5000
    """Records taken from the consumer per poll (all partitions together); each
    partition's share is one bulk delivery."""
    linger_ms: int = 1
    """How long the producer waits to batch records (adds to latency, saves CPU)."""
    session_timeout_s: float = 6.0
    heartbeat_s: float = 0.5
    commit_interval_s: float = 1.0
    envelope_bytes: int = 512 * 1024
    """Routed batches are split so no message exceeds this."""
    checkpoint_s: float = 1.0
    """How often changed detector states are stored and processed records acknowledged."""
    settle_records: int = 20_000
    """Records waiting for acknowledgement that trigger an early checkpoint."""


class TunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """The aiokafka consumer thread with a configurable fetch wait, which pauses in
    aiokafka the partitions faust does not read.

    Faust "pauses" a partition (the changelog partitions of active tables once they are
    recovered, streams during recovery) only in its own bookkeeping: aiokafka goes on
    fetching it, and the records it fetched but nobody takes hold back every further
    fetch from that broker for aiokafka's prefetch backoff (100 ms). The first checkpoint
    after a start or rebalance thus stalled the streams for 100 ms.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when the consumer starts; faust hard-codes 1500 ms.
        consumer._fetch_max_wait_ms = tuning_of(self.consumer.app).fetch_wait_ms
        return consumer

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        if active_partitions is not None:
            _pause_idle(consumer, active_partitions)
        return await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )


def _pause_idle(consumer: Any, active: set[TP]) -> None:
    """Pause in aiokafka the assigned partitions not in ``active``, resume the others."""
    paused = consumer.paused()
    idle = {tp for tp in consumer.assignment() if tp not in active}
    if idle == paused:
        return
    if paused - idle:
        consumer.resume(*(paused - idle))
    if idle - paused:
        consumer.pause(*(idle - paused))
        # Records prefetched before the pause would still hold back the next fetch; the
        # position is unchanged, so a resumed partition fetches them again.
        for tp in idle - paused:
            consumer._fetcher._records.pop(tp, None)


_UNSEEN: Any = object()
"""Expected offset of a partition not positioned by a seek since it was assigned."""

BulkHandler = Callable[[TP, list[Any]], Awaitable[None]]
"""Takes one partition's records of one fetch (aiokafka ``ConsumerRecord`` objects, in
offset order) and acknowledges them later with :meth:`TunedConsumer.acknowledger`."""


class TunedConsumer(faust_aiokafka.Consumer):
    """The faust consumer with a fetch loop that hands over whole fetches, in order.

    Topics with a bulk handler (:meth:`TunedApp.bulk`) skip faust's per-record path
    (messages, events, stream buffers, per-record acks): each fetch hands a partition's
    records to the handler as one list, and the handler acknowledges them as a range.
    Other topics are delivered record by record as faust does.

    Streams and bulk handlers get each partition's records strictly in offset order from
    where the last seek put it (faust seeks every assigned partition to its committed
    offset after a rebalance and table recovery): records fetched before that seek,
    repeats, and records after an unexplained gap are not delivered. Faust alone does not
    ensure this: a fetch that began before the seek may go on delivering after it, and the
    broker may hand out records from ahead of the committed offset first and from the
    committed offset later, so records came out of order or were dropped as already
    read. A gap is explained by seeking back to the expected offset: if the broker
    still starts after it, the offsets really are missing (compaction, transaction
    markers) and the gap is accepted. Changelog partitions (not acknowledged, read by
    table recovery) are delivered as faust does.
    """

    _seeking = False

    def _new_consumer_thread(self) -> TunedConsumerThread:
        return TunedConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def _expect(self) -> dict[TP, Any]:
        found: dict[TP, Any] | None = self.__dict__.get("_expected")
        if found is None:
            found = self.__dict__["_expected"] = {}
        return found

    async def perform_seek(self) -> None:
        self._seeking = True
        self._expect.clear()
        try:
            await super().perform_seek()
        finally:
            # committed offset, or None when nothing was committed (take the first)
            self._expect.update(self._read_offset)
            self._seeking = False

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._expect[partition] = offset

    def acknowledger(self, tp: TP, first: int, last: int) -> Callable[[], None]:
        """A callable that acknowledges offsets ``first..last`` of ``tp`` (a bulk delivery).

        It does nothing once the partition was reassigned (a new consumer generation):
        the records are delivered again from the committed offset.
        """
        generation = self.app.consumer_generation_id

        def acknowledge() -> None:
            if self.app.consumer_generation_id != generation:
                return
            committed = self._committed_offset[tp]
            start = first if committed is None else max(first, committed)
            if start > last:
                return
            index = self._acked_index[tp]
            fresh = [o for o in range(start, last + 1) if o not in index]
            if fresh:
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)

        return acknowledge

    def _new_offset(self, tp: TP) -> int | None:
        # Bulk acknowledgements are contiguous ranges: skip faust's walk over every
        # offset when the acknowledged offsets form one run with no gap recorded.
        acked = self._acked[tp]
        if acked and not self._gap[tp]:
            acked.sort()
            low, high = acked[0], acked[-1]
            if high - low + 1 == len(acked):
                committed = self._committed_offset[tp]
                if committed and low - committed > 1:
                    return None  # as faust: a gap before the first acknowledged offset
                acked.clear()
                self._acked_index[tp].clear()
                return int(high) + 1
        found: int | None = super()._new_offset(tp)
        return found

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - I/O loop
        poll_timeout = tuning_of(self.app).poll_timeout_s
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)
                if not self.should_stop:
                    await self.wait_first(self._fetch(poll_timeout), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _fetch(self, timeout: float) -> None:  # pragma: no cover - I/O loop
        """Fetch once and deliver: bulk per partition, else record by record."""
        records, active = await self._wait_next_records(timeout)
        if not records or self.should_stop:
            return
        app = self.app
        generation = app.consumer_generation_id
        handlers = bulk_handlers_of(app)
        acks_enabled_for = app.topics.acks_enabled_for
        to_message = self._to_message
        for tp, batch in records.items():
            if not self.flow_active or app.consumer_generation_id != generation:
                break  # a rebalance: the rest is fetched again after it
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            handler = handlers.get(tp.topic)
            if handler is not None:
                ordered = await self._in_order(tp, batch)
                if ordered:
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                    await handler(tp, ordered)
                continue
            if not acks_enabled_for(tp.topic):
                for record in batch:
                    await self._deliver_unordered(tp, to_message(tp, record))
                continue
            for record in await self._in_order(tp, batch):
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
                await self.callback(to_message(tp, record))

    async def _in_order(self, tp: TP, batch: list[Any]) -> list[Any]:  # pragma: no cover
        """The records of ``batch`` that continue ``tp`` in order from the last seek."""
        if self._seeking:
            return []
        expect = self._expect
        wanted = expect.get(tp, _UNSEEN)
        if wanted is _UNSEEN:
            return []  # not positioned yet
        start = 0
        if wanted is not None:
            while start < len(batch) and batch[start].offset < wanted:
                start += 1  # repeats
        out: list[Any] = []
        for record in batch[start:]:
            offset = record.offset
            if wanted is not None and offset != wanted:
                if offset < wanted:
                    continue
                if self._gap_checked.get(tp) != wanted:
                    self._gap_checked[tp] = wanted
                    # in the consumer's thread: aiokafka is not thread-safe
                    await self._thread.seek_wait({tp: wanted})
                    break  # the rest comes again after the seek
                await self._add_gap(tp, wanted, offset - 1)  # really missing
            out.append(record)
            wanted = offset + 1
        if out:
            expect[tp] = wanted
            self._read_offset[tp] = out[-1].offset
        return out

    @property
    def _gap_checked(self) -> dict[TP, int]:
        found: dict[TP, int] | None = self.__dict__.get("_gaps")
        if found is None:
            found = self.__dict__["_gaps"] = {}
        return found

    async def _deliver_unordered(
        self, tp: TP, message: Message
    ) -> None:  # pragma: no cover - I/O loop
        offset = message.offset
        r_offset = self._read_offset[tp]
        if r_offset is None or offset >= r_offset:
            await self.callback(message)
            self._read_offset[tp] = offset


class TunedTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`TunedConsumer`."""

    Consumer: ClassVar[type[Any]] = TunedConsumer


class RawSchema(faust.Schema):  # type: ignore[misc,type-arg,unused-ignore]
    """Keys and values as the bytes on the wire, without faust's codec lookups."""

    def __init__(self) -> None:
        super().__init__(
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    def compile(
        self,
        app: Any,
        *,
        on_key_decode_error: Any = None,
        on_value_decode_error: Any = None,
        default_propagate: bool = False,
    ) -> Any:
        create_event = app.create_event

        async def decode(message: Message, *, propagate: bool = default_propagate) -> Any:
            return create_event(message.key, message.value, message.headers, message)

        return decode


class LeanMonitor(Monitor):  # type: ignore[misc,unused-ignore]
    """Faust's monitor without its per-record bookkeeping (kept for the web UI only)."""

    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        return None

    def on_stream_event_in(self, tp: TP, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: TP, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        return None

    def on_send_initiated(
        self, producer: Any, topic: str, message: Any, keysize: int, valsize: int
    ) -> Any:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        return None


class TunedApp(faust.App):
    """A faust App on :class:`TunedTransport`, carrying its :class:`Tuning`."""

    tuning: Tuning = Tuning()

    def _new_transport(self) -> Any:
        return TunedTransport(self.conf.broker_consumer, self)

    def bulk(self, topic: Any, handler: BulkHandler) -> None:
        """Subscribe to ``topic`` (a faust topic) and hand its fetches to ``handler``.

        The handler gets each partition's new records of a fetch, in offset order, and
        must acknowledge them (:meth:`TunedConsumer.acknowledger`) once they are done
        with, so that faust may commit their offsets.
        """
        handlers: dict[str, BulkHandler] = self.__dict__.setdefault("_bulk_handlers", {})
        for name in topic.topics:
            handlers[name] = handler
        self.topics.add(topic)


def bulk_handlers_of(app: Any) -> dict[str, BulkHandler]:
    """The bulk handlers of ``app`` by topic name (none for a plain faust App)."""
    found: dict[str, BulkHandler] = getattr(app, "_bulk_handlers", {})
    return found


def tuning_of(app: Any) -> Tuning:
    """The tuning of ``app`` (defaults for a plain faust App)."""
    found = getattr(app, "tuning", None)
    return found if isinstance(found, Tuning) else Tuning()
