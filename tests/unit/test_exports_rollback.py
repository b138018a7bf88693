"""The rollback and projections packages export a pinned, pure surface."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

ROLLBACK_ALL = [
    "BlastRadius",
    "Decision",
    "FieldChange",
    "PlanDiff",
    "PlanStep",
    "RollbackPlan",
    "RollbackScope",
    "Writer",
    "blast_radius",
    "diff_plans",
    "plan_rollback",
]
PROJECTIONS_ALL = [
    "ABSENT",
    "EMPTY",
    "EXISTS",
    "EventInfo",
    "FieldWrite",
    "Projection",
    "RecordHistory",
    "RecordState",
    "RunState",
    "Task",
    "evolve",
    "fold",
]


@pytest.mark.parametrize(
    ("package", "expected"),
    [("backout.rollback", ROLLBACK_ALL), ("backout.projections", PROJECTIONS_ALL)],
)
def test_all_is_pinned(package: str, expected: list[str]) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(expected)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_the_design_public_surface_imports() -> None:
    from backout.rollback import plan_rollback

    assert callable(plan_rollback)


@pytest.mark.parametrize(
    "module",
    [
        "backout.rollback",
        "backout.projections",
        "backout.rollback.planner",
        "backout.rollback.blast_radius",
        "backout.projections.fold",
        "backout.rollback.ordering",
        "backout.rollback.results",
    ],
)
def test_pure_modules_pull_in_no_kafka_or_sql(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in ('confluent_kafka', 'sqlalchemy', 'faust') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
