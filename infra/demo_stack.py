"""The parts of the stack ``backout demo`` runs in its own process. [adapter]

The broker (embedded, or ``BACKOUT_BOOTSTRAP`` after a reachability check), the real
processors worker (Faust) on its own event loop in a thread, and an EventSink wrapper that
counts published actions so the demo can wait until the processors have judged them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from backout.infra.broker import Broker, BrokerUnavailable, kafka_config, start_embedded
from backout.infra.settings import Settings
from backout.processors.app import Processors, serve
from backout.producers.kafka import KafkaEventSink
from backout.producers.sink import Headers, Published
from backout.schemas.errors import ConfigError

__all__ = ["CountingSink", "ProcessorsThread", "quiet_logs", "start_broker"]

_QUIET_LOGGERS = ("faust", "mode", "aiokafka", "kafka", "backout", "asyncio")


class CountingSink:
    """An EventSink that counts the ActionEvents published (to wait for the processors)."""

    def __init__(self, inner: KafkaEventSink, topic: str, counter: list[int]) -> None:
        self._inner = inner
        self._topic = topic
        self._counter = counter

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        headers: Headers | None = None,
        confirm: bool = True,
    ) -> Published:
        done = self._inner.publish(topic, key, value, headers=headers, confirm=confirm)
        if topic == self._topic:
            self._counter[0] += 1
        return done

    def flush(self, timeout: float | None = None) -> None:
        self._inner.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        self._inner.close(timeout)


class ProcessorsThread:
    """The real processors worker (Faust) on its own event loop in a thread.

    The worker is built by ``make`` inside that loop: a Faust app binds to the loop it is
    created on, and one built elsewhere never receives its partitions.
    """

    def __init__(self, make: Callable[[], Processors]) -> None:
        self._make = make
        self._processors: Processors | None = None
        self._stop: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="backout-demo-processors", daemon=True
        )

    @property
    def processors(self) -> Processors:
        """The running worker (after :meth:`start`)."""
        if self._processors is None:
            raise ConfigError(f"the processors did not start: {self._error or 'timed out'}")
        return self._processors

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self._processors = self._make()
            self._ready.set()
            await serve(self._processors, self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # reported by wait_for; the demo then fails cleanly
            self._error = exc
            self._ready.set()

    def start(self) -> ProcessorsThread:
        self._thread.start()
        self._ready.wait(30)
        return self

    def wait_for(self, events: int, timeout: float) -> None:
        """Wait until the processors have judged ``events`` action events."""
        deadline = time.monotonic() + timeout
        processors = self.processors
        while processors.stats.detected < events:
            if self._error is not None:
                raise ConfigError(f"the processors stopped: {self._error}")
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"the processors judged {processors.stats.detected} of {events} "
                    f"events in {timeout:g}s"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        stop = self._stop
        if stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(20)
        if not self._thread.is_alive():
            self._loop.close()


def start_broker(settings: Settings) -> Broker:
    """BACKOUT_BOOTSTRAP when set (checked), else the embedded broker.

    Raises:
        ConfigError: the broker cannot be reached, or the embedded one cannot start (the
            message says how to point the demo at a broker instead).
    """
    if settings.bootstrap:
        try:
            # log_level 0: the one line below says it all, not librdkafka's retries
            probe = AdminClient(kafka_config(settings, settings.bootstrap, log_level=0))
            probe.list_topics(timeout=5)
        except KafkaException as exc:
            raise ConfigError(
                f"cannot reach the broker at {settings.bootstrap} "
                f"(BACKOUT_BOOTSTRAP): {exc.args[0].str()}"
            ) from None
        return Broker(settings.bootstrap, "external")
    try:
        return start_embedded(log_path=None)
    except BrokerUnavailable as exc:
        reason = " ".join(str(exc).split()).rstrip(".")
        raise ConfigError(
            f"the embedded broker cannot start ({reason}); point the demo at a Kafka broker "
            "instead: BACKOUT_BOOTSTRAP=host:9092 backout demo"
        ) from None


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence the libraries' own logging while the demo tells the story."""
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
