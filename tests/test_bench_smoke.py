"""Every benchmark runs: tiny sizes, checked for its printed figures (never for timings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backout.infra.broker import Broker

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str, bootstrap: str) -> str:
    """Run ``python -m bench.<module> args`` on the test broker; return its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env["BACKOUT_BOOTSTRAP"] = bootstrap
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.integration
def test_journal_overhead_bench_runs(broker: Broker) -> None:
    out = run_bench("journal_overhead", "--quick", bootstrap=broker.bootstrap)
    assert "codec: one ActionEvent of" in out
    for figure, target in [
        ("encode per ActionEvent", "<= 25 us"),
        ("decode per ActionEvent", "<= 25 us"),
        ("background overhead per call (mean)", "<= 40 us"),
        ("of which Journal alone (null sink)", "(info)"),
        ("confirm latency p50", "<= 1 ms"),
        ("confirm latency p99", "<= 2 ms"),
        ("background throughput (to flushed)", ">= 30,000/s"),
    ]:
        lines = [line for line in out.splitlines() if line.strip().startswith(figure)]
        assert len(lines) == 1, (figure, out)
        assert f"target {target}" in lines[0], lines[0]
    assert "ratio" in out and "fastavro alone" in out
    assert "targets met" in out
