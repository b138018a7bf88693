"""The rollback benchmark runs end to end at tiny sizes (the figures are not judged here)."""

from __future__ import annotations

from pathlib import Path

from backout.infra.broker import Broker
from bench.rollback import SMALL, run


def test_bench_rollback_smoke(broker: Broker, tmp_path: Path) -> None:
    figures = run(SMALL, tmp_path, workers=2, bootstrap=broker.bootstrap)
    assert figures["projection_events_per_s"] > 0
    assert figures["plan_seconds"] > 0 and figures["restores_per_s"] > 0
