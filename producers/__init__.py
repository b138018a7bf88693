"""What agent code imports: the Journal, tool declarations, guards and targets.

Every name loads on first use (PEP 562), so importing a pure module of this package
(``backout.producers.freezes``, say) does not load the Journal, SQLAlchemy or the Kafka
clients.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backout.producers.downstream import FreezeAwareConsumer
    from backout.producers.guard import ControlGuard
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

_LAZY = {
    "ApprovalDenied": "backout.schemas.errors",
    "CallGuard": "backout.producers.scope",
    "CallScope": "backout.producers.scope",
    "CasOutcome": "backout.producers.targets",
    "CasResult": "backout.producers.targets",
    "Compensate": "backout.producers.registry",
    "ControlGuard": "backout.producers.guard",
    "EventSink": "backout.producers.sink",
    "FreezeAwareConsumer": "backout.producers.downstream",
    "Frozen": "backout.schemas.errors",
    "InMemoryEventSink": "backout.producers.sink",
    "Journal": "backout.producers.journal",
    "Pending": "backout.producers.journal",
    "PublishError": "backout.schemas.errors",
    "Reversibility": "backout.schemas.events",
    "RunContext": "backout.producers.journal",
    "SqlTableTarget": "backout.producers.targets",
    "Target": "backout.producers.targets",
    "TargetUnavailable": "backout.producers.targets",
    "ToolSpec": "backout.producers.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'backout.producers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
