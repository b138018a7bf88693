"""The processors worker on a real broker: signals, signed freezes, dead letters, crashes,
several workers, and replay of a topic range."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from backout.infra.cli import main
from backout.infra.settings import Settings
from backout.processors.findings import EventRef
from backout.processors.policy import load_policy
from backout.processors.replay import read_topic, replay
from backout.schemas.events import ActionEvent, ControlCommand, FreezeMode, Signal
from backout.schemas.signing import verify
from tests.detection_kit import Clock
from tests.integration.processors_kit import Workers, decoded, produce, read_all, wait_for

POLICY = """
name: it
window: 60s
cooldown: 10m
defaults:
  limits: {retry_loop: 3}
  allow: {tenants: [acme]}
responses:
  policy_violation: {high: [halt]}
  retry_loop: {medium: [read_only]}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


ASSIGNED = re.compile(r"\[(\d+)\] \[INFO\] assigned partitions of \S+: (\[[\d, ]*\])")


def _signals(settings: Settings) -> list[Signal]:
    return [r for r in decoded(settings, "signals") if isinstance(r, Signal)]


def _commands(settings: Settings) -> list[ControlCommand]:
    return [r for r in decoded(settings, "control") if isinstance(r, ControlCommand)]


def test_a_worker_emits_a_signal_and_a_signed_freeze_and_dead_letters_garbage(
    kafka_settings: Settings, tmp_path: Path, policy_file: Path
) -> None:
    workers = Workers(kafka_settings, tmp_path, "--policy", str(policy_file)).start()
    try:
        offending = Clock().event(tenant="globex", run_id="run-bad")
        produce(kafka_settings, [offending], raw=[(b"junk", b"definitely not avro")])
        signal = wait_for(lambda: _signals(kafka_settings), 90, "a signal")[0]
        assert signal.detector == "policy_violation"
        [evidence] = signal.evidence
        assert evidence.event_id == offending.event_id
        assert evidence.topic == kafka_settings.topic("actions")
        assert evidence.partition is not None and evidence.offset is not None
        command = wait_for(lambda: _commands(kafka_settings), 30, "a freeze")[0]
        verify(command, workers.trusted)
        assert (command.scope, command.mode, command.cause) == (
            {"run": "run-bad"},
            FreezeMode.HALT,
            signal.signal_id,
        )
        [letter] = wait_for(lambda: read_all(kafka_settings, "dlq"), 30, "a dead letter")
        headers = dict(letter.headers())
        assert letter.value() == b"definitely not avro"
        assert headers["backout-dlq-reason"].startswith(b"not Avro single-object")
        assert headers["backout-dlq-consumer"] == b"processors:route"
        # the worker kept going
        later = Clock().event(tenant="initech", run_id="run-later")
        produce(kafka_settings, [later])
        wait_for(lambda: len(_signals(kafka_settings)) >= 2, 30, "the next signal")
    finally:
        workers.stop()


def _stream(runs: int) -> list[ActionEvent]:
    """Per run: a write to another tenant and a retry loop on one record."""
    clock = Clock(step=0.01)
    events: list[ActionEvent] = []
    for n in range(runs):
        run = f"run-{n:04d}"
        events.append(clock.event(run_id=run, tenant="evil", object_id=f"x-{n}"))
        events += [
            clock.event(
                run_id=run, object_id=f"loop-{n}", requested_args={"invoice_id": f"loop-{n}"}
            )
            for _ in range(3)
        ]
        events += [clock.event(run_id=run) for _ in range(4)]
    return events


def test_a_worker_killed_mid_stream_loses_no_finding_and_duplicates_none(
    kafka_settings: Settings, tmp_path: Path, policy_file: Path
) -> None:
    events = _stream(300)
    expected = replay([(e, EventRef(e.event_id)) for e in events], load_policy(policy_file))
    expected_signals = {f.finding_id for f in expected.findings}
    expected_commands = {c.command_id for c, _ in expected.commands}
    assert len(expected_signals) == 600 and len(expected_commands) == 600

    workers = Workers(kafka_settings, tmp_path, "--policy", str(policy_file)).start()
    try:
        produce(kafka_settings, events[:8])  # the first run: the worker is up once it fired
        wait_for(lambda: len(read_all(kafka_settings, "control")) == 2, 90, "the first run")
        stream = threading.Thread(
            target=produce, args=(kafka_settings, events[8:]), kwargs={"rate": 300}
        )  # about 8 s of stream ...
        stream.start()
        wait_for(lambda: len(read_all(kafka_settings, "control")) > 100, 60, "progress")
        workers.kill()  # ... killed part way through it
        before = {c.command_id for c in _commands(kafka_settings)}
        assert len(before) < len(expected_commands)
        workers.start()
        stream.join()
        wait_for(
            lambda: {s.signal_id for s in _signals(kafka_settings)} >= expected_signals,
            120,
            "every finding after the restart",
        )
        wait_for(
            lambda: {c.command_id for c in _commands(kafka_settings)} >= expected_commands,
            30,
            "every freeze after the restart",
        )
    finally:
        workers.stop()
    assert {s.signal_id for s in _signals(kafka_settings)} == expected_signals
    commands = Counter(c.command_id for c in _commands(kafka_settings))
    assert set(commands) == expected_commands
    assert max(commands.values()) == 1, "a command was published twice"


def test_two_workers_split_the_partitions(
    kafka_settings: Settings, tmp_path: Path, policy_file: Path
) -> None:
    workers = Workers(
        kafka_settings, tmp_path, "--policy", str(policy_file), "--workers", "2"
    ).start()
    try:

        def split() -> bool:
            latest: dict[str, list[int]] = {}  # pid -> its latest assignment
            for pid, owned in ASSIGNED.findall(workers.output()):
                latest[pid] = json.loads(owned)
            mine = list(latest.values())
            owned_all = sorted(p for owned in mine for p in owned)
            return len(mine) == 2 and all(mine) and owned_all == [0, 1, 2]

        wait_for(split, 120, "both workers to own partitions")
        clock = Clock()
        events = [clock.event(tenant="evil", run_id=f"r{n}", object_id=f"o{n}") for n in range(30)]
        produce(kafka_settings, events)
        wait_for(
            lambda: len({s.signal_id for s in _signals(kafka_settings)}) == 30,
            60,
            "a signal per event",
        )
    finally:
        workers.stop()


def test_detect_replays_a_topic_range_without_side_effects(
    kafka_settings: Settings,
    tmp_path: Path,
    policy_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = _stream(5)
    produce(kafka_settings, events, raw=[(b"k", b"garbage")])
    for name in ("BOOTSTRAP", "TOPIC_PREFIX", "STATE_DIR"):
        monkeypatch.setenv(f"BACKOUT_{name}", str(getattr(kafka_settings, name.lower())))
    assert main(["detect", "--replay", "actions", "--policy", str(policy_file), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    recorded, bad = read_topic(
        kafka_settings, kafka_settings.bootstrap or "", kafka_settings.topic("actions")
    )
    direct = replay(recorded, load_policy(policy_file), undecodable=bad)
    assert printed == json.loads(json.dumps(direct.to_json()))
    assert printed["events"] == len(events)
    assert len(printed["findings"]) == 10 and len(printed["commands"]) == 10
    assert [u["reason"][:10] for u in printed["undecodable"]] == ["not Avro s"]
    assert printed["commands"][0]["event_id"] == events[0].event_id
    assert read_all(kafka_settings, "signals") == [] and read_all(kafka_settings, "control") == []


def test_the_ledger_knows_the_commands_on_the_control_topic(kafka_settings: Settings) -> None:
    from backout.processors.findings import Context, Finding
    from backout.processors.ledger import ControlLedger
    from backout.processors.policy import parse_policy
    from backout.producers.kafka import KafkaEventSink
    from backout.schemas import codec
    from backout.schemas.events import Severity
    from tests.detection_kit import T0

    pol = parse_policy("responses: {default: {high: [halt]}}")

    def command(n: int) -> ControlCommand:
        ctx = Context(f"run-{n}", "bot", "svc", None, None, "production", "tool")
        finding = Finding(
            f"f_{n}",
            "rate_anomaly",
            Severity.HIGH,
            T0,
            ("run", f"run-{n}"),
            ctx,
            "x",
            EventRef("e"),
            (),
        )
        return pol.commands_for(finding)[0]

    sink = KafkaEventSink(kafka_settings, kafka_settings.bootstrap or "")
    first, second = command(1), command(2)
    sink.publish(kafka_settings.topic("control"), b"k", codec.encode(first))
    ledger = ControlLedger(kafka_settings, kafka_settings.bootstrap or "").start()
    try:
        assert ledger.holds(first.command_id) and not ledger.holds(second.command_id)
        sink.publish(kafka_settings.topic("control"), b"k", codec.encode(second))
        wait_for(lambda: ledger.holds(second.command_id), 15, "the ledger to follow")
    finally:
        ledger.close()
        sink.close()
