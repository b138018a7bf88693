"""What a rollback run did, step by step: outcomes, results and the report. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from backout.rollback.plan import Decision
from backout.schemas.events import JsonMap

__all__ = ["DONE_OUTCOMES", "RollbackReport", "StepOutcome", "StepResult"]


class StepOutcome(StrEnum):
    """What executing one step did."""

    APPLIED = "applied"
    """The inverse write happened (restore, delete or recreate)."""
    ALREADY = "already"
    """The target already had the desired state; nothing written, journaled as done."""
    COMPENSATED = "compensated"
    CONFLICT = "conflict"
    """The live record differs from what the log says: nothing written."""
    PENDING = "pending"
    """The target could not be reached (or is not configured): not done, try again."""
    FAILED = "failed"
    """The compensating tool failed or is missing: not done, try again."""
    MANUAL = "manual"
    """A task was opened for a person."""
    SKIPPED = "skipped"
    """Nothing to do: finished in an earlier attempt, superseded or already undone."""


DONE_OUTCOMES = frozenset({"applied", "already", "compensated", "manual"})
"""Outcomes of a finished step that a re-run must not repeat."""


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step, with what the target said."""

    step_id: str
    index: int
    decision: Decision
    outcome: StepOutcome
    record: str | None
    detail: str = ""
    expected: JsonMap = field(default_factory=dict)
    live: JsonMap | None = None
    """For conflicts: the live values of the fields the step wanted to change."""
    inverse_event_id: str | None = None
    freeze: str | None = None


@dataclass(frozen=True)
class RollbackReport:
    """Everything one ``apply`` did, step by step."""

    plan_id: str
    rollback_run: str
    results: tuple[StepResult, ...]
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, int]:
        """Counts: restored, compensated, conflicts, manual, skipped, pending, failed."""
        counts = dict.fromkeys(
            ("restored", "compensated", "conflicts", "manual", "skipped", "pending", "failed"), 0
        )
        names = {
            StepOutcome.APPLIED: "restored",
            StepOutcome.ALREADY: "restored",
            StepOutcome.COMPENSATED: "compensated",
            StepOutcome.CONFLICT: "conflicts",
            StepOutcome.MANUAL: "manual",
            StepOutcome.SKIPPED: "skipped",
            StepOutcome.PENDING: "pending",
            StepOutcome.FAILED: "failed",
        }
        for result in self.results:
            counts[names[result.outcome]] += 1
        return counts

    def of(self, *outcomes: StepOutcome) -> list[StepResult]:
        """The results with one of ``outcomes``."""
        return [r for r in self.results if r.outcome in outcomes]

    @property
    def pending_systems(self) -> list[str]:
        """Systems with steps still pending (unreachable or not configured)."""
        return sorted({(r.record or "").split("/", 1)[0] for r in self.of(StepOutcome.PENDING)})

    @property
    def complete(self) -> bool:
        """True when nothing is pending, failed or in conflict."""
        return not self.of(StepOutcome.PENDING, StepOutcome.FAILED, StepOutcome.CONFLICT)
