"""The specialised Avro code agrees with fastavro, byte for byte, in both directions."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backout.schemas import codec
from backout.schemas.avro_binary import read_micros, write_micros
from backout.schemas.avro_fast import AvroFastError, read_long, write_long
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    ControlAction,
    ControlCommand,
    ErrorInfo,
    EventKind,
    Evidence,
    FreezeMode,
    Origin,
    RecordImage,
    Reversibility,
    Severity,
    Signal,
    TargetRef,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
json_maps = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
texts = st.text(max_size=40)
optional_texts = st.none() | texts
times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
images = st.builds(RecordImage, exists=st.booleans(), fields=json_maps, version=json_values)

action_events = st.builds(
    ActionEvent,
    event_id=texts,
    occurred_at=times,
    kind=st.sampled_from(EventKind),
    run_id=texts,
    parent_run_id=optional_texts,
    agent_id=texts,
    identity=texts,
    tenant=optional_texts,
    environment=texts,
    workflow=optional_texts,
    step_id=texts,
    parent_step_id=optional_texts,
    tool=texts,
    requested_args=json_maps,
    approved_args=st.none() | json_maps,
    target=st.none() | st.builds(TargetRef, system=texts, object_id=texts),
    reversibility=st.sampled_from(Reversibility),
    before=st.none() | images,
    after=st.none() | images,
    idempotency_key=texts,
    status=st.sampled_from(CallStatus),
    job_id=optional_texts,
    result=json_values,
    error=st.none()
    | st.builds(ErrorInfo, type=texts, message=texts, retryable=st.none() | st.booleans()),
    compensation=st.none()
    | st.builds(
        Compensation,
        strategy=texts,
        tool=optional_texts,
        args=json_maps,
        allowed_until=st.none() | times,
    ),
    origin=st.sampled_from(Origin),
    compensates=optional_texts,
    correlation_id=optional_texts,
    value=st.none() | st.floats(allow_nan=False),
    confidence=st.none() | st.floats(0, 1),
    reasoning_summary=optional_texts,
    blocked_by=optional_texts,
    labels=st.dictionaries(texts, texts, max_size=3),
)

control_commands = st.builds(
    ControlCommand,
    command_id=texts,
    issued_at=times,
    action=st.sampled_from(ControlAction),
    scope=st.dictionaries(texts, texts, max_size=4),
    mode=st.sampled_from(FreezeMode),
    expires_at=st.none() | times,
    reason=texts,
    issuer=texts,
    cause=optional_texts,
    refers_to=optional_texts,
    approved_args=st.none() | json_maps,
    key_id=optional_texts,
    signature=st.none() | st.binary(max_size=64),
)

signals = st.builds(
    Signal,
    signal_id=texts,
    detected_at=times,
    detector=texts,
    severity=st.sampled_from(Severity),
    scope=st.dictionaries(texts, texts, max_size=3),
    summary=texts,
    evidence=st.lists(
        st.builds(
            Evidence,
            event_id=texts,
            topic=optional_texts,
            partition=st.none() | st.integers(0, 2**31 - 1),
            offset=st.none() | st.integers(0, 2**63 - 1),
        ),
        max_size=3,
    ),
    details=st.dictionaries(texts, texts, max_size=3),
)


def _fastavro_bytes(record: ActionEvent | ControlCommand | Signal) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf, codec.current_schema(type(record)).parsed, codec.to_datum(record)
    )
    return buf.getvalue()


def _fastavro_read(record_type: type, body: bytes) -> object:
    datum = fastavro.schemaless_reader(
        io.BytesIO(body), codec.current_schema(record_type).parsed, None
    )
    return codec.from_datum(record_type, datum)  # type: ignore[type-var]


@settings(max_examples=150, deadline=None)
@given(st.one_of(action_events, control_commands, signals))
def test_same_bytes_as_fastavro_and_readable_both_ways(record: ActionEvent) -> None:
    ours = codec.encode_body(record)
    assert ours == _fastavro_bytes(record)
    from_fastavro = _fastavro_read(type(record), ours)
    assert from_fastavro == record
    decoded = codec.decode(codec.encode(record))
    assert decoded == record
    # The same model as model_construct builds from fastavro's datum: field order (repr;
    # JSON text comes back with sorted keys either way), every field set, nothing extra.
    assert repr(decoded) == repr(from_fastavro)
    assert decoded.model_fields_set == from_fastavro.model_fields_set
    assert decoded.model_fields_set == set(type(record).model_fields)
    assert decoded.__pydantic_extra__ is None and decoded.__pydantic_private__ is None
    assert decoded.model_dump() == record.model_dump()


@pytest.mark.parametrize("n", [0, 1, -1, 63, 64, -65, 2**31, -(2**31), 2**63 - 1, -(2**63)])
def test_long_round_trip(n: int) -> None:
    out = bytearray()
    write_long(n, out)
    assert read_long(bytes(out), 0) == (n, len(out))


@pytest.mark.parametrize(
    "micros",
    [0, 1, -1, 2**48 - 1, 2**48, -(2**48), -(2**48) - 1, 2**55 - 1, 2**55, -(2**55),
     -(2**55) - 1, 1_763_870_400_000_000, -62_135_596_800_000_000, 253_402_300_799_999_999],
)
def test_timestamps_are_longs_on_the_wire(micros: int) -> None:
    expected = bytearray()
    write_long(micros, expected)
    ours = bytearray()
    write_micros(micros, ours)
    assert ours == expected
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    from_datetime = bytearray()
    write_micros(when, from_datetime)
    assert from_datetime == expected
    assert read_micros(bytes(expected) + b"\x07", 0) == (when, len(expected))


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(AvroFastError, match="timezone-aware"):
        write_micros(datetime(2026, 1, 1), bytearray())


def test_long_out_of_range_is_refused() -> None:
    with pytest.raises(AvroFastError):
        write_long(2**63, bytearray())


def test_trailing_and_truncated_bodies_are_refused() -> None:
    event = ActionEvent(
        event_id="e1",
        occurred_at=datetime.now(UTC) - timedelta(seconds=1),
        run_id="r",
        agent_id="a",
        identity="i",
        step_id="r:1",
        tool="t",
        reversibility=Reversibility.READ_ONLY,
        idempotency_key="r:1",
        status=CallStatus.SUCCEEDED,
    )
    body = codec.encode_body(event)
    compiled = codec.compiled(ActionEvent)
    with pytest.raises(AvroFastError):
        compiled.read(body + b"\x00")
    for cut in range(len(body)):
        with pytest.raises(AvroFastError):
            compiled.read(body[:cut])


def _event_with_text(text: str) -> ActionEvent:
    return ActionEvent(
        event_id=text,
        occurred_at=datetime(2026, 11, 24, tzinfo=UTC),
        run_id="r",
        agent_id=text,
        identity="i",
        tenant=text,
        step_id="r:1",
        tool="t",
        requested_args={text: text, "n": [text, {text: text}]},
        target=TargetRef(system="erp", object_id=text),
        reversibility=Reversibility.REVERSIBLE,
        before=RecordImage(exists=True, fields={text: text, "plain": "x"}, version=1),
        idempotency_key="r:1",
        status=CallStatus.SUCCEEDED,
        labels={text: text},
    )


@pytest.mark.parametrize(
    "text", ["ascii", "café", "€" * 30, "ü" * 70, "\U0001f600 emoji", "\x7f\x80", ""]
)
def test_non_ascii_strings_in_every_position(text: str) -> None:
    # Strings are read as Latin-1 slices when ASCII: every other string, short (one-byte
    # length) or long, must come back as its UTF-8 decoding.
    event = _event_with_text(text)
    assert codec.decode(codec.encode(event)) == event
    body = codec.encode_body(event)
    records = body + body
    compiled = codec.compiled(ActionEvent)
    first, end = compiled.read_from(records, records.decode("latin-1"), 0)
    second, stop = compiled.read_from(records, records.decode("latin-1"), end)
    assert first == second == event
    assert (end, stop) == (len(body), len(records))


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80"])
def test_invalid_utf8_in_a_string_is_refused(bad: bytes) -> None:
    marker = b"MARKER"
    body = codec.encode_body(_event_with_text("MARKER"))
    corrupt = body.replace(bytes([len(marker) << 1]) + marker,
                           bytes([len(bad) << 1]) + bad, 1)
    assert corrupt != body
    with pytest.raises(AvroFastError, match="corrupt"):
        codec.compiled(ActionEvent).read(corrupt)
