"""The containment CLI against a real broker: freeze, freezes, lift, audit, release, discard."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from backout.infra.broker import Broker
from backout.infra.cli import main
from backout.infra.settings import Settings
from backout.producers.downstream import FreezeAwareConsumer
from backout.producers.guard import ControlGuard
from backout.producers.integrity import INTEGRITY_DETECTOR
from backout.producers.kafka import KafkaEventSink
from backout.schemas.codec import decode, encode
from backout.schemas.errors import Frozen
from backout.schemas.events import ActionEvent, CallStatus, Reversibility, Signal
from tests.containment_helpers import (
    Commands,
    call,
    cli_env,
    close_publishers,  # noqa: F401 - an autouse fixture
    containment_settings,
    publish,
    read_all,
)


@pytest.fixture
def ops() -> Commands:
    return Commands(issued_at=datetime.now(UTC))


@pytest.fixture
def settings(
    broker: Broker, tmp_path: Path, ops: Commands, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    made = containment_settings(broker.bootstrap, tmp_path, ops)
    for name, value in cli_env(made).items():
        monkeypatch.setenv(name, value)
    return made


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """Run a command with --json; its parsed output."""
    capsys.readouterr()
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_freeze_list_and_lift(
    settings: Settings, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    with ControlGuard(settings, broker.bootstrap) as guard:
        frozen = cli(
            capsys,
            "freeze",
            "--agent",
            "billing-bot",
            "--tenant",
            "acme",
            "--mode",
            "read_only",
            "--reason",
            "refund loop",
            "--expires",
            "1h",
        )
        stop = cli(capsys, "freeze", "--all", "--reason", "stop everything")
        assert guard.wait_position(stop["offset"], 10.0)
        with pytest.raises(Frozen) as refused:
            guard.check(call())
        assert refused.value.command_id == stop["command_id"]
        listed = cli(capsys, "freezes")
        assert [f["command_id"] for f in listed] == [frozen["command_id"], stop["command_id"]]
        assert listed[0]["scope"] == {"agent": "billing-bot", "tenant": "acme"}
        assert listed[0]["mode"] == "read_only" and listed[0]["expires_at"]
        lifted = cli(capsys, "lift", "--all", "--reason", "scoped freeze is enough")
        assert [x["refers_to"] for x in lifted] == [stop["command_id"]]
        assert guard.wait_position(lifted[0]["offset"], 10.0)
        with pytest.raises(Frozen) as refused:
            guard.check(call())
        assert refused.value.command_id == frozen["command_id"]
        guard.check(call(reversibility=Reversibility.READ_ONLY))
        cli(capsys, "lift", frozen["command_id"])
    assert cli(capsys, "freezes") == []
    assert main(["lift", "--agent", "nobody"]) == 1


def test_control_audit_reports_each_invalid_command_once(
    settings: Settings, broker: Broker, ops: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(
        settings, broker.bootstrap, ops.freeze(agent="a").model_copy(update={"signature": None})
    )
    publish(
        settings, broker.bootstrap, ops.freeze(agent="a").model_copy(update={"reason": "tampered"})
    )
    publish(settings, broker.bootstrap, ops.freeze(agent="ok"))
    found = cli(capsys, "control-audit", "--once")
    assert [f["verdict"] for f in found] == ["unsigned", "forged"]
    signals = [decode(m.value(), Signal) for m in read_all(settings, broker.bootstrap, "signals")]
    assert [s.detector for s in signals] == [INTEGRITY_DETECTOR] * 2


def test_release_and_discard_from_the_cli(
    settings: Settings, broker: Broker, ops: Commands, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        ActionEvent(
            event_id=f"e{i}",
            occurred_at=datetime.now(UTC),
            run_id=f"run_{i}",
            agent_id="billing-bot" if i < 2 else "crm-bot",
            identity="svc",
            step_id=f"run_{i}:1",
            tool="refund",
            reversibility=Reversibility.READ_ONLY,
            idempotency_key=f"k{i}",
            status=CallStatus.SUCCEEDED,
        )
        for i in range(3)
    ]
    billing = cli(capsys, "freeze", "--agent", "billing-bot", "--reason", "loop")
    crm = cli(capsys, "freeze", "--agent", "crm-bot", "--reason", "bad sync")
    sink = KafkaEventSink(settings, broker.bootstrap)
    for event in events:
        sink.publish(settings.topic("actions"), event.key.encode(), encode(event))
    sink.close()
    wrapped = FreezeAwareConsumer.from_settings(
        settings, {"group.id": "svc", "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10}
    )
    wrapped.assign([TopicPartition(settings.topic("actions"), p) for p in range(3)])
    try:
        import time

        deadline = time.monotonic() + 15
        while wrapped.parked < 3 and time.monotonic() < deadline:
            assert wrapped.poll(0.2) is None
    finally:
        wrapped.close()
    assert wrapped.parked == 3

    preview = cli(capsys, "release", "--dry-run")
    assert preview["count"] == 0 and len(preview["still_frozen"]) == 3
    cli(capsys, "lift", billing["command_id"])
    released = cli(capsys, "release", "--reason", "billing fixed")
    assert released["count"] == 2 and len(released["still_frozen"]) == 1
    assert released["journal_event"]
    discarded = cli(capsys, "discard", "--freeze", crm["command_id"], "--reason", "rolled back")
    assert discarded["count"] == 1
    again = cli(capsys, "release")
    assert again["count"] == 0 and again["settled_before"] == 3
    journal = [
        decode(m.value(), ActionEvent) for m in read_all(settings, broker.bootstrap, "actions")
    ]
    assert sorted(e.tool for e in journal if e.tool.startswith("backout.")) == [
        "backout.discard",
        "backout.release",
    ]
