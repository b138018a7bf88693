"""Rollback planning, table-driven from the design's examples and beyond."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from backout.projections.fold import EXISTS, LABEL_TASK, LABEL_TASK_STATUS, LABEL_UNDOES, fold
from backout.rollback.plan import Decision, RollbackPlan, diff_plans
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.errors import PlanningError
from backout.schemas.events import CallStatus, EventKind, Origin, Reversibility
from tests.eventkit import DELETE, T0, Log, compensating

NOW = T0 + timedelta(days=1)


def plan_of(log: Log, now: Any = NOW, **scope: Any) -> RollbackPlan:
    return plan_rollback(fold(log.events), RollbackScope(**(scope or {"run": "run"})), now=now)


def summary(plan: RollbackPlan) -> list[tuple[str, str, dict[str, tuple[object, object]]]]:
    """(decision, record, {field: (current, restore_to)}) per step, in plan order."""
    out = []
    for step in plan.steps:
        changes = {
            c.field: (
                c.current if c.current_present else "-",
                c.restore_to if c.restore_present else "-",
            )
            for c in step.changes
        }
        out.append((step.decision.value, step.object_id or step.tool or "", changes))
    return out


def undo(log: Log, plan: RollbackPlan) -> None:
    """Apply a plan's restore/delete/recreate steps to the simulated records, journaled as
    the executor would (origin rollback, compensates, undoes)."""
    for step in plan.actionable:
        if step.decision not in (Decision.RESTORE, Decision.DELETE, Decision.RECREATE):
            continue
        assert step.object_id is not None
        fields = None if step.decision is Decision.DELETE else step.desired()
        log.write(
            f"rollback-{plan.plan_id}",
            step.object_id,
            fields,
            origin=Origin.ROLLBACK,
            compensates=step.undoes[0],
            labels={LABEL_UNDOES: " ".join(step.undoes)},
            tool=f"backout.{step.decision.value}",
        )


@dataclass(frozen=True)
class Case:
    name: str
    history: Callable[[Log], None]
    expected: list[tuple[str, str, dict[str, tuple[object, object]]]]


def _a_to_b(log: Log) -> None:
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})


def _interleaved(log: Log) -> None:
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.write("other", "i1", {"status": "C"})
    log.write("run", "i1", {"status": "D"})


def _other_newest(log: Log) -> None:
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.write("other", "i1", {"status": "C"})


def _per_field(log: Log) -> None:
    log.seed("i1", status="A", amount=1)
    log.write("run", "i1", {"status": "B", "amount": 2})
    log.write("other", "i1", {"amount": 3})


def _back_and_forth(log: Log) -> None:
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.write("run", "i1", {"status": "A"})


def _created(log: Log) -> None:
    log.write("run", "i1", {"status": "new", "amount": 1})
    log.write("run", "i1", {"amount": 2})


def _created_then_touched(log: Log) -> None:
    log.write("run", "i1", {"status": "new", "amount": 1})
    log.write("other", "i1", {"status": "approved"})
    log.write("run", "i1", {"amount": 2})


def _deleted(log: Log) -> None:
    log.seed("i1", status="A", amount=1)
    log.write("run", "i1", {"status": "B"})
    log.write("run", "i1", DELETE)


def _deleted_then_recreated(log: Log) -> None:
    log.seed("i1", status="A")
    log.write("run", "i1", DELETE)
    log.write("other", "i1", {"status": "fresh"})


def _created_and_deleted(log: Log) -> None:
    log.write("run", "i1", {"status": "tmp"})
    log.write("run", "i1", DELETE)


def _unjournaled(log: Log) -> None:
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.human("i1", {"status": "X"})
    log.write("run", "i1", {"status": "C"})


CASES = [
    Case("A->B back to A", _a_to_b, [("restore", "i1", {"status": ("B", "A")})]),
    Case(
        "run A->B, other B->C, run C->D back to C",
        _interleaved,
        [("restore", "i1", {"status": ("D", "C")}), ("superseded", "i1", {"status": ("D", "A")})],
    ),
    Case(
        "someone else's newest write is kept",
        _other_newest,
        [("superseded", "i1", {"status": ("C", "A")})],
    ),
    Case(
        "fields are judged one by one",
        _per_field,
        [("restore", "i1", {"status": ("B", "A")}), ("superseded", "i1", {"amount": (3, 1)})],
    ),
    Case("a write undone within the run needs nothing", _back_and_forth, []),
    Case(
        "created in scope: deleted",
        _created,
        [("delete", "i1", {EXISTS: (True, False), "amount": (2, "-"), "status": ("new", "-")})],
    ),
    Case(
        "created in scope but touched by others: kept, later writes undone",
        _created_then_touched,
        [
            ("restore", "i1", {"amount": (2, 1)}),
            ("superseded", "i1", {}),
            ("superseded", "i1", {"status": ("approved", "-")}),
        ],
    ),
    Case(
        "deleted in scope: recreated as before the run",
        _deleted,
        [("recreate", "i1", {EXISTS: (False, True), "amount": ("-", 1), "status": ("-", "A")})],
    ),
    Case(
        "deleted in scope, recreated by others: kept",
        _deleted_then_recreated,
        [("superseded", "i1", {EXISTS: (True, True), "status": ("fresh", "A")})],
    ),
    Case("created and deleted in scope: nothing to do", _created_and_deleted, []),
    Case(
        "an unjournaled write stops the walk",
        _unjournaled,
        [("restore", "i1", {"status": ("C", "X")}), ("superseded", "i1", {"status": ("C", "A")})],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_surgical_semantics(case: Case) -> None:
    log = Log()
    case.history(log)
    log.write("bystander", "zz", {"x": 1})
    assert summary(plan_of(log)) == case.expected


def test_superseded_reports_who_and_when() -> None:
    log = Log()
    _interleaved(log)
    plan = plan_of(log)
    superseded = next(s for s in plan.steps if s.decision is Decision.SUPERSEDED)
    other = log.events[1]
    assert superseded.superseded_by is not None
    assert superseded.superseded_by.run_id == "other"
    assert superseded.superseded_by.at == other.occurred_at
    assert superseded.superseded_by.agent_id == "agent-other"
    assert superseded.undoes == (log.events[0].event_id,)
    assert "other" in superseded.reason


def test_unjournaled_writer_is_reported_as_such() -> None:
    log = Log()
    _unjournaled(log)
    step = next(s for s in plan_of(log).steps if s.decision is Decision.SUPERSEDED)
    assert step.superseded_by is not None and not step.superseded_by.journaled
    assert "unjournaled" in step.reason


def test_compensation_runs_within_its_window() -> None:
    log = Log()
    log.seed("i1", status="open", charged=0)
    until = T0 + timedelta(days=30)
    charge = log.write(
        "run",
        "i1",
        {"charged": 100},
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund", until, invoice="i1", amount=100),
    )
    plan = plan_of(log)
    assert summary(plan) == [("compensate", "i1", {"charged": (100, 0)})]
    step = plan.steps[0]
    assert step.tool == "refund" and step.args == {"invoice": "i1", "amount": 100}
    assert step.allowed_until == until and step.undoes == (charge.event_id,)


def test_expired_compensation_window_is_manual() -> None:
    log = Log()
    log.seed("i1", charged=0)
    log.write(
        "run",
        "i1",
        {"charged": 100},
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund", T0 + timedelta(hours=1)),
    )
    plan = plan_of(log, now=T0 + timedelta(hours=2))
    assert [s.decision for s in plan.steps] == [Decision.MANUAL]
    assert "expired" in plan.steps[0].reason


def test_compensation_that_would_wipe_a_later_write_is_manual() -> None:
    log = Log()
    log.seed("i1", charged=0)
    log.write(
        "run",
        "i1",
        {"charged": 100},
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund"),
    )
    log.write("other", "i1", {"charged": 150})
    decisions = [s.decision for s in plan_of(log).steps]
    assert decisions == [Decision.MANUAL]


def test_restores_around_a_compensation_are_split_in_order() -> None:
    log = Log()
    log.seed("i1", status="A", charged=0)
    log.write("run", "i1", {"status": "B"})
    log.write(
        "run",
        "i1",
        {"charged": 10, "status": "C"},
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund"),
    )
    log.write("run", "i1", {"status": "D"})
    assert summary(plan_of(log)) == [
        ("restore", "i1", {"status": ("D", "C")}),
        ("compensate", "i1", {"charged": (10, 0), "status": ("C", "B")}),
        ("restore", "i1", {"status": ("B", "A")}),
    ]


def test_irreversible_action_is_manual_and_blocks_older_writes() -> None:
    log = Log()
    log.seed("i1", status="draft")
    older = log.write("run", "i1", {"status": "final"})
    sent = log.write("run", "i1", {"status": "sent"}, reversibility=Reversibility.IRREVERSIBLE)
    log.write("run", "i1", {"status": "archived"})
    plan = plan_of(log)
    assert summary(plan) == [
        ("restore", "i1", {"status": ("archived", "sent")}),
        ("manual", "i1", {"status": ("archived", "final")}),
    ]
    manual = plan.steps[1]
    assert manual.undoes == (sent.event_id,) and manual.blocked == (older.event_id,)
    assert manual.tool == "set" and "irreversible" in manual.reason


def test_in_doubt_call_is_manual() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"}, status=CallStatus.UNKNOWN, capture_after=False)
    plan = plan_of(log)
    assert [s.decision for s in plan.steps] == [Decision.MANUAL]
    assert "in doubt" in plan.steps[0].reason


def test_calls_without_a_target() -> None:
    log = Log()
    log.call("run", "send_email")
    log.call(
        "run",
        "charge_card",
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund", amount=5),
    )
    log.call("run", "lookup", reversibility=Reversibility.READ_ONLY)
    assert [(s.decision.value, s.tool) for s in plan_of(log).steps] == [
        ("compensate", "refund"),
        ("manual", "send_email"),
    ]


def test_a_second_plan_after_undoing_reports_already_undone() -> None:
    log = Log()
    _interleaved(log)
    log.write("run", "i2", {"x": 1})
    first = plan_of(log)
    undo(log, first)
    second = plan_of(log)
    assert second.actionable == ()
    assert {s.decision for s in second.steps} == {Decision.ALREADY_UNDONE, Decision.SUPERSEDED}
    assert second.plan_id == first.plan_id
    assert any("nothing to roll back" in n for n in second.notes)


def test_rollbacks_own_writes_are_out_of_a_time_window_scope() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    plan = plan_of(log)
    undo(log, plan)
    window = plan_of(log, since=T0, until=T0 + timedelta(hours=1))
    assert window.actionable == ()


def test_closed_task_counts_as_undone_and_unblocks_older_writes() -> None:
    log = Log()
    log.seed("i1", status="draft")
    log.write("run", "i1", {"status": "final"})
    sent = log.write("run", "i1", {"status": "sent"}, reversibility=Reversibility.IRREVERSIBLE)
    log.call(
        "ops",
        "backout.task_done",
        reversibility=Reversibility.READ_ONLY,
        compensates=sent.event_id,
        origin=Origin.HUMAN,
        labels={LABEL_TASK: "t1", LABEL_TASK_STATUS: "done"},
    )
    assert summary(plan_of(log)) == [
        ("already_undone", "i1", {"status": ("sent", "final")}),
        ("restore", "i1", {"status": ("sent", "draft")}),
    ]


def test_scope_after_checkpoint_only_takes_later_writes() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.checkpoint("run", "reviewed")
    log.write("run", "i1", {"status": "C"})
    plan = plan_of(log, run="run", after_checkpoint="reviewed")
    assert summary(plan) == [("restore", "i1", {"status": ("C", "B")})]


def test_child_runs_are_in_scope_unless_excluded() -> None:
    log = Log()
    log.seed("i1", status="A")
    log.seed("i2", status="A")
    log.fact("run", EventKind.RUN_STARTED)
    log.write("run", "i1", {"status": "B"})
    log.fact("child", EventKind.RUN_STARTED, parent_run="run")
    log.write("child", "i2", {"status": "C"}, parent_run="run")
    assert [s.object_id for s in plan_of(log).steps] == ["i2", "i1"]
    only = plan_of(log, run="run", include_child_runs=False)
    assert [s.object_id for s in only.steps] == ["i1"]


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"agent": "agent-run"}, ["i1"]),
        ({"identity": "id-other"}, ["i2"]),
        ({"since": T0 + timedelta(seconds=2)}, ["i2"]),
        ({"until": T0 + timedelta(seconds=1)}, ["i1"]),
    ],
)
def test_other_scopes(scope: dict[str, Any], expected: list[str]) -> None:
    log = Log()
    log.seed("i1", status="A")
    log.seed("i2", status="A")
    log.write("run", "i1", {"status": "B"})
    log.write("other", "i2", {"status": "C"})
    assert [s.object_id for s in plan_of(log, **scope).steps] == expected


def test_scope_by_event_ids() -> None:
    log = Log()
    log.seed("i1", status="A")
    first = log.write("run", "i1", {"status": "B"})
    log.write("run", "i2", {"status": "B"})
    plan = plan_of(log, event_ids=(first.event_id,))
    assert [s.object_id for s in plan.steps] == ["i1"]


def test_reverse_causal_order_across_records() -> None:
    log = Log()
    for record in ("a", "b", "c"):
        log.seed(record, v=0)
    parent = log.write("run", "a", {"v": 1})
    log.write("run", "b", {"v": 1})
    # Written last but caused by the first call: its clock says it is newest, and it is
    # undone first; the call it depended on ("a") comes after everything it caused.
    log.write("run", "c", {"v": 1}, parent_step=parent.step_id)
    order = [s.object_id for s in plan_of(log).steps]
    assert order == ["c", "b", "a"]


def test_causal_parent_beats_clock_order() -> None:
    log = Log()
    for record in ("a", "b"):
        log.seed(record, v=0)
    child = log.write("run", "a", {"v": 1})
    parent_event = log.write("run", "b", {"v": 1})
    # The clock says "a" happened first, but it was caused by "b": undo "a" first anyway.
    events = [
        e.model_copy(update={"parent_step_id": parent_event.step_id})
        if e.event_id == child.event_id
        else e
        for e in log.events
    ]
    plan = plan_rollback(fold(events), RollbackScope(run="run"), now=NOW)
    assert [s.object_id for s in plan.steps] == ["a", "b"]


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ({"run": "nope"}, "unknown run 'nope'"),
        ({"agent": "nobody"}, "no journaled tool calls"),
        ({"run": "run", "after_checkpoint": "missing"}, "no checkpoint 'missing'"),
        ({}, "empty scope"),
    ],
)
def test_refusals(scope: dict[str, Any], message: str) -> None:
    log = Log()
    _a_to_b(log)
    log.checkpoint("run", "c1")
    with pytest.raises(PlanningError, match=message):
        plan_rollback(fold(log.events), RollbackScope(**scope), now=NOW)


def test_plan_is_a_deterministic_printable_json_value() -> None:
    log = Log()
    _interleaved(log)
    log.write("run", "i9", {"status": "new"})
    first, again = plan_of(log), plan_of(log)
    assert first == again
    assert all(s.step_id.startswith(f"{first.plan_id}:") for s in first.steps)
    assert len({s.step_id for s in first.steps}) == len(first.steps)
    assert RollbackPlan.from_json(first.to_json()) == first
    text = str(first)
    assert first.plan_id in text and "restore" in text and "'D' -> 'C'" in text
    assert first.to_dict()["steps"][0]["decision"] == first.steps[0].decision.value
    assert [r[4] for r in first.rows()] == ["delete", "delete", "restore", "superseded"]


def test_plans_diff_by_step() -> None:
    log = Log()
    _interleaved(log)
    before = plan_of(log)
    log.write("other", "i1", {"status": "E"})
    log.write("run", "i2", {"x": 1})
    after = plan_of(log)
    diff = diff_plans(before, after)
    assert [s.decision for s in diff.added] == [Decision.DELETE, Decision.SUPERSEDED]
    assert [s.decision for s in diff.removed] == [Decision.RESTORE]
    [(old, new)] = diff.changed
    assert old.decision is new.decision is Decision.SUPERSEDED
    assert (old.changes[0].current, new.changes[0].current) == ("D", "E")
    assert diff_plans(before, before).empty
