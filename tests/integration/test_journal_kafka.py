"""The Journal and the core commands on a real broker.

Confirm and background delivery, the broker going away, resuming a run after its process
died, ``backout tail`` (including garbage on the topic), ``backout topics ensure`` and
``backout broker`` as a real foreground process.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition

from backout.infra import clikit
from backout.infra.broker import Broker, kafka_config, start_embedded
from backout.infra.cli import main
from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.producers import Journal, PublishError, Reversibility, SqlTableTarget
from backout.producers.kafka import KafkaEventSink
from backout.schemas import ActionEvent, decode
from backout.schemas.events import CallStatus, EventKind, RecordImage
from tests.conftest import fresh_settings


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def read_topic(
    settings: Settings, bootstrap: str, name: str, timeout: float = 30.0
) -> list[Record]:
    """Every record of a topic, read with assigned partitions (no consumer group join).

    Reads past the high watermarks until a poll is empty: the embedded broker reports a
    batch's base offset as the end, so watermarks alone can stop short.
    """
    topic = settings.topic(name)
    consumer = Consumer(
        kafka_config(
            settings,
            bootstrap,
            **{
                "group.id": f"t-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            },
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends: dict[int, int] = {}
        assign = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
            assign.append(TopicPartition(topic, p, low))
        ends = {p: high for p, high in ends.items() if high > 0}
        out: list[Record] = []
        consumer.assign(assign)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = consumer.consume(num_messages=1000, timeout=0.5)
            if not batch and not ends:
                break
            for msg in batch:
                if msg.error():
                    continue
                partition, offset = msg.partition(), msg.offset()
                assert partition is not None and offset is not None
                out.append(Record(partition, offset, msg.key(), msg.value() or b""))
                if offset + 1 >= ends.get(partition, 0):
                    ends.pop(partition, None)
        assert not ends, f"did not reach the end of {topic}: {ends}"
        return out
    finally:
        consumer.close()


def events_of(records: list[Record]) -> list[ActionEvent]:
    return [decode(r.value, ActionEvent) for r in records]


def make_invoices(path: Path) -> tuple[sa.Engine, SqlTableTarget]:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS invoices (id TEXT PRIMARY KEY, status TEXT, "
                "touched INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 1)"
            )
        )
        for invoice in ("inv1", "inv2"):
            conn.execute(
                sa.text("INSERT OR IGNORE INTO invoices (id, status) VALUES (:i, 'open')"),
                {"i": invoice},
            )
    return engine, SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")


def declare_set_status(journal: Journal, engine: sa.Engine, target: SqlTableTarget) -> Any:
    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=target,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def set_status(invoice_id: str, status: str) -> str:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE invoices SET status = :s, touched = touched + 1, "
                    "version = version + 1 WHERE id = :i"
                ),
                {"s": status, "i": invoice_id},
            )
        return f"{invoice_id} is {status}"

    return set_status


def touched(engine: sa.Engine, invoice_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT touched FROM invoices WHERE id = :i"), {"i": invoice_id}
            ).scalar_one()
        )


# --- delivery ------------------------------------------------------------------------------
def test_confirm_mode_publishes_before_returning_keyed_by_target(
    broker: Broker, kafka_settings: Settings, tmp_path: Path
) -> None:
    engine, target = make_invoices(tmp_path / "erp.db")
    journal = Journal.from_settings(kafka_settings)
    assert journal.confirm
    set_status = declare_set_status(journal, engine, target)
    try:
        with journal.run("wf_confirm", agent="billing", identity="svc", tenant="acme"):
            assert set_status("inv1", "void") == "inv1 is void"
            # Confirm mode: acknowledged by the broker when the call returns, no flush needed.
            records = read_topic(kafka_settings, broker.bootstrap, "actions")
            tool_records = [r for r in records if r.key == b"erp/inv1"]
            assert len(tool_records) == 1
            set_status("inv1", "paid")
    finally:
        journal.close()

    records = read_topic(kafka_settings, broker.bootstrap, "actions")
    by_key: dict[bytes | None, list[Record]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    assert set(by_key) == {b"erp/inv1", b"wf_confirm"}
    first, second = sorted(by_key[b"erp/inv1"], key=lambda r: r.offset)
    assert first.partition == second.partition  # one record's writes stay in order
    void, paid = events_of([first, second])
    assert (void.status, void.tool, void.run_id) == (
        CallStatus.SUCCEEDED,
        "set_status",
        "wf_confirm",
    )
    assert void.before == RecordImage(
        exists=True, fields={"status": "open", "touched": 0}, version=1
    )
    assert void.after == RecordImage(
        exists=True, fields={"status": "void", "touched": 1}, version=2
    )
    assert paid.before == void.after and paid.step_id == "wf_confirm:2"
    lifecycle = events_of(by_key[b"wf_confirm"])
    assert sorted(e.kind for e in lifecycle) == sorted(
        [EventKind.RUN_STARTED, EventKind.RUN_FINISHED]
    )


def test_background_mode_flushes_every_event_on_close(broker: Broker, tmp_path: Path) -> None:
    # A small local queue: 2,000 events must block the caller at times, never drop.
    settings = fresh_settings(
        broker.bootstrap, tmp_path, delivery="background", background_queue_size=100
    )
    ensure_topics(settings, broker.bootstrap)
    journal = Journal.from_settings(settings)
    assert not journal.confirm

    @journal.tool(reversibility="irreversible", system="mail", object_id=lambda to, **_: to)
    def send(to: str, n: int) -> int:
        return n

    with journal.run(agent="mailer", identity="svc-mail"):
        for n in range(2000):
            send(f"user{n % 50}@example.com", n)
    journal.close()

    events = [
        e
        for e in events_of(read_topic(settings, broker.bootstrap, "actions"))
        if e.kind is EventKind.TOOL_CALL
    ]
    assert len(events) == 2000
    assert len({e.event_id for e in events}) == 2000
    assert sorted(int(e.result) for e in events) == list(range(2000))  # type: ignore[arg-type]
    assert {e.status for e in events} == {CallStatus.SUCCEEDED}


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _threads_settle(expected: int) -> int:
    """The thread count once it is down to ``expected`` (native threads exit asynchronously)."""
    for _ in range(300):
        if _native_threads() <= expected:
            break
        time.sleep(0.01)
    return _native_threads()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_sink_close_delivers_then_releases_the_producer(broker: Broker, tmp_path: Path) -> None:
    settings = fresh_settings(broker.bootstrap, tmp_path, delivery="background")
    ensure_topics(settings, broker.bootstrap)
    before = _native_threads()
    sink = KafkaEventSink(settings, broker.bootstrap, background=True)
    producer = sink._producer
    assert isinstance(producer, Producer)
    assert _native_threads() > before  # librdkafka's own threads
    topic = settings.topic("actions")
    for i in range(100):
        sink.publish(topic, f"k{i % 7}".encode(), f"v{i}".encode())

    sink.close(30)

    assert _threads_settle(before) == before  # threads joined: the client is destroyed
    with pytest.raises(RuntimeError):
        producer.flush(0)  # destroyed, not merely flushed
    with pytest.raises(PublishError, match="closed") as refused:
        sink.publish(topic, b"k", b"late")
    assert refused.value.retryable is False
    sink.close()  # a second close is a no-op
    sink.flush()  # and so is a flush after close
    values = sorted(r.value for r in read_topic(settings, broker.bootstrap, "actions"))
    assert values == sorted(f"v{i}".encode() for i in range(100))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("background", [True, False])
def test_sink_close_without_a_broker_reports_what_is_undelivered_and_releases(
    tmp_path: Path, background: bool
) -> None:
    before = _native_threads()
    settings = Settings(bootstrap=None, schema_registry_url=None, publish_timeout_s=0.5)
    sink = KafkaEventSink(settings, _closed_port(), background=background,
                          config={"log_level": 0})
    if background:
        for i in range(3):
            sink.publish("backout.actions", b"k", f"v{i}".encode())
        started = time.monotonic()
        with pytest.raises(PublishError, match="3 record"):
            sink.close(0.5)
        assert time.monotonic() - started < 10  # purged, not waited for without bound
    else:
        with pytest.raises(PublishError):
            sink.publish("backout.actions", b"k", b"v")
        sink.close(0.5)
    assert sink._producer is None
    assert _threads_settle(before) == before
    with pytest.raises(PublishError, match="closed"):
        sink.publish("backout.actions", b"k", b"v")


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """An embedded broker this test may stop."""
    started = start_embedded()
    try:
        yield started
    finally:
        started.stop()


def test_broker_down_in_confirm_mode_is_a_bounded_publish_error(
    own_broker: Broker, tmp_path: Path
) -> None:
    settings = fresh_settings(own_broker.bootstrap, tmp_path).model_copy(
        update={"publish_timeout_s": 2.0}
    )
    ensure_topics(settings, own_broker.bootstrap)
    engine, target = make_invoices(tmp_path / "erp.db")
    # The spine alone (no control-topic guard): what the broker's absence does to a call.
    sink = KafkaEventSink(settings, own_broker.bootstrap)
    journal = Journal(settings, sink=sink, owns=(sink,))
    set_status = declare_set_status(journal, engine, target)
    run = journal.run(agent="billing", identity="svc")
    run.__enter__()
    assert set_status("inv1", "void") == "inv1 is void"

    assert own_broker.pid is not None
    os.kill(own_broker.pid, signal.SIGKILL)  # the broker dies (the fixture reaps it)
    started = time.monotonic()
    with pytest.raises(PublishError) as info:
        set_status("inv2", "void")
    elapsed = time.monotonic() - started

    assert elapsed < 10, f"waited {elapsed:.1f}s"
    error = info.value
    assert error.side_effect_done is True
    assert "'set_status' already ran" in str(error)
    assert touched(engine, "inv2") == 1  # the side effect did happen, and we were told

    # Leaving the run cannot journal run_finished either: also a PublishError, also bounded.
    started = time.monotonic()
    with pytest.raises(PublishError) as finish:
        run.__exit__(None, None, None)
    assert finish.value.side_effect_done is False
    assert time.monotonic() - started < 10
    # Nothing is left queued in confirm mode: close returns promptly.
    started = time.monotonic()
    with contextlib.suppress(PublishError):
        journal.close(timeout=2)
    assert time.monotonic() - started < 10


_CRASHING_AGENT = textwrap.dedent(
    """
    import os, sys
    import sqlalchemy as sa
    from backout.producers import Journal, SqlTableTarget

    engine = sa.create_engine(f"sqlite:///{sys.argv[1]}")
    target = SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")
    journal = Journal.from_settings()  # BACKOUT_* from the environment

    @journal.tool(reversibility="reversible", target=target,
                  object_id=lambda invoice_id, **_: invoice_id)
    def set_status(invoice_id, status):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE invoices SET status = :s, touched = touched + 1, "
                                 "version = version + 1 WHERE id = :i"),
                         {"s": status, "i": invoice_id})
        return f"{invoice_id} is {status}"

    with journal.run("wf_crash", agent="billing", identity="svc"):
        print(set_status("inv1", "void"), flush=True)
        os._exit(3)  # the machine dies: no run_finished, no close
    """
)


def test_resume_after_a_crash_reads_completed_calls_from_the_log(
    broker: Broker, kafka_settings: Settings, tmp_path: Path
) -> None:
    db = tmp_path / "erp.db"
    engine, target = make_invoices(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env |= {
        "BACKOUT_BOOTSTRAP": broker.bootstrap,
        "BACKOUT_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "BACKOUT_STATE_DIR": str(tmp_path / "state"),
    }
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_AGENT, str(db)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == 3, crashed.stderr
    assert crashed.stdout.strip() == "inv1 is void"
    assert touched(engine, "inv1") == 1

    # A new process: a second Journal from the same settings, resuming the same run id.
    for attempt in range(2):
        journal = Journal.from_settings(kafka_settings)
        set_status = declare_set_status(journal, engine, target)
        try:
            with journal.run("wf_crash", agent="billing", identity="svc"):
                assert set_status("inv1", "void") == "inv1 is void"  # recorded, not re-run
                if attempt == 0:
                    assert set_status("inv2", "void") == "inv2 is void"  # a new step runs
                else:
                    set_status("inv2", "void")  # completed by attempt 0: not re-run
        finally:
            journal.close()
    assert touched(engine, "inv1") == 1
    assert touched(engine, "inv2") == 1
    calls = [
        e
        for e in events_of(read_topic(kafka_settings, broker.bootstrap, "actions"))
        if e.kind is EventKind.TOOL_CALL
    ]
    assert sorted(e.step_id for e in calls) == ["wf_crash:1", "wf_crash:2"]


# --- the core commands ---------------------------------------------------------------------
@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, broker: Broker, kafka_settings: Settings, tmp_path: Path
) -> Settings:
    """BACKOUT_* for the CLI: this test's broker and topic prefix, nothing else."""
    for name in list(os.environ):
        if name.startswith("BACKOUT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BACKOUT_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("BACKOUT_TOPIC_PREFIX", kafka_settings.topic_prefix)
    # Wide enough that table cells do not fold.
    monkeypatch.setattr(clikit.console, "_width", 300)
    return kafka_settings


GARBAGE = b"definitely not avro"


def test_tail_prints_events_and_a_line_for_garbage(
    cli_env: Settings, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, target = make_invoices(tmp_path / "erp.db")
    journal = Journal.from_settings(cli_env)
    set_status = declare_set_status(journal, engine, target)
    with journal.run("wf_tail", agent="billing-agent", identity="svc"):
        set_status("inv1", "void")
        # Garbage lands on the same partition as inv1's events (same key, same partitioner).
        producer = Producer(kafka_config(cli_env, broker.bootstrap))
        producer.produce(cli_env.topic("actions"), GARBAGE, b"erp/inv1")
        assert producer.flush(10) == 0
        set_status("inv1", "paid")
    journal.close()

    assert main(["tail"]) == 0
    out = capsys.readouterr().out
    assert "5 record(s), 1 undecodable" in out
    assert "UNDECODABLE" in out
    bad_lines = [line for line in out.splitlines() if "undecodable record (" in line]
    assert len(bad_lines) == 1
    assert f"undecodable record ({len(GARBAGE)} bytes): not Avro single-object" in bad_lines[0]
    for text in (
        "set_status",
        "erp/inv1",
        "billing-agent",
        "wf_tail",
        "'open'→'void'",
        "'void'→'paid'",
        "run_started",
        "run_finished",
    ):
        assert text in out, text

    assert main(["tail", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5
    (bad,) = [line for line in lines if "error" in line]
    assert bytes.fromhex(bad["raw_hex"]) == GARBAGE
    assert "single-object" in bad["error"]
    bad_partition, bad_offset = (int(x) for x in bad["position"].split("@"))
    events = [line for line in lines if "record" in line]
    assert {line["type"] for line in events} == {"ActionEvent"}
    after_garbage = [
        line["record"]
        for line in events
        if line["position"].startswith(f"{bad_partition}@")
        and int(line["position"].split("@")[1]) > bad_offset
    ]
    # The tail went on past the bad record.
    assert [(r["tool"], r["after"]["fields"]["status"]) for r in after_garbage] == [
        ("set_status", "paid")
    ]


def test_tail_last_and_since(
    cli_env: Settings, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = Journal.from_settings(cli_env)

    @journal.tool(reversibility="read_only")
    def look(n: int) -> int:
        return n

    with journal.run("wf_last", agent="a", identity="i"):
        for n in range(3):
            look(n)
    journal.close()
    assert main(["tail", "--since", "1h", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    # Keyed by run: all five on one partition, so --last 2 gives the last two.
    assert main(["tail", "--last", "2", "--json"]) == 0
    tools = [json.loads(line)["record"]["tool"] for line in capsys.readouterr().out.splitlines()]
    assert tools == ["look", "backout.run_finished"]
    assert main(["tail", "--topic", "signals"]) == 0
    assert "0 record(s), 0 undecodable" in capsys.readouterr().out


def test_topics_ensure_is_idempotent(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"ens{uuid.uuid4().hex[:8]}."
    monkeypatch.setenv("BACKOUT_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("BACKOUT_ACTIONS_PARTITIONS", "4")
    names = [f"{prefix}{t}" for t in ("actions", "control", "signals", "quarantine", "dlq")]

    assert main(["topics", "ensure", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [t["topic"] for t in first] == names
    assert all(t["created"] for t in first)
    assert {t["topic"]: t["partitions"] for t in first} == {
        names[0]: 4,
        names[1]: 1,
        names[2]: 4,
        names[3]: 4,
        names[4]: 1,
    }

    assert main(["topics", "ensure", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert [t["topic"] for t in second] == names
    assert not any(t["created"] for t in second)
    assert [t["partitions"] for t in second] == [t["partitions"] for t in first]

    assert main(["topics", "ensure"]) == 0
    table = capsys.readouterr().out
    assert table.count("exists") == 5 and "yes" not in table


# --- `backout broker` in the foreground ----------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_backout_broker_runs_in_the_foreground_and_stops_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env["PYTHONUNBUFFERED"] = "1"
    script = Path(sys.executable).parent / "backout"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "backout.infra.cli"]
    proc = subprocess.Popen(
        [*command, "broker"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True
    )
    reader.start()
    try:
        output: list[str] = []
        match = None
        deadline = time.monotonic() + 60
        while match is None and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=0.5))
                match = re.search(r"listening on (127\.0\.0\.1:\d+) \(pid (\d+)\)", output[-1])
            assert proc.poll() is None, "".join(output)
        assert match is not None, "".join(output)
        address, tansu_pid = match.group(1), int(match.group(2))
        assert _alive(tansu_pid)
        assert (tmp_path / ".backout" / "broker.json").exists()

        # Other commands in that directory find it without BACKOUT_BOOTSTRAP.
        for name in list(os.environ):
            if name.startswith("BACKOUT_"):
                monkeypatch.delenv(name)
        monkeypatch.chdir(tmp_path)
        journal = Journal.from_settings()

        @journal.tool(reversibility="read_only")
        def hello() -> str:
            return "world"

        with journal.run("wf_broker", agent="a", identity="i"):
            hello()
        journal.close()
        assert main(["tail", "--json"]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [p["record"]["tool"] for p in printed] == [
            "backout.run_started",
            "hello",
            "backout.run_finished",
        ]
        monkeypatch.setenv("BACKOUT_BOOTSTRAP", address)
        assert main(["tail", "--last", "1", "--json"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        reader.join(timeout=5)
        while not lines.empty():
            output.append(lines.get())
        assert "embedded broker stopped" in "".join(output)
        assert not _alive(tansu_pid)
        assert not (tmp_path / ".backout" / "broker.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
