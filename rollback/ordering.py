"""Ordering and assembling rollback steps: reverse causal order, ids from the inputs. Pure.

The planner decides what each record needs as draft steps; this module puts them in
reverse causal order (newest first, every step before the steps it depended on: on the
same record newer writes first, across records an action before its causal parent's)
and turns them into the plan value, with a plan id and step ids derived from the inputs.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from backout.projections.fold import EventInfo, RecordState
from backout.rollback.plan import ACTIONABLE, Decision, FieldChange, PlanStep, RollbackPlan, Writer
from backout.rollback.scope import RollbackScope

__all__ = ["Draft", "assemble_plan", "order_drafts"]


@dataclass(slots=True)
class Draft:
    """A step before it has its place and id."""

    decision: Decision
    events: list[EventInfo]
    at: datetime
    seq: int | None
    state: RecordState | None
    changes: list[FieldChange]
    reason: str
    blocked: list[str] = field(default_factory=list)
    superseded_by: Writer | None = None
    undone_by: str | None = None

    @property
    def key(self) -> str:
        return self.state.key if self.state is not None else ""


def order_drafts(
    drafts: list[Draft], events: Mapping[str, EventInfo]
) -> tuple[list[Draft], list[str]]:
    """Reverse causal order: newest first, each step before the steps it depended on."""
    rank = sorted(
        range(len(drafts)),
        key=lambda i: (
            -drafts[i].at.timestamp(),
            -(drafts[i].seq or 0),
            drafts[i].key,
            drafts[i].decision.value,
            drafts[i].events[0].event_id if drafts[i].events else "",
        ),
    )
    priority = {i: p for p, i in enumerate(rank)}
    edges: dict[int, set[int]] = {i: set() for i in range(len(drafts))}
    owner: dict[str, int] = {}
    by_record: dict[str, list[int]] = {}
    for i, d in enumerate(drafts):
        if d.decision in ACTIONABLE:
            for e in d.events:
                owner.setdefault(e.event_id, i)
            if d.seq is not None:
                by_record.setdefault(d.key, []).append(i)
    for members in by_record.values():
        members.sort(key=lambda i: -(drafts[i].seq or 0))
        for newer, older in itertools.pairwise(members):
            edges[newer].add(older)
    steps = {e.step_id: e.event_id for e in events.values() if e.step_id}
    for i, d in enumerate(drafts):
        if d.decision not in ACTIONABLE:
            continue
        for e in d.events:
            parent = _causal_owner(e, steps, events, owner)
            if parent is not None and parent != i:
                edges[i].add(parent)
    indegree = {i: 0 for i in edges}
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = [(priority[i], i) for i, n in indegree.items() if n == 0]
    heapq.heapify(ready)
    out: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        out.append(i)
        for t in edges[i]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(ready, (priority[t], t))
    notes = []
    if len(out) < len(drafts):
        rest = sorted(set(range(len(drafts))) - set(out), key=priority.__getitem__)
        out += rest
        notes.append(
            f"{len(rest)} step(s) depend on each other both ways (interleaved causal "
            "chains); they are ordered newest first"
        )
    return [drafts[i] for i in out], notes


def _causal_owner(
    event: EventInfo,
    steps: Mapping[str, str],
    events: Mapping[str, EventInfo],
    owner: Mapping[str, int],
) -> int | None:
    """The draft undoing the nearest causal ancestor of ``event``, if any."""
    seen: set[str] = set()
    parent_step = event.parent_step_id
    while parent_step and parent_step not in seen:
        seen.add(parent_step)
        parent_id = steps.get(parent_step)
        if parent_id is None:
            return None
        if parent_id in owner:
            return owner[parent_id]
        parent = events.get(parent_id)
        parent_step = parent.parent_step_id if parent is not None else None
    return None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def assemble_plan(
    scope: RollbackScope,
    now: datetime,
    selected: list[EventInfo],
    writes: int,
    records: int,
    drafts: list[Draft],
    notes: list[str],
) -> RollbackPlan:
    plan_id = "rb_" + _digest(scope.canonical(), *sorted(e.event_id for e in selected))[:16]
    steps, used = [], set()
    for index, d in enumerate(drafts):
        content = _digest(
            d.decision.value,
            d.key,
            *sorted(e.event_id for e in d.events),
            *sorted(c.field for c in d.changes),
        )[:12]
        while content in used:
            content = _digest(content, str(index))[:12]
        used.add(content)
        first = d.events[0] if d.events else None
        comp = first.compensation if first is not None else None
        compensating = d.decision is Decision.COMPENSATE and comp is not None
        steps.append(
            PlanStep(
                step_id=f"{plan_id}:{content}",
                index=index,
                decision=d.decision,
                system=d.state.system if d.state is not None else (first.system if first else None),
                object_id=(
                    d.state.object_id
                    if d.state is not None
                    else (first.object_id if first else None)
                ),
                changes=tuple(d.changes),
                undoes=tuple(e.event_id for e in d.events),
                blocked=tuple(d.blocked),
                reason=d.reason,
                at=d.at,
                tool=(
                    comp.tool
                    if compensating and comp is not None
                    else first.tool
                    if first is not None
                    else None
                ),
                args=dict(comp.args) if compensating and comp is not None else {},
                allowed_until=comp.allowed_until if compensating and comp is not None else None,
                run_id=first.run_id if first else None,
                agent_id=first.agent_id if first else None,
                tenant=first.tenant if first else None,
                superseded_by=d.superseded_by,
                undone_by=d.undone_by,
            )
        )
    return RollbackPlan(
        plan_id=plan_id,
        scope=scope,
        created_at=now,
        events_in_scope=len(selected),
        writes_in_scope=writes,
        records=records,
        steps=tuple(steps),
        notes=tuple(notes),
    )
