"""``backout harden`` on a real broker: the run and its baseline are read from the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backout.infra.cli import main
from backout.infra.harden_files import read_events, write_events
from backout.infra.harden_template import POLICY_ENV
from backout.infra.settings import Settings
from backout.producers.kafka import KafkaEventSink
from backout.schemas.codec import encode
from backout.schemas.events import ActionEvent
from tests.harden_story import POLICY, T0, baseline, incident

SINCE = (T0 - timedelta(days=1)).isoformat()
"""The story happens on a fixed date: the automatic baseline must look back that far."""


def _publish(settings: Settings, events: list[ActionEvent]) -> None:
    assert settings.bootstrap is not None
    sink = KafkaEventSink(settings, settings.bootstrap)
    try:
        for event in events:
            sink.publish(settings.topic("actions"), event.key.encode(), encode(event))
    finally:
        sink.close()


@pytest.fixture
def on_the_log(kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The story's baseline and incident on the actions topic; the CLI pointed at them.

    Returns the policy file in force.
    """
    _publish(kafka_settings, [*baseline(), *incident()])
    monkeypatch.setenv("BACKOUT_BOOTSTRAP", kafka_settings.bootstrap or "")
    monkeypatch.setenv("BACKOUT_TOPIC_PREFIX", kafka_settings.topic_prefix)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, "utf-8")
    return policy


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _pytest(test: Path, policy: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=test.parent,
        env={**os.environ, POLICY_ENV: str(policy)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode


def test_harden_reads_the_run_and_an_automatic_baseline_from_the_log(
    on_the_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hardening"
    found = _cli(
        capsys, "harden", "wf_1", "--out", str(out), "--policy", str(on_the_log), "--since", SINCE
    )
    assert found["events"] == len(incident())
    assert found["baseline"] == {"runs": ["wf_0", "wf_00"], "events": len(baseline())}
    before, after = found["contained_before"]["event"], found["contained_after"]["event"]
    assert after < before
    assert found["test_asserts_containment_by_event"] == after
    assert found["change"]["paths"][0].startswith("agents.billing-agent.limits.")
    assert read_events(Path(found["files"]["events"])) == incident()
    [perm] = found["permissions"]
    assert perm["excess"]["tenants"] == ["globex"]
    test = Path(found["files"]["test"])
    assert _pytest(test, on_the_log) == 1
    assert _pytest(test, Path(found["files"]["proposed_policy"])) == 0


def test_explicit_baselines_from_the_log_and_from_an_avro_file(
    on_the_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "normal.avro"
    write_events(file, [e for e in baseline() if e.run_id == "wf_00"])
    found = _cli(
        capsys,
        "harden",
        "wf_1",
        "--out",
        str(tmp_path / "h"),
        "--policy",
        str(on_the_log),
        "--baseline",
        "wf_0",
        "--baseline",
        str(file),
    )
    assert found["baseline"]["runs"] == ["wf_0", "wf_00"]


def test_text_output_names_the_change_and_the_files(
    on_the_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert (
        main(
            [
                "harden",
                "wf_1",
                "--out",
                str(tmp_path / "t"),
                "--policy",
                str(on_the_log),
                "--since",
                SINCE,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "in force:   first freeze after event" in out
    assert "proposed:   agents.billing-agent.limits." in out
    assert f"{POLICY_ENV}=" in out and "test_harden_wf_1.py" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["harden", "nope", "--out", "{tmp}/x"], "unknown run 'nope'"),
        (
            ["harden", "wf_1", "--out", "{tmp}/x", "--policy", "{tmp}/missing.yaml"],
            "cannot read policy",
        ),
        (["harden", "wf_1", "--out", "{tmp}/x", "--baseline", "ghost"], "--baseline 'ghost'"),
        (["harden", "wf_1", "--out", "{tmp}/x", "--since", "yesterday"], "bad time"),
    ],
)
def test_bad_input_is_one_line(
    on_the_log: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    capsys.readouterr()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
