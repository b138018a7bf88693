"""The incident figures as Prometheus metrics, fed from the story's records. No broker."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from backout.infra.broker import free_port
from backout.infra.metrics import Metrics, metrics_for, serve, stop_serving
from backout.infra.settings import Settings
from backout.schemas.errors import ConfigError
from tests.operators_story import Story, build_story


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    return build_story(tmp_path_factory.mktemp("story"))


@pytest.fixture
def fed(story: Story) -> Metrics:
    metrics = Metrics()
    for event in story.events:
        metrics.figures.action(event)
        if event.event_id == story.ids["refund"]:
            metrics.figures.signal(story.signals[0])
            metrics.figures.command(story.commands[0])
    return metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, name
    return found


def test_detection_and_containment(fed: Metrics, story: Story) -> None:
    first = story.by_id(story.ids["set_inv1"]).occurred_at
    signal, freeze = story.signals[0], story.commands[0]
    assert value(fed, "backout_detection_latency_seconds_count") == 1
    assert value(fed, "backout_detection_latency_seconds_sum") == pytest.approx(
        (signal.detected_at - first).total_seconds()
    )
    assert value(fed, "backout_time_to_containment_seconds_sum") == pytest.approx(
        (freeze.issued_at - first).total_seconds()
    )
    assert value(fed, "backout_signals_total", detector="retry_loop", severity="high") == 1
    assert value(fed, "backout_control_commands_total", action="freeze", mode="halt") == 1


def test_rollback_figures_match_the_report(fed: Metrics) -> None:
    # Over every consequential action seen: the run's 6 and the operator's own write.
    assert value(fed, "backout_rollback_coverage_ratio") == pytest.approx(2 / 7)
    assert value(fed, "backout_rollback_success_ratio") == pytest.approx(2 / 3)
    assert value(fed, "backout_rollback_steps_total", outcome="conflict") == 1
    assert value(fed, "backout_rollback_steps_total", outcome="manual") == 1
    assert value(fed, "backout_recovery_seconds_count") == 2
    assert value(fed, "backout_blocked_calls_total") == 1
    assert value(fed, "backout_consequential_actions_total", reversibility="reversible") == 5


def test_blast_radius_per_run(fed: Metrics) -> None:
    assert value(fed, "backout_blast_radius_max_records") == 6  # wf_1 with its child run
    assert value(fed, "backout_blast_radius_max_tenants") == 2


def test_component_health() -> None:
    metrics = Metrics()
    metrics.batch("projector", records=500, seconds=0.02, decode_errors=2)
    metrics.lag("projector", 3, 1200)
    assert value(metrics, "backout_records_processed_total", component="projector") == 500
    assert value(metrics, "backout_decode_errors_total", component="projector") == 2
    assert (
        value(metrics, "backout_consumer_lag_records", component="projector", partition="3") == 1200
    )


def test_bounded_memory(story: Story) -> None:
    metrics = Metrics(max_tracked=3)
    for event in story.events:
        metrics.figures.action(event)
    assert len(metrics.figures._seen) <= 3 and len(metrics.figures._actions) <= 3


def test_served_over_http(tmp_path: Path) -> None:
    port = free_port()
    metrics = metrics_for(Settings(metrics_port=port, state_dir=tmp_path))
    assert metrics_for(Settings(metrics_port=port, state_dir=tmp_path)) is metrics
    try:
        metrics.batch("processors", records=7, seconds=0.01)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read()
        assert b'backout_records_processed_total{component="processors"} 7.0' in body
    finally:
        stop_serving(port)


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(ConfigError, match=f"cannot serve metrics on port {port}"):
            serve(Metrics(), port)
