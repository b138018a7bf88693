"""KafkaEventSink: the EventSink on a real broker (confluent-kafka). [adapter]

Confirm mode waits for this record's delivery report; ``message.timeout.ms`` is set
to the publish timeout so librdkafka gives up at the same moment we do, and a record
we reported as failed is never delivered later behind the caller's back. Background
mode keeps retrying (``message.timeout.ms=0``) until ``close``, which reports what is
still undelivered; a full local queue blocks the caller, it never drops. ``close``
releases the librdkafka producer (its threads and connections) in every case.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from backout.infra.broker import kafka_config
from backout.infra.settings import Settings
from backout.producers.sink import Headers, Published
from backout.schemas.errors import PublishError

_POLL_EVERY = 63
"""Background mode serves delivery reports once per 64 records (a mask)."""
_new = object.__new__
_set = object.__setattr__


def published(
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Headers,
    partition: int | None = None,
    offset: int | None = None,
) -> Published:
    """``Published(...)``, without the frozen dataclass's setattr per field (every publish
    returns one; that cost as much as queueing the record)."""
    record = _new(Published)
    _set(record, "__dict__", {"topic": topic, "key": key, "value": value, "headers": headers,
                              "partition": partition, "offset": offset})
    return record


class _Delivery:
    __slots__ = ("done", "error", "offset", "partition")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: KafkaError | None = None
        self.partition: int | None = None
        self.offset: int | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        self.error = err
        if err is None:
            self.partition = msg.partition()
            self.offset = msg.offset()
        self.done.set()


class KafkaEventSink:
    """Publishes to Kafka with an idempotent producer (acks=all).

    Args:
        settings: timeouts, queue bound and pass-through librdkafka options.
        bootstrap: the broker address.
        background: the default mode of ``publish`` when ``confirm`` is not given.
        config: extra librdkafka options for this producer.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        background: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._timeout = settings.publish_timeout_s
        self._background = background
        timeout_ms = int(self._timeout * 1000)
        self._producer: Producer | None = Producer(
            kafka_config(
                settings,
                bootstrap,
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5 if background else 0,
                    "message.timeout.ms": 0 if background else timeout_ms,
                    "socket.timeout.ms": max(timeout_ms, 10),
                    "queue.buffering.max.messages": settings.background_queue_size,
                    "statistics.interval.ms": 0,
                    **(config or {}),
                },
            )
        )
        self._failed: list[str] = []
        self._failed_lock = threading.Lock()
        self._queued = 0
        self._closed = False

    def _background_report(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self._failed_lock:
                self._failed.append(f"{msg.topic()}: {err.str()}")

    def _produce(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, callback: Any
    ) -> Producer:
        """Queue one record (blocking while the queue is full); the producer it went to."""
        producer = self._producer
        if producer is None:
            raise PublishError("the event sink is closed", retryable=False)
        while True:
            try:
                if headers:
                    producer.produce(topic, value, key, headers=list(headers), on_delivery=callback)
                else:
                    producer.produce(topic, value, key, on_delivery=callback)
                return producer
            except BufferError:
                producer.poll(0.01)  # a full queue blocks the caller, never drops
            except KafkaException as exc:
                err = exc.args[0]
                raise PublishError(
                    f"cannot publish to {topic!r}: {err.str()}", retryable=err.retriable()
                ) from exc

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        headers: Headers | None = None,
        confirm: bool | None = None,
    ) -> Published:
        confirm = (not self._background) if confirm is None else confirm
        if self._closed:
            raise PublishError("the event sink is closed", retryable=False)
        headers = list(headers) if headers else []
        if not confirm:
            producer = self._produce(topic, key, value, headers, self._background_report)
            self._queued += 1
            if not self._queued & _POLL_EVERY:
                # Serve delivery reports now and then, not per record: each poll costs
                # about as much as a produce, and the reports keep until served.
                producer.poll(0)
            return published(topic, key, value, headers)
        delivery = _Delivery()
        producer = self._produce(topic, key, value, headers, delivery)
        deadline = time.monotonic() + self._timeout + 1.0
        while not delivery.done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"no acknowledgement from the broker for {topic!r} in {self._timeout}s",
                    retryable=True,
                )
            producer.flush(min(remaining, 0.5))
        if delivery.error is not None:
            error = delivery.error
            raise PublishError(
                f"broker refused or never acknowledged the record for {topic!r}: {error.str()}",
                retryable=error.retriable(),
            ) from KafkaException(error)
        return published(topic, key, value, headers, delivery.partition, delivery.offset)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued record; PublishError if some are still undelivered."""
        if self._producer is None:
            return
        remaining = self._producer.flush(self._timeout if timeout is None else timeout)
        with self._failed_lock:
            failed, self._failed = self._failed, []
        if remaining or failed:
            detail = f"; first failure: {failed[0]}" if failed else ""
            raise PublishError(
                f"{remaining} record(s) still undelivered and {len(failed)} failed{detail}",
                retryable=True,
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush, refuse further records, and release the librdkafka producer (its threads
        and connections).

        Raises:
            PublishError: records are still undelivered when the timeout ends; they are
                purged (never delivered later) and the producer is released all the same.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout)
        finally:
            self._release()

    def _release(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if len(producer):
            # librdkafka's close waits without bound for queued records; these were
            # reported undelivered, so drop them first.
            producer.purge()
            producer.poll(0)
        producer.close()
