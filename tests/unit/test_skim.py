"""Skimming Avro records: the same record boundaries and field as a full decode."""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backout.processors.skim import compile_skimmer
from backout.schemas import codec
from backout.schemas.avro_binary import write_long
from backout.schemas.events import ActionEvent
from tests.detection_kit import Clock
from tests.unit.test_avro_fast import action_events

SCHEMA = json.loads(resources.files("backout.schemas").joinpath("ActionEvent.avsc").read_text())
SKIM_AGENT = compile_skimmer(SCHEMA, "agent_id")


def _body(event: ActionEvent) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, codec.current_schema(ActionEvent).parsed, codec.to_datum(event))
    return out.getvalue()


@settings(max_examples=150, deadline=None)
@given(st.lists(action_events, min_size=1, max_size=4), st.binary(max_size=3))
def test_skimming_finds_each_record_end_and_its_agent(
    events: list[ActionEvent], prefix: bytes
) -> None:
    bodies = [_body(e) for e in events]
    block = prefix + b"".join(bodies)
    pos = len(prefix)
    for event, body in zip(events, bodies, strict=True):
        end, agent = SKIM_AGENT(block, pos)
        assert end == pos + len(body)
        assert agent.decode() == event.agent_id
        pos = end
    assert pos == len(block)


MAP_SCHEMA = {
    "type": "record",
    "name": "Sample",
    "fields": [
        {"name": "tags", "type": {"type": "map", "values": ["null", "long", "string"]}},
        {"name": "items", "type": {"type": "array", "items": "double"}},
        {"name": "colour", "type": {"type": "enum", "name": "Colour", "symbols": ["r", "g"]}},
        {"name": "again", "type": ["null", "Colour"]},
        {"name": "name", "type": "string"},
        {"name": "blob", "type": {"type": "fixed", "name": "Blob", "size": 3}},
    ],
}


def _encode(schema: dict[str, Any], datum: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), datum)
    return out.getvalue()


def test_blocks_written_with_their_byte_size_are_stepped_over_whole() -> None:
    datum = {
        "tags": {"a": 1, "b": "x" * 300, "c": None},
        "items": [1.0, 2.5],
        "colour": "g",
        "again": "r",
        "name": "n" * 200,
        "blob": b"abc",
    }
    plain = _encode(MAP_SCHEMA, datum)
    skim = compile_skimmer(MAP_SCHEMA, "name")
    assert skim(plain, 0) == (len(plain), b"n" * 200)
    # writers may instead give a block a negative count followed by its size in bytes
    tags_only = {**MAP_SCHEMA, "name": "TagsOnly", "fields": MAP_SCHEMA["fields"][:1]}
    entries = _encode(tags_only, {"tags": datum["tags"]})[1:-1]  # count 3 (0x06) ... end 0x00
    rest = {**MAP_SCHEMA, "name": "Rest", "fields": MAP_SCHEMA["fields"][1:]}
    sized = bytearray()
    write_long(-3, sized)
    write_long(len(entries), sized)
    sized += entries + b"\x00" + _encode(rest, {k: v for k, v in datum.items() if k != "tags"})
    assert skim(bytes(sized), 0) == (len(sized), b"n" * 200)


def test_a_field_that_is_not_a_top_level_string_is_refused() -> None:
    with pytest.raises(ValueError, match="not a top-level string field"):
        compile_skimmer(SCHEMA, "occurred_at")
    with pytest.raises(ValueError, match="not a top-level string field"):
        compile_skimmer(SCHEMA, "no_such_field")


def test_truncated_or_negative_lengths_raise_instead_of_running_on() -> None:
    body = _body(Clock().event())
    for cut in (1, len(body) // 2, len(body) - 1):
        with pytest.raises((ValueError, IndexError)):
            SKIM_AGENT(body[:cut], 0)
    negative = b"\x01" + body[1:]  # event_id's length: zig-zag -1
    with pytest.raises(ValueError, match="negative length"):
        SKIM_AGENT(negative, 0)
