"""Blast radius: what a scope touched."""

from __future__ import annotations

import pytest

from backout.projections.fold import fold
from backout.rollback.blast_radius import blast_radius
from backout.rollback.scope import RollbackScope
from backout.schemas.errors import PlanningError
from backout.schemas.events import CallStatus, EventKind, Reversibility
from tests.eventkit import Log, compensating


def incident() -> Log:
    log = Log()
    log.seed("i1", status="A")
    log.fact("run", EventKind.RUN_STARTED)
    log.write("run", "i1", {"status": "B"})
    log.write("run", "i2", {"status": "new"}, tenant="globex")
    log.write("run", "i3", {"x": 1}, reversibility=Reversibility.IRREVERSIBLE)
    log.write("run", "i4", {"x": 1}, status=CallStatus.UNKNOWN, capture_after=False)
    log.call(
        "run",
        "charge",
        reversibility=Reversibility.COMPENSATABLE,
        compensation=compensating("refund"),
    )
    log.fact("child", EventKind.RUN_STARTED, parent_run="run")
    log.write("child", "i5", {"x": 2}, parent_run="run")
    log.write("other", "i1", {"status": "C"})
    log.write("run", "lookup", {}, reversibility=Reversibility.READ_ONLY)
    return log


def test_blast_radius_of_a_run() -> None:
    radius = blast_radius(fold(incident().events), RollbackScope(run="run"))
    assert radius.records == ("erp/i1", "erp/i2", "erp/i3", "erp/i4", "erp/i5")
    assert radius.systems == ("erp",) and radius.tenants == ("acme", "globex")
    assert radius.runs == ("child", "run") and radius.child_runs == ("child",)
    assert (radius.calls, radius.writes) == (7, 6)
    assert (radius.irreversible, radius.compensatable, radius.in_doubt) == (1, 1, 1)
    assert radius.contested == ("erp/i1",)
    assert radius.first_at is not None and radius.last_at is not None
    assert "6 write(s) on 5 record(s)" in radius.summary()


def test_blast_radius_without_child_runs_and_by_tenant() -> None:
    events = incident().events
    only = blast_radius(fold(events), RollbackScope(run="run", include_child_runs=False))
    assert "erp/i5" not in only.records and only.child_runs == ()
    globex = blast_radius(fold(events), RollbackScope(tenant="globex"))
    assert globex.records == ("erp/i2",)


def test_blast_radius_refuses_bad_scopes() -> None:
    with pytest.raises(PlanningError, match="unknown run"):
        blast_radius(fold(incident().events), RollbackScope(run="nope"))
    with pytest.raises(PlanningError, match="empty scope"):
        blast_radius(fold(incident().events), RollbackScope())
