"""bench.operators runs: tiny sizes on the test broker, checked for its figures (not timings)."""

from __future__ import annotations

import pytest

from backout.infra.broker import Broker
from tests.test_bench_smoke import run_bench


@pytest.mark.integration
def test_operators_bench_runs(broker: Broker) -> None:
    out = run_bench("operators", "--quick", bootstrap=broker.bootstrap)
    assert "200-step trace" in out and "2,000-event replay" in out
    for figure, target in [
        ("trace (in-process, text)", "<= 2 s"),
        ("trace --json (in-process)", "<= 2 s"),
        ("trace --html (in-process, text + page)", "<= 2 s"),
        ("trace, whole command (fresh interpreter)", "<= 2 s"),
        ("replay engine, every record decoded", ">= 30,000/s"),
        ("decode alone (codec, same events, no Kafka)", "(info)"),
        ("replay engine, --agent (1 in 10)", ">= 30,000/s"),
        ("replay engine, --since/--until (middle half)", ">= 30,000/s"),
        ("backout replay --agent --json (whole command)", ">= 30,000/s"),
    ]:
        lines = [line for line in out.splitlines() if line.strip().startswith(figure)]
        assert len(lines) == 1, (figure, out)
        assert f"target {target}" in lines[0], lines[0]
    assert "targets met" in out
