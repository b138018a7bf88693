"""EventSink: where producers put encoded records. Ports and the in-memory fake."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Published:
    """One record as a sink accepted it."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)
    partition: int | None = None
    offset: int | None = None


class EventSink(Protocol):
    """Publishes encoded records to topics.

    ``publish`` with ``confirm=True`` returns only once the broker acknowledged the record
    (and returns where it was stored); with ``confirm=False`` it queues the record (blocking
    while the bounded queue is full, never dropping) and returns at once. ``flush`` waits
    for every queued record. Failures raise ``PublishError``.
    """

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        headers: Headers | None = None,
        confirm: bool = True,
    ) -> Published: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class InMemoryEventSink:
    """An EventSink that keeps records in a list: the fake for unit tests."""

    def __init__(self) -> None:
        self.records: list[Published] = []
        self._lock = threading.Lock()
        self.closed = False

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        headers: Headers | None = None,
        confirm: bool = True,
    ) -> Published:
        with self._lock:
            offset = sum(1 for r in self.records if r.topic == topic)
            record = Published(topic, key, value, list(headers or []), 0, offset)
            self.records.append(record)
            return record

    def on(self, topic: str) -> list[Published]:
        """Records published to ``topic``, in order."""
        with self._lock:
            return [r for r in self.records if r.topic == topic]

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self, timeout: float | None = None) -> None:
        self.closed = True
