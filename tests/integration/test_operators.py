"""The operator commands on a real broker: trace, replay, blast-radius, report.

The shared incident (``tests/operators_story.py``) is published to the test's own topics;
the commands run through ``backout.infra.cli.main`` with the environment pointing at them.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from backout.infra.broker import Broker, kafka_config
from backout.infra.cli import main
from backout.infra.settings import Settings
from backout.producers.freezes import scope_key
from backout.producers.kafka import KafkaEventSink
from backout.schemas.codec import encode
from tests.operators_story import FREEZE_ID, SIGNAL_ID, Story, build_story


def publish_story(settings: Settings, bootstrap: str, story: Story) -> None:
    sink = KafkaEventSink(settings, bootstrap, background=True)
    try:
        for event in story.events:
            sink.publish(settings.topic("actions"), event.key.encode(), encode(event))
        for command in story.commands:
            sink.publish(
                settings.topic("control"), scope_key(command.scope).encode(), encode(command)
            )
        for signal in story.signals:
            sink.publish(
                settings.topic("signals"), scope_key(signal.scope).encode(), encode(signal)
            )
    finally:
        sink.close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, kafka_settings: Settings, tmp_path: Path) -> Settings:
    for name in list(os.environ):
        if name.startswith("BACKOUT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BACKOUT_BOOTSTRAP", kafka_settings.bootstrap or "")
    monkeypatch.setenv("BACKOUT_TOPIC_PREFIX", kafka_settings.topic_prefix)
    monkeypatch.setenv("BACKOUT_STATE_DIR", str(tmp_path / "state"))
    return kafka_settings


@pytest.fixture
def story(env: Settings, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Story:
    built = build_story(tmp_path)
    publish_story(env, broker.bootstrap, built)
    monkeypatch.setenv("BACKOUT_TRUSTED_KEYS", json.dumps({built.key.key_id: built.key.public_b64}))
    return built


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def fail_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- trace -----------------------------------------------------------------------------------
def test_trace_json_reconstructs_the_tree(
    story: Story, env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = env.topic_prefix
    data = run_json(capsys, "trace", "wf_1")
    run = data["run"]
    assert run["run_id"] == "wf_1" and run["status"] == "succeeded"
    tools = [s["tool"] for s in run["steps"]]
    assert tools == ["lookup", "set_status", "batch", "email", "refund", "set_status"]
    nested = run["steps"][2]["children"][0]
    assert nested["tool"] == "set_status" and nested["target"] == "erp/inv2"
    assert nested["diffs"][0] | {} == {
        "field": "status",
        "before": "open",
        "after": "refunded",
        "before_present": True,
        "after_present": True,
        "before_known": True,
    }
    child = nested["child_runs"][0]
    assert child["run_id"] == "wf_1_child" and child["tenant"] == "globex"
    assert [s["change"] for s in child["steps"]] == ["created", "deleted"]
    blocked = run["steps"][-1]
    assert blocked["status"] == "blocked"
    assert blocked["blocked_by"]["command_id"] == FREEZE_ID
    assert blocked["blocked_by"]["found"] and blocked["blocked_by"]["reason"] == "refund loop"
    assert data["summary"]["blocked"] == 1 and data["summary"]["runs"] == 2
    assert story.ids["inverse_inv9"] in child["steps"][0]["undone_by"]
    assert [s["signal_id"] for s in data["signals"]] == [SIGNAL_ID]
    assert all(s["position"].startswith(f"{prefix}actions/") for s in run["steps"])


def test_trace_text_and_html(
    story: Story, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    page = tmp_path / "incident.html"
    assert main(["trace", "wf_1", "--html", str(page)]) == 0
    out, err = capsys.readouterr()
    assert "run wf_1 (agent billing-agent" in out
    assert "blocked by freeze cmd_freeze_1 (run=wf_1, halt): refund loop" in out
    assert "status: 'open' -> 'refunded'" in out
    assert "incident page written" in err
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "cmd_freeze_1" in html
    assert "<link" not in html and "<script" not in html and "src=" not in html


def test_trace_bad_input(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown run 'nope'" in fail_line(capsys, "trace", "nope")
    assert "bad time" in fail_line(capsys, "trace", "nope", "--since", "yesterday-ish")


# --- replay ----------------------------------------------------------------------------------
def test_replay_filters_by_run_agent_and_time(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "--run", "wf_1_child", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["record"]["run_id"] for x in lines} == {"wf_1_child"} and len(lines) == 4
    assert main(["replay", "--agent", "ops-console", "--json"]) == 0
    assert [json.loads(x)["record"]["identity"] for x in capsys.readouterr().out.splitlines()] == [
        "alice"
    ]
    human = story.by_id(story.ids["human"]).occurred_at
    since = (human - timedelta(milliseconds=1)).isoformat()
    until = (human + timedelta(milliseconds=1)).isoformat()
    assert main(["replay", "--since", since, "--until", until, "--json"]) == 0
    got = [json.loads(x)["record"]["event_id"] for x in capsys.readouterr().out.splitlines()]
    assert got == [story.ids["human"]]


def test_replay_reads_control_and_signals_by_scope(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "--run", "wf_1", "--topic", "control", "--topic", "signals"]) == 0
    out = capsys.readouterr().out
    assert "freeze cmd_freeze_1 run=wf_1 halt refund loop" in out
    assert "retry_loop high refund repeated on inv2" in out


def test_replay_bad_input(story: Story, capsys: pytest.CaptureFixture[str]) -> None:
    assert "bad time" in fail_line(capsys, "replay", "--since", "tuesday")
    line = fail_line(
        capsys, "replay", "--since", "2026-01-02T00:00Z", "--until", "2026-01-01T00:00Z"
    )
    assert "empty time range" in line
    assert "no records match" in fail_line(capsys, "replay", "--run", "nope")
    assert "unknown topic 'bogus'" in fail_line(capsys, "replay", "--topic", "bogus")


# --- blast radius ------------------------------------------------------------------------------
def _commit_group(settings: Settings, group: str, upto: dict[int, int]) -> None:
    consumer = Consumer(
        kafka_config(
            settings, settings.bootstrap or "", **{"group.id": group, "enable.auto.commit": False}
        )
    )
    try:
        consumer.commit(
            offsets=[TopicPartition(settings.topic("actions"), p, o) for p, o in upto.items()],
            asynchronous=False,
        )
    finally:
        consumer.close()


def test_blast_radius_with_downstream_groups(
    story: Story, env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    sync, late, own = (
        f"{name}-{uuid.uuid4().hex[:6]}"
        for name in ("billing-sync", "late-reader", f"{env.topic_prefix}projector")
    )
    _commit_group(env, sync, {p: 10_000 for p in range(3)})
    _commit_group(env, late, {p: 0 for p in range(3)})
    _commit_group(env, own, {p: 10_000 for p in range(3)})
    data = run_json(capsys, "blast-radius", "wf_1")
    assert data["child_runs"] == ["wf_1_child"]
    assert data["tenants"] == ["acme", "globex"]
    assert data["systems"] == ["erp", "mail", "payments"]
    status = {e["record"]: e["status"] for e in data["exposures"]}
    assert status == {
        "erp/inv1": "overwritten_by_others",
        "erp/inv2": "rolled_back",
        "erp/inv3": "conflict",
        "erp/inv9": "rolled_back",
        "mail/cfo@acme.test": "manual_task",
        "payments/inv2": "compensation_due",
    }
    groups = {g["group"]: g for g in data["downstream"]}
    synced = groups[sync]
    assert synced["consumed"] == synced["total"] == 13  # every event of the two runs
    assert late not in groups
    assert not synced["internal"] and groups[own]["internal"]
    assert main(["blast-radius", "wf_1"]) == 0
    assert "still exposed: 3 record(s)" in capsys.readouterr().out


def test_blast_radius_unknown_run(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown run 'ghost'" in fail_line(capsys, "blast-radius", "ghost")


# --- report ------------------------------------------------------------------------------------
def test_report_latest_incident(story: Story, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "report")
    assert data["incident"]["id"] == FREEZE_ID and data["incident"]["kind"] == "freeze"
    assert data["incident"]["signals"] == [SIGNAL_ID]
    assert data["first_offending_event"] == story.ids["set_inv1"]
    assert 0 < data["detection_latency_s"] <= data["time_to_containment_s"]
    assert data["blocked_calls"] == 1
    assert data["consequential_actions"] == 6 and data["undone_actions"] == 2
    assert data["rollback_coverage"] == pytest.approx(2 / 6, abs=1e-5)
    assert data["rollback_steps"] | {} == {
        "succeeded": 2,
        "conflicts": 1,
        "failed": 0,
        "manual": 1,
        "unfinished": 0,
        "attempted": 3,
    }
    assert data["rollback_success_rate"] == pytest.approx(2 / 3, abs=1e-5)
    assert data["recovery_time_s"] > 0
    assert data["open_tasks"] == ["plan_1:3"] and data["conflicts"] == ["erp/inv3"]
    assert data["others_writes_kept"] == 1 and data["records_restored"] == 2
    assert data["notes"] == []
    same = run_json(capsys, "report", "--incident", SIGNAL_ID)
    assert same["time_to_containment_s"] == data["time_to_containment_s"]
    by_run = run_json(capsys, "report", "--incident", "wf_1")
    assert by_run["incident"]["kind"] == "run" and by_run["blocked_calls"] == 1
    assert main(["report"]) == 0
    assert "time to containment" in capsys.readouterr().out


def test_report_ignores_untrusted_freezes(
    story: Story, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKOUT_TRUSTED_KEYS", json.dumps({"k_other": story.key.public_b64}))
    data = run_json(capsys, "report")
    assert data["incident"]["kind"] == "signal"  # the forged-looking freeze is not an incident
    assert any("ignored forged freeze cmd_freeze_1" in n for n in data["notes"])


def test_report_bad_input(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no incident on the log" in fail_line(capsys, "report")
    assert "unknown incident 'nope'" in fail_line(capsys, "report", "--incident", "nope")


def test_every_operator_command_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("trace", "replay", "blast-radius", "report", "up"):
        assert main([command, "--help"]) == 0
        assert "Example: backout" in capsys.readouterr().out.replace(
            "BACKOUT_METRICS_PORT=9464 ", ""
        )


# --- metrics --------------------------------------------------------------------------------
def test_metrics_tap_serves_the_figures_from_the_topics(
    story: Story, env: Settings, broker: Broker
) -> None:
    import time
    import urllib.request

    from backout.infra.broker import free_port
    from backout.infra.metrics import Metrics, MetricsTap, serve, stop_serving

    metrics = Metrics()
    port = free_port()
    serve(metrics, port)
    tap = MetricsTap(env, broker.bootstrap, metrics).start()
    try:
        total = len(story.events) + len(story.commands) + len(story.signals)
        deadline = time.monotonic() + 30
        while tap.records < total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tap.records == total and tap.error is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        figures = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in body.splitlines()
            if line and not line.startswith("#")
        }
        assert figures["backout_rollback_success_ratio"] == pytest.approx(2 / 3)
        assert figures["backout_rollback_coverage_ratio"] == pytest.approx(2 / 7)
        assert figures["backout_blocked_calls_total"] == 1
        assert figures["backout_blast_radius_max_records"] == 6
        assert figures['backout_signals_total{detector="retry_loop",severity="high"}'] == 1
        assert figures["backout_detection_latency_seconds_count"] == 1
        assert figures["backout_time_to_containment_seconds_count"] == 1
    finally:
        tap.close()
        stop_serving(port)


# --- after a real rollback -------------------------------------------------------------------
@pytest.fixture
def incident(
    env: Settings, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    story: Story = build_story(tmp_path)
    story.events = [e for e in story.events if e.run_id != "rollback_1"]  # the real one runs
    publish_story(env, broker.bootstrap, story)
    monkeypatch.setenv("BACKOUT_DB", f"sqlite:///{tmp_path / 'projection.db'}")
    monkeypatch.setenv("BACKOUT_TRUSTED_KEYS", json.dumps({story.key.key_id: story.key.public_b64}))
    targets = tmp_path / "targets.toml"
    targets.write_text(
        "[[targets]]\n"
        'system = "erp"\n'
        f'url = "sqlite:///{tmp_path / "erp_wf_1.db"}"\n'
        'table = "invoices"\nkey = "id"\nversion = "version"\n'
    )
    return targets


def test_report_and_trace_after_a_real_rollback(
    incident: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    applied = run_json(
        capsys, "rollback", "apply", "--run", "wf_1", "--targets", str(incident), "--yes"
    )
    summary = applied["report"]["summary"]
    assert summary["pending"] == 0
    report = run_json(capsys, "report")
    steps = report["rollback_steps"]
    assert steps["succeeded"] == summary["restored"] + summary["compensated"] > 0
    assert steps["conflicts"] == summary["conflicts"]
    assert steps["failed"] == summary["failed"]
    assert steps["manual"] == summary["manual"] == len(report["open_tasks"])
    assert steps["unfinished"] == 0
    assert report["rollback_success_rate"] == pytest.approx(
        steps["succeeded"] / steps["attempted"], abs=1e-5
    )
    assert report["recovery_time_s"] > report["time_to_containment_s"] > 0
    restored = {
        r["record"]
        for r in applied["report"]["results"]
        if r["outcome"] in ("applied", "already", "compensated")
    }
    assert report["records_restored"] == len(restored)
    blast = run_json(capsys, "blast-radius", "wf_1")
    status = {e["record"]: e["status"] for e in blast["exposures"]}
    assert {r for r, s in status.items() if s == "rolled_back"} == restored
    trace = run_json(capsys, "trace", "wf_1")
    undone = set()
    todo = [trace["run"]]
    while todo:
        node = todo.pop()
        for step in node.get("steps", []) + node.get("children", []):
            if step["undone_by"]:
                undone.add(step["target"])
            todo.append(step)
        todo.extend(node.get("child_runs", []))
    assert undone == restored
