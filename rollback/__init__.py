"""Surgical rollback: scopes, plans (pure) and the executor that applies them.

``plan_rollback`` and the plan types are pure; the executor and the targets loader are
adapters, imported from their modules
(``backout.rollback.executor.RollbackExecutor``), so importing this package pulls in no
Kafka or SQL client.
"""

from backout.rollback.blast_radius import BlastRadius, blast_radius
from backout.rollback.plan import (
    Decision,
    FieldChange,
    PlanDiff,
    PlanStep,
    RollbackPlan,
    Writer,
    diff_plans,
)
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope

__all__ = [
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
