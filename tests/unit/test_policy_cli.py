"""``backout detect`` and ``backout processors`` on bad input: one line, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from backout.infra.cli import main
from backout.processors.replay import write_container
from tests.detection_kit import Clock


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKOUT_BOOTSTRAP", "BACKOUT_SIGNING_KEY_FILE", "BACKOUT_POLICY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BACKOUT_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "run.avro"
    clock = Clock()
    write_container(path, [clock.event(tenant="globex")] + [clock.read() for _ in range(3)])
    return path


def _bad_policy(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ndefaults:\n  limits:\n    agent: {actoins: 3}\n")
    return path


def test_detect_prints_findings_and_the_commands_they_would_issue(
    recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "defaults: {allow: {tenants: [acme]}}\nresponses: {policy_violation: {high: [halt]}}\n"
    )
    assert main(["detect", "--replay", str(recording), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "policy_violation" in out and "halt" in out and "run=run-1" in out
    assert "4 events, 1 findings, 1 commands" in out


@pytest.mark.parametrize("args", [["detect", "--replay", "{rec}"], ["processors"]])
def test_a_bad_policy_is_refused_with_file_line_and_field(
    args: list[str], recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_policy(tmp_path)
    argv = [a.format(rec=recording) for a in args] + ["--policy", str(bad)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"backout: {bad}:4: defaults.limits.agent.actoins: unknown key"


def test_the_processors_need_a_signing_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["processors"]) == 1
    assert "BACKOUT_SIGNING_KEY_FILE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--replay", "nowhere/run.avro"], "no file 'nowhere/run.avro'"),
        (["--replay", "{rec}", "--since", "1h"], "--since/--until apply to a topic"),
    ],
)
def test_detect_refuses_bad_arguments(
    args: list[str], says: str, recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["detect", *[a.format(rec=recording) for a in args]]) == 1
    assert says in capsys.readouterr().err


def test_detect_refuses_a_file_that_is_not_a_recording(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"not an avro container")
    assert main(["detect", "--replay", str(junk)]) == 1
    assert "is not an Avro container of ActionEvents" in capsys.readouterr().err
