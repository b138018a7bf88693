"""Faust plumbing tuned for throughput and latency. [adapter]

Stock faust-streaming 0.15 with aiokafka has three costs that dominate a detector
worker; each is changed here, and nothing else:

1. Its consumer asks the broker to hold a fetch up to 1.5 s (``fetch_max_wait_ms`` is
   hard-coded). Brokers that do not answer a long poll early when data arrives (Tansu,
   the embedded broker) then add up to 1.5 s to every record's latency.
   :class:`TunedConsumerThread` sets the wait from :class:`Tuning`.
2. Its fetch loop hands each record to the streams through ``Service.wait_first``,
   which creates four asyncio tasks per record, and waits up to 1 s for a fetch that
   the stream buffers' back-pressure has starved. :class:`TunedConsumer` hands over a
   whole fetch under one ``wait_first`` (a rebalance still interrupts it) and polls
   with a short timeout.
3. Tables send a changelog record per assignment, to the partition of the event being
   processed, which does not exist inside ``take()`` batches; and the future of that
   send is dropped, so a worker cannot wait for its state to be durable before its
   offsets are committed. :class:`StateTable` takes the partition explicitly and returns
   the futures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import faust
from faust.sensors import Monitor
from faust.tables.table import Table
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
    max_poll_records: int = 2000
    """Records per fetch; the stream buffer holds four fetches."""
    linger_ms: int = 5
    """How long the producer waits to batch records (adds to latency, saves CPU)."""
    session_timeout_s: float = 6.0
    heartbeat_s: float = 0.5
    commit_interval_s: float = 1.0
    route_batch: int = 2000
    route_within_s: float = 0.01
    detect_batch: int = 64
    """Routed batches (each up to ``route_batch`` records) taken at once."""
    detect_within_s: float = 0.005
    envelope_bytes: int = 512 * 1024
    """Routed batches are split so no message exceeds this."""
    checkpoint_s: float = 0.5
    """How often changed detector states are stored and processed records acknowledged."""
    settle_records: int = 20_000
    """Records waiting for acknowledgement that trigger an early checkpoint."""


class TunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """The aiokafka consumer thread with a configurable fetch wait."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when the consumer starts; faust hard-codes 1500 ms.
        consumer._fetch_max_wait_ms = tuning_of(self.consumer.app).fetch_wait_ms
        return consumer


_UNSEEN: Any = object()
"""Expected offset of a partition not positioned by a seek since it was assigned."""


class TunedConsumer(faust_aiokafka.Consumer):
    """The faust consumer with a fetch loop that hands over whole fetches, in order.

    Streams get each partition's records strictly in offset order from where the last
    seek put it (faust seeks every assigned partition to its committed offset after a
    rebalance and table recovery): records fetched before that seek, repeats, and
    records after an unexplained gap are not delivered. Faust alone does not ensure
    this: a fetch that began before the seek may go on delivering after it, and the
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

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - I/O loop
        poll_timeout = tuning_of(self.app).poll_timeout_s
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)
                if not self.should_stop:
                    await self.wait_first(self._deliver(self.getmany(timeout=poll_timeout)),
                                          self.suspend_flow.wait())
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

    async def _deliver(self, fetched: AsyncIterator[tuple[TP, Message]]
                       ) -> None:  # pragma: no cover - I/O loop
        """Deliver one fetch: in order for acknowledged topics, as faust does otherwise."""
        callback = self.callback
        expect = self._expect
        acks_enabled_for = self.app.topics.acks_enabled_for
        refetching: set[TP] = set()
        since_yield = 0
        async with contextlib.aclosing(fetched):  # type: ignore[type-var]
            async for tp, message in fetched:
                since_yield += 1
                if since_yield > 100:
                    await asyncio.sleep(0)
                    since_yield = 0
                offset = message.offset
                if not acks_enabled_for(message.topic):
                    await self._deliver_unordered(tp, message)
                    continue
                if self._seeking or tp in refetching:
                    continue
                wanted = expect.get(tp, _UNSEEN)
                if wanted is _UNSEEN or (wanted is not None and offset < wanted):
                    continue  # not positioned yet, or a repeat
                if wanted is not None and offset > wanted:
                    if self._gap_checked.get(tp) != wanted:
                        self._gap_checked[tp] = wanted
                        refetching.add(tp)
                        # in the consumer's thread: aiokafka is not thread-safe
                        await self._thread.seek_wait({tp: wanted})
                        continue
                    await self._add_gap(tp, wanted, offset - 1)  # really missing
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
                await callback(message)
                expect[tp] = offset + 1
                self._read_offset[tp] = offset

    @property
    def _gap_checked(self) -> dict[TP, int]:
        found: dict[TP, int] | None = self.__dict__.get("_gaps")
        if found is None:
            found = self.__dict__["_gaps"] = {}
        return found

    async def _deliver_unordered(self, tp: TP, message: Message
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
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw")

    def compile(self, app: Any, *, on_key_decode_error: Any = None,
                on_value_decode_error: Any = None, default_propagate: bool = False) -> Any:
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

    def on_stream_event_out(self, tp: TP, offset: int, stream: Any, event: Any,
                            state: Any = None) -> None:
        return None

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        return None

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int,
                          valsize: int) -> Any:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        return None


class TunedApp(faust.App):
    """A faust App on :class:`TunedTransport`, carrying its :class:`Tuning`."""

    tuning: Tuning = Tuning()

    def _new_transport(self) -> Any:
        return TunedTransport(self.conf.broker_consumer, self)


def tuning_of(app: Any) -> Tuning:
    """The tuning of ``app`` (defaults for a plain faust App)."""
    found = getattr(app, "tuning", None)
    return found if isinstance(found, Tuning) else Tuning()


class StateTable(Table):  # type: ignore[misc,type-arg,unused-ignore]
    """A raw ``bytes -> bytes`` table written with explicit partitions.

    :meth:`put` and :meth:`drop` return the changelog send futures, so the caller can
    wait until its state is durable before the offsets of the records that produced it
    are committed.
    """

    def partition_for_key(self, key: Any) -> int | None:
        raise TypeError("write StateTable with put()/drop() and an explicit partition")

    def read(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        value = self.data.get(key)
        return value if isinstance(value, bytes) else None

    def put(self, key: bytes, value: bytes, partition: int) -> Any:
        """Store ``value`` and send it to changelog ``partition``; returns the future."""
        future = self.send_changelog(partition, key, value)
        self.data[key] = value
        return future

    def drop(self, key: bytes, partition: int) -> Any | None:
        """Delete ``key`` (a tombstone on the changelog); None when it was absent."""
        if key not in self.data:
            return None
        future = self.send_changelog(partition, key, None, value_serializer="raw")
        del self.data[key]
        return future
