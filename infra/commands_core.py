"""Core commands: ``broker``, ``topics ensure``, ``tail``."""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from confluent_kafka import Consumer, KafkaException, TopicPartition
from rich.markup import escape

from backout.infra.broker import (
    forget_running,
    kafka_config,
    record_running,
    resolve_bootstrap,
    start_embedded,
)
from backout.infra.clikit import (
    JSON_OPTION,
    console,
    load_settings,
    parse_time,
    print_json,
    print_json_line,
    table,
)
from backout.infra.kafkaio import offset_of, partition_of, value_of
from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.schemas.errors import ConfigError, DecodeError
from backout.schemas.events import ActionEvent, ControlCommand, Signal
from backout.schemas.registry import Codec, make_codec

topics_app = typer.Typer(help="Topic provisioning.", no_args_is_help=True)


def broker(
    port: Annotated[int, typer.Option(help="Loopback port to listen on (0: a free one).")] = 0,
) -> None:
    """Run the embedded broker (Tansu, memory-only) in the foreground and print its address.

    Other commands in this directory find it; elsewhere set BACKOUT_BOOTSTRAP to the
    address printed. Ctrl-C stops it (its data is lost: it keeps no files).

    Example: backout broker --port 9092
    """
    settings = load_settings()
    stop = threading.Event()
    # Installed before the broker starts, so a SIGTERM at any moment still stops it.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running = start_embedded(port=port or None)
        try:
            ensure_topics(settings, running.bootstrap)
            record_running(settings, running)
            console.print(f"embedded broker listening on {running.bootstrap} (pid {running.pid})")
            console.print(f"export BACKOUT_BOOTSTRAP={running.bootstrap}")
            while not stop.is_set() and running._handle.poll() is None:
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            # Also when provisioning fails: never leave the broker process behind.
            forget_running(settings)
            running.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print("embedded broker stopped")


@topics_app.command("ensure")
def topics_ensure(json_out: bool = JSON_OPTION) -> None:
    """Create backout's topics where missing (safe to run again).

    Example: BACKOUT_BOOTSTRAP=127.0.0.1:9092 backout topics ensure
    """
    settings = load_settings()
    results = ensure_topics(settings, resolve_bootstrap(settings))
    if json_out:
        print_json(results)
        return
    console.print(
        table(
            "topics",
            ["topic", "partitions", "created"],
            [(r.topic, r.partitions, "yes" if r.created else "exists") for r in results],
        )
    )


_TAIL_COLUMNS = ["offset", "time", "run", "agent", "tool", "target", "status", "change"]


def _change(event: ActionEvent) -> str:
    before = event.before.fields if event.before and event.before.exists else {}
    after = event.after.fields if event.after and event.after.exists else {}
    if event.before and not event.before.exists and event.after and event.after.exists:
        return "created"
    if event.before and event.before.exists and event.after and not event.after.exists:
        return "deleted"
    diffs = [
        f"{k}: {before.get(k)!r}→{after.get(k)!r}" for k in after if before.get(k) != after.get(k)
    ]
    return ", ".join(diffs)


def _row(position: str, record: Any) -> list[str]:
    # Records carry agent-supplied text: escape it so rich does not read it as markup.
    return [escape(cell) for cell in _cells(position, record)]


def _cells(position: str, record: Any) -> list[str]:
    if isinstance(record, ActionEvent):
        target = record.target.key if record.target else ""
        return [
            position,
            record.occurred_at.strftime("%H:%M:%S.%f")[:-3],
            record.run_id,
            record.agent_id,
            record.tool,
            target,
            record.status.value,
            _change(record),
        ]
    if isinstance(record, ControlCommand):
        return [
            position,
            record.issued_at.strftime("%H:%M:%S.%f")[:-3],
            "",
            record.issuer,
            record.action.value,
            ",".join(f"{k}={v}" for k, v in record.scope.items()),
            record.mode.value,
            record.reason,
        ]
    assert isinstance(record, Signal)
    return [
        position,
        record.detected_at.strftime("%H:%M:%S.%f")[:-3],
        "",
        record.detector,
        record.severity.value,
        "",
        "",
        record.summary,
    ]


def _start_positions(
    consumer: Consumer, topic: str, since: datetime | None, last: int | None
) -> list[TopicPartition]:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        raise ConfigError(f"no topic {topic!r} on the broker (run `backout topics ensure`)")
    parts = sorted(meta.partitions)
    if since is not None:
        stamp = int(since.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, stamp) for p in parts], timeout=10
        )
        out = []
        for tp in found:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=10
            )
            out.append(TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else high))
        return out
    out = []
    for p in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        start = low if last is None else max(low, high - last)
        out.append(TopicPartition(topic, p, start))
    return out


def tail_records(
    settings: Settings,
    codec: Codec,
    topic: str,
    *,
    follow: bool,
    since: datetime | None = None,
    last: int | None = None,
    idle_timeout: float = 1.0,
) -> Any:
    """Yield ``(position, record or DecodeError)``; stop at the end unless following."""
    consumer = Consumer(
        kafka_config(
            settings,
            resolve_bootstrap(settings),
            **{"group.id": "backout-tail", "enable.auto.commit": False, "fetch.wait.max.ms": 20},
        )
    )
    try:
        starts = _start_positions(consumer, topic, since, last)
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in starts}
        pending = {tp.partition for tp in starts if tp.offset < ends[tp.partition]}
        consumer.assign(starts)
        while True:
            # Past the end offsets, drain until a poll comes back empty: a broker's high
            # watermark can lag the last batch (the embedded Tansu reports a batch's base).
            wait = idle_timeout if follow or pending else min(idle_timeout, 0.2)
            batch = consumer.consume(num_messages=500, timeout=wait)
            if not batch and not follow:
                break
            for msg in batch:
                if msg.error():
                    continue
                position = f"{partition_of(msg)}@{offset_of(msg)}"
                if offset_of(msg) + 1 >= ends.get(partition_of(msg), 0):
                    pending.discard(partition_of(msg))
                try:
                    yield position, codec.decode(value_of(msg))
                except DecodeError as exc:
                    yield position, exc.at(f"{topic}/{position}")
    finally:
        consumer.close()


def tail(
    topic: Annotated[
        str, typer.Option(help="actions, control, signals, quarantine or dlq.")
    ] = "actions",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records.")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="Start at a time: ISO-8601 or 15m/2h/1d ago.")
    ] = None,
    last: Annotated[
        int | None, typer.Option(help="Only the last N records of each partition.")
    ] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Decode and print records of a backout topic, as a table or JSON lines.

    An undecodable record prints one readable line and the tail goes on.

    Example: backout tail --topic actions --since 15m --follow
    """
    settings = load_settings()
    if topic not in ("actions", "control", "signals", "quarantine", "dlq"):
        raise ConfigError(f"unknown topic {topic!r}: actions, control, signals, quarantine or dlq")
    if last is not None and last < 1:
        raise ConfigError("--last must be at least 1")
    start = parse_time(since) if since else None
    codec = make_codec(settings.schema_registry_url)
    records = tail_records(
        settings, codec, settings.topic(topic), follow=follow, since=start, last=last
    )
    try:
        if json_out:
            for position, record in records:
                if isinstance(record, DecodeError):
                    print_json_line(
                        {
                            "position": position,
                            "error": record.reason,
                            "raw_hex": record.raw[:64].hex(),
                        }
                    )
                else:
                    print_json_line(
                        {"position": position, "type": type(record).__name__, "record": record}
                    )
            return
        if follow:
            console.print(" | ".join(_TAIL_COLUMNS), style="bold")
            for position, record in records:
                if isinstance(record, DecodeError):
                    console.print(
                        escape(f"{position} undecodable record: {record.reason}"), style="red"
                    )
                else:
                    console.print(" | ".join(_row(position, record)))
            return
        rows, bad = [], []
        for position, record in records:
            if isinstance(record, DecodeError):
                bad.append(
                    f"{position} undecodable record ({len(record.raw)} bytes): {record.reason}"
                )
                rows.append([position, "", "", "", "UNDECODABLE", "", "", escape(record.reason)])
            else:
                rows.append(_row(position, record))
        console.print(table(settings.topic(topic), _TAIL_COLUMNS, rows))
        for line in bad:
            console.print(escape(line), style="red")
        console.print(f"{len(rows)} record(s), {len(bad)} undecodable")
    except KafkaException as exc:
        raise ConfigError(f"cannot read {settings.topic(topic)!r}: {exc.args[0].str()}") from exc
    except KeyboardInterrupt:
        time.sleep(0)


def register(app: typer.Typer) -> None:
    """Add the core commands to ``app``."""
    app.command()(broker)
    app.command()(tail)
    app.add_typer(topics_app, name="topics")
