"""The rollback benchmark runs end to end at tiny sizes (the figures are not judged here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backout.infra.broker import Broker
from bench.rollback import SMALL, run


def test_bench_rollback_smoke(broker: Broker, tmp_path: Path) -> None:
    figures = {f.name: f for f in run(SMALL, tmp_path, workers=2, bootstrap=broker.bootstrap)}
    assert figures["projection into SQLite (2 proc)"].value > 0
    assert figures["planning (pure)"].value > 0
    assert figures["restores on SQLite (CAS + journal)"].value > 0
    assert not figures["loading the scope from SQL"].judged


def test_bench_rollback_one_part(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = run(SMALL, tmp_path, bootstrap=broker.bootstrap, only="planning")
    assert [f.name for f in figures] == ["planning (pure)", "loading the scope from SQL"]
    out = capsys.readouterr().out
    assert "planning (pure)" in out and "/1 targets met" in out
    assert "restores on SQLite" not in out
