"""The scope of one tool call, as guards and freezes see it. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from backout.schemas.events import Reversibility

SCOPE_DIMENSIONS = ("tool", "agent", "identity", "run", "workflow", "tenant", "environment")
"""The keys a freeze scope may combine; ``all`` (any value) is a global stop."""


@dataclass(frozen=True, slots=True)
class CallScope:
    """Who is about to call what, where."""

    tool: str
    agent: str
    identity: str
    run: str
    ancestor_runs: tuple[str, ...]
    """Parent run, its parent, ...: a freeze on any of them covers this call (no fan-out)."""
    workflow: str | None
    tenant: str | None
    environment: str
    reversibility: Reversibility

    def value(self, dimension: str) -> str | None:
        """This call's value for one scope dimension."""
        return getattr(self, dimension) if dimension in SCOPE_DIMENSIONS else None


class CallGuard(Protocol):
    """Checked before every tool call; refuses calls in frozen scopes."""

    def check(self, call: CallScope) -> None:
        """Return if the call may run.

        Raises:
            Frozen: an active freeze covers the call (or the guard fails closed).
        """
        ...
