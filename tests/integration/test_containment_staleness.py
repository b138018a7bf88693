"""The staleness rule: a guard that cannot read the control topic fails closed (or open).

These tests stop a broker, so they start their own embedded one, not the session's.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backout.infra.broker import Broker, start_embedded
from backout.infra.topics import ensure_topics
from backout.producers.guard import ControlGuard
from backout.schemas.errors import Frozen
from backout.schemas.events import Reversibility
from tests.conftest import fresh_settings
from tests.containment_helpers import (
    Commands,
    call,
    close_publishers,  # noqa: F401 - an autouse fixture
    containment_settings,
    drop_publisher,
    publish,
    wait_until,
)

STALENESS = 1.0


def crash(broker: Broker) -> None:
    """Kill the broker this test started (SIGKILL: as a crash, and without a 5 s wait)."""
    assert broker.pid is not None
    drop_publisher(broker.bootstrap)
    os.kill(broker.pid, signal.SIGKILL)
    broker.stop()  # reaps the process


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    broker = start_embedded()
    try:
        yield broker
    finally:
        broker.stop()


def test_guard_fails_closed_when_the_control_topic_is_unreachable(
    own_broker: Broker, tmp_path: Path
) -> None:
    ops = Commands(issued_at=datetime.now(UTC))
    settings = containment_settings(
        own_broker.bootstrap, tmp_path, ops, control_staleness_s=STALENESS
    )
    open_settings = settings.model_copy(update={"fail_open": True})
    freeze = ops.freeze(agent="frozen-bot")
    publish(settings, own_broker.bootstrap, freeze)
    closed = ControlGuard(settings, own_broker.bootstrap).start()
    opened = ControlGuard(open_settings, own_broker.bootstrap).start()
    try:
        time.sleep(STALENESS * 1.5)  # heartbeats keep a healthy guard fresh
        for guard in (closed, opened):
            assert guard.stale_reason() is None
            guard.check(call())
        crash(own_broker)
        wait_until(lambda: closed.stale, timeout=STALENESS * 5)
        with pytest.raises(Frozen, match=r"control topic .* is stale") as refused:
            closed.check(call())
        assert refused.value.command_id == ""
        assert "stale" in refused.value.reason
        closed.check(call(reversibility=Reversibility.READ_ONLY))  # reads still run
        wait_until(lambda: opened.stale, timeout=STALENESS * 5)
        opened.check(call())  # fail_open lets mutating calls run
        for guard in (closed, opened):  # the last known freezes still apply
            with pytest.raises(Frozen) as refused:
                guard.check(call(agent="frozen-bot", reversibility=Reversibility.READ_ONLY))
            assert refused.value.command_id == freeze.command_id
    finally:
        closed.close()
        opened.close()


def test_guard_recovers_when_the_broker_returns(own_broker: Broker, tmp_path: Path) -> None:
    ops = Commands(issued_at=datetime.now(UTC))
    settings = containment_settings(
        own_broker.bootstrap, tmp_path, ops, control_staleness_s=STALENESS
    )
    port = int(own_broker.bootstrap.rsplit(":", 1)[1])
    guard = ControlGuard(settings, own_broker.bootstrap).start()
    try:
        crash(own_broker)
        wait_until(lambda: guard.stale, timeout=STALENESS * 5)
        again = start_embedded(port=port)  # memory-only: an empty broker, same address
        try:
            ensure_topics(settings, again.bootstrap)
            wait_until(lambda: not guard.stale, timeout=15.0)
            guard.check(call())
            publish(settings, again.bootstrap, ops.freeze(agent="billing-bot"))
            wait_until(lambda: guard.blocking(call()) is not None, timeout=10.0)
        finally:
            crash(again)
    finally:
        guard.close()


def test_guard_that_never_read_the_topic_fails_closed(tmp_path: Path) -> None:
    ops = Commands()
    settings = fresh_settings(
        "127.0.0.1:1", tmp_path, trusted_keys=ops.trusted, control_staleness_s=STALENESS
    )
    guard = ControlGuard(settings, "127.0.0.1:1").start(timeout=0.5)
    try:
        assert not guard.synced
        with pytest.raises(Frozen, match="not read since the guard started"):
            guard.check(call())
        guard.check(call(reversibility=Reversibility.READ_ONLY))
    finally:
        guard.close()
