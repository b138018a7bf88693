"""bench.containment runs end to end at tiny sizes (figures printed, timings not judged)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from backout.infra.broker import Broker

ROOT = Path(__file__).resolve().parents[2]


def test_containment_bench_runs(broker: Broker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env["BACKOUT_BOOTSTRAP"] = broker.bootstrap
    done = subprocess.run(
        [sys.executable, "-m", "bench.containment", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for figure, target in [
        ("freeze publish -> other process refuses (p50)", "<= 10"),
        ("freeze publish -> other process refuses (p99)", "<= 25"),
        ("guard check, call passes (mean)", "<= 20"),
        ("rebuild from 400 commands (usable)", "<= 5"),
    ]:
        lines = [line for line in done.stdout.splitlines() if line.strip().startswith(figure)]
        assert len(lines) == 1, (figure, done.stdout)
        assert f"target {target}" in lines[0], lines[0]
    assert "targets met" in done.stdout
