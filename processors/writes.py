"""Faust's write side tuned for latency: outputs and table state straight to the
producer. [adapter]

1. ``Topic.send_soon`` queues a ``FutureMessage`` that one task hands to the producer a
   record at a time, behind every changelog write queued before it: a freeze waited for
   a whole checkpoint. :class:`DirectSender` appends records to the producer's batches
   in call order, at once.
2. Tables send a changelog record per assignment, to the partition of the event being
   processed, which does not exist for batches; and the future of that send is dropped,
   so a worker cannot wait for its state to be durable before its offsets are
   committed. :class:`StateTable` takes the partition explicitly and returns the
   futures.
3. Table recovery reads a changelog up to the high watermark the broker reports. Tansu
   reports the base offset of the last batch written, so the rest of that batch was not
   recovered (stale detector state after a restart). :meth:`StateTable.seal` ends every
   checkpoint with a one-record batch, so the reported end is the real one.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Iterable
from typing import Any

from faust.tables.table import Table
from faust.types import AppT


class DirectSender:
    """Sends records through the app's producer in call order, without faust's buffer.

    Faust's ``send_soon`` queues a ``FutureMessage`` that one task hands to the producer
    a record at a time, behind every changelog write queued before it. Here each call
    returns a future at once and one drain task appends the queued records to the
    producer's batches (which waits only when those are full); the future completes when
    the broker acknowledged the record.
    """

    def __init__(self, app: AppT) -> None:
        self._app = app
        self._queue: deque[tuple[str, bytes | None, bytes | None, Any, int | None, Any]] = deque()
        self._task: asyncio.Task[None] | None = None

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Any = None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a record (None: a tombstone); the future gives its metadata once the
        broker has it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((topic, key, value, headers, partition, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        send = self._app.producer.send
        queue = self._queue
        while queue:
            topic, key, value, headers, partition, future = queue.popleft()
            try:
                sent: Any = await send(topic, key, value, partition, None, headers)
            except Exception as exc:  # reported through the record's future
                if not future.done():
                    future.set_exception(exc)
                continue
            sent.add_done_callback(functools.partial(_settle, future))


def _settle(future: asyncio.Future[Any], sent: asyncio.Future[Any]) -> None:
    if future.done():
        return
    if sent.cancelled():
        future.cancel()
    elif (error := sent.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(sent.result())


SEAL_KEY = b"\x00seal"
"""The key of :meth:`StateTable.seal`'s markers (no detector state uses it)."""


class StateTable(Table):  # type: ignore[misc,type-arg,unused-ignore]
    """A raw ``bytes -> bytes`` table written with explicit partitions.

    :meth:`put` and :meth:`drop` return the changelog send futures, so the caller can
    wait until its state is durable before the offsets of the records that produced it
    are committed. Writes go straight to the producer (:class:`DirectSender`), so they
    skip faust's persisted-offset bookkeeping, which only RocksDB stores use: use it
    with the memory store.
    """

    def _direct(self) -> tuple[DirectSender, str]:
        found: tuple[DirectSender, str] | None = self.__dict__.get("_direct_sender")
        if found is None:
            name = self.changelog_topic.get_topic_name()
            found = self.__dict__["_direct_sender"] = (DirectSender(self.app), name)
        return found

    def partition_for_key(self, key: Any) -> int | None:
        raise TypeError("write StateTable with put()/drop() and an explicit partition")

    def read(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        value = self.data.get(key)
        return value if isinstance(value, bytes) else None

    def put(self, key: bytes, value: bytes, partition: int) -> Any:
        """Store ``value`` and send it to changelog ``partition``; returns the future."""
        sender, topic = self._direct()
        future = sender.send(topic, key, value, partition=partition)
        self.data[key] = value
        return future

    async def seal(self, partitions: Iterable[int]) -> None:
        """Append a marker record to each changelog partition, in a batch of its own.

        Call it once the checkpoint's writes are acknowledged: the marker then ends the
        partition, so a broker that reports the base offset of the last batch as the
        high watermark still reports the real end, and recovery reads every write.
        """
        sender, topic = self._direct()
        sent = [sender.send(topic, SEAL_KEY, b"", partition=p) for p in partitions]
        self.data[SEAL_KEY] = b""
        await asyncio.gather(*sent)

    def drop(self, key: bytes, partition: int) -> Any | None:
        """Delete ``key`` (a tombstone on the changelog); None when it was absent."""
        if key not in self.data:
            return None
        sender, topic = self._direct()
        future = sender.send(topic, key, None, partition=partition)
        del self.data[key]
        return future
