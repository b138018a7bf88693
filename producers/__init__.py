"""What agent code imports: the Journal, tool declarations, guards and targets."""

from backout.producers.journal import Journal, Pending, RunContext
from backout.producers.registry import Compensate, ToolSpec
from backout.producers.scope import CallGuard, CallScope
from backout.producers.sink import EventSink, InMemoryEventSink
from backout.producers.targets import (
    CasOutcome,
    CasResult,
    SqlTableTarget,
    Target,
    TargetUnavailable,
)
from backout.schemas.errors import ApprovalDenied, Frozen, PublishError
from backout.schemas.events import Reversibility

__all__ = [
    "ApprovalDenied",
    "CallGuard",
    "CallScope",
    "CasOutcome",
    "CasResult",
    "Compensate",
    "EventSink",
    "Frozen",
    "InMemoryEventSink",
    "Journal",
    "Pending",
    "PublishError",
    "Reversibility",
    "RunContext",
    "SqlTableTarget",
    "Target",
    "TargetUnavailable",
    "ToolSpec",
]
