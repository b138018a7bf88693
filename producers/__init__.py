"""What agent code imports: the Journal, tool declarations, guards and targets.

``ControlGuard`` and ``FreezeAwareConsumer`` are Kafka adapters; they load on first use so
importing this package stays cheap for code that only declares tools.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from backout.producers.downstream import FreezeAwareConsumer
    from backout.producers.guard import ControlGuard

_LAZY = {"ControlGuard": "backout.producers.guard",
         "FreezeAwareConsumer": "backout.producers.downstream"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'backout.producers' has no attribute {name!r}")


__all__ = [
    "ApprovalDenied",
    "CallGuard",
    "CallScope",
    "CasOutcome",
    "CasResult",
    "Compensate",
    "ControlGuard",
    "EventSink",
    "FreezeAwareConsumer",
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
