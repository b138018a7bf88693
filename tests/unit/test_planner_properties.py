"""The surgical-rollback property on fakes (the real-broker version is in tests/integration).

Random interleavings of writes by the run, another run and unjournaled humans, planned
from the fold and executed through an in-memory Target with compare-and-set.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, assume, given, settings

from backout.infra.settings import Settings
from backout.producers.sink import InMemoryEventSink
from backout.projections.fold import fold
from backout.rollback.executor import RollbackExecutor
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from tests.eventkit import T0, Log, journaled, live
from tests.fakes import InMemoryTarget
from tests.surgical import RECORDS, History, Row, Write, check, check_again, histories, step

SETTINGS = Settings(topic_prefix="t.")
SCOPE = RollbackScope(run="run")


def play(history: History) -> Log:
    """Run the history's writes: run and other through the journal, humans straight in."""
    log = Log()
    for record, row in history.initial.items():
        if row is not None:
            log.seed(record, **row)
    for op in history.ops:
        before = log.records.get(op.record)
        after = step(before, op)
        if op.actor == "human":
            log.records[op.record] = None if after is None else dict(after)
        else:
            log.write(op.actor, op.record, None if after is None else dict(after))
        history.actual.append(Write(op.actor, op.record, before, after))
    return log


def rows(target: InMemoryTarget) -> dict[str, Row]:
    return {r: dict(target.records[r]) if r in target.records else None for r in RECORDS}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories)
def test_rollback_is_surgical(history: History) -> None:
    assume(any(op.actor == "run" for op in history.ops))
    log = play(history)
    target = InMemoryTarget(records=live(log))
    before = rows(target)
    sink = InMemoryEventSink()
    executor = RollbackExecutor(SETTINGS, sink=sink, targets=[target])
    now = T0 + timedelta(days=1)
    plan = plan_rollback(fold(log.events), SCOPE, now=now)
    report = executor.apply(plan)
    after = rows(target)
    check(history, before, after, plan, report, log.events)

    events = log.events + journaled(sink, SETTINGS.topic("actions"))
    again = plan_rollback(fold(events), SCOPE, now=now)
    second = executor.apply(again, prior=fold(events).steps)
    check_again(after, rows(target), again, second)
