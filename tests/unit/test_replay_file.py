"""A recorded file replayed over several processes: the same result as one fold, and
the same typed errors."""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path

import pytest
from fastavro import parse_schema, writer

from backout.processors.replay import read_container, replay, write_container
from backout.processors.replay_file import replay_file
from backout.schemas import codec
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent
from tests.detection_kit import Clock, policy

TIGHT = """\
version: 1
window: 10s
defaults:
  limits:
    run: {actions: 12, records: 8, tenants: 1}
    agent: {actions: 30, value: 40}
    retry_loop: 3
responses:
  default:
    high: [read_only]
    critical: [halt]
"""


def _events(n: int = 400) -> list[ActionEvent]:
    """Seven agents interleaved, each with two runs, some tenants and repeated calls."""
    clock = Clock(step=0.05)
    return [
        clock.event(
            agent_id=f"agent-{i % 7}",
            run_id=f"run-{i % 7}-{i % 2}",
            tenant=f"tenant-{i % 3}",
            object_id=f"inv_{i % 11}",
            value=1.0,
        )
        for i in range(n)
    ]


def _same(path: Path, *, workers: int) -> None:
    chosen = policy(TIGHT)
    expected = replay(read_container(path), chosen).to_json()
    assert expected["findings"] and expected["commands"]  # the comparison has substance
    assert replay_file(path, chosen, workers=workers, min_bytes=0).to_json() == expected


def test_shared_over_processes_it_equals_one_fold(tmp_path: Path) -> None:
    path = tmp_path / "r.avro"
    write_container(path, _events(), block_records=50)
    _same(path, workers=2)
    _same(path, workers=5)


def test_while_threads_run_the_workers_start_fresh_and_agree(tmp_path: Path) -> None:
    path = tmp_path / "r.avro"
    write_container(path, _events(120))
    done = threading.Event()
    busy = threading.Thread(target=done.wait)
    busy.start()
    try:
        _same(path, workers=2)
    finally:
        done.set()
        busy.join()


def test_a_file_with_an_older_schema_is_replayed_in_process(tmp_path: Path) -> None:
    old = json.loads(
        resources.files("backout.schemas").joinpath("history/ActionEvent.v1.avsc").read_text()
    )
    names = {f["name"] for f in old["fields"]}
    path = tmp_path / "v1.avro"
    with open(path, "wb") as out:
        datums = [{k: v for k, v in codec.to_datum(e).items() if k in names} for e in _events(60)]
        writer(out, parse_schema(old), datums)
    _same(path, workers=2)


def test_a_corrupt_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "r.avro"
    write_container(path, _events(), block_records=1000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConfigError, match="not an Avro container of ActionEvents"):
        replay_file(path, policy(), workers=2, min_bytes=0)


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        replay_file(tmp_path / "missing.avro", policy(), workers=2, min_bytes=0)
    path = tmp_path / "r.avro"
    write_container(path, _events(10))
    with pytest.raises(ConfigError, match="at least 1"):
        replay_file(path, policy(), workers=0)
