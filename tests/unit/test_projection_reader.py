"""The projector's fast ActionEvent reader returns exactly what the codec returns."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings

from backout.projections.reader import ActionReader
from backout.schemas.codec import decode, encode
from backout.schemas.errors import DecodeError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    ErrorInfo,
    EventKind,
    Origin,
    RecordImage,
    Reversibility,
    Severity,
    Signal,
    TargetRef,
)
from backout.schemas.registry import make_codec
from tests.eventkit import T0
from tests.surgical import History, histories
from tests.unit.test_planner_properties import play

FULL = ActionEvent(
    event_id="e1",
    occurred_at=T0,
    kind=EventKind.TOOL_CALL,
    run_id="r",
    parent_run_id="p",
    agent_id="a",
    identity="i",
    tenant="t",
    environment="staging",
    workflow="w",
    step_id="r:1",
    parent_step_id="r:0",
    tool="refund",
    requested_args={"n": 1, "big": 2**70, "x": [1, {"y": None}]},
    approved_args={"n": 2},
    target=TargetRef(system="erp", object_id="inv/1"),
    reversibility=Reversibility.COMPENSATABLE,
    before=RecordImage(exists=True, fields={"a": 1.5, "b": True, "c": None}, version=3),
    after=RecordImage(exists=False),
    idempotency_key="k",
    status=CallStatus.UNKNOWN,
    job_id="j",
    result={"ok": [1, 2]},
    error=ErrorInfo(type="T", message="m", retryable=True),
    compensation=Compensation(
        strategy="compensating_tool",
        tool="undo",
        args={"q": "é"},
        allowed_until=T0 + timedelta(days=1),
    ),
    origin=Origin.ROLLBACK,
    compensates="e0",
    correlation_id="c",
    value=9.5,
    confidence=0.5,
    reasoning_summary="why",
    blocked_by="cmd",
    labels={"k": "v"},
)
BARE = ActionEvent(
    event_id="e2",
    occurred_at=T0,
    run_id="r",
    agent_id="a",
    identity="i",
    step_id="s",
    tool="t",
    reversibility=Reversibility.READ_ONLY,
    idempotency_key="k",
    status=CallStatus.BLOCKED,
)


@pytest.mark.parametrize("event", [FULL, BARE], ids=["every field", "bare"])
def test_same_as_the_codec(event: ActionEvent) -> None:
    raw = encode(event)
    fast = ActionReader(make_codec(None))(raw)
    assert fast == decode(raw, ActionEvent) == event
    assert fast.model_dump() == event.model_dump()
    assert fast.__pydantic_fields_set__ == set(ActionEvent.model_fields)


@settings(max_examples=50, deadline=None)
@given(histories)
def test_same_as_the_codec_on_histories(history: History) -> None:
    reader = ActionReader(make_codec(None))
    for event in play(history).events:
        raw = encode(event)
        assert reader(raw) == decode(raw, ActionEvent)


def test_other_records_and_garbage_are_decode_errors() -> None:
    reader = ActionReader(make_codec(None))
    signal = Signal(signal_id="s", detected_at=T0, detector="d", severity=Severity.LOW, summary="x")
    with pytest.raises(DecodeError, match="expected ActionEvent, got Signal"):
        reader(encode(signal))
    with pytest.raises(DecodeError, match="single-object"):
        reader(b"garbage")
    with pytest.raises(DecodeError, match="corrupt ActionEvent"):
        reader(encode(FULL)[:-3])


def test_registry_framing_goes_through_the_codec() -> None:
    codec = make_codec("mock://reader-test")
    raw = codec.encode(FULL)
    assert ActionReader(codec)(raw) == FULL
