"""``backout demo`` end to end: the README's main job, and what it says when it cannot run."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from backout.infra.broker import Broker, free_port
from backout.infra.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["demo", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_demo_on_the_embedded_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BACKOUT_BOOTSTRAP", raising=False)
    code, out, err = _run(capsys, "--json", "--workdir", str(tmp_path))
    assert code == 0, err
    found: dict[str, Any] = json.loads(out)
    failed = [c for c in found["checks"] if not c["ok"]]
    assert found["ok"] and not failed, failed
    assert found["broker"]["kind"] == "embedded"
    assert found["seconds"] < 60
    # containment: a signed freeze of the agent from the processors, the next calls blocked
    freeze = found["freeze"]
    assert freeze["scope"] == {"agent": "billing-agent", "environment": "production"}
    assert freeze["issuer"] == "backout-processors" and freeze["signature"]
    assert len(found["blocked_calls"]) == 2
    report = found["report"]
    assert report["blocked_calls"] == 2
    assert report["time_to_containment_s"] is not None and report["time_to_containment_s"] > 0
    # the rollback: surgical, with a kept out-of-band write and a manual task
    assert report["conflicts"] == ["erp.invoices/INV-A3"]
    assert report["others_writes_kept"] >= 2
    assert len(report["open_tasks"]) == 1
    summary = found["rollback"]["summary"]
    assert summary["compensated"] >= 1 and summary["restored"] >= 1
    assert summary["conflicts"] == 1 and summary["manual"] == 1
    assert report["records_restored"] == summary["restored"] + summary["compensated"]
    # the databases and outputs the user can inspect afterwards
    assert (tmp_path / "erp.db").exists() and (tmp_path / "crm.db").exists()
    hardened = found["harden"]
    assert hardened["contained_after"]["event"] < hardened["contained_before"]["event"]
    assert Path(hardened["files"]["test"]).exists()
    kinds = {row["kind"] for row in found["timeline"]}
    assert {"action", "signal", "freeze"} <= kinds


def test_the_demo_on_BACKOUT_BOOTSTRAP_prints_the_story(
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("BACKOUT_BOOTSTRAP", broker.bootstrap)
    code, out, err = _run(capsys, "--workdir", str(tmp_path))
    assert code == 0, out + err
    for heading in (
        "timeline",
        "the freeze",
        "rollback plan",
        "incident report",
        "harden",
        "checks",
    ):
        assert heading in out
    assert "BLOCKED by cmd_" in out
    assert "demo passed in" in out
    assert f"explore the log: BACKOUT_BOOTSTRAP={broker.bootstrap}" in out
    assert "starting the topics and the processors" in err  # the phase checklist goes to stderr


def test_no_embedded_broker_says_how_to_point_at_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_binary = tmp_path / "tansu"
    not_a_binary.write_text("not a program")
    not_a_binary.chmod(stat.S_IRUSR | stat.S_IWUSR)
    monkeypatch.setenv("CALF_TANSU_BIN", str(not_a_binary))
    monkeypatch.delenv("BACKOUT_BOOTSTRAP", raising=False)
    code, out, err = _run(capsys, "--workdir", str(tmp_path / "w"))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "embedded broker cannot start" in lines[0]
    assert "CALF_TANSU_BIN" in lines[0]
    assert "BACKOUT_BOOTSTRAP=host:9092 backout demo" in lines[0]
    assert out == ""


def test_an_unreachable_BACKOUT_BOOTSTRAP_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKOUT_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    capfd.readouterr()
    code = main(["demo", "--workdir", str(tmp_path)])
    _, err = capfd.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "cannot reach the broker" in lines[0] and "BACKOUT_BOOTSTRAP" in lines[0]
