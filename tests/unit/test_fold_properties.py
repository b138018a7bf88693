"""Properties of the fold: it composes, replays idempotently, and the SQL store agrees."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backout.projections.fold import EMPTY, Projection, advance_run, evolve, fold, fold_run
from backout.projections.store import Positioned, SqlProjectionStore
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.codec import encode
from backout.schemas.events import ActionEvent
from tests.eventkit import T0
from tests.surgical import History, histories
from tests.unit.test_planner_properties import play

SLOW = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def events_of(history: History) -> list[ActionEvent]:
    return play(history).events


@settings(max_examples=200, deadline=None)
@given(histories, st.integers(min_value=0, max_value=20))
def test_fold_composes(history: History, cut: int) -> None:
    events = events_of(history)
    head, tail = events[:cut], events[cut:]
    assert fold(head + tail) == fold(tail, fold(head))


@settings(max_examples=100, deadline=None)
@given(histories)
def test_evolve_one_by_one_equals_fold(history: History) -> None:
    events = events_of(history)
    state: Projection = EMPTY
    for event in events:
        state = evolve(state, event)
    assert state == fold(events)


@settings(max_examples=100, deadline=None)
@given(histories, st.randoms(use_true_random=False))
def test_replaying_events_changes_nothing(history: History, rnd: object) -> None:
    events = events_of(history)
    replayed = list(events)
    rnd.shuffle(replayed)  # type: ignore[attr-defined]
    assert fold(events + replayed) == fold(events)


@settings(max_examples=100, deadline=None)
@given(histories, st.integers(min_value=0, max_value=20))
def test_fold_run_equals_advance_run_event_by_event(history: History, cut: int) -> None:
    events = events_of(history)
    for run_id in {e.run_id for e in events}:
        mine = [e for e in events if e.run_id == run_id]
        stepwise = None
        for event in mine:
            stepwise = advance_run(stepwise, event)
        assert fold_run(None, mine) == stepwise
        head = fold_run(None, mine[: cut or 1])
        assert fold_run(head, mine[cut or 1 :]) == stepwise


@SLOW
@given(histories, st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=5))
def test_sql_store_agrees_with_the_fold(history: History, sizes: list[int]) -> None:
    events = events_of(history)
    store = SqlProjectionStore("sqlite://")
    store.create()
    items = [Positioned(e, encode(e), "t.actions", 0, i) for i, e in enumerate(events)]
    start = 0
    for size in sizes * 10:
        if start >= len(items):
            break
        store.apply(items[start : start + size])
        store.apply(items[max(0, start - 2) : start + size])  # overlapping redelivery
        start += size
    store.apply(items[start:])
    assert store.positions("t.actions") == ({0: len(items) - 1} if items else {})
    expected = fold(events)
    if not any(e.run_id == "run" for e in events):
        return
    scope = RollbackScope(run="run")
    loaded = store.load(scope)
    for key, record in loaded.records.items():
        assert record == expected.records[key]
    for event_id, info in loaded.events.items():
        assert info == expected.events[event_id]
    for run_id, run in loaded.runs.items():
        assert run == expected.runs[run_id]
    assert plan_rollback(loaded, scope, now=T0) == plan_rollback(expected, scope, now=T0)
