"""Recordings: Avro container files written and read, by us and by plain fastavro."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from fastavro import parse_schema, reader, writer

from backout.processors.findings import EventRef
from backout.processors.replay import read_container, replay, write_container
from backout.schemas import codec
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent
from tests.detection_kit import Clock, policy


def _events(n: int = 30) -> list[ActionEvent]:
    clock = Clock()
    return [
        clock.event(value=1.5, labels={"k": "v"}) if i % 3 else clock.read() for i in range(n)
    ] + [clock.lifecycle()]


@pytest.mark.parametrize("compression", ["null", "deflate"])
def test_our_files_are_standard_containers(compression: str, tmp_path: Path) -> None:
    events = _events()
    path = tmp_path / "r.avro"
    assert write_container(path, events, compression=compression, block_records=7) == 31
    assert [e for e, _ in read_container(path)] == events
    with open(path, "rb") as stream:
        assert [d["event_id"] for d in reader(stream)] == [e.event_id for e in events]
    copy = tmp_path / "again.avro"
    write_container(copy, events, compression=compression, block_records=7)
    assert copy.read_bytes() == path.read_bytes()


def test_files_written_by_fastavro_are_read(tmp_path: Path) -> None:
    events = _events()
    path = tmp_path / "fa.avro"
    with open(path, "wb") as out:
        writer(out, codec.current_schema(ActionEvent).parsed, [codec.to_datum(e) for e in events])
    assert [e for e, _ in read_container(path)] == events


def test_files_written_with_an_older_schema_are_read(tmp_path: Path) -> None:
    old = json.loads(
        resources.files("backout.schemas").joinpath("history/ActionEvent.v1.avsc").read_text()
    )
    names = {f["name"] for f in old["fields"]}
    events = _events(5)
    datums = [{k: v for k, v in codec.to_datum(e).items() if k in names} for e in events]
    path = tmp_path / "v1.avro"
    with open(path, "wb") as out:
        writer(out, parse_schema(old), datums)
    back = [e for e, _ in read_container(path)]
    assert [e.event_id for e in back] == [e.event_id for e in events]
    assert back[1].target == events[1].target


def test_positions_are_indexes_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.avro"
    write_container(path, _events(4))
    assert [ref.offset for _, ref in read_container(path)] == [0, 1, 2, 3, 4]


def test_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "x.avro"
    path.write_bytes(b"nope")
    with pytest.raises(ConfigError, match="not an Avro container"):
        list(read_container(path))
    with pytest.raises(ConfigError, match="cannot read"):
        list(read_container(tmp_path / "absent.avro"))


def test_replay_reports_findings_in_event_order_across_agents(tmp_path: Path) -> None:
    clock = Clock()
    events = [
        clock.event(agent_id=f"a{i % 3}", run_id=f"r{i % 3}", tenant="evil") for i in range(9)
    ]
    path = tmp_path / "r.avro"
    write_container(path, events)
    result = replay(read_container(path), policy("defaults: {allow: {tenants: [acme]}}"))
    assert [f.trigger.event_id for f in result.findings] == [e.event_id for e in events]
    assert [result.position[e.event_id] for e in events] == list(range(9))
    assert result.to_json()["events"] == 9


def test_sampling_is_counted_not_rechecked() -> None:
    events = _events(40)
    result = replay([(e, EventRef(e.event_id)) for e in events], policy("supervisor: {share: 1.0}"))
    assert result.sampled == sum(
        1 for e in events if e.after is not None and e.is_write and e.status == "succeeded"
    )
