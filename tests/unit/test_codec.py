"""The codec: Avro single-object encoding, lossless JSON values, typed decode errors,
schema evolution and Confluent Schema Registry framing (``mock://``)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from io import BytesIO
from typing import Any

import fastavro
import fastavro.schema
import pytest
from pydantic import JsonValue

from backout.schemas import (
    ActionEvent,
    ControlCommand,
    DecodeError,
    Signal,
    decode,
    encode,
)
from backout.schemas import codec as codec_mod
from backout.schemas.events import (
    CallStatus,
    Compensation,
    ControlAction,
    ErrorInfo,
    EventKind,
    Evidence,
    FreezeMode,
    Origin,
    RecordImage,
    Reversibility,
    Severity,
    TargetRef,
)
from backout.schemas.registry import RegistryCodec, SingleObjectCodec, make_codec

T0 = datetime(2026, 11, 23, 4, 0, 0, 123456, tzinfo=UTC)


def _avsc(name: str) -> dict[str, Any]:
    text = resources.files("backout.schemas").joinpath(name).read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def full_event(**overrides: Any) -> ActionEvent:
    """An ActionEvent with every field set."""
    fields: dict[str, Any] = {
        "event_id": "01JDQ0000000000000000000AB",
        "occurred_at": T0,
        "kind": EventKind.TOOL_CALL,
        "run_id": "wf_2026_0042",
        "parent_run_id": "wf_parent",
        "agent_id": "billing-agent",
        "identity": "svc-billing",
        "tenant": "acme",
        "environment": "staging",
        "workflow": "dunning",
        "step_id": "wf_2026_0042:3",
        "parent_step_id": "wf_2026_0042:2",
        "tool": "set_status",
        "requested_args": {"invoice_id": "inv_88421", "status": "void", "amount": 12.5},
        "approved_args": {"invoice_id": "inv_88421", "status": "void"},
        "target": TargetRef(system="erp", object_id="inv_88421"),
        "reversibility": Reversibility.COMPENSATABLE,
        "before": RecordImage(exists=True, fields={"status": "open", "amount": 1250}, version=7),
        "after": RecordImage(exists=True, fields={"status": "void", "amount": 1250}, version=8),
        "idempotency_key": "wf_2026_0042:3",
        "status": CallStatus.PENDING,
        "job_id": "job-77",
        "result": {"ok": True, "ids": [1, 2, 3]},
        "error": ErrorInfo(type="ValueError", message="boom", retryable=False),
        "compensation": Compensation(
            strategy="compensating_tool",
            tool="reopen",
            args={"invoice_id": "inv_88421"},
            allowed_until=T0 + timedelta(days=30),
        ),
        "origin": Origin.ROLLBACK,
        "compensates": "01JDQ0000000000000000000AA",
        "correlation_id": "corr-1",
        "value": 1250.0,
        "confidence": 0.42,
        "reasoning_summary": "customer asked to void",
        "blocked_by": "cmd-1",
        "labels": {"checkpoint": "before-bulk", "uncertainty": "parse_failure"},
    }
    fields.update(overrides)
    return ActionEvent(**fields)


def minimal_event(**overrides: Any) -> ActionEvent:
    fields: dict[str, Any] = {
        "event_id": "e1",
        "occurred_at": T0,
        "run_id": "r1",
        "agent_id": "a",
        "identity": "i",
        "step_id": "r1:1",
        "tool": "t",
        "reversibility": Reversibility.READ_ONLY,
        "idempotency_key": "r1:1",
        "status": CallStatus.SUCCEEDED,
    }
    fields.update(overrides)
    return ActionEvent(**fields)


def full_command() -> ControlCommand:
    return ControlCommand(
        command_id="cmd-1",
        issued_at=T0,
        action=ControlAction.APPROVE,
        scope={"agent": "billing-agent", "tenant": "acme"},
        mode=FreezeMode.READ_ONLY,
        expires_at=T0 + timedelta(hours=1),
        reason="looks fine",
        issuer="alice",
        cause="sig-9",
        refers_to="req-3",
        approved_args={"amount": 10, "note": None, "nested": {"x": [1.0, 2]}},
        key_id="k1",
        signature=bytes(range(64)),
    )


def full_signal() -> Signal:
    return Signal(
        signal_id="sig-1",
        detected_at=T0,
        detector="mutation_volume",
        severity=Severity.HIGH,
        scope={"agent": "billing-agent"},
        summary="120 writes in 10s",
        evidence=[
            Evidence(event_id="e1", topic="backout.actions", partition=2, offset=2**40),
            Evidence(event_id="e2"),
        ],
        details={"threshold": "100"},
    )


# --- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record",
    [
        full_event(),
        minimal_event(),
        full_command(),
        ControlCommand(command_id="c", issued_at=T0, action=ControlAction.FREEZE),
        full_signal(),
        Signal(signal_id="s", detected_at=T0, detector="d", severity=Severity.INFO, summary=""),
    ],
    ids=["action-full", "action-minimal", "control-full", "control-min", "signal", "signal-min"],
)
def test_round_trip(record: ActionEvent | ControlCommand | Signal) -> None:
    raw = encode(record)
    back = decode(raw)
    assert type(back) is type(record)
    assert back == record
    assert back.model_dump() == record.model_dump()
    assert decode(raw, type(record)) == record
    # Decoded records are real models (enums are enum members, nested models typed).
    assert type(back).model_validate(back.model_dump()) == record


def test_decoded_action_event_has_typed_members() -> None:
    back = decode(encode(full_event()), ActionEvent)
    assert back.kind is EventKind.TOOL_CALL
    assert back.status is CallStatus.PENDING
    assert back.reversibility is Reversibility.COMPENSATABLE
    assert back.origin is Origin.ROLLBACK
    assert isinstance(back.target, TargetRef) and back.key == "erp/inv_88421"
    assert isinstance(back.before, RecordImage) and back.before.version == 7
    assert isinstance(back.compensation, Compensation)
    assert back.compensation.allowed_until == T0 + timedelta(days=30)
    assert back.occurred_at == T0 and back.occurred_at.tzinfo is not None


def test_timestamps_keep_microseconds_and_normalise_to_utc() -> None:
    local = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    back = decode(encode(minimal_event(occurred_at=local)), ActionEvent)
    assert back.occurred_at == local
    assert back.occurred_at.utcoffset() == timedelta(0)


# --- JSON values are lossless -------------------------------------------------------------
JSON_VALUES: list[JsonValue] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**63) - 1,
    10**40,
    1.0,
    -0.5,
    0.1,
    1e300,
    "",
    "text",
    "ünïcødé ✓",
    "1",
    "null",
    [],
    {},
    [1, 1.0, "1", None, True, False],
    {"a": {"b": [1, {"c": 2**70, "d": 2.0}]}, "e": None},
    [[[]], [{}], {"json": "looks like JsonText"}],
    {"json": "x"},
]


def assert_same_json(actual: object, expected: object) -> None:
    """Equal, and of the same JSON type at every level (1.0 is not 1, True is not 1)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same_json(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same_json(a, e)
    else:
        assert actual == expected


@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
def test_json_values_are_lossless_everywhere(value: JsonValue) -> None:
    event = full_event(
        requested_args={"v": value, "other": 1},
        approved_args={"v": value},
        before=RecordImage(exists=True, fields={"f": value}, version=value),
        after=RecordImage(exists=True, fields={"f": value, "g": "x"}, version=value),
        result=value,
        compensation=Compensation(strategy="compensating_tool", tool="t", args={"v": value}),
    )
    back = decode(encode(event), ActionEvent)
    assert_same_json(back.requested_args, {"v": value, "other": 1})
    assert_same_json(back.approved_args, {"v": value})
    assert back.before is not None and back.after is not None
    assert_same_json(back.before.fields, {"f": value})
    assert_same_json(back.before.version, value)
    assert_same_json(back.after.fields, {"f": value, "g": "x"})
    assert_same_json(back.result, value)
    assert back.compensation is not None
    assert_same_json(back.compensation.args, {"v": value})
    command = decode(encode(full_command().model_copy(update={"approved_args": {"v": value}})))
    assert_same_json(command.approved_args, {"v": value})


def test_float_and_int_stay_distinct_side_by_side() -> None:
    back = decode(encode(full_event(requested_args={"i": 1, "f": 1.0, "b": True})), ActionEvent)
    assert [type(back.requested_args[k]) for k in ("i", "f", "b")] == [int, float, bool]


def test_scalars_use_native_avro_types_and_the_rest_json_text() -> None:
    assert codec_mod.to_avro_json(5) == 5
    assert codec_mod.to_avro_json(1.0) == 1.0
    assert codec_mod.to_avro_json("s") == "s"
    assert codec_mod.to_avro_json(None) is None
    assert codec_mod.to_avro_json(2**64) == {"json": str(2**64)}
    assert codec_mod.to_avro_json([1, 2]) == {"json": "[1,2]"}
    assert codec_mod.to_avro_json({"b": 1, "a": 2}) == {"json": '{"a":2,"b":1}'}


# --- the wire format -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("record", "avsc"),
    [
        (full_event(), "ActionEvent.avsc"),
        (full_command(), "ControlCommand.avsc"),
        (full_signal(), "Signal.avsc"),
    ],
)
def test_single_object_header_is_magic_and_crc64_avro_fingerprint(
    record: ActionEvent | ControlCommand | Signal, avsc: str
) -> None:
    raw = encode(record)
    assert raw[:2] == b"\xc3\x01"
    canonical = fastavro.schema.to_parsing_canonical_form(_avsc(avsc))
    # fastavro's own Rabin implementation returns the fingerprint as the hex of its
    # little-endian bytes: exactly what single-object encoding puts on the wire.
    expected = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    assert raw[2:10] == expected
    assert int.from_bytes(raw[2:10], "little") == codec_mod.crc64_avro(canonical.encode())


def test_crc64_avro_matches_the_specification_and_fastavro() -> None:
    # The Avro specification's test vectors: the fingerprint of the empty string is the
    # polynomial's EMPTY value, and of the schema "null" is 7195948357588979594.
    assert codec_mod.crc64_avro(b"") == 0xC15D213AA4D7A795
    assert codec_mod.crc64_avro(b'"null"') == 7195948357588979594
    rng = random.Random(7)
    for text in ['"int"', '{"type":"fixed","name":"f","size":4}', "x" * 1000, "ü"]:
        ours = codec_mod.crc64_avro(text.encode()).to_bytes(8, "little")
        assert ours.hex() == fastavro.schema.fingerprint(text, "CRC-64-AVRO")
    for _ in range(20):
        text = "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 80)))
        ours = codec_mod.crc64_avro(text.encode()).to_bytes(8, "little")
        assert ours.hex() == fastavro.schema.fingerprint(text, "CRC-64-AVRO")


@pytest.mark.parametrize(
    ("record", "avsc"),
    [
        (full_event(), "ActionEvent.avsc"),
        (full_command(), "ControlCommand.avsc"),
        (full_signal(), "Signal.avsc"),
    ],
)
def test_any_avro_reader_decodes_a_record_given_only_the_avsc(
    record: ActionEvent | ControlCommand | Signal, avsc: str
) -> None:
    raw = encode(record)
    schema = fastavro.parse_schema(_avsc(avsc))
    datum = fastavro.schemaless_reader(BytesIO(raw[10:]), schema, None)
    assert isinstance(datum, dict)
    for name, value in record.model_dump(mode="python").items():
        if isinstance(value, str | bool | int | float | bytes) or value is None:
            assert datum[name] == value, name


def test_plain_fastavro_sees_json_values_as_native_scalars_or_json_text() -> None:
    raw = encode(full_event())
    datum = fastavro.schemaless_reader(
        BytesIO(raw[10:]), fastavro.parse_schema(_avsc("ActionEvent.avsc")), None
    )
    assert isinstance(datum, dict)
    assert datum["status"] == "pending"
    assert datum["target"] == {"system": "erp", "object_id": "inv_88421"}
    assert datum["requested_args"] == {"invoice_id": "inv_88421", "status": "void", "amount": 12.5}
    assert datum["before"]["version"] == 7
    assert json.loads(datum["result"]["json"]) == {"ok": True, "ids": [1, 2, 3]}
    assert datum["occurred_at"] == T0


# --- decode errors ------------------------------------------------------------------------
def _assert_decode_error(raw: bytes, expected: type[Any] | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw, expected)
    assert info.value.raw == raw
    assert info.value.reason
    assert str(info.value).startswith("cannot decode record")
    return info.value


def test_unknown_fingerprint() -> None:
    raw = encode(full_event())
    bad = raw[:2] + bytes(8) + raw[10:]
    error = _assert_decode_error(bad)
    assert "unknown schema fingerprint" in error.reason
    assert "0000000000000000" in error.reason


def test_every_truncation_is_a_decode_error() -> None:
    raw = encode(full_event())
    for cut in range(len(raw)):
        _assert_decode_error(raw[:cut])


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"hello world, not avro", b"\xc3", b"\xc3\x01"])
def test_garbage_and_empty_bytes(garbage: bytes) -> None:
    error = _assert_decode_error(garbage)
    assert "single-object" in error.reason


def test_random_bodies_behind_a_valid_header_raise_decode_error_only() -> None:
    rng = random.Random(2026)
    for record_type in (ActionEvent, ControlCommand, Signal):
        header = b"\xc3\x01" + codec_mod.current_schema(record_type).fingerprint
        for _ in range(300):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
            _assert_decode_error(header + body)


def test_wrong_expected_type() -> None:
    error = _assert_decode_error(encode(full_signal()), ActionEvent)
    assert "expected ActionEvent, got Signal" in error.reason


def test_not_bytes() -> None:
    with pytest.raises(DecodeError):
        decode("not bytes")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_decode() -> None:
    raw = encode(full_event())
    assert decode(bytearray(raw)) == full_event()
    assert decode(memoryview(raw)) == full_event()


def test_decode_error_at_keeps_raw_and_adds_position() -> None:
    error = _assert_decode_error(b"junk")
    located = error.at("backout.actions/2@17")
    assert located.raw == b"junk" and located.reason == error.reason
    assert located.position == "backout.actions/2@17"
    assert "at backout.actions/2@17" in str(located)


# --- schema evolution --------------------------------------------------------------------
def _v1_datum() -> dict[str, Any]:
    datum = codec_mod.to_datum(full_event())
    v1_names = {f["name"] for f in _avsc("history/ActionEvent.v1.avsc")["fields"]}
    return {k: v for k, v in datum.items() if k in v1_names}


def test_a_record_written_with_v1_decodes_with_the_current_schema() -> None:
    v1 = _avsc("history/ActionEvent.v1.avsc")
    canonical = fastavro.schema.to_parsing_canonical_form(v1)
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    assert fingerprint != codec_mod.current_schema(ActionEvent).fingerprint
    body = BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(v1), _v1_datum())
    raw = b"\xc3\x01" + fingerprint + body.getvalue()

    back = decode(raw, ActionEvent)
    assert isinstance(back, ActionEvent)
    # Fields added after v1 get their defaults; everything else survives.
    assert back.blocked_by is None
    assert back.labels == {}
    expected = full_event(blocked_by=None, labels={})
    assert back == expected


def test_history_schemas_are_in_the_catalog() -> None:
    catalog = codec_mod.schema_catalog()
    old = [w for w in catalog.values() if not w.is_current]
    assert [w.record_type for w in old] == [ActionEvent]
    assert sum(1 for w in catalog.values() if w.is_current) == 3


# --- Confluent Schema Registry framing -----------------------------------------------------
def test_make_codec_without_url_is_single_object() -> None:
    plain = make_codec(None)
    assert isinstance(plain, SingleObjectCodec)
    assert plain.encode(full_event()) == encode(full_event())
    assert plain.decode(encode(full_signal()), Signal) == full_signal()
    assert isinstance(make_codec(""), SingleObjectCodec)


@pytest.mark.parametrize("record", [full_event(), full_command(), full_signal()])
def test_registry_framing_round_trip(record: ActionEvent | ControlCommand | Signal) -> None:
    registry = make_codec("mock://backout-test")
    assert isinstance(registry, RegistryCodec)
    raw = registry.encode(record)
    assert raw[:1] == b"\x00"
    schema_id = int.from_bytes(raw[1:5], "big")
    assert raw[5:] == codec_mod.encode_body(record)
    assert registry.decode(raw) == record
    assert registry.decode(raw, type(record)) == record
    # The registry holds the record's schema under the record-name subject.
    client = registry._client
    registered = client.get_latest_version(codec_mod.record_name(type(record)))
    assert registered.schema_id == schema_id
    assert (
        fastavro.schema.to_parsing_canonical_form(json.loads(registered.schema.schema_str))
        == codec_mod.current_schema(type(record)).canonical
    )


def test_registry_decode_looks_schemas_up_by_id() -> None:
    writer = RegistryCodec("mock://shared")
    raw = writer.encode(full_event())
    reader = RegistryCodec("mock://shared")
    reader._client = writer._client  # mock registries are per client; share it
    assert reader.decode(raw, ActionEvent) == full_event()


def test_registry_decodes_a_v1_record_with_the_current_schema() -> None:
    from confluent_kafka.schema_registry import Schema

    registry = RegistryCodec("mock://evolution")
    v1 = _avsc("history/ActionEvent.v1.avsc")
    v1_id = registry._client.register_schema(
        "backout.v1.ActionEvent", Schema(json.dumps(v1), "AVRO")
    )
    body = BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(v1), _v1_datum())
    raw = b"\x00" + v1_id.to_bytes(4, "big") + body.getvalue()
    assert registry.decode(raw, ActionEvent) == full_event(blocked_by=None, labels={})


def test_registry_decode_errors_keep_raw() -> None:
    registry = make_codec("mock://errors")
    raw = registry.encode(full_event())
    cases = [
        b"",
        b"\x00\x00",
        encode(full_event()),  # single-object bytes are not registry framing
        b"\x00" + (9999).to_bytes(4, "big") + raw[5:],  # unknown schema id
        raw[:40],  # truncated body
    ]
    for bad in cases:
        with pytest.raises(DecodeError) as info:
            registry.decode(bad)
        assert info.value.raw == bad
    with pytest.raises(DecodeError, match="expected Signal, got ActionEvent"):
        registry.decode(raw, Signal)
