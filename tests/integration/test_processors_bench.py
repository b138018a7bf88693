"""The detection benchmark runs (tiny sizes); its figures are printed, never judged here."""

from __future__ import annotations

from backout.infra.broker import Broker
from tests.test_bench_smoke import run_bench


def test_detection_bench_runs(broker: Broker) -> None:
    out = run_bench("detection", "--quick", bootstrap=broker.bootstrap)
    for figure, target in [
        ("throughput, one worker", ">= 10,000/s"),
        ("offending action -> its freeze, p99", "<= 250 ms"),
        ("replay from an Avro container file", ">= 30,000/s"),
    ]:
        lines = [line for line in out.splitlines() if line.strip().startswith(figure)]
        assert len(lines) == 1, (figure, out)
        assert f"target {target}" in lines[0], lines[0]
        assert "MISSING" not in lines[0]
    assert "targets met" in out
