"""Reading records cheaply for trace and replay: record heads and replay filters. No broker."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from importlib import resources

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import given
from hypothesis import strategies as st

from backout.infra.forensics import Head, ReplayFilter, read_head, record_matches
from backout.schemas.codec import encode, schema_catalog, to_datum
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    Reversibility,
    Severity,
    Signal,
)
from backout.schemas.registry import make_codec

T0 = datetime(2026, 11, 23, 4, 0, 0, 123456, tzinfo=UTC)


def micros(at: datetime) -> int:
    return int((at - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


def action(**changes: object) -> ActionEvent:
    base: dict[str, object] = dict(
        event_id="01HEVENT",
        occurred_at=T0,
        run_id="wf_1",
        agent_id="billing-agent",
        identity="svc",
        step_id="wf_1:1",
        tool="t",
        reversibility=Reversibility.READ_ONLY,
        idempotency_key="k",
        status=CallStatus.SUCCEEDED,
    )
    base.update(changes)
    return ActionEvent.model_validate(base)


names = st.text(min_size=0, max_size=200)


@given(
    event_id=names,
    run=names,
    parent=st.none() | names,
    agent=names,
    offset=st.integers(min_value=-(10**12), max_value=10**12),
)
def test_action_heads_match_the_event(
    event_id: str, run: str, parent: str | None, agent: str, offset: int
) -> None:
    at = T0 + timedelta(microseconds=offset)
    event = action(
        event_id=event_id, run_id=run, parent_run_id=parent, agent_id=agent, occurred_at=at
    )
    assert read_head(encode(event)) == Head(event_id, micros(at), run, parent, agent)


def test_command_and_signal_heads() -> None:
    command = ControlCommand(
        command_id="cmd_1", issued_at=T0, action=ControlAction.FREEZE, scope={"run": "wf_1"}
    )
    signal = Signal(
        signal_id="sig_1", detected_at=T0, detector="d", severity=Severity.LOW, summary="s"
    )
    assert read_head(encode(command)) == Head("cmd_1", micros(T0))
    assert read_head(encode(signal)) == Head("sig_1", micros(T0))


def test_old_writer_schema_head() -> None:
    raw = json.loads(
        resources.files("backout.schemas").joinpath("history/ActionEvent.v1.avsc").read_text()
    )
    old = next(
        w for w in schema_catalog().values() if w.record_type is ActionEvent and not w.is_current
    )
    datum = to_datum(action(parent_run_id="root"))
    fields = {f["name"] for f in raw["fields"]}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(raw), {k: v for k, v in datum.items() if k in fields})
    head = read_head(b"\xc3\x01" + old.fingerprint + buf.getvalue())
    assert head == Head("01HEVENT", micros(T0), "wf_1", "root", "billing-agent")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc3",
        b"\xc3\x01" + b"\x00" * 8,
        b"garbage bytes here",
        b"\x00\x00\x00\x00\x01" + encode(action())[10:],  # Schema Registry framing
    ],
)
def test_unreadable_heads_fall_back_to_a_full_decode(raw: bytes) -> None:
    assert read_head(raw) is None


@given(st.binary(max_size=80))
def test_corrupt_bodies_never_raise(tail: bytes) -> None:
    raw = encode(action())[:10] + tail
    head = read_head(raw)
    assert head is None or isinstance(head, Head)


def test_truncated_event_head_is_none() -> None:
    raw = encode(action(run_id="r" * 300))
    assert read_head(raw[:40]) is None


def test_registry_codec_records_have_no_cheap_head() -> None:
    codec = make_codec("mock://trace-log")
    assert read_head(codec.encode(action())) is None


# --- filters ---------------------------------------------------------------------------------
def test_filter_by_run_agent_and_time() -> None:
    event = action(run_id="wf_1", agent_id="a1")
    assert record_matches(event, ReplayFilter())
    assert record_matches(event, ReplayFilter(run="wf_1", agent="a1"))
    assert not record_matches(event, ReplayFilter(run="wf_2"))
    assert not record_matches(event, ReplayFilter(agent="a2"))
    assert record_matches(event, ReplayFilter(since=T0, until=T0))
    assert not record_matches(event, ReplayFilter(since=T0 + timedelta(microseconds=1)))
    assert not record_matches(event, ReplayFilter(until=T0 - timedelta(microseconds=1)))


def test_commands_and_signals_match_by_scope() -> None:
    command = ControlCommand(
        command_id="c",
        issued_at=T0,
        action=ControlAction.FREEZE,
        scope={"run": "wf_1", "agent": "a1"},
    )
    signal = Signal(
        signal_id="s",
        detected_at=T0,
        detector="d",
        severity=Severity.LOW,
        summary="x",
        scope={"agent": "a1"},
    )
    assert record_matches(command, ReplayFilter(run="wf_1"))
    assert not record_matches(command, ReplayFilter(run="wf_2"))
    assert record_matches(signal, ReplayFilter(agent="a1"))
    assert not record_matches(signal, ReplayFilter(run="wf_1"))


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ConfigError, match="empty time range"):
        ReplayFilter(since=T0, until=T0 - timedelta(seconds=1))
    with pytest.raises(ConfigError, match="time zone"):
        ReplayFilter(since=datetime(2026, 1, 1))
