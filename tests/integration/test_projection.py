"""The projector on a real broker: exact resume, no-op replays, dead letters, rebuilds,
several worker processes, the service loop, and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from backout.infra.broker import Broker, kafka_config
from backout.infra.settings import Settings
from backout.producers.kafka import KafkaEventSink
from backout.projections.fold import fold
from backout.projections.projector import DLQ_FROM, DLQ_REASON, Projector
from backout.projections.store import SqlProjectionStore
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.codec import encode
from backout.schemas.events import ActionEvent, Severity, Signal
from tests.eventkit import T0, Log


def history(runs: int = 3, records: int = 12) -> Log:
    log = Log()
    for n in range(records):
        log.seed(f"i{n}", status="open", amount=n)
    for step in range(40):
        run = "run" if step % 3 else f"other{step % runs}"
        log.write(run, f"i{(step * 7) % records}", {"status": f"s{step}", "amount": step})
        if step % 11 == 0:
            log.write(run, f"new{step}", {"status": "created"})
    return log


def publish(settings: Settings, bootstrap: str, events: list[ActionEvent]) -> None:
    sink = KafkaEventSink(settings, bootstrap, background=True)
    for event in events:
        sink.publish(settings.topic("actions"), event.key.encode(), encode(event), confirm=False)
    sink.close()


def publish_raw(settings: Settings, bootstrap: str, key: bytes, value: bytes) -> None:
    sink = KafkaEventSink(settings, bootstrap)
    sink.publish(settings.topic("actions"), key, value)
    sink.close()


def projector(
    settings: Settings, broker: Broker, store: SqlProjectionStore, **options: object
) -> Projector:
    return Projector(settings, broker.bootstrap, store=store, **options)  # type: ignore[arg-type]


def same_projection(store: SqlProjectionStore, events: list[ActionEvent]) -> None:
    expected = fold(events)
    scope = RollbackScope(run="run")
    loaded = store.load(scope)
    assert loaded.records == {k: v for k, v in expected.records.items() if k in loaded.records}
    assert set(loaded.records) == {
        e.target.key for e in events if e.run_id == "run" and e.target is not None
    }
    assert plan_rollback(loaded, scope, now=T0) == plan_rollback(expected, scope, now=T0)
    assert store.counts()["events"] == len({e.event_id for e in events})


def test_catches_up_and_resumes_exactly_after_a_restart(
    kafka_settings: Settings, broker: Broker
) -> None:
    log = history()
    first, rest = log.events[:30], log.events[30:]
    publish(kafka_settings, broker.bootstrap, first)
    store = SqlProjectionStore(kafka_settings.db)
    with projector(kafka_settings, broker, store) as p:
        stats = p.catch_up(timeout=60)
    assert stats.events == 30 and stats.duplicates == 0
    publish(kafka_settings, broker.bootstrap, rest)
    with projector(kafka_settings, broker, SqlProjectionStore(kafka_settings.db)) as p:
        stats = p.catch_up(timeout=60)
        assert sum(o + 1 for o in p.positions.values()) == len(log.events)
    assert stats.events == len(rest) and stats.duplicates == 0
    same_projection(store, log.events)


def test_reprocessing_an_event_is_a_no_op(kafka_settings: Settings, broker: Broker) -> None:
    log = history()
    publish(kafka_settings, broker.bootstrap, log.events)
    publish(kafka_settings, broker.bootstrap, log.events[:10])  # redelivered duplicates
    store = SqlProjectionStore(kafka_settings.db)
    with projector(kafka_settings, broker, store) as p:
        stats = p.catch_up(timeout=60)
    assert (stats.events, stats.duplicates) == (len(log.events), 10)
    same_projection(store, log.events)


def test_undecodable_records_go_to_the_dead_letter_topic(
    kafka_settings: Settings, broker: Broker
) -> None:
    log = history()
    publish(kafka_settings, broker.bootstrap, log.events[:5])
    publish_raw(kafka_settings, broker.bootstrap, b"erp/x", b"\x00garbage")
    signal = Signal(
        signal_id="s1", detected_at=T0, detector="d", severity=Severity.LOW, summary="not an action"
    )
    publish_raw(kafka_settings, broker.bootstrap, b"erp/y", encode(signal))
    publish(kafka_settings, broker.bootstrap, log.events[5:])
    store = SqlProjectionStore(kafka_settings.db)
    with projector(kafka_settings, broker, store) as p:
        stats = p.catch_up(timeout=60)
    assert stats.dead_lettered == 2 and stats.events == len(log.events)
    dead = read_all(kafka_settings, broker, "dlq")
    reasons = sorted(dict(h)[DLQ_REASON].decode() for _, _, h in dead)
    assert "expected ActionEvent, got Signal" in reasons[0]
    assert "single-object" in reasons[1]
    assert {v for _, v, _ in dead} == {b"\x00garbage", encode(signal)}
    assert all(
        dict(h)[DLQ_FROM].decode().startswith(kafka_settings.topic("actions")) for _, _, h in dead
    )
    # The dead letters' positions were stored too: a restart does not send them again.
    with projector(kafka_settings, broker, SqlProjectionStore(kafka_settings.db)) as p:
        assert p.catch_up(timeout=60).dead_lettered == 0


def test_rebuild_from_offset_zero_gives_the_same_projection(
    kafka_settings: Settings, broker: Broker
) -> None:
    log = history()
    publish(kafka_settings, broker.bootstrap, log.events)
    store = SqlProjectionStore(kafka_settings.db)
    with projector(kafka_settings, broker, store) as p:
        p.catch_up(timeout=60)
    before = store.load(RollbackScope(run="run"))
    store.reset()
    assert store.counts()["events"] == 0
    with projector(kafka_settings, broker, store) as p:
        assert p.catch_up(timeout=60).events == len(log.events)
    assert store.load(RollbackScope(run="run")) == before


def test_worker_processes_project_the_same(
    kafka_settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    log = history(records=30)
    publish(kafka_settings, broker.bootstrap, log.events)
    parallel = SqlProjectionStore(f"sqlite:///{tmp_path / 'parallel.db'}")
    with projector(kafka_settings, broker, parallel, workers=2) as p:
        stats = p.catch_up(timeout=120)
    assert stats.events == len(log.events)
    same_projection(parallel, log.events)
    with pytest.raises(Exception, match="in-memory"):
        projector(kafka_settings, broker, SqlProjectionStore("sqlite://"), workers=2).catch_up()


def test_service_loop_projects_new_events_until_stopped(
    kafka_settings: Settings, broker: Broker
) -> None:
    log = history()
    store = SqlProjectionStore(kafka_settings.db)
    stop = threading.Event()
    p = projector(kafka_settings, broker, store)
    p.start()
    worker = threading.Thread(target=p.run_forever, args=(stop,))
    worker.start()
    try:
        publish(kafka_settings, broker.bootstrap, log.events)
        deadline = time.monotonic() + 30
        while store.counts()["events"] < len(log.events) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(timeout=10)
        p.close()
    assert store.counts()["events"] == len(log.events)


@pytest.mark.postgres
def test_projection_on_postgresql(
    kafka_settings: Settings, broker: Broker, postgres_db: str
) -> None:
    log = history()
    log.checkpoint("run", "c1")
    publish(kafka_settings, broker.bootstrap, log.events)
    publish(kafka_settings, broker.bootstrap, log.events[:5])
    store = SqlProjectionStore(postgres_db)
    with projector(kafka_settings, broker, store, workers=2) as p:
        stats = p.catch_up(timeout=120)
    assert stats.events == len(log.events) and stats.duplicates == 5
    same_projection(store, log.events)
    assert [c.name for c in store.load(RollbackScope(run="run")).runs["run"].checkpoints] == ["c1"]
    store.engine.dispose()


def read_all(
    settings: Settings, broker: Broker, name: str
) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """Every record of a topic (keys, values, headers), until a poll comes back empty."""
    topic = settings.topic(name)
    consumer = Consumer(
        kafka_config(
            settings,
            broker.bootstrap,
            **{"group.id": f"t-{uuid.uuid4().hex}", "fetch.wait.max.ms": 10},
        )
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        out = []
        quiet = 0
        while quiet < 3:
            batch = consumer.consume(num_messages=100, timeout=0.5)
            quiet = 0 if batch else quiet + 1
            for msg in batch:
                if msg.error() is None:
                    out.append((msg.key(), msg.value() or b"", list(msg.headers() or [])))
        return out
    finally:
        consumer.close()
