"""Helpers for the processors' real-broker tests: run workers, produce, read topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, Producer, TopicPartition

from backout.infra.settings import Settings
from backout.schemas import codec
from backout.schemas.events import ActionEvent
from backout.schemas.signing import SigningKey, new_signing_key

T = TypeVar("T")


def worker_env(settings: Settings, key_file: Path, trusted: dict[str, str]) -> dict[str, str]:
    """The environment a ``backout processors`` child needs for ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env.update(
        {
            "BACKOUT_BOOTSTRAP": settings.bootstrap or "",
            "BACKOUT_TOPIC_PREFIX": settings.topic_prefix,
            "BACKOUT_ACTIONS_PARTITIONS": str(settings.actions_partitions),
            "BACKOUT_STATE_DIR": str(settings.state_dir),
            "BACKOUT_SIGNING_KEY_FILE": str(key_file),
            "BACKOUT_TRUSTED_KEYS": json.dumps(trusted),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Workers:
    """``backout processors`` as a child process, its output in a log file."""

    def __init__(self, settings: Settings, tmp: Path, *args: str) -> None:
        self.settings = settings
        self.key: SigningKey = new_signing_key()
        self.key_file = tmp / "processors.key"
        self.key_file.write_bytes(self.key.private_pem())
        self.trusted = {self.key.key_id: self.key.public_b64}
        self.args = args
        self.log = tmp / "processors.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Workers:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backout.infra.cli", "processors", *self.args, *extra],
                env=worker_env(self.settings, self.key_file, self.trusted),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL the worker (and its children, when it supervises several)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def produce(
    settings: Settings,
    events: Iterable[ActionEvent],
    *,
    raw: Iterable[tuple[bytes, bytes]] = (),
    rate: float | None = None,
) -> None:
    """Publish ``raw`` (key, value) pairs, then ``events``, optionally at ``rate`` per second."""
    producer = Producer({"bootstrap.servers": settings.bootstrap, "linger.ms": 2})
    topic = settings.topic("actions")
    for key, value in raw:
        producer.produce(topic, value, key)
    started = time.monotonic()
    for n, event in enumerate(events):
        producer.produce(topic, codec.encode(event), event.key.encode())
        if rate is not None:
            producer.poll(0)
            ahead = started + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    producer.flush(15)


def read_all(settings: Settings, short: str) -> list[Any]:
    """Every record now on one of backout's topics, as consumer messages.

    Reads past the listed ends until a poll comes back empty (for at most a second, as
    the topic may be growing): the embedded Tansu lists the base offset of the last
    batch as a partition's end.
    """
    topic = settings.topic(short)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": "test-reader",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in parts if ends[p] > 0])
        out: list[Any] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.2)
            out += [m for m in batch if m.error() is None]
            if len(out) >= sum(ends.values()):
                if not batch:
                    break
                deadline = min(deadline, time.monotonic() + 1.0)
        return out
    finally:
        consumer.close()


def decoded(settings: Settings, short: str) -> list[Any]:
    """The records of a topic, decoded."""
    return [codec.decode(m.value()) for m in read_all(settings, short)]


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)
