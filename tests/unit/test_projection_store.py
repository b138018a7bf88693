"""SqlProjectionStore on SQLite: one transaction per batch, reading back for operators."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backout.projections import batch as batch_module
from backout.projections.fold import (
    LABEL_OUTCOME,
    LABEL_PLAN,
    LABEL_STEP,
    LABEL_UNDOES,
    fold,
)
from backout.projections.rows import dump_json, from_us, load_json, to_us
from backout.projections.store import Positioned, SqlProjectionStore
from backout.schemas.codec import decode, encode
from backout.schemas.errors import ProjectionError
from backout.schemas.events import ActionEvent, EventKind, Reversibility
from tests.eventkit import T0, Log

TOPIC = "t.actions"


def positioned(events: list[ActionEvent], start: int = 0, partition: int = 0) -> list[Positioned]:
    return [Positioned(e, encode(e), TOPIC, partition, start + i) for i, e in enumerate(events)]


@pytest.fixture
def store() -> SqlProjectionStore:
    made = SqlProjectionStore("sqlite://", consumer="unit")
    made.create()
    return made


def incident() -> Log:
    log = Log()
    log.seed("i1", status="A")
    log.write("run", "i1", {"status": "B"})
    log.checkpoint("run", "c1")
    log.write("run", "i1", {"status": "C"})
    log.write("run", "i2", {"status": "new"})
    return log


def test_views_and_positions_commit_together(
    store: SqlProjectionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = incident()
    real = batch_module.run_row

    def broken(run: Any) -> Any:
        # Fails after the journal, field_writes and record_state rows were written.
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(batch_module, "run_row", broken)
    with pytest.raises(RuntimeError):
        store.apply(positioned(log.events))
    counts = store.counts()
    assert (counts["events"], counts["field_writes"], counts["records"]) == (0, 0, 0)
    assert store.positions(TOPIC) == {}
    monkeypatch.setattr(batch_module, "run_row", real)
    result = store.apply(positioned(log.events))
    assert result.applied == len(log.events) and store.positions(TOPIC) == {0: 3}
    assert store.record("erp", "i1") == fold(log.events).records["erp/i1"]


def test_positions_of_skipped_records_are_stored(store: SqlProjectionStore) -> None:
    store.apply([], {(TOPIC, 2): 41})
    assert store.positions(TOPIC) == {2: 41}
    assert SqlProjectionStore(store.engine, consumer="another").positions(TOPIC) == {}


def test_record_history_payloads_and_runs(store: SqlProjectionStore) -> None:
    log = incident()
    store.apply(positioned(log.events))
    history = store.record("erp", "i1")
    assert history == fold(log.events).records["erp/i1"]
    assert store.record("erp", "nope") is None
    payloads = store.record_payloads("erp", "i1", until=log.events[0].occurred_at)
    assert [decode(p, ActionEvent) for p in payloads] == [log.events[0]]
    assert len(store.record_payloads("erp", "i1")) == 2
    assert store.known_run("run") and not store.known_run("nope")
    assert store.counts() == {
        "events": 4,
        "records": 2,
        "field_writes": 4,
        "runs": 1,
        "open_tasks": 0,
    }


def test_steps_and_tasks_are_read_back(store: SqlProjectionStore) -> None:
    log = Log()
    log.seed("i1", status="draft")
    action = log.write("run", "i1", {"status": "sent"}, reversibility=Reversibility.IRREVERSIBLE)
    marker = log.fact("rb", EventKind.ROLLBACK_STEP_STARTED).model_copy(
        update={"target": action.target, "labels": {LABEL_STEP: "p:1", LABEL_PLAN: "p"}}
    )
    finished = marker.model_copy(
        update={
            "event_id": "fin",
            "kind": EventKind.ROLLBACK_STEP_FINISHED,
            "occurred_at": marker.occurred_at + timedelta(seconds=1),
            "labels": {
                LABEL_STEP: "p:1",
                LABEL_PLAN: "p",
                LABEL_OUTCOME: "manual",
                LABEL_UNDOES: action.event_id,
            },
        }
    )
    store.apply(positioned([*log.events[:-1], marker]))
    assert store.steps("p")["p:1"].status == "started"
    store.apply(positioned([finished], start=10))
    assert store.steps()["p:1"].outcome == "manual"
    [task] = store.tasks()
    assert (task.task_id, task.event_id, task.status) == ("p:1", action.event_id, "open")
    assert store.tasks(status="done") == [] and store.counts()["open_tasks"] == 1


def test_reset_empties_the_projection(store: SqlProjectionStore) -> None:
    store.apply(positioned(incident().events))
    store.reset()
    assert store.counts()["events"] == 0 and store.positions(TOPIC) == {}


def test_an_unusable_database_is_a_projection_error() -> None:
    broken = SqlProjectionStore("sqlite:////nonexistent/dir/projection.db")
    with pytest.raises(ProjectionError, match="cannot create the projection tables"):
        broken.create()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(json_values)
def test_json_fast_paths_match_json(value: Any) -> None:
    text = dump_json(value)
    assert text == json.dumps(value, sort_keys=True, separators=(",", ":"))
    back = load_json(text)
    assert back == value and type(back) is type(value)


def test_time_round_trip() -> None:
    moment = T0 + timedelta(microseconds=123456)
    assert from_us(to_us(moment)) == moment
    assert to_us(moment.replace(tzinfo=None)) == to_us(moment)
