"""A run reconstructed from its ActionEvents as a tree. Pure: no I/O.

``build_trace(run_id, events, ...)`` turns the events of a run and of the runs started
inside it into a :class:`Trace`: each run holds its steps in causal order; a step holds the
steps nested inside it (a tool called from inside a tool) and the child runs started from
it. Each step says when, which tool, with which identity, the requested and the approved
arguments, the target record and its field diffs, the status, the reversibility, and for a
blocked call the freeze that blocked it. Rollback's inverse writes mark the steps they undid.

``render_text`` draws the tree for a terminal; ``Trace.to_dict`` gives its JSON form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from backout.infra.trace_model import (
    Change,
    FieldDiff,
    FreezeInfo,
    RunStatusText,
    Trace,
    TraceRun,
    TraceStep,
    TraceSummary,
)
from backout.infra.trace_text import render_text
from backout.projections.fold import LABEL_OUTCOME, LABEL_UNDOES, undone_ids
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlCommand,
    EventKind,
    RecordImage,
    Signal,
)

__all__ = [
    "Change",
    "FieldDiff",
    "FreezeInfo",
    "Trace",
    "TraceRun",
    "TraceStep",
    "TraceSummary",
    "build_trace",
    "field_diffs",
    "render_text",
]

_LIFECYCLE = (EventKind.RUN_STARTED, EventKind.RUN_FINISHED)
_MISSING = object()


# --- building -----------------------------------------------------------------------------------
def field_diffs(
    before: RecordImage | None, after: RecordImage | None
) -> tuple[Change | None, tuple[FieldDiff, ...]]:
    """What a write did to its record: created, deleted, updated (with the changed fields)."""
    if after is None:
        return None, ()
    if before is None:
        diffs = tuple(
            FieldDiff(k, None, v, before_present=False, before_known=False)
            for k, v in sorted(after.fields.items())
        )
        return ("written" if after.exists else "deleted"), diffs
    if not before.exists and not after.exists:
        return "unchanged", ()
    was_map = before.fields if before.exists else {}
    now_map = after.fields if after.exists else {}
    change: Change = (
        "created" if not before.exists else "deleted" if not after.exists else "updated"
    )
    out = []
    for name in sorted(was_map.keys() | now_map.keys()):
        was = was_map.get(name, _MISSING)
        now = now_map.get(name, _MISSING)
        if was is not _MISSING and now is not _MISSING and was == now and (type(was) is type(now)):
            continue
        out.append(
            FieldDiff(
                name,
                None if was is _MISSING else was,  # type: ignore[arg-type]
                None if now is _MISSING else now,  # type: ignore[arg-type]
                before_present=was is not _MISSING,
                after_present=now is not _MISSING,
            )
        )
    if change == "updated" and not out:
        change = "unchanged"
    return change, tuple(out)


def _freeze_info(command_id: str, commands: Mapping[str, ControlCommand]) -> FreezeInfo:
    command = commands.get(command_id)
    if command is None:
        return FreezeInfo(command_id, False)
    return FreezeInfo(
        command_id,
        True,
        dict(command.scope),
        command.mode.value,
        command.reason,
        command.issuer,
        command.issued_at,
        command.cause,
    )


def _compensation_text(event: ActionEvent) -> str | None:
    comp = event.compensation
    if comp is None:
        return None
    text = comp.strategy
    if comp.tool:
        text += f" via {comp.tool}"
    if comp.allowed_until is not None:
        text += f" until {comp.allowed_until.isoformat(timespec='seconds')}"
    return text


@dataclass(frozen=True)
class _Links:
    """What other records say about the run's events."""

    commands: Mapping[str, ControlCommand]
    undone: Mapping[str, list[str]]
    """Event id -> inverse events that undid it."""
    outcomes: Mapping[str, str]
    """Event id -> latest rollback step outcome about it."""
    positions: Mapping[str, str]


def _step_of(event: ActionEvent, links: _Links) -> TraceStep:
    change, diffs = field_diffs(event.before, event.after)
    blocked = (
        _freeze_info(event.blocked_by or "", links.commands)
        if event.status is CallStatus.BLOCKED
        else None
    )
    return TraceStep(
        event_id=event.event_id,
        step_id=event.step_id,
        parent_step_id=event.parent_step_id,
        occurred_at=event.occurred_at,
        kind=event.kind,
        tool=event.tool,
        run_id=event.run_id,
        agent_id=event.agent_id,
        identity=event.identity,
        tenant=event.tenant,
        requested_args=event.requested_args,
        approved_args=event.approved_args,
        target=event.target.key if event.target is not None else None,
        change=change,
        diffs=diffs,
        status=event.status,
        reversibility=event.reversibility,
        origin=event.origin.value,
        error=f"{event.error.type}: {event.error.message}" if event.error else None,
        blocked_by=blocked,
        compensation=_compensation_text(event),
        compensates=event.compensates,
        undone_by=tuple(links.undone.get(event.event_id, ())),
        rollback=links.outcomes.get(event.event_id),
        version_before=event.before.version if event.before is not None else None,
        version_after=event.after.version if event.after is not None else None,
        value=event.value,
        confidence=event.confidence,
        reasoning=event.reasoning_summary,
        job_id=event.job_id,
        labels=event.labels,
        position=links.positions.get(event.event_id),
    )


@dataclass
class _RunDraft:
    run_id: str
    first: ActionEvent
    started: ActionEvent | None = None
    finished: ActionEvent | None = None
    steps: list[ActionEvent] = field(default_factory=list)


def _run_tree(run_id: str, events: Iterable[ActionEvent]) -> set[str]:
    children: dict[str, set[str]] = {}
    for event in events:
        if event.parent_run_id is not None and event.parent_run_id != event.run_id:
            children.setdefault(event.parent_run_id, set()).add(event.run_id)
    found, todo = {run_id}, [run_id]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def build_trace(
    run_id: str,
    events: Sequence[ActionEvent],
    *,
    related: Sequence[ActionEvent] = (),
    commands: Sequence[ControlCommand] = (),
    signals: Sequence[Signal] = (),
    positions: Mapping[str, str] | None = None,
) -> Trace:
    """Reconstruct ``run_id`` (with its child runs) from its events.

    Args:
        events: the events of the run tree (others are ignored), in any order.
        related: other events; inverse writes among them mark the steps they undid.
        commands: control commands; a blocked step shows the freeze named by ``blocked_by``.
        signals: detector findings to attach to the trace.
        positions: event id -> ``topic/partition@offset``.

    Raises:
        ConfigError: no event belongs to the run.
    """
    positions = positions or {}
    tree = _run_tree(run_id, events)
    mine = [e for e in events if e.run_id in tree]
    if not mine:
        raise ConfigError(f"unknown run {run_id!r}: no events of it on the log")
    mine.sort(key=lambda e: e.occurred_at)
    by_command = {c.command_id: c for c in commands}
    undone: dict[str, list[str]] = {}
    for other in (*related, *mine):
        for target in undone_ids(other.compensates, other.labels):
            if other.event_id not in undone.setdefault(target, []):
                undone[target].append(other.event_id)
    drafts: dict[str, _RunDraft] = {}
    for event in mine:
        draft = drafts.setdefault(event.run_id, _RunDraft(event.run_id, event))
        if event.kind is EventKind.RUN_STARTED:
            draft.started = draft.started or event
        elif event.kind is EventKind.RUN_FINISHED:
            draft.finished = event
        else:
            draft.steps.append(event)
    links = _Links(by_command, undone, _rollback_outcomes(related), positions)
    runs = _assemble(run_id, drafts, links)
    root = runs[run_id] if run_id in runs else _placeholder(run_id, runs)
    blocked_ids = {e.blocked_by for e in mine if e.blocked_by}
    freezes = [_freeze_info(c.command_id, by_command) for c in commands]
    known = {f.command_id for f in freezes}
    freezes += [_freeze_info(i, by_command) for i in sorted(blocked_ids - known)]
    return Trace(root, _summary(mine, undone), tuple(freezes), tuple(signals))


def _rollback_outcomes(related: Sequence[ActionEvent]) -> dict[str, str]:
    steps = sorted(
        (
            e
            for e in related
            if e.kind in (EventKind.ROLLBACK_STEP_STARTED, EventKind.ROLLBACK_STEP_FINISHED)
        ),
        key=lambda e: e.occurred_at,
    )
    out: dict[str, str] = {}
    for event in steps:
        finished = event.kind is EventKind.ROLLBACK_STEP_FINISHED
        outcome = event.labels.get(LABEL_OUTCOME, "finished") if finished else "started"
        for undone in event.labels.get(LABEL_UNDOES, "").split():
            if finished or out.get(undone) in (None, "started"):
                out[undone] = outcome
    return out


def _placeholder(run_id: str, runs: Mapping[str, TraceRun]) -> TraceRun:
    """A root with no events of its own (only its child runs are on the log)."""
    children = tuple(
        sorted(
            (r for r in runs.values() if r.parent_run_id == run_id),
            key=lambda r: r.started_at.timestamp() if r.started_at else float("inf"),
        )
    )
    first = children[0]
    return TraceRun(
        run_id,
        None,
        None,
        first.agent_id,
        first.identity,
        first.tenant,
        first.workflow,
        first.environment,
        first.origin,
        None,
        None,
        "running",
        "no events of this run on the log; only its child runs",
        (),
        children,
    )


def _cap_depth(parents: Mapping[str, str], limit: int) -> dict[str, str]:
    """Re-hang nodes deeper than ``limit`` on their ancestor at depth ``limit - 1``.

    A trace is shown and serialised as nested structures; capping the nesting keeps a
    pathological log (a tool calling a tool thousands of levels deep) printable as JSON.
    ``parents`` must be acyclic; roots are the nodes that are nobody's child.
    """
    depth: dict[str, int] = {}
    for node in parents:
        chain = []
        current = node
        while current in parents and current not in depth:
            chain.append(current)
            current = parents[current]
        base = depth.get(current, 0)
        for item in reversed(chain):
            base += 1
            depth[item] = base
    anchor: dict[str, str] = {}
    out: dict[str, str] = {}
    for node in sorted(parents, key=depth.__getitem__):
        parent = parents[node]
        if depth[node] <= limit:
            out[node] = parent
            if depth[node] == limit - 1:
                anchor[node] = node
            elif depth[node] == limit:
                anchor[node] = parent
            continue
        found = anchor.get(parent, parent)
        anchor[node] = found
        out[node] = found
    return out


MAX_NESTING = 50
"""Deepest nesting of child runs, and of steps inside a run, before they are flattened."""


def _assemble(root: str, drafts: Mapping[str, _RunDraft], links: _Links) -> dict[str, TraceRun]:
    """Build the runs bottom-up (children before parents), without recursion."""
    kids: dict[str, list[str]] = {}
    for run_id, draft in drafts.items():
        parent = draft.first.parent_run_id
        if parent is not None and parent in drafts and parent != run_id:
            kids.setdefault(parent, []).append(run_id)
    starts = (
        [root]
        if root in drafts
        else [r for r, d in drafts.items() if d.first.parent_run_id == root]
    )
    found: dict[str, str] = {}  # run -> the parent it was reached from (a tree: no cycles)
    seen = set(starts)
    todo = list(starts)
    while todo:
        run_id = todo.pop()
        for kid in kids.get(run_id, ()):
            if kid not in seen:
                seen.add(kid)
                found[kid] = run_id
                todo.append(kid)
    parents = _cap_depth(found, MAX_NESTING)
    children: dict[str, list[str]] = {}
    for kid, parent in parents.items():
        children.setdefault(parent, []).append(kid)
    depth = {r: 0 for r in starts}
    order = list(starts)
    for run_id in order:  # breadth first: parents before children
        for kid in children.get(run_id, ()):
            depth[kid] = depth[run_id] + 1
            order.append(kid)
    built: dict[str, TraceRun] = {}
    for run_id in reversed(order):
        runs = [built[k] for k in children.get(run_id, ())]
        built[run_id] = _build_run(drafts[run_id], runs, links)
    return built


def _build_run(draft: _RunDraft, child_runs: list[TraceRun], links: _Links) -> TraceRun:
    events = draft.steps  # in time order
    index = {e.event_id: i for i, e in enumerate(events)}
    step_ids = {e.step_id: e for e in reversed(events)}  # the first event of a step id wins
    parent_of: dict[str, str] = {}
    for i, event in enumerate(events):
        anchor = step_ids.get(event.parent_step_id or "")
        # A call starts after the call it is nested in; anything else is a broken link
        # (and following it could loop), so the step stays at the top of its run.
        if anchor is not None and index[anchor.event_id] < i:
            parent_of[event.event_id] = anchor.event_id
    parent_of = _cap_depth(parent_of, MAX_NESTING)
    nested: dict[str, list[str]] = {}
    for event in events:
        if event.event_id in parent_of:
            nested.setdefault(parent_of[event.event_id], []).append(event.event_id)
    runs_at: dict[str, list[TraceRun]] = {}
    loose: list[TraceRun] = []
    for child in child_runs:
        anchor = step_ids.get(child.parent_step_id or "")
        if anchor is not None:
            runs_at.setdefault(anchor.event_id, []).append(child)
        else:
            loose.append(child)
    built: dict[str, TraceStep] = {}
    for event in reversed(events):  # nested steps come later, so they are built first
        step = _step_of(event, links)
        kids = tuple(built[c] for c in nested.get(event.event_id, ()))
        extra = tuple(runs_at.get(event.event_id, ()))
        if kids or extra:
            step = replace(step, children=kids, child_runs=extra)
        built[event.event_id] = step
    first, started, finished = draft.first, draft.started, draft.finished
    status: RunStatusText = "running"
    error = None
    if finished is not None:
        status = "succeeded" if finished.status is CallStatus.SUCCEEDED else "failed"
        if finished.error is not None:
            error = f"{finished.error.type}: {finished.error.message}"
    head = started or first
    return TraceRun(
        run_id=draft.run_id,
        parent_run_id=head.parent_run_id,
        parent_step_id=head.parent_step_id if head.parent_run_id else None,
        agent_id=head.agent_id,
        identity=head.identity,
        tenant=head.tenant,
        workflow=head.workflow,
        environment=head.environment,
        origin=head.origin.value,
        started_at=started.occurred_at if started else first.occurred_at,
        finished_at=finished.occurred_at if finished else None,
        status=status,
        error=error,
        steps=tuple(built[e.event_id] for e in events if e.event_id not in parent_of),
        child_runs=tuple(sorted(loose, key=lambda r: r.started_at or first.occurred_at)),
    )


def _summary(events: Sequence[ActionEvent], undone: Mapping[str, list[str]]) -> TraceSummary:
    calls = [e for e in events if e.kind not in _LIFECYCLE]
    writes = [e for e in calls if e.is_write]
    return TraceSummary(
        runs=len({e.run_id for e in events}),
        steps=len(calls),
        writes=len(writes),
        blocked=sum(1 for e in calls if e.status is CallStatus.BLOCKED),
        failed=sum(1 for e in calls if e.status is CallStatus.FAILED),
        in_doubt=sum(1 for e in calls if e.status is CallStatus.UNKNOWN),
        undone=sum(1 for e in writes if e.event_id in undone),
        records=tuple(sorted({e.target.key for e in writes if e.target is not None})),
        tenants=tuple(sorted({e.tenant for e in writes if e.tenant is not None})),
        first_at=events[0].occurred_at if events else None,
        last_at=events[-1].occurred_at if events else None,
    )
