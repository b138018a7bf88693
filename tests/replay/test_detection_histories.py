"""Recorded histories through the detectors and the policy, compared with stored results.

Each folder under ``detection/`` holds ``history.jsonl`` (ActionEvents, one per line),
``policy.yaml`` and ``expected.json`` (what ``backout detect --json`` prints). The history
goes through an Avro container file, as a recording would, and must give exactly the
expected findings and commands: same input, same output. After an intended change of
the detectors, regenerate with ``BACKOUT_REGEN_REPLAY=1 pytest tests/replay`` and review
the diff of the ``expected.json`` files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from backout.infra.cli import main
from backout.processors.findings import DETECTORS, EventRef
from backout.processors.policy import load_policy
from backout.processors.replay import read_container, replay, write_container
from backout.processors.replay_file import replay_file
from backout.schemas.events import ActionEvent

HERE = Path(__file__).parent / "detection"
CASES = sorted(p.name for p in HERE.iterdir() if (p / "history.jsonl").exists())


def _history(case: str) -> list[ActionEvent]:
    lines = (HERE / case / "history.jsonl").read_text().splitlines()
    return [ActionEvent.model_validate_json(line) for line in lines if line.strip()]


def _expected(case: str, result: dict[str, Any]) -> dict[str, Any]:
    path = HERE / case / "expected.json"
    if os.environ.get("BACKOUT_REGEN_REPLAY") or not path.exists():
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", CASES)
def test_a_recorded_history_gives_the_recorded_findings(case: str, tmp_path: Path) -> None:
    recording = tmp_path / "history.avro"
    write_container(recording, _history(case))
    policy = load_policy(HERE / case / "policy.yaml")
    result = json.loads(json.dumps(replay(read_container(recording), policy).to_json()))
    assert result == _expected(case, result)
    # the same events straight from memory, and a second time: the same output
    direct = replay(
        [(e, EventRef(e.event_id, None, None, i)) for i, e in enumerate(_history(case))], policy
    )
    assert json.loads(json.dumps(direct.to_json())) == result


@pytest.mark.parametrize("case", CASES)
def test_backout_detect_prints_the_recorded_findings(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKOUT_STATE_DIR", str(tmp_path / "state"))
    recording = tmp_path / "history.avro"
    write_container(recording, _history(case))
    code = main(
        [
            "detect",
            "--replay",
            str(recording),
            "--policy",
            str(HERE / case / "policy.yaml"),
            "--json",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((HERE / case / "expected.json").read_text())


def test_the_histories_cover_every_detector_and_response() -> None:
    detectors: set[str] = set()
    modes: set[str] = set()
    for case in CASES:
        expected = json.loads((HERE / case / "expected.json").read_text())
        detectors |= {f["detector"] for f in expected["findings"]}
        modes |= {c["mode"] for c in expected["commands"]}
    # every detector but supervisor sampling (it needs a live target, not a recording)
    assert detectors >= set(DETECTORS) - {"supervisor_drift"}
    assert modes >= {"halt", "read_only", "quarantine_identity"}


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_a_replay_shared_over_processes_gives_the_recorded_findings(
    case: str, workers: int, tmp_path: Path
) -> None:
    recording = tmp_path / "history.avro"
    write_container(recording, _history(case), block_records=64)
    policy = load_policy(HERE / case / "policy.yaml")
    shared = replay_file(recording, policy, workers=workers, min_bytes=0)
    expected = json.loads((HERE / case / "expected.json").read_text())
    assert json.loads(json.dumps(shared.to_json())) == expected


def test_backout_detect_shares_a_file_over_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKOUT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr("backout.processors.replay_file.PARALLEL_MIN_BYTES", 0)
    case = "burst_and_uncertainty"
    recording = tmp_path / "history.avro"
    write_container(recording, _history(case))
    policy = str(HERE / case / "policy.yaml")
    argv = ["detect", "--replay", str(recording), "--policy", policy, "--workers", "2", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((HERE / case / "expected.json").read_text())
