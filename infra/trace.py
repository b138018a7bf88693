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
from datetime import datetime
from typing import Literal

from pydantic import JsonValue

from backout.projections.fold import LABEL_OUTCOME, LABEL_UNDOES, undone_ids
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlCommand,
    EventKind,
    JsonMap,
    RecordImage,
    Reversibility,
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

Change = Literal["created", "deleted", "updated", "unchanged", "written"]
"""What a step did to its target record (``written``: no before-image to compare)."""
RunStatusText = Literal["running", "succeeded", "failed"]

_LIFECYCLE = (EventKind.RUN_STARTED, EventKind.RUN_FINISHED)
_MISSING = object()


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One field's value before and after a step (``present`` False: absent)."""

    field: str
    before: JsonValue
    after: JsonValue
    before_present: bool = True
    after_present: bool = True
    before_known: bool = True
    """False when the event carried no before-image."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "field": self.field,
            "before": self.before if self.before_present else None,
            "after": self.after if self.after_present else None,
            "before_present": self.before_present,
            "after_present": self.after_present,
            "before_known": self.before_known,
        }

    def describe(self) -> str:
        """``status: 'open' -> 'void'``."""
        was = (
            (repr(self.before) if self.before_present else "(absent)")
            if (self.before_known)
            else "?"
        )
        now = repr(self.after) if self.after_present else "(absent)"
        return f"{self.field}: {was} -> {now}"


@dataclass(frozen=True, slots=True)
class FreezeInfo:
    """The freeze that blocked a call, as the control topic has it."""

    command_id: str
    found: bool
    """False when the command is not on the control topic (or the guard failed closed)."""
    scope: Mapping[str, str] = field(default_factory=dict)
    mode: str | None = None
    reason: str = ""
    issuer: str = ""
    issued_at: datetime | None = None
    cause: str | None = None

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "command_id": self.command_id,
            "found": self.found,
            "scope": dict(self.scope),
            "mode": self.mode,
            "reason": self.reason,
            "issuer": self.issuer,
            "issued_at": self.issued_at.isoformat() if self.issued_at else None,
            "cause": self.cause,
        }

    def describe(self) -> str:
        """``freeze cmd_1 (agent=billing-bot, halt): rate anomaly``."""
        if not self.command_id:
            return "the guard failed closed (control topic stale)"
        if not self.found:
            return f"freeze {self.command_id} (not on the control topic)"
        scope = ",".join(f"{k}={v}" for k, v in sorted(self.scope.items()))
        why = f": {self.reason}" if self.reason else ""
        return f"freeze {self.command_id} ({scope}, {self.mode}){why}"


@dataclass(frozen=True)
class TraceStep:
    """One journaled call (or checkpoint, approval, rollback step) and what hangs under it."""

    event_id: str
    step_id: str
    parent_step_id: str | None
    occurred_at: datetime
    kind: EventKind
    tool: str
    run_id: str
    agent_id: str
    identity: str
    tenant: str | None
    requested_args: JsonMap
    approved_args: JsonMap | None
    target: str | None
    change: Change | None
    diffs: tuple[FieldDiff, ...]
    status: CallStatus
    reversibility: Reversibility
    origin: str
    error: str | None = None
    blocked_by: FreezeInfo | None = None
    compensation: str | None = None
    compensates: str | None = None
    undone_by: tuple[str, ...] = ()
    """Inverse events (rollback or compensation) that undid this step."""
    rollback: str | None = None
    """The outcome of the latest rollback step about this step (``applied``, ``conflict``,
    ``manual``, ...), or ``started`` while one is unfinished."""
    version_before: JsonValue = None
    version_after: JsonValue = None
    value: float | None = None
    confidence: float | None = None
    reasoning: str | None = None
    job_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    position: str | None = None
    children: tuple[TraceStep, ...] = ()
    child_runs: tuple[TraceRun, ...] = ()

    @property
    def args_narrowed(self) -> tuple[str, ...]:
        """Argument names whose approved value differs from the requested one."""
        if self.approved_args is None:
            return ()
        keys = sorted(set(self.requested_args) | set(self.approved_args))
        return tuple(
            k
            for k in keys
            if self.approved_args.get(k, self.requested_args.get(k)) != self.requested_args.get(k)
        )

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form (nested steps and child runs included)."""
        return {
            "event_id": self.event_id,
            "step_id": self.step_id,
            "parent_step_id": self.parent_step_id,
            "occurred_at": self.occurred_at.isoformat(),
            "kind": self.kind.value,
            "tool": self.tool,
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "identity": self.identity,
            "tenant": self.tenant,
            "requested_args": self.requested_args,
            "approved_args": self.approved_args,
            "args_narrowed": list(self.args_narrowed),
            "target": self.target,
            "change": self.change,
            "diffs": [d.to_dict() for d in self.diffs],
            "version_before": self.version_before,
            "version_after": self.version_after,
            "status": self.status.value,
            "reversibility": self.reversibility.value,
            "origin": self.origin,
            "error": self.error,
            "blocked_by": self.blocked_by.to_dict() if self.blocked_by else None,
            "compensation": self.compensation,
            "compensates": self.compensates,
            "undone_by": list(self.undone_by),
            "rollback": self.rollback,
            "value": self.value,
            "confidence": self.confidence,
            "reasoning": self.reasoning,
            "job_id": self.job_id,
            "labels": dict(self.labels),
            "position": self.position,
            "children": [c.to_dict() for c in self.children],
            "child_runs": [r.to_dict() for r in self.child_runs],
        }


@dataclass(frozen=True)
class TraceRun:
    """One run: who ran it, how it ended, and its steps in causal order."""

    run_id: str
    parent_run_id: str | None
    parent_step_id: str | None
    agent_id: str
    identity: str
    tenant: str | None
    workflow: str | None
    environment: str
    origin: str
    started_at: datetime | None
    finished_at: datetime | None
    status: RunStatusText
    error: str | None = None
    steps: tuple[TraceStep, ...] = ()
    child_runs: tuple[TraceRun, ...] = ()
    """Child runs not started from a known step of this run."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form (steps and child runs included)."""
        return {
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "parent_step_id": self.parent_step_id,
            "agent_id": self.agent_id,
            "identity": self.identity,
            "tenant": self.tenant,
            "workflow": self.workflow,
            "environment": self.environment,
            "origin": self.origin,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "status": self.status,
            "error": self.error,
            "steps": [s.to_dict() for s in self.steps],
            "child_runs": [r.to_dict() for r in self.child_runs],
        }


@dataclass(frozen=True)
class TraceSummary:
    """Counts over the whole tree."""

    runs: int
    steps: int
    writes: int
    blocked: int
    failed: int
    in_doubt: int
    undone: int
    records: tuple[str, ...]
    tenants: tuple[str, ...]
    first_at: datetime | None
    last_at: datetime | None

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "runs": self.runs,
            "steps": self.steps,
            "writes": self.writes,
            "blocked": self.blocked,
            "failed": self.failed,
            "in_doubt": self.in_doubt,
            "undone": self.undone,
            "records": list(self.records),
            "tenants": list(self.tenants),
            "first_at": self.first_at.isoformat() if self.first_at else None,
            "last_at": self.last_at.isoformat() if self.last_at else None,
        }


@dataclass(frozen=True)
class Trace:
    """A run tree with the freezes and signals about it."""

    root: TraceRun
    summary: TraceSummary
    freezes: tuple[FreezeInfo, ...] = ()
    """Freezes that blocked calls of the tree or name its runs, agents or identities."""
    signals: tuple[Signal, ...] = ()
    """Detector findings about the tree."""

    def to_dict(self) -> dict[str, JsonValue]:
        """JSON form."""
        return {
            "run": self.root.to_dict(),
            "summary": self.summary.to_dict(),
            "freezes": [f.to_dict() for f in self.freezes],
            "signals": [s.model_dump(mode="json") for s in self.signals],
        }

    def steps(self) -> list[TraceStep]:
        """Every step of the tree, in time order."""
        out: list[TraceStep] = []
        runs = [self.root]
        while runs:
            run = runs.pop()
            todo = list(run.steps)
            runs.extend(run.child_runs)
            while todo:
                step = todo.pop()
                out.append(step)
                todo.extend(step.children)
                runs.extend(step.child_runs)
        out.sort(key=lambda s: (s.occurred_at, s.event_id))
        return out


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


# --- text ----------------------------------------------------------------------------------
def _clock(at: datetime | None) -> str:
    return at.strftime("%H:%M:%S.%f")[:-3] if at is not None else "--:--:--.---"


def _args(args: Mapping[str, JsonValue], limit: int = 80) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _step_line(step: TraceStep) -> str:
    bits = [_clock(step.occurred_at), step.tool]
    if step.kind is not EventKind.TOOL_CALL:
        bits.append(f"[{step.kind.value}]")
    if step.target:
        bits.append(step.target)
    bits.append(step.status.value.upper() if step.status is not CallStatus.SUCCEEDED else "ok")
    if step.reversibility is not Reversibility.READ_ONLY:
        bits.append(step.reversibility.value)
    if step.identity:
        bits.append(f"as {step.identity}")
    line = " ".join(bits)
    if step.requested_args:
        line += f" ({_args(step.requested_args)})"
    return line


def _step_details(step: TraceStep) -> list[str]:
    out = []
    if step.args_narrowed and step.approved_args is not None:
        out.append(f"approved args differ: {_args(step.approved_args)}")
    if step.change in ("created", "deleted"):
        out.append(f"record {step.change}")
    out.extend(d.describe() for d in step.diffs[:12])
    if len(step.diffs) > 12:
        out.append(f"… {len(step.diffs) - 12} more field(s)")
    if step.blocked_by is not None:
        out.append(f"blocked by {step.blocked_by.describe()}")
    elif step.error:
        out.append(f"error: {step.error}")
    if step.compensates:
        out.append(f"undoes {step.compensates}")
    if step.undone_by:
        out.append(f"undone by {', '.join(step.undone_by)}")
    if step.rollback and step.rollback not in ("applied", "already", "compensated"):
        out.append(f"rollback: {step.rollback}")
    return out


def _run_line(run: TraceRun) -> str:
    who = f"agent {run.agent_id}, identity {run.identity}"
    if run.tenant:
        who += f", tenant {run.tenant}"
    if run.workflow:
        who += f", workflow {run.workflow}"
    end = f" -> {_clock(run.finished_at)}" if run.finished_at else ""
    text = f"run {run.run_id} ({who}) {_clock(run.started_at)}{end} {run.status}"
    if run.error:
        text += f": {run.error}"
    return text


def render_text(trace: Trace) -> str:
    """The trace as an indented tree for a terminal (plain text, no markup)."""
    lines: list[str] = []
    # Work items: (prefix for this item's line, prefix for its children, item)
    stack: list[tuple[str, str, TraceRun | TraceStep]] = [("", "", trace.root)]
    while stack:
        lead, indent, item = stack.pop()
        if isinstance(item, TraceRun):
            lines.append(lead + _run_line(item))
            kids: list[TraceRun | TraceStep] = [*item.steps, *item.child_runs]
        else:
            lines.append(lead + _step_line(item))
            detail_pad = indent + ("│  " if (item.children or item.child_runs) else "   ")
            lines.extend(detail_pad + d for d in _step_details(item))
            kids = [*item.children, *item.child_runs]
        for i in range(len(kids) - 1, -1, -1):
            last = i == len(kids) - 1
            stack.append(
                (indent + ("└─ " if last else "├─ "), indent + ("   " if last else "│  "), kids[i])
            )
    s = trace.summary
    lines.append("")
    lines.append(
        f"{s.runs} run(s), {s.steps} step(s): {s.writes} write(s) on {len(s.records)} record(s)"
        f" in {len(s.tenants)} tenant(s); {s.blocked} blocked, {s.failed} failed, "
        f"{s.in_doubt} in doubt, {s.undone} undone"
    )
    for freeze in trace.freezes:
        lines.append(f"freeze: {freeze.describe()}")
    for signal in trace.signals:
        lines.append(
            f"signal {signal.signal_id} {_clock(signal.detected_at)} {signal.detector} "
            f"{signal.severity.value}: {signal.summary}"
        )
    return "\n".join(lines) + "\n"
