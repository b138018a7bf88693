"""Blast radius: what a scope touched (records, systems, tenants, runs). Pure: no I/O.

Operators read it before freezing or rolling back ("how bad is it?"), and detectors use
it for thresholds. It counts the scope's tool calls and writes, and flags the records
someone outside the scope wrote after the scope did: those are the ones a rollback may
only partly restore (superseded writes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from backout.projections.fold import Projection
from backout.rollback.scope import RollbackScope, ScopeMatcher
from backout.schemas.events import CallStatus, Reversibility

__all__ = ["BlastRadius", "blast_radius"]


@dataclass(frozen=True, slots=True)
class BlastRadius:
    """What one scope touched, as the log says."""

    scope: RollbackScope
    calls: int
    """Tool calls in scope (reads, blocked and failed calls included)."""
    writes: int
    """Calls that may have changed something."""
    records: tuple[str, ...]
    """``system/object_id`` of every record the scope wrote, sorted."""
    systems: tuple[str, ...]
    tenants: tuple[str, ...]
    runs: tuple[str, ...]
    """Runs with calls in scope (the scope's run and its child runs)."""
    child_runs: tuple[str, ...]
    """Runs started inside the scope's run (whether or not they made calls)."""
    agents: tuple[str, ...]
    identities: tuple[str, ...]
    tools: tuple[str, ...]
    irreversible: int
    """Writes that cannot be undone automatically."""
    compensatable: int
    in_doubt: int
    """Writes whose outcome is unknown or pending."""
    contested: tuple[str, ...]
    """Records someone out of scope wrote after the scope did."""
    first_at: datetime | None
    last_at: datetime | None

    def summary(self) -> str:
        """One line for humans."""
        span = ""
        if self.first_at is not None and self.last_at is not None:
            span = (
                f" between {self.first_at.isoformat(timespec='seconds')} and "
                f"{self.last_at.isoformat(timespec='seconds')}"
            )
        return (
            f"{self.writes} write(s) on {len(self.records)} record(s) in "
            f"{len(self.systems)} system(s) and {len(self.tenants)} tenant(s) by "
            f"{len(self.runs)} run(s){span}; {self.irreversible} irreversible, "
            f"{len(self.contested)} record(s) changed by others since"
        )


def blast_radius(history: Projection, scope: RollbackScope) -> BlastRadius:
    """What ``scope`` touched in ``history``.

    Raises:
        PlanningError: an empty scope, or an unknown run or checkpoint.
    """
    matcher = ScopeMatcher.resolve(scope, history)
    calls = matcher.select(history)
    writes = [e for e in calls if e.is_write or e.changes_record]
    records = sorted({k for e in writes if (k := e.record_key) is not None})
    child_runs: tuple[str, ...] = ()
    if scope.run is not None and matcher.runs is not None:
        child_runs = tuple(sorted(matcher.runs - {scope.run}))
    return BlastRadius(
        scope=scope,
        calls=len(calls),
        writes=len(writes),
        records=tuple(records),
        systems=_distinct(e.system for e in writes),
        tenants=_distinct(e.tenant for e in writes),
        runs=_distinct(e.run_id for e in calls),
        child_runs=child_runs,
        agents=_distinct(e.agent_id for e in calls),
        identities=_distinct(e.identity for e in calls),
        tools=_distinct(e.tool for e in calls),
        irreversible=sum(1 for e in writes if e.reversibility is Reversibility.IRREVERSIBLE),
        compensatable=sum(1 for e in writes if e.reversibility is Reversibility.COMPENSATABLE),
        in_doubt=sum(1 for e in writes if e.status in (CallStatus.UNKNOWN, CallStatus.PENDING)),
        contested=tuple(_contested(history, records, {e.event_id for e in calls})),
        first_at=calls[0].occurred_at if calls else None,
        last_at=calls[-1].occurred_at if calls else None,
    )


def _distinct(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(sorted({v for v in values if v is not None}))


def _contested(history: Projection, records: list[str], in_scope: set[str]) -> list[str]:
    out = []
    for key in records:
        record = history.records.get(key)
        if record is None:
            continue
        last_mine = max(
            (w.seq for w in record.writes if w.event_id in in_scope and w.journaled), default=None
        )
        if last_mine is not None and any(
            w.seq > last_mine and not (w.journaled and w.event_id in in_scope)
            for w in record.writes
        ):
            out.append(key)
    return out
