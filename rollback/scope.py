"""Rollback scopes: which journaled writes a rollback (or a blast radius) is about. Pure.

A scope combines criteria with AND: a run (with its child runs), an agent, an identity,
a tenant, a time window, a list of event ids, and optionally "only after checkpoint C" of
the run. Rollback's own inverse writes are never in a scope by accident: they count only
when the scope names their run or their event ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from backout.projections.fold import EventInfo, Projection, RunState
from backout.schemas.errors import PlanningError
from backout.schemas.events import EventKind, Origin

__all__ = ["RollbackScope", "ScopeMatcher", "run_tree"]


class RollbackScope(BaseModel):
    """What to roll back. Criteria combine with AND; at least one is required."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str | None = None
    include_child_runs: bool = True
    """With ``run``: also the runs started inside it (transitively)."""
    agent: str | None = None
    identity: str | None = None
    tenant: str | None = None
    since: datetime | None = None
    """Only writes at or after this time."""
    until: datetime | None = None
    """Only writes at or before this time."""
    event_ids: tuple[str, ...] = ()
    after_checkpoint: str | None = None
    """With ``run``: only writes after the run's (latest) checkpoint of this name or id."""

    @field_validator("since", "until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("times must carry a time zone (e.g. 2026-11-23T04:00:00Z)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RollbackScope:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since is after until")
        if self.after_checkpoint is not None and self.run is None:
            raise ValueError("after_checkpoint needs a run")
        return self

    def is_empty(self) -> bool:
        """True when no criterion is given (which would mean everything: refused)."""
        return not (
            self.run
            or self.agent
            or self.identity
            or self.tenant
            or self.since
            or self.until
            or self.event_ids
        )

    def describe(self) -> str:
        """A short human description: ``run=wf_42 (+children) after checkpoint 'c1'``."""
        parts = []
        if self.run:
            parts.append(f"run={self.run}" + (" (+child runs)" if self.include_child_runs else ""))
        for name in ("agent", "identity", "tenant"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        if self.since:
            parts.append(f"since {self.since.isoformat()}")
        if self.until:
            parts.append(f"until {self.until.isoformat()}")
        if self.event_ids:
            parts.append(f"{len(self.event_ids)} event id(s)")
        if self.after_checkpoint:
            parts.append(f"after checkpoint {self.after_checkpoint!r}")
        return " ".join(parts) or "(empty scope)"

    def canonical(self) -> str:
        """Canonical JSON, independent of event id order (for plan ids)."""
        data = self.model_dump(mode="json")
        data["event_ids"] = sorted(set(self.event_ids))
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def run_tree(
    runs: Mapping[str, RunState], root: str, extra_parents: Iterable[tuple[str, str | None]] = ()
) -> frozenset[str]:
    """``root`` and every run started inside it, transitively.

    Args:
        runs: known runs (their ``parent_run_id`` links).
        root: the run at the top.
        extra_parents: more (run, parent) pairs, e.g. from events of runs not in ``runs``.
    """
    children: dict[str, set[str]] = {}
    for run in runs.values():
        if run.parent_run_id is not None:
            children.setdefault(run.parent_run_id, set()).add(run.run_id)
    for run_id, parent in extra_parents:
        if parent is not None:
            children.setdefault(parent, set()).add(run_id)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return frozenset(found)


@dataclass(frozen=True)
class ScopeMatcher:
    """A scope resolved against a projection: runs expanded, checkpoint found."""

    scope: RollbackScope
    runs: frozenset[str] | None
    after: datetime | None
    event_ids: frozenset[str] | None

    @classmethod
    def resolve(cls, scope: RollbackScope, projection: Projection) -> ScopeMatcher:
        """Resolve ``scope`` against what the projection knows.

        Raises:
            PlanningError: an empty scope, an unknown run, or an unknown checkpoint.
        """
        if scope.is_empty():
            raise PlanningError(
                "empty scope: give a run, agent, identity, tenant, time window or event ids"
            )
        runs: frozenset[str] | None = None
        after: datetime | None = None
        if scope.run is not None:
            known = scope.run in projection.runs or any(
                e.run_id == scope.run for e in projection.events.values()
            )
            if not known:
                raise PlanningError(
                    f"unknown run {scope.run!r}: the projection has no events of it "
                    "(check the run id; is the projector caught up?)"
                )
            runs = (
                run_tree(
                    projection.runs,
                    scope.run,
                    ((e.run_id, e.parent_run_id) for e in projection.events.values()),
                )
                if scope.include_child_runs
                else frozenset({scope.run})
            )
            if scope.after_checkpoint is not None:
                after = _checkpoint_time(projection, scope.run, scope.after_checkpoint)
        ids = frozenset(scope.event_ids) if scope.event_ids else None
        return cls(scope, runs, after, ids)

    def matches(self, event: EventInfo) -> bool:
        """True when ``event`` is one of the scope's tool calls."""
        scope = self.scope
        if event.kind is not EventKind.TOOL_CALL:
            return False
        if self.runs is not None and event.run_id not in self.runs:
            return False
        if self.event_ids is not None and event.event_id not in self.event_ids:
            return False
        if (
            event.origin is Origin.ROLLBACK
            and event.run_id != scope.run
            and (self.event_ids is None)
        ):
            return False
        if scope.agent is not None and event.agent_id != scope.agent:
            return False
        if scope.identity is not None and event.identity != scope.identity:
            return False
        if scope.tenant is not None and event.tenant != scope.tenant:
            return False
        at = event.occurred_at
        if scope.since is not None and at < scope.since:
            return False
        if scope.until is not None and at > scope.until:
            return False
        return self.after is None or at > self.after

    def select(self, projection: Projection) -> list[EventInfo]:
        """The scope's tool calls in the projection, oldest first."""
        found = [e for e in projection.events.values() if self.matches(e)]
        found.sort(key=attrgetter("event_id"))
        found.sort(key=attrgetter("occurred_at"))  # stable: ties stay in event id order
        return found


def _checkpoint_time(projection: Projection, run_id: str, name: str) -> datetime:
    run = projection.runs.get(run_id)
    points = run.checkpoints if run is not None else ()
    hits = [p for p in points if name in (p.name, p.event_id)]
    if not hits:
        known = ", ".join(sorted({repr(p.name) for p in points})) or "none"
        raise PlanningError(f"run {run_id!r} has no checkpoint {name!r} (it has: {known})")
    return max(p.occurred_at for p in hits)
