"""The rollback executor on fakes: CAS outcomes, journaling, resume, tasks, freezes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import StaticPool

from backout.infra.settings import Settings
from backout.producers.sink import InMemoryEventSink
from backout.producers.targets import SqlTableTarget
from backout.projections.fold import (
    LABEL_CAS,
    LABEL_OUTCOME,
    LABEL_STEP,
    LABEL_UNDOES,
    fold,
)
from backout.rollback.executor import RollbackExecutor, StepOutcome, targets_by_system
from backout.rollback.plan import Decision, RollbackPlan
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.codec import decode
from backout.schemas.errors import CompensationFailed, ConfigError, RollbackError
from backout.schemas.events import ControlCommand, EventKind, FreezeMode, Origin, Reversibility
from backout.schemas.signing import new_signing_key, verify
from tests.eventkit import T0, Log, compensating, journaled, live
from tests.fakes import Crash, CrashingSink, InMemoryTarget

NOW = T0 + timedelta(days=1)
SETTINGS = Settings(topic_prefix="t.")
ACTIONS = SETTINGS.topic("actions")


def clock() -> datetime:
    return datetime(2026, 1, 3, tzinfo=UTC)


def plan_of(log: Log, extra: list[Any] | None = None) -> RollbackPlan:
    return plan_rollback(fold(log.events + (extra or [])), RollbackScope(run="run"), now=NOW)


def executor(sink: InMemoryEventSink, *targets: Any, **options: Any) -> RollbackExecutor:
    return RollbackExecutor(SETTINGS, sink=sink, targets=targets, clock=clock, **options)


def simple_log() -> Log:
    log = Log()
    log.seed("i1", status="A", amount=1)
    log.seed("i3", status="old")
    log.write("run", "i1", {"status": "B", "amount": 2})
    log.write("run", "i2", {"status": "new"})
    log.write("run", "i3", None)
    return log


def test_restores_deletes_recreates_and_journals_each_inverse() -> None:
    log = simple_log()
    target = InMemoryTarget(records=live(log))
    sink = InMemoryEventSink()
    plan = plan_of(log)
    report = executor(sink, target).apply(plan)
    assert report.summary()["restored"] == 3 and report.complete
    assert target.records == {"i1": {"status": "A", "amount": 1}, "i3": {"status": "old"}}
    events = journaled(sink, ACTIONS)
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.RUN_STARTED and kinds[-1] is EventKind.RUN_FINISHED
    inverses = [e for e in events if e.kind is EventKind.TOOL_CALL]
    assert {e.tool for e in inverses} == {"backout.restore", "backout.delete", "backout.recreate"}
    for event in inverses:
        assert event.origin is Origin.ROLLBACK and event.compensates is not None
        step = plan.step(event.labels[LABEL_STEP])
        assert event.labels[LABEL_UNDOES].split() == list(step.undoes)
        assert event.labels[LABEL_CAS] == "applied"
        assert event.run_id == report.rollback_run
    restore = next(e for e in inverses if e.tool == "backout.restore")
    assert restore.before is not None and restore.before.fields == {"status": "B", "amount": 2}
    assert restore.after is not None and restore.after.fields == {"status": "A", "amount": 1}
    finished = [e for e in events if e.kind is EventKind.ROLLBACK_STEP_FINISHED]
    assert {e.labels[LABEL_OUTCOME] for e in finished} == {"applied"}


def test_applying_the_same_rollback_twice_writes_nothing_new() -> None:
    log = simple_log()
    target = InMemoryTarget(records=live(log))
    sink = InMemoryEventSink()
    executor(sink, target).apply(plan_of(log))
    writes = target.writes
    again = plan_of(log, journaled(sink, ACTIONS))
    assert again.actionable == ()
    report = executor(sink, target).apply(again)
    assert target.writes == writes
    assert set(report.summary().values()) <= {0, len(again.steps)}
    assert report.summary()["skipped"] == len(again.steps)


def test_conflict_writes_nothing_and_reports_both_values() -> None:
    log = simple_log()
    target = InMemoryTarget(records=live(log))
    target.records["i1"]["status"] = "edited by hand"
    sink = InMemoryEventSink()
    report = executor(sink, target).apply(plan_of(log))
    [conflict] = report.of(StepOutcome.CONFLICT)
    assert conflict.record == "erp/i1"
    assert conflict.expected == {"status": "B", "amount": 2}
    assert conflict.live == {"status": "edited by hand", "amount": 2}
    assert "edited by hand" in conflict.detail
    assert target.records["i1"] == {"status": "edited by hand", "amount": 2}
    assert not report.complete
    marks = [e for e in journaled(sink, ACTIONS) if e.labels.get(LABEL_OUTCOME) == "conflict"]
    assert len(marks) == 1


def test_unreachable_target_leaves_steps_pending_and_marks_nothing_done() -> None:
    log = simple_log()
    target = InMemoryTarget(records=live(log))
    target.down = True
    sink = InMemoryEventSink()
    report = executor(sink, target).apply(plan_of(log))
    assert report.summary()["pending"] == 3 and report.pending_systems == ["erp"]
    events = journaled(sink, ACTIONS)
    assert not [e for e in events if e.kind is EventKind.ROLLBACK_STEP_FINISHED]
    assert not [e for e in events if e.kind is EventKind.TOOL_CALL]
    target.down = False
    prior = fold(log.events + events).steps
    retry = executor(sink, target).apply(plan_of(log, events), prior=prior)
    assert retry.summary()["restored"] == 3


def test_missing_target_is_pending_with_the_reason() -> None:
    log = simple_log()
    report = executor(InMemoryEventSink()).apply(plan_of(log))
    assert report.summary()["pending"] == 3
    assert "no target configured for system 'erp'" in report.results[0].detail


def test_compensation_calls_the_tool_and_journals_it() -> None:
    log = Log()
    log.seed("i1", charged=0)
    charge = log.write(
        "run",
        "i1",
        {"charged": 100},
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund", invoice="i1", amount=100),
    )
    target = InMemoryTarget(records=live(log))
    calls: list[dict[str, Any]] = []

    def refund(invoice: str, amount: int) -> str:
        calls.append({"invoice": invoice, "amount": amount})
        target.records[invoice]["charged"] = 0
        return "ok"

    sink = InMemoryEventSink()
    report = executor(sink, target, compensators={"refund": refund}).apply(plan_of(log))
    assert calls == [{"invoice": "i1", "amount": 100}]
    assert report.summary()["compensated"] == 1
    [event] = [e for e in journaled(sink, ACTIONS) if e.tool == "refund"]
    assert event.origin is Origin.ROLLBACK and event.compensates == charge.event_id
    assert event.result == "ok" and event.requested_args == {"invoice": "i1", "amount": 100}
    assert event.before is not None and event.after is not None
    assert plan_of(log, journaled(sink, ACTIONS)).actionable == ()


def test_journal_tools_are_called_undecorated() -> None:
    log = Log()
    log.call(
        "run",
        "charge",
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund", amount=5),
    )
    seen: list[int] = []

    def refund(amount: int) -> None:
        seen.append(amount)

    def decorated(**_: Any) -> None:
        raise AssertionError("the journaled wrapper must not be called")

    decorated.__backout_tool__ = type(
        "Spec",
        (),
        {
            "fn": staticmethod(refund),  # type: ignore[attr-defined]
            "target": None,
        },
    )()
    report = executor(InMemoryEventSink(), compensators={"refund": decorated}).apply(plan_of(log))
    assert seen == [5] and report.summary()["compensated"] == 1


def test_failed_or_missing_compensation_is_not_done() -> None:
    log = Log()
    log.call(
        "run",
        "charge",
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund"),
    )

    def refund() -> None:
        raise CompensationFailed("gateway down", retryable=True)

    failed = executor(InMemoryEventSink(), compensators={"refund": refund}).apply(plan_of(log))
    assert failed.summary()["failed"] == 1 and "retryable" in failed.results[0].detail
    missing = executor(InMemoryEventSink()).apply(plan_of(log))
    assert "no compensating tool 'refund'" in missing.results[0].detail


def test_compensation_started_but_never_finished_is_not_run_again() -> None:
    log = Log()
    log.call(
        "run",
        "charge",
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund"),
    )
    plan = plan_of(log)
    sink = CrashingSink(crash_at=3)  # run started, step started, then the process dies

    def refund() -> None:
        raise AssertionError("must not run")

    with pytest.raises(Crash):
        executor(sink, compensators={"refund": lambda: None}).apply(plan)
    prior = fold(log.events + journaled(sink, ACTIONS)).steps
    assert prior[plan.steps[0].step_id].status == "started"
    report = executor(InMemoryEventSink(), compensators={"refund": refund}).apply(plan, prior=prior)
    assert report.results[0].outcome is StepOutcome.MANUAL
    assert "never finished" in report.results[0].detail


def test_manual_step_opens_a_task_and_freezes_with_a_signed_command() -> None:
    log = Log()
    log.seed("i1", status="draft")
    sent = log.write("run", "i1", {"status": "sent"}, reversibility=Reversibility.IRREVERSIBLE)
    key = new_signing_key()
    sink = InMemoryEventSink()
    report = executor(sink, InMemoryTarget(records=live(log)), signing_key=key).apply(plan_of(log))
    [result] = report.results
    assert result.outcome is StepOutcome.MANUAL and result.freeze is not None
    [record] = sink.on(SETTINGS.topic("control"))
    command = decode(record.value, ControlCommand)
    verify(command, {key.key_id: key.public_b64})
    assert command.scope == {"agent": "agent-run", "tenant": "acme"}
    assert command.mode is FreezeMode.READ_ONLY and command.command_id == result.freeze
    assert record.key == b"agent=agent-run,tenant=acme"
    tasks = fold(log.events + journaled(sink, ACTIONS)).tasks
    [task] = tasks.values()
    assert (task.status, task.event_id, task.freeze) == ("open", sent.event_id, result.freeze)
    assert task.tool == "set" and task.run_id == "run" and "irreversible" in task.reason
    prior = fold(log.events + journaled(sink, ACTIONS)).steps
    again = executor(sink, signing_key=key).apply(plan_of(log), prior=prior)
    assert again.results[0].outcome is StepOutcome.SKIPPED
    assert len(sink.on(SETTINGS.topic("control"))) == 1


def test_without_a_signing_key_the_freeze_is_recorded_as_not_done() -> None:
    log = Log()
    log.call("run", "send_email")
    log.call("run", "send_sms")
    sink = InMemoryEventSink()
    report = executor(sink).apply(plan_of(log))
    assert all("no signing key" in (r.freeze or "") for r in report.results)
    assert len(report.notes) == 1 and "could not freeze" in report.notes[0]
    assert sink.on(SETTINGS.topic("control")) == []


def test_killed_mid_plan_resumes_without_repeating_a_step() -> None:
    log = Log()
    for n in range(6):
        log.seed(f"i{n}", v=0)
        log.write("run", f"i{n}", {"v": 1})
    target = InMemoryTarget(records=live(log))
    plan = plan_of(log)
    # Dies in the fourth step after writing the target but before journaling the write.
    sink = CrashingSink(crash_at=12)
    with pytest.raises(Crash):
        executor(sink, target, batch_size=1).apply(plan)
    done_before = target.writes
    assert 0 < done_before < 6
    events = journaled(sink, ACTIONS)
    resumed = executor(InMemoryEventSink(), target).apply(
        plan_of(log, events), prior=fold(log.events + events).steps
    )
    assert target.writes == 6  # each record written exactly once in total
    outcomes = [r.outcome for r in resumed.results if r.decision is not Decision.ALREADY_UNDONE]
    assert outcomes.count(StepOutcome.ALREADY) == 1  # the step the crash interrupted
    assert StepOutcome.APPLIED in outcomes and StepOutcome.CONFLICT not in outcomes
    assert all(v == {"v": 0} for v in target.records.values())


def test_sql_batches_give_the_same_results_as_single_steps() -> None:
    log = Log()
    for n in range(30):
        log.seed(f"{n}", status="a", amount=n)
        log.write("run", f"{n}", {"status": "b", "amount": n + 1})

    def table() -> SqlTableTarget:
        engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TABLE inv (id INTEGER PRIMARY KEY, status TEXT, "
                    "amount INTEGER, version INTEGER NOT NULL DEFAULT 1)"
                )
            )
            for key, fields in live(log).items():
                conn.execute(
                    text("INSERT INTO inv (id, status, amount) VALUES (:i, :s, :a)"),
                    {"i": int(key), "s": fields["status"], "a": fields["amount"]},
                )
            conn.execute(text("UPDATE inv SET status = 'hand' WHERE id = 7"))
            conn.execute(text("UPDATE inv SET status = 'a', amount = 0 WHERE id = 9"))
        return SqlTableTarget(engine, "inv", key="id", version="version", system="erp")

    plan = plan_of(log)
    outcomes = []
    for batch_size in (1, 8):
        target = table()
        report = executor(InMemoryEventSink(), target, batch_size=batch_size).apply(plan)
        outcomes.append([(r.record, r.outcome, r.live) for r in report.results])
        with target.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM inv ORDER BY id")).all()
        outcomes.append(rows)
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[3]
    assert {o for _, o, _ in outcomes[0]} == {StepOutcome.APPLIED, StepOutcome.CONFLICT}


def test_publish_failure_is_a_rollback_error_that_says_rerun_is_safe() -> None:
    from backout.schemas.errors import PublishError

    class Broken(InMemoryEventSink):
        def flush(self, timeout: float | None = None) -> None:
            raise PublishError("broker gone", retryable=True)

    log = simple_log()
    with pytest.raises(RollbackError, match="re-run the same rollback"):
        executor(Broken(), InMemoryTarget(records=live(log))).apply(plan_of(log))


def test_targets_by_system_refuses_duplicates_and_non_targets() -> None:
    with pytest.raises(ConfigError, match="two targets"):
        targets_by_system([InMemoryTarget(), InMemoryTarget()])
    with pytest.raises(ConfigError, match="is not a Target"):
        targets_by_system([object()])  # type: ignore[list-item]
    assert set(targets_by_system({"x": InMemoryTarget("crm")})) == {"crm"}
