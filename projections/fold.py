"""The projection fold: what the log says about records, runs and rollbacks. Pure: no I/O.

``evolve(state, event) -> state`` defines the projection; ``fold(events, state)`` is the
same for many events (one copy of the maps instead of one per event). The SQL store runs
the very same per-aggregate steps (``advance_record``, ``fold_run``, ``links_of``,
``advance_step``, ``advance_task``) over the rows a batch touches, so the tables and this
fold cannot disagree. Rollback planning reads a :class:`Projection`.

A record is seen as *cells*: one per field plus :data:`EXISTS` (does the record exist).
Every event that changed a record contributes one :class:`FieldWrite` per changed cell,
in the record's own order (``seq``). When an event's before-image disagrees with what the
log last said, someone changed the record without being journaled: that difference is
recorded as an unjournaled write (``journaled=False``) just before the event's own writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from backout.projections.values import (
    ABSENT,
    EXISTS,
    LABEL_CAS,
    LABEL_CHECKPOINT,
    LABEL_DETAIL,
    LABEL_FREEZE,
    LABEL_OUTCOME,
    LABEL_PLAN,
    LABEL_REASON,
    LABEL_RUN,
    LABEL_STEP,
    LABEL_TASK,
    LABEL_TASK_STATUS,
    LABEL_TOOL,
    LABEL_UNDOES,
    Absent,
    CellValue,
    Checkpoint,
    CompensationLink,
    EventInfo,
    FieldWrite,
    RecordChange,
    RecordHistory,
    RecordState,
    RunState,
    RunStatus,
    StepState,
    Task,
    changes_record,
    same,
    undone_ids,
)
from backout.schemas.events import ActionEvent, CallStatus, EventKind, RecordImage

__all__ = [
    "ABSENT",
    "EMPTY",
    "EXISTS",
    "LABEL_CAS",
    "LABEL_CHECKPOINT",
    "LABEL_DETAIL",
    "LABEL_FREEZE",
    "LABEL_OUTCOME",
    "LABEL_PLAN",
    "LABEL_REASON",
    "LABEL_RUN",
    "LABEL_STEP",
    "LABEL_TASK",
    "LABEL_TASK_STATUS",
    "LABEL_TOOL",
    "LABEL_UNDOES",
    "Absent",
    "CellValue",
    "Checkpoint",
    "CompensationLink",
    "EventInfo",
    "FieldWrite",
    "Projection",
    "RecordChange",
    "RecordHistory",
    "RecordState",
    "RunState",
    "RunStatus",
    "StepState",
    "Task",
    "advance_record",
    "advance_run",
    "advance_step",
    "advance_task",
    "changes_record",
    "checkpoint_of",
    "evolve",
    "fold",
    "fold_run",
    "links_of",
    "same",
    "task_key",
    "undone_ids",
]


# --- per-aggregate steps (shared with the SQL store) -----------------------------------------
def _image_value(image: RecordImage, cell: str) -> CellValue:
    if cell == EXISTS:
        return image.exists
    if not image.exists:
        return ABSENT
    return image.fields.get(cell, ABSENT)


def _drift(prior: RecordState, before: RecordImage) -> list[tuple[str, CellValue, CellValue]]:
    """Cells whose before-image differs from what the log last said: unjournaled writes."""
    if not prior.known:
        return []
    if prior.exists != before.exists:
        names = sorted(prior.fields) if prior.exists else sorted(before.fields)
        return [(EXISTS, prior.exists, before.exists)] + [
            (n, prior.value(n), _image_value(before, n)) for n in names
        ]
    if not before.exists:
        return []
    return [
        (n, prior.fields[n], v)
        for n, v in sorted(before.fields.items())
        if n in prior.fields and not same(prior.fields[n], v)
    ]


def advance_record(state: RecordState | None, event: ActionEvent) -> RecordChange:
    """Apply one record-changing event (see :func:`changes_record`) to its target record."""
    target = event.target
    if target is None:
        raise ValueError(f"event {event.event_id!r} has no target")
    prior = state or RecordState(target.system, target.object_id)
    seq, at, writes = prior.seq, event.occurred_at, []
    before, after = event.before, event.after
    drift = _drift(prior, before) if before is not None else []
    if drift:
        seq += 1
        writes += [
            FieldWrite(cell, seq, event.event_id, None, None, at, was, now, journaled=False)
            for cell, was, now in drift
        ]
    exists, fields, known = prior.exists, prior.fields, prior.known
    if before is not None:
        exists, known = before.exists, True
        fields = {**fields, **before.fields} if before.exists else {}
    if after is None:
        new = replace(
            prior,
            exists=exists,
            known=known,
            fields=dict(fields),
            seq=seq,
            last_event_id=event.event_id,
            updated_at=at,
        )
        return RecordChange(new, tuple(writes), True)
    seq += 1
    event_id, run_id, origin = event.event_id, event.run_id, event.origin
    drifted = len(writes)
    if exists != after.exists:
        writes.append(FieldWrite(EXISTS, seq, event_id, run_id, origin, at, exists, after.exists))
    if after.exists:
        # A field the after-image leaves out keeps its value: only its fields can change.
        for name, now in sorted(after.fields.items()):
            if not exists:
                was: CellValue = ABSENT
                was_known = True
            elif name in fields:
                was, was_known = fields[name], True
            else:
                was, was_known = ABSENT, before is not None
            if not same(was, now):
                writes.append(
                    FieldWrite(
                        name, seq, event_id, run_id, origin, at, was, now, before_known=was_known
                    )
                )
        fields = {**fields, **after.fields}
    else:
        if exists:  # deleted: every known field becomes absent
            writes += [
                FieldWrite(name, seq, event_id, run_id, origin, at, fields[name], ABSENT)
                for name in sorted(fields)
            ]
        fields = {}
    if len(writes) == drifted:  # the event changed nothing: it takes no seq
        seq -= 1
    new = RecordState(
        target.system,
        target.object_id,
        after.exists,
        True,
        fields,
        after.version,
        seq,
        event_id,
        at,
    )
    return RecordChange(new, tuple(writes), False)


def advance_run(run: RunState | None, event: ActionEvent) -> RunState:
    """Apply one event to its run (events of a run may arrive in any order)."""
    return fold_run(run, (event,))


def fold_run(run: RunState | None, events: Sequence[ActionEvent]) -> RunState:
    """:func:`advance_run` over ``events`` of one run, in order, in a single pass.

    Raises:
        ValueError: no run and no events to start one from.
    """
    if run is None:
        if not events:
            raise ValueError("fold_run needs a run or at least one event")
        first = events[0]
        run = RunState(
            first.run_id,
            first.agent_id,
            first.identity,
            environment=first.environment,
            started_at=first.occurred_at,
        )
    parent, tenant, workflow = run.parent_run_id, run.tenant, run.workflow
    status, finished, points = run.status, run.finished_at, run.checkpoints
    started, last = run.started_at, run.last_event_at
    calls, writes = run.calls, run.writes
    for event in events:
        at, kind = event.occurred_at, event.kind
        if kind is EventKind.TOOL_CALL:
            calls += 1
            writes += 1 if event.is_write or changes_record(event) else 0
        elif kind is EventKind.RUN_FINISHED:
            ok = event.status is CallStatus.SUCCEEDED
            status, finished = (RunStatus.FINISHED if ok else RunStatus.FAILED), at
        elif kind is EventKind.CHECKPOINT:
            point = checkpoint_of(event)
            assert point is not None
            points = (*points, point)
        if started is None or started > at:
            started = at
        if last is None or last < at:
            last = at
        parent = parent or event.parent_run_id
        tenant = tenant if tenant is not None else event.tenant
        workflow = workflow if workflow is not None else event.workflow
    return RunState(
        run.run_id,
        run.agent_id,
        run.identity,
        parent,
        tenant,
        workflow,
        run.environment,
        status,
        started,
        finished,
        last,
        calls,
        writes,
        points,
    )


def checkpoint_of(event: ActionEvent) -> Checkpoint | None:
    """The checkpoint a CHECKPOINT event marks."""
    if event.kind is not EventKind.CHECKPOINT:
        return None
    name = event.labels.get(LABEL_CHECKPOINT) or event.tool
    return Checkpoint(event.run_id, name, event.event_id, event.occurred_at)


def links_of(event: ActionEvent) -> tuple[CompensationLink, ...]:
    """The compensation links an inverse write (``compensates`` set) creates."""
    return tuple(
        CompensationLink(
            undone,
            event.event_id,
            event.origin,
            event.occurred_at,
            event.labels.get(LABEL_PLAN),
            event.labels.get(LABEL_STEP),
        )
        for undone in undone_ids(event.compensates, event.labels)
    )


def advance_step(step: StepState | None, event: ActionEvent) -> StepState | None:
    """Apply a rollback_step_started/finished event to its step; None for other events."""
    step_id = event.labels.get(LABEL_STEP)
    if step_id is None or event.kind not in (
        EventKind.ROLLBACK_STEP_STARTED,
        EventKind.ROLLBACK_STEP_FINISHED,
    ):
        return None
    key = event.target.key if event.target is not None else None
    plan_id = event.labels.get(LABEL_PLAN, "")
    if event.kind is EventKind.ROLLBACK_STEP_STARTED:
        if step is not None and step.status == "finished":
            return step  # a late duplicate start never reopens a finished step
        return StepState(step_id, plan_id, "started", None, key, event.occurred_at)
    started = step.started_at if step is not None else None
    return StepState(
        step_id,
        plan_id,
        "finished",
        event.labels.get(LABEL_OUTCOME),
        key,
        started,
        event.occurred_at,
        event.labels.get(LABEL_DETAIL, ""),
    )


def advance_task(task: Task | None, event: ActionEvent) -> Task | None:
    """Open a task for a manual rollback step, or close one; None when nothing applies."""
    labels = event.labels
    if (
        event.kind is EventKind.ROLLBACK_STEP_FINISHED
        and labels.get(LABEL_OUTCOME) == "manual"
        and LABEL_STEP in labels
    ):
        if task is not None:
            return task
        target = event.target
        undone = labels.get(LABEL_UNDOES, "").split()
        return Task(
            labels[LABEL_STEP],
            labels.get(LABEL_PLAN, ""),
            "open",
            undone[0] if undone else None,
            target.system if target else None,
            target.object_id if target else None,
            labels.get(LABEL_RUN),
            labels.get(LABEL_TOOL, event.tool),
            labels.get(LABEL_REASON, ""),
            event.occurred_at,
            freeze=labels.get(LABEL_FREEZE, ""),
        )
    if task is not None and labels.get(LABEL_TASK) == task.task_id:
        status = labels.get(LABEL_TASK_STATUS, task.status)
        return replace(
            task, status=status, closed_at=event.occurred_at if status == "done" else None
        )
    return None


def task_key(event: ActionEvent) -> str | None:
    """The task an event opens or closes, if any."""
    if (
        event.kind is EventKind.ROLLBACK_STEP_FINISHED
        and event.labels.get(LABEL_OUTCOME) == "manual"
    ):
        return event.labels.get(LABEL_STEP)
    return event.labels.get(LABEL_TASK)


# --- the whole projection -------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """Everything the log says, as values. Immutable: ``evolve`` returns a new one."""

    records: Mapping[str, RecordHistory] = field(default_factory=dict)
    events: Mapping[str, EventInfo] = field(default_factory=dict)
    runs: Mapping[str, RunState] = field(default_factory=dict)
    links: Mapping[str, tuple[CompensationLink, ...]] = field(default_factory=dict)
    """Inverse writes by the event they undo."""
    steps: Mapping[str, StepState] = field(default_factory=dict)
    tasks: Mapping[str, Task] = field(default_factory=dict)


EMPTY: Final = Projection()


class _Builder:
    """Mutable copies of a projection's maps, for folding many events with one copy."""

    def __init__(self, state: Projection) -> None:
        self.records = dict(state.records)
        self.events = dict(state.events)
        self.runs = dict(state.runs)
        self.links = dict(state.links)
        self.steps = dict(state.steps)
        self.tasks = dict(state.tasks)

    def apply(self, event: ActionEvent) -> None:
        if event.event_id in self.events:
            return  # reprocessing an event is a no-op
        self.events[event.event_id] = EventInfo.of(event)
        if changes_record(event):
            assert event.target is not None
            key = event.target.key
            history = self.records.get(key)
            change = advance_record(history.state if history else None, event)
            writes = history.writes if history else ()
            opaque = history.opaque if history else ()
            self.records[key] = RecordHistory(
                change.state,
                writes + change.writes,
                (*opaque, event.event_id) if change.opaque else opaque,
            )
        self.runs[event.run_id] = advance_run(self.runs.get(event.run_id), event)
        for link in links_of(event):
            self.links[link.undone_event_id] = (*self.links.get(link.undone_event_id, ()), link)
        step_id = event.labels.get(LABEL_STEP)
        if step_id is not None:
            step = advance_step(self.steps.get(step_id), event)
            if step is not None:
                self.steps[step_id] = step
        task_id = task_key(event)
        if task_id is not None:
            task = advance_task(self.tasks.get(task_id), event)
            if task is not None:
                self.tasks[task_id] = task

    def freeze(self) -> Projection:
        return Projection(self.records, self.events, self.runs, self.links, self.steps, self.tasks)


def evolve(state: Projection, event: ActionEvent) -> Projection:
    """The projection after one more event. An event seen before changes nothing."""
    if event.event_id in state.events:
        return state
    return fold((event,), state)


def fold(events: Iterable[ActionEvent], state: Projection = EMPTY) -> Projection:
    """The projection after ``events``, in order: ``fold(a + b) == fold(b, fold(a))``."""
    builder = _Builder(state)
    for event in events:
        builder.apply(event)
    return builder.freeze()
