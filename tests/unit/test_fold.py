"""The projection fold: records as cells, unjournaled writes, runs, links, steps, tasks."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backout.projections.fold import (
    ABSENT,
    EMPTY,
    EXISTS,
    LABEL_OUTCOME,
    LABEL_PLAN,
    LABEL_STEP,
    LABEL_TASK,
    LABEL_TASK_STATUS,
    LABEL_UNDOES,
    RunStatus,
    advance_record,
    changes_record,
    evolve,
    fold,
    fold_run,
    links_of,
    same,
)
from backout.schemas.events import CallStatus, EventKind, Origin, Reversibility
from tests.eventkit import DELETE, Log


def cells(log: Log, key: str = "erp/i1") -> list[tuple[str, object, object, str | None]]:
    record = fold(log.events).records[key]
    return [(w.field, w.before, w.after, w.run_id) for w in record.writes]


def test_update_writes_only_changed_fields() -> None:
    log = Log()
    log.seed("i1", status="A", amount=1)
    log.write("run", "i1", {"status": "B"})
    record = fold(log.events).records["erp/i1"]
    assert [(w.field, w.before, w.after) for w in record.writes] == [("status", "A", "B")]
    assert record.state.fields == {"status": "B", "amount": 1}
    assert record.state.exists and record.state.known and record.state.seq == 1


def test_create_and_delete_write_every_cell() -> None:
    log = Log()
    log.write("run", "i1", {"status": "new", "amount": 5})
    log.write("run", "i1", DELETE)
    assert cells(log) == [
        (EXISTS, False, True, "run"),
        ("amount", ABSENT, 5, "run"),
        ("status", ABSENT, "new", "run"),
        (EXISTS, True, False, "run"),
        ("amount", 5, ABSENT, "run"),
        ("status", "new", ABSENT, "run"),
    ]
    state = fold(log.events).records["erp/i1"].state
    assert not state.exists and state.fields == {}
    assert state.value("status") is ABSENT and state.value(EXISTS) is False


def test_unjournaled_change_is_recorded_before_the_event_that_reveals_it() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.human("i1", {"status": "X"})
    log.write("other", "i1", {"status": "Y"})
    record = fold(log.events).records["erp/i1"]
    drift, own = record.writes[1], record.writes[2]
    assert (drift.before, drift.after, drift.journaled, drift.origin) == ("B", "X", False, None)
    assert drift.event_id == own.event_id and drift.seq < own.seq
    assert (own.before, own.after, own.run_id) == ("X", "Y", "other")


def test_unjournaled_delete_and_recreate_are_seen() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.human("i1", None)
    log.write("run", "i1", {"status": "C"})
    writes = fold(log.events).records["erp/i1"].writes
    unjournaled = [(w.field, w.before, w.after) for w in writes if not w.journaled]
    assert unjournaled == [(EXISTS, True, False), ("status", "B", ABSENT)]
    assert [(w.field, w.before, w.after) for w in writes[-2:]] == [
        (EXISTS, False, True),
        ("status", ABSENT, "C"),
    ]


def test_event_without_after_image_is_opaque_and_its_effect_shows_later() -> None:
    log = Log()
    log.seed("i1", status="A")
    lost = log.write("run", "i1", {"status": "B"}, status=CallStatus.UNKNOWN, capture_after=False)
    log.write("other", "i1", {"amount": 1})
    record = fold(log.events).records["erp/i1"]
    assert record.opaque == (lost.event_id,)
    drift = [w for w in record.writes if not w.journaled]
    assert [(w.field, w.before, w.after) for w in drift] == [("status", "A", "B")]


def test_failed_call_counts_only_when_it_changed_the_record() -> None:
    log = Log()
    log.seed("i1", status="A")
    same_images = log.write("run", "i1", {}, status=CallStatus.FAILED)
    half_done = log.write("run", "i1", {"status": "B"}, status=CallStatus.FAILED)
    blocked = log.write("run", "i1", {"status": "Z"}, status=CallStatus.BLOCKED, apply=False)
    assert not changes_record(same_images)
    assert changes_record(half_done)
    assert not changes_record(blocked)
    assert [w.event_id for w in fold(log.events).records["erp/i1"].writes] == [half_done.event_id]


def test_read_only_calls_never_change_records() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {}, reversibility=Reversibility.READ_ONLY)
    assert fold(log.events).records == {}


def test_reprocessing_an_event_is_a_no_op() -> None:
    log = Log()
    log.seed("i1", status="A")
    event = log.write("run", "i1", {"status": "B"})
    once = evolve(EMPTY, event)
    assert evolve(once, event) is once
    assert fold([event, event]) == once


def test_advance_record_requires_a_target() -> None:
    log = Log()
    with pytest.raises(ValueError, match="no target"):
        advance_record(None, log.call("run", "send_email"))


def test_runs_track_parents_checkpoints_and_status() -> None:
    log = Log()
    log.fact("run", EventKind.RUN_STARTED)
    log.write("run", "i1", {"status": "B"})
    log.checkpoint("run", "approved")
    log.fact("child", EventKind.RUN_STARTED, parent_run="run")
    log.write("child", "i2", {"status": "C"}, parent_run="run")
    log.fact("child", EventKind.RUN_FINISHED, parent_run="run", status=CallStatus.FAILED)
    log.fact("run", EventKind.RUN_FINISHED)
    runs = fold(log.events).runs
    assert runs["run"].status is RunStatus.FINISHED and runs["run"].calls == 1
    assert runs["run"].writes == 1
    assert [c.name for c in runs["run"].checkpoints] == ["approved"]
    assert runs["child"].parent_run_id == "run" and runs["child"].status is RunStatus.FAILED
    assert runs["run"].started_at is not None and runs["run"].finished_at is not None


def test_runs_accept_events_out_of_order() -> None:
    log = Log()
    start = log.fact("run", EventKind.RUN_STARTED)
    call = log.write("run", "i1", {"status": "B"})
    end = log.fact("run", EventKind.RUN_FINISHED)
    shuffled = fold([end, call, start]).runs["run"]
    assert shuffled.started_at == start.occurred_at
    assert shuffled.last_event_at == end.occurred_at
    assert shuffled.status is RunStatus.FINISHED and shuffled.calls == 1


def test_inverse_writes_link_every_event_they_undo() -> None:
    log = Log()
    log.seed("i1", status="A")
    first = log.write("run", "i1", {"status": "B"})
    second = log.write("run", "i1", {"status": "C"})
    inverse = log.write(
        "rb",
        "i1",
        {"status": "A"},
        origin=Origin.ROLLBACK,
        compensates=second.event_id,
        labels={
            LABEL_UNDOES: f"{second.event_id} {first.event_id}",
            LABEL_PLAN: "p1",
            LABEL_STEP: "p1:s1",
        },
    )
    links = fold(log.events).links
    assert set(links) == {first.event_id, second.event_id}
    assert links[first.event_id][0].inverse_event_id == inverse.event_id
    assert links[first.event_id][0].plan_id == "p1"
    assert links_of(log.events[0]) == ()


def test_rollback_steps_and_tasks_fold_from_step_events() -> None:
    log = Log()
    log.seed("i1", status="A")
    action = log.write("run", "i1", {"status": "sent"}, reversibility=Reversibility.IRREVERSIBLE)
    started = log.fact("rb", EventKind.ROLLBACK_STEP_STARTED)
    started = started.model_copy(
        update={"labels": {LABEL_STEP: "p:1", LABEL_PLAN: "p"}, "target": action.target}
    )
    finished = started.model_copy(
        update={
            "event_id": "fin",
            "kind": EventKind.ROLLBACK_STEP_FINISHED,
            "occurred_at": started.occurred_at + timedelta(seconds=1),
            "labels": {
                LABEL_STEP: "p:1",
                LABEL_PLAN: "p",
                LABEL_OUTCOME: "manual",
                LABEL_UNDOES: action.event_id,
                "rollback.reason": "irreversible",
            },
        }
    )
    projection = fold([*log.events[:-1], started, finished])
    step = projection.steps["p:1"]
    assert (step.status, step.outcome, step.record_key) == ("finished", "manual", "erp/i1")
    task = projection.tasks["p:1"]
    assert (task.status, task.event_id, task.reason) == ("open", action.event_id, "irreversible")
    late_start = started.model_copy(update={"event_id": "again"})
    assert fold([late_start], projection).steps["p:1"].status == "finished"
    done = log.call(
        "ops",
        "backout.task_done",
        reversibility=Reversibility.READ_ONLY,
        compensates=action.event_id,
        origin=Origin.HUMAN,
        labels={LABEL_TASK: "p:1", LABEL_TASK_STATUS: "done"},
    )
    closed = fold([done], projection)
    assert closed.tasks["p:1"].status == "done" and closed.tasks["p:1"].closed_at is not None
    assert closed.links[action.event_id][0].origin is Origin.HUMAN


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (1, 1, True),
        (True, 1, False),
        (1, 1.0, True),
        (None, ABSENT, False),
        (ABSENT, ABSENT, True),
        ("a", "a", True),
        ("a", "b", False),
        (2, 3, False),
        ("1", 1, False),
        ([1], [1], True),
        (False, 0, False),
    ],
)
def test_same_keeps_bools_and_absence_apart(a: object, b: object, expected: bool) -> None:
    assert same(a, b) is expected  # type: ignore[arg-type]


def test_fold_run_needs_a_run_or_an_event() -> None:
    with pytest.raises(ValueError, match="needs a run or at least one event"):
        fold_run(None, [])
