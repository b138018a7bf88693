"""Builders for signed control commands and call scopes, shared by the containment tests."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydantic import JsonValue

from backout.producers.freezes import ControlRecord
from backout.producers.scope import CallScope
from backout.schemas.events import ControlAction, ControlCommand, FreezeMode, Reversibility
from backout.schemas.signing import SigningKey, new_signing_key, sign

if TYPE_CHECKING:
    from confluent_kafka import Message

    from backout.infra.settings import Settings
    from backout.producers.kafka import KafkaEventSink
    from backout.producers.sink import Published

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Commands:
    """Signs control commands with one operator key."""

    key: SigningKey = field(default_factory=new_signing_key)
    issued_at: datetime = T0

    @property
    def trusted(self) -> dict[str, str]:
        return {self.key.key_id: self.key.public_b64}

    def _new(self, action: ControlAction, **fields: object) -> ControlCommand:
        fields.setdefault("command_id", f"cmd_{uuid.uuid4().hex[:16]}")
        fields.setdefault("issued_at", self.issued_at)
        fields.setdefault("issuer", "test-operator")
        return sign(ControlCommand(action=action, **fields), self.key)  # type: ignore[arg-type]

    def freeze(
        self,
        mode: FreezeMode = FreezeMode.HALT,
        *,
        expires_at: datetime | None = None,
        reason: str = "incident",
        command_id: str | None = None,
        **scope: str,
    ) -> ControlCommand:
        extra = {"command_id": command_id} if command_id else {}
        return self._new(
            ControlAction.FREEZE,
            scope=scope,
            mode=mode,
            expires_at=expires_at,
            reason=reason,
            **extra,
        )

    def stop_all(self, mode: FreezeMode = FreezeMode.HALT) -> ControlCommand:
        return self._new(ControlAction.FREEZE, scope={"all": "*"}, mode=mode, reason="global")

    def lift(self, freeze_id: str) -> ControlCommand:
        return self._new(ControlAction.LIFT, refers_to=freeze_id, reason="fixed")

    def approve(self, request_id: str, args: dict[str, JsonValue] | None = None) -> ControlCommand:
        return self._new(ControlAction.APPROVE, refers_to=request_id, approved_args=args)

    def deny(self, request_id: str) -> ControlCommand:
        return self._new(ControlAction.DENY, refers_to=request_id, reason="no")


class Log:
    """Turns commands into ControlRecords at increasing offsets."""

    def __init__(self, at: datetime = T0 + timedelta(seconds=1)) -> None:
        self._offsets = itertools.count()
        self.at = at

    def __call__(
        self,
        command: ControlCommand | None,
        *,
        error: str | None = None,
        at: datetime | None = None,
    ) -> ControlRecord:
        return ControlRecord(
            "t.control",
            0,
            next(self._offsets),
            at or self.at,
            command,
            error if command is None else None,
        )


def call(
    *,
    tool: str = "refund",
    agent: str = "billing-bot",
    identity: str = "svc-billing",
    run: str = "run_1",
    ancestors: tuple[str, ...] = (),
    workflow: str | None = "wf",
    tenant: str | None = "acme",
    environment: str = "production",
    reversibility: Reversibility = Reversibility.REVERSIBLE,
) -> CallScope:
    return CallScope(
        tool, agent, identity, run, ancestors, workflow, tenant, environment, reversibility
    )


# --- integration helpers (real broker) ---------------------------------------------------
def containment_settings(
    bootstrap: str, tmp_path: Path, ops: Commands, **extra: object
) -> Settings:
    """Settings with this test's topics, ``ops``' key trusted and on file, topics created."""
    from backout.infra.topics import ensure_topics
    from tests.conftest import fresh_settings

    key_file = tmp_path / "operator.key"
    key_file.write_bytes(ops.key.private_pem())
    settings = fresh_settings(
        bootstrap, tmp_path, trusted_keys=ops.trusted, signing_key_file=key_file, **extra
    )
    ensure_topics(settings, bootstrap)
    return settings


_SINKS: dict[str, KafkaEventSink] = {}


def publish(
    settings: Settings, bootstrap: str, command: ControlCommand | bytes, *, topic: str = "control"
) -> Published:
    """Publish a command (or raw bytes) and wait for the broker's acknowledgement."""
    from backout.producers.kafka import KafkaEventSink
    from backout.schemas.codec import encode

    # One producer per broker for the whole session: a new idempotent producer costs ~0.5 s.
    sink = _SINKS.get(bootstrap)
    if sink is None:
        sink = _SINKS[bootstrap] = KafkaEventSink(settings, bootstrap, config={"linger.ms": 0})
    value = command if isinstance(command, bytes) else encode(command)
    return sink.publish(settings.topic(topic), b"test", value)


def drop_publisher(bootstrap: str) -> None:
    """Forget the cached producer of a broker that is going away."""
    sink = _SINKS.pop(bootstrap, None)
    if sink is not None:
        sink.close(0.1)


@pytest.fixture(autouse=True, scope="module")
def close_publishers() -> Iterator[None]:
    """Close the cached producers when a test module ends (import this into the module)."""
    yield
    for bootstrap in list(_SINKS):
        drop_publisher(bootstrap)


def read_all(settings: Settings, bootstrap: str, topic: str) -> list[Message]:
    """Every record of one of the settings' topics, from its start to its end now."""
    from confluent_kafka import Consumer

    from backout.infra.broker import kafka_config
    from backout.producers.downstream import read_to_end

    consumer = Consumer(
        kafka_config(
            settings,
            bootstrap,
            **{
                "group.id": f"t-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            },
        )
    )
    try:
        return read_to_end(consumer, settings.topic(topic))
    finally:
        consumer.close()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def cli_env(settings: Settings) -> dict[str, str]:
    """The BACKOUT_* environment that makes the CLI use these settings."""
    import json

    env = {
        "BACKOUT_BOOTSTRAP": settings.bootstrap or "",
        "BACKOUT_TOPIC_PREFIX": settings.topic_prefix,
        "BACKOUT_TRUSTED_KEYS": json.dumps(settings.trusted_keys),
        "BACKOUT_STATE_DIR": str(settings.state_dir),
        "BACKOUT_DB": settings.db,
        "BACKOUT_ACTIONS_PARTITIONS": str(settings.actions_partitions),
        "BACKOUT_APPROVAL_TIMEOUT_S": str(settings.approval_timeout_s),
    }
    if settings.signing_key_file is not None:
        env["BACKOUT_SIGNING_KEY_FILE"] = str(settings.signing_key_file)
    return env
