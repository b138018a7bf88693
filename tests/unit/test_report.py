"""Incident figures and blast radius, computed purely from the story's records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backout.infra.report import (
    Incident,
    blast_radius,
    build_report,
    select_incident,
)
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    EventKind,
    Severity,
    Signal,
)
from tests.operators_story import FREEZE_ID, SIGNAL_ID, Story, build_story

TREE = ["wf_1", "wf_1_child"]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    return build_story(tmp_path_factory.mktemp("story"))


def split(events: list[ActionEvent]) -> tuple[list[ActionEvent], list[ActionEvent]]:
    return ([e for e in events if e.run_id in TREE], [e for e in events if e.run_id not in TREE])


def report_for(
    story: Story,
    events: list[ActionEvent] | None = None,
    incident: Incident | None = None,
    **extra: object,
):  # type: ignore[no-untyped-def]
    mine, related = split(events if events is not None else story.events)
    chosen = incident or select_incident(None, story.signals, story.commands)
    return build_report(chosen, mine, related, runs=TREE, now=datetime.now(UTC), **extra)  # type: ignore[arg-type]


# --- choosing the incident ----------------------------------------------------------------------
def test_latest_freeze_is_the_default(story: Story) -> None:
    chosen = select_incident(None, story.signals, story.commands)
    assert (chosen.incident_id, chosen.kind) == (FREEZE_ID, "freeze")
    assert [s.signal_id for s in chosen.signals] == [SIGNAL_ID]
    assert chosen.runs == ("wf_1",) and chosen.evidence == (
        story.ids["set_inv1"],
        story.ids["refund"],
    )


def test_by_signal_and_by_run(story: Story) -> None:
    by_signal = select_incident(SIGNAL_ID, story.signals, story.commands)
    assert by_signal.kind == "signal" and by_signal.freeze_ids == {FREEZE_ID}
    by_run = select_incident("wf_1", story.signals, story.commands, known_runs=["wf_1"])
    assert by_run.kind == "run" and by_run.runs[0] == "wf_1"
    assert by_run.freeze_ids == {FREEZE_ID} and len(by_run.signals) == 1


def test_latest_signal_when_no_freeze_and_integrity_signals_skipped(story: Story) -> None:
    integrity = Signal(
        signal_id="sig_ctl",
        detected_at=datetime.now(UTC) + timedelta(days=1),
        detector="control_integrity",
        severity=Severity.HIGH,
        summary="forged",
    )
    chosen = select_incident(None, [*story.signals, integrity], [])
    assert chosen.incident_id == SIGNAL_ID and chosen.freezes == ()


def test_no_incident_and_unknown_ids(story: Story) -> None:
    with pytest.raises(ConfigError, match="no incident on the log"):
        select_incident(None, [], [])
    with pytest.raises(ConfigError, match="unknown incident 'nope'"):
        select_incident("nope", story.signals, story.commands)


# --- the figures --------------------------------------------------------------------------------
def test_containment_and_detection(story: Story) -> None:
    rep = report_for(story)
    first = story.by_id(story.ids["set_inv1"])
    assert rep.first_offending_event == first.event_id
    signal, freeze = story.signals[0], story.commands[0]
    assert rep.detection_latency_s == pytest.approx(
        (signal.detected_at - first.occurred_at).total_seconds()
    )
    assert rep.contained_by == FREEZE_ID
    assert rep.time_to_containment_s == pytest.approx(
        (freeze.issued_at - first.occurred_at).total_seconds()
    )
    assert rep.blocked_calls == 1
    assert rep.first_blocked_at == story.by_id(story.ids["blocked"]).occurred_at


def test_freeze_appended_later_than_issued(story: Story) -> None:
    freeze = story.commands[0]
    late = freeze.issued_at + timedelta(seconds=2)
    rep = report_for(story, appended={FREEZE_ID: late})
    assert rep.contained_at == late


def test_containment_by_a_blocked_call_when_no_freeze_is_known(story: Story) -> None:
    chosen = select_incident(SIGNAL_ID, story.signals, [])
    rep = report_for(story, incident=chosen)
    assert rep.contained_by == f"blocked call {story.ids['blocked']}"


def test_rollback_figures(story: Story) -> None:
    rep = report_for(story)
    assert (rep.consequential_actions, rep.undoable_actions, rep.irreversible_actions) == (6, 5, 1)
    assert rep.undone_actions == 2 and rep.rollback_coverage == pytest.approx(2 / 6, abs=1e-6)
    steps = rep.steps
    assert (steps.succeeded, steps.conflicts, steps.failed, steps.manual, steps.unfinished) == (
        2,
        1,
        0,
        1,
        0,
    )
    assert rep.rollback_success_rate == pytest.approx(2 / 3, abs=1e-6)
    last_step = max(
        e.occurred_at for e in story.events if e.kind is EventKind.ROLLBACK_STEP_FINISHED
    )
    assert rep.recovered_at == last_step
    assert rep.recovery_time_s == pytest.approx(
        (last_step - story.by_id(story.ids["set_inv1"]).occurred_at).total_seconds()
    )
    assert rep.records_restored == 2 and rep.others_writes_kept == 1
    assert rep.open_tasks == ("plan_1:3",) and rep.conflicts == ("erp/inv3",)


def test_an_unfinished_step_means_not_recovered(story: Story) -> None:
    events = [
        e
        for e in story.events
        if not (
            e.kind is EventKind.ROLLBACK_STEP_FINISHED
            and e.labels.get("rollback.step") == "plan_1:2"
        )
    ]
    rep = report_for(story, events)
    assert rep.steps.unfinished == 1 and rep.recovered_at is None
    assert rep.rollback_success_rate == pytest.approx(2 / 3, abs=1e-6)  # 1 unfinished of 3


def test_before_any_rollback(story: Story) -> None:
    events = [e for e in story.events if e.run_id != "rollback_1"]
    rep = report_for(story, events)
    assert rep.undone_actions == 0 and rep.rollback_coverage == 0.0
    assert rep.rollback_success_rate is None and rep.recovery_time_s is None


def test_without_evidence_the_first_write_offends(story: Story) -> None:
    bare = Incident("wf_1", "run", (), (), ("wf_1",), ())
    rep = report_for(story, incident=bare)
    assert rep.first_offending_event == story.ids["set_inv1"]
    assert rep.detection_latency_s is None and any("no detector evidence" in n for n in rep.notes)


def test_report_json_is_plain(story: Story) -> None:
    import json

    data = report_for(story).to_dict()
    assert json.loads(json.dumps(data))["incident"]["freezes"] == [FREEZE_ID]


# --- blast radius ------------------------------------------------------------------------------
def test_exposure_of_each_record(story: Story) -> None:
    mine, related = split(story.events)
    blast = blast_radius(TREE, mine, related, now=datetime.now(UTC))
    assert {e.record: e.status for e in blast.exposures} == {
        "erp/inv1": "overwritten_by_others",
        "erp/inv2": "rolled_back",
        "erp/inv3": "conflict",
        "erp/inv9": "rolled_back",
        "mail/cfo@acme.test": "manual_task",
        "payments/inv2": "compensation_due",
    }
    assert [e.record for e in blast.still_exposed] == [
        "erp/inv3",
        "mail/cfo@acme.test",
        "payments/inv2",
    ]
    assert blast.child_runs == ("wf_1_child",) and blast.value_moved == 250.0


def test_exposure_before_rollback_and_after_the_window(story: Story) -> None:
    mine, _ = split([e for e in story.events if e.run_id != "rollback_1"])
    later = datetime.now(UTC) + timedelta(days=60)  # past the 30-day compensation window
    blast = blast_radius(TREE, mine, [], now=later)
    status = {e.record: e.status for e in blast.exposures}
    assert status["erp/inv1"] == "exposed" and status["mail/cfo@acme.test"] == "irreversible"
    assert status["payments/inv2"] == "irreversible"
    doubt = [
        e.model_copy(update={"status": CallStatus.UNKNOWN})
        if e.event_id == story.ids["set_inv1"]
        else e
        for e in mine
    ]
    status = {e.record: e.status for e in blast_radius(TREE, doubt, [], now=later).exposures}
    assert status["erp/inv1"] == "in_doubt"


def test_downstream_groups(story: Story) -> None:
    mine, related = split(story.events)
    positions = {e.event_id: (0, n) for n, e in enumerate(mine)}
    groups = {
        "billing-sync": {0: len(mine)},
        "halfway": {0: 5},
        "behind": {0: 0},
        "backout-projector": {0: len(mine)},
    }
    blast = blast_radius(
        TREE, mine, related, now=datetime.now(UTC), positions=positions, groups=groups
    )
    got = {g.group: (g.consumed, g.total, g.internal) for g in blast.downstream}
    total = len([e for e in mine])
    assert got == {
        "billing-sync": (total, total, False),
        "halfway": (5, total, False),
        "backout-projector": (total, total, True),
    }


def test_forged_commands_are_not_incidents_when_filtered(story: Story) -> None:
    lift = ControlCommand(
        command_id="cmd_lift",
        issued_at=datetime.now(UTC),
        action=ControlAction.LIFT,
        refers_to=FREEZE_ID,
    )
    chosen = select_incident(None, story.signals, [*story.commands, lift])
    assert chosen.incident_id == FREEZE_ID


def test_counts_agree_with_the_rollback_planners_blast_radius(story: Story) -> None:
    mine, related = split(story.events)
    blast = blast_radius(TREE, mine, related, now=datetime.now(UTC))
    assert blast.writes == 6 and blast.irreversible == 1 and blast.in_doubt == 0
    assert blast.records == (
        "erp/inv1",
        "erp/inv2",
        "erp/inv3",
        "erp/inv9",
        "mail/cfo@acme.test",
        "payments/inv2",
    )
    assert "erp/inv1" in blast.contested  # the operator's later write


def test_a_rollback_freeze_is_not_the_default_incident(story: Story) -> None:
    follow_on = ControlCommand(
        command_id="cmd_follow_on",
        issued_at=datetime.now(UTC) + timedelta(hours=1),
        action=ControlAction.FREEZE,
        scope={"agent": "billing-agent", "tenant": "acme"},
        reason="rollback plan_1: manual step",
        cause=story.ids["email"],  # the action it could not undo
    )
    assert select_incident(None, story.signals, [*story.commands, follow_on]).incident_id == (
        FREEZE_ID
    )
    chosen = select_incident("cmd_follow_on", story.signals, [*story.commands, follow_on])
    assert chosen.evidence == (story.ids["email"],) and chosen.runs == ()
