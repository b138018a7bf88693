"""The surgical-rollback property, shared by the pure and the real-broker tests.

A history is a random interleaving of writes to a few records by the run in scope, by
another run and by humans writing straight to the table (not journaled), including
creates and deletes. After rolling the run back:

1. a record where the rollback met a conflict is left exactly as it was (and the conflict
   is reported);
2. every other record is what an independent oracle says, cell by cell: a cell whose
   newest writes are the run's returns to its value before them; a cell whose newest
   write is someone else's keeps it; a record the run created is deleted unless someone
   else touched it since (then it is kept as created, minus the run's later writes);
3. records the run never wrote are untouched;
4. rolling back again changes nothing and applies nothing;
5. every run write a journaled writer overwrote later is reported superseded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hypothesis import strategies as st

from backout.rollback.executor import RollbackReport, StepOutcome
from backout.rollback.plan import Decision, RollbackPlan

Actor = Literal["run", "other", "human"]
Row = dict[str, Any] | None
RECORDS = ("r0", "r1", "r2")
FIELDS = ("a", "b")
VALUES = (0, 1, 2)
_ABSENT = object()


@dataclass(frozen=True)
class Op:
    """One write: ``set`` a field (or create the record when absent), or ``delete`` it."""

    actor: Actor
    record: str
    kind: Literal["set", "delete"]
    field: str = "a"
    value: int = 0


@dataclass(eq=False)
class Write:
    """A write as it really happened (the oracle's view, humans included)."""

    actor: Actor
    record: str
    before: Row
    after: Row


@dataclass
class History:
    initial: dict[str, Row]
    ops: list[Op]
    actual: list[Write] = field(default_factory=list)


ops = st.builds(
    Op,
    actor=st.sampled_from(("run", "run", "other", "human")),
    record=st.sampled_from(RECORDS),
    kind=st.sampled_from(("set", "set", "set", "delete")),
    field=st.sampled_from(FIELDS),
    value=st.sampled_from(VALUES),
)
rows = st.one_of(st.none(), st.fixed_dictionaries({f: st.sampled_from(VALUES) for f in FIELDS}))
histories = st.builds(
    History,
    initial=st.fixed_dictionaries({r: rows for r in RECORDS}),
    ops=st.lists(ops, min_size=1, max_size=14),
)


def step(row: Row, op: Op) -> Row:
    """The record after ``op`` (a set on an absent record creates it with both fields)."""
    if op.kind == "delete":
        return None
    if row is None:
        return {f: op.value for f in FIELDS}
    return {**row, op.field: op.value}


def _value(row: Row, cell: str) -> Any:
    if cell == "$exists":
        return row is not None
    return _ABSENT if row is None else row.get(cell, _ABSENT)


def expected(history: History, now: Mapping[str, Row]) -> dict[str, Row]:
    """What a surgical rollback of ``run`` should leave, per record (no conflicts)."""
    out: dict[str, Row] = {}
    for record in RECORDS:
        writes = _observable([w for w in history.actual if w.record == record])
        out[record] = _expected_record(writes, now[record])
    return out


def _observable(writes: list[Write]) -> list[Write]:
    """Unjournaled writes are only ever seen as a net change (in the next before-image, or
    by compare-and-set): merge consecutive ones, and drop those that undo themselves."""
    out: list[Write] = []
    for w in writes:
        if w.actor == "human" and out and out[-1].actor == "human":
            merged = Write("human", w.record, out[-1].before, w.after)
            out[-1] = merged
        else:
            out.append(w)
    return [w for w in out if w.actor != "human" or w.before != w.after]


def _chain(writes: list[Write], cell: str) -> list[Write]:
    changing = [w for w in writes if _value(w.before, cell) != _value(w.after, cell)]
    chain = []
    for w in reversed(changing):
        if w.actor != "run":
            break
        chain.append(w)
    return chain


def _expected_record(writes: list[Write], current: Row) -> Row:
    cells = ("$exists", *FIELDS)
    chains = {c: _chain(writes, c) for c in cells}

    def restored(cell: str) -> Any:
        chain = chains[cell]
        return _value(chain[-1].before, cell) if chain else _value(current, cell)

    want_exists = restored("$exists")
    if current is not None and not want_exists:
        create = next(w for w in chains["$exists"] if w.before is None)
        index = next(i for i, w in enumerate(writes) if w is create)
        if all(w.actor == "run" for w in writes[index + 1 :] if w.before != w.after):
            return None  # created by the run, untouched since: deleted
        kept = {}
        for cell in FIELDS:
            chain = chains[cell]
            if any(w is create for w in chain):
                kept[cell] = create.after[cell] if create.after else None
            else:
                kept[cell] = restored(cell)
        return kept
    if not want_exists:
        return None
    return {c: v for c in FIELDS if (v := restored(c)) is not _ABSENT}


def check(
    history: History,
    before: Mapping[str, Row],
    after: Mapping[str, Row],
    plan: RollbackPlan,
    report: RollbackReport,
    events: list[Any],
    run_id: str = "run",
    prefix: str = "",
) -> None:
    """Assert properties 1, 2, 3 and 5 (4 needs a second run: see ``check_again``).

    Args:
        events: the journaled events the plan was made from.
        run_id: the id the run has on the log.
        prefix: what the example's record ids start with on the target.
    """
    conflicted = {
        r.record.split("/", 1)[1].removeprefix(prefix)
        for r in report.of(StepOutcome.CONFLICT)
        if r.record
    }
    oracle = expected(history, before)
    written = {w.record for w in history.actual if w.actor == "run"}
    for record in RECORDS:
        if record in conflicted:
            assert after[record] == before[record], f"{record}: conflict but written"
        elif record not in written:
            assert after[record] == before[record], f"{record}: not the run's, but changed"
        else:
            assert after[record] == oracle[record], (
                f"{record}: got {after[record]}, oracle {oracle[record]}"
            )
    assert not report.of(StepOutcome.PENDING, StepOutcome.FAILED)
    superseded = {e for s in plan.steps if s.decision is Decision.SUPERSEDED for e in s.undoes}
    missing = superseded_by_journaled(events, run_id) - superseded
    assert not missing, f"overwritten run writes not reported superseded: {missing}"


def check_again(
    before: Mapping[str, Row], after: Mapping[str, Row], plan: RollbackPlan, report: RollbackReport
) -> None:
    """Property 4: the second rollback applies nothing and changes nothing."""
    assert after == before
    applied = report.of(StepOutcome.APPLIED, StepOutcome.COMPENSATED)
    assert not applied, f"second rollback applied {applied}"
    assert {s.decision for s in plan.actionable} <= {
        Decision.RESTORE,
        Decision.DELETE,
        Decision.RECREATE,
    }


def superseded_by_journaled(events: list[Any], run_id: str = "run") -> set[str]:
    """Run events whose write to some field a later journaled non-run write overwrote."""
    from backout.projections.fold import fold

    projection = fold(events)
    out = set()
    for record in projection.records.values():
        for writes in record.cells().values():
            for i, w in enumerate(writes):
                if w.run_id != run_id:
                    continue
                if any(
                    later.journaled
                    and later.run_id not in (run_id, None)
                    and later.origin is not None
                    and later.origin.value != "rollback"
                    for later in writes[i + 1 :]
                ):
                    out.add(w.event_id)
    return out
