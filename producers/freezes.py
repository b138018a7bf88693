"""Control commands as values: verdicts, records, outcomes, freezes and decisions, and the
checks of a command's form. Pure.

:class:`~backout.producers.control.FreezeView` folds control records into these; a
freeze's scope is a conjunction over a call's dimensions (see ``control.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from backout.producers.scope import SCOPE_DIMENSIONS, CallScope
from backout.schemas.events import (
    ControlAction,
    ControlCommand,
    FreezeMode,
    JsonMap,
    Reversibility,
)

GLOBAL_SCOPE: dict[str, str] = {"all": "*"}
"""The scope of a global stop."""

DEFAULT_MAX_AGE = timedelta(days=1)
"""A command appended longer than this after it was issued is expired."""

_DIMENSIONS = frozenset(SCOPE_DIMENSIONS)
_MODE_RANK = {FreezeMode.HALT: 0, FreezeMode.QUARANTINE_IDENTITY: 1, FreezeMode.READ_ONLY: 2}
_FOREVER = float("inf")


class Verdict(StrEnum):
    """What applying one control record did."""

    APPLIED = "applied"
    """The view changed: a freeze started or ended, a decision was recorded."""
    NO_EFFECT = "no_effect"
    """Valid, but nothing to change (a lift of an inactive freeze, a second decision)."""
    DEFERRED = "deferred"
    """Taken provisionally (rebuild): its signature is checked when it matters."""
    UNSIGNED = "unsigned"
    FORGED = "forged"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    MALFORMED = "malformed"

    @property
    def invalid(self) -> bool:
        """True for a command that must change nothing and raise a Signal."""
        return self in _INVALID


_INVALID = frozenset(
    {Verdict.UNSIGNED, Verdict.FORGED, Verdict.REPLAYED, Verdict.EXPIRED, Verdict.MALFORMED}
)


@dataclass(frozen=True, slots=True)
class ControlRecord:
    """One record read from the control topic, decoded or not."""

    topic: str
    partition: int
    offset: int
    at: datetime
    """The record's timestamp: when it was appended (or created, by the producer's clock)."""
    command: ControlCommand | None
    """None when the bytes could not be decoded (``error`` says why)."""
    error: str | None = None

    @property
    def position(self) -> str:
        """``topic/partition@offset``."""
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one control record."""

    verdict: Verdict
    position: str
    command_id: str | None
    action: ControlAction | None
    reason: str
    command: ControlCommand | None = field(default=None, repr=False, compare=False)
    record: ControlRecord | None = field(default=None, repr=False, compare=False)

    @property
    def invalid(self) -> bool:
        """True when the command was refused (it raises a Signal)."""
        return self.verdict.invalid


@dataclass(frozen=True, slots=True)
class Freeze:
    """An active freeze: a signed scope and mode."""

    command_id: str
    scope: tuple[tuple[str, str], ...]
    """Sorted ``(dimension, value)`` pairs; ``(('all', '*'),)`` for a global stop."""
    mode: FreezeMode
    issued_at: datetime
    expires_at: datetime | None
    reason: str
    issuer: str
    cause: str | None
    key_id: str | None
    position: str
    expires_ts: float = _FOREVER
    """``expires_at`` in POSIX seconds (infinity when it never expires)."""
    conditions: tuple[tuple[str, str], ...] = ()
    """The pairs a call must match: the scope without ``all``; for ``quarantine_identity``
    only the identity."""

    @classmethod
    def of(cls, command: ControlCommand, position: str) -> Freeze:
        """The freeze a (valid) freeze command starts."""
        expires = command.expires_at
        scope = tuple(sorted(command.scope.items()))
        conditions: tuple[tuple[str, str], ...]
        if command.mode is FreezeMode.QUARANTINE_IDENTITY:
            conditions = (("identity", command.scope["identity"]),)
        else:
            conditions = tuple(p for p in scope if p[0] != "all")
        return cls(
            command.command_id,
            scope,
            command.mode,
            command.issued_at,
            expires,
            command.reason,
            command.issuer,
            command.cause,
            command.key_id,
            position,
            expires.timestamp() if expires is not None else _FOREVER,
            conditions,
        )

    @property
    def is_global(self) -> bool:
        """True for a global stop (``{'all': '*'}``)."""
        return self.scope == (("all", "*"),)

    @property
    def scope_map(self) -> dict[str, str]:
        """The scope as a dict."""
        return dict(self.scope)

    def covers(self, call: CallScope) -> bool:
        """True when the call is inside this freeze's scope."""
        for dimension, value in self.conditions:
            if dimension == "run":
                if value != call.run and value not in call.ancestor_runs:
                    return False
            elif getattr(call, dimension) != value:
                return False
        return True

    def blocks(self, call: CallScope, now_ts: float) -> bool:
        """True when this freeze refuses the call at ``now_ts`` (POSIX seconds)."""
        if now_ts >= self.expires_ts or not self.covers(call):
            return False
        return not (
            self.mode is FreezeMode.READ_ONLY and call.reversibility is Reversibility.READ_ONLY
        )

    def rank(self) -> tuple[int, int, datetime]:
        """Sort key of the freeze reported when several block a call: global stops first,
        then the strictest mode, then the oldest."""
        return (0 if self.is_global else 1, _MODE_RANK[self.mode], self.issued_at)


@dataclass(frozen=True, slots=True)
class Decision:
    """An operator's approve or deny of an approval request."""

    request_id: str
    command_id: str
    approved: bool
    approved_args: JsonMap | None
    issuer: str
    reason: str
    decided_at: datetime


def scope_key(scope: dict[str, str]) -> str:
    """The control topic key of a scope: ``agent=billing-bot,tenant=acme`` (sorted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(scope.items()))


def malformed_reason(command: ControlCommand) -> str | None:
    """Why a command is structurally unusable, or None when it is well formed."""
    if not command.command_id:
        return "empty command_id"
    if command.action is ControlAction.FREEZE:
        return _scope_problem(command.scope, command.mode)
    if not command.refers_to:
        return f"{command.action.value} without refers_to"
    if command.action is not ControlAction.APPROVE and command.approved_args is not None:
        return f"{command.action.value} with approved_args"
    return None


def _scope_problem(scope: dict[str, str], mode: FreezeMode) -> str | None:
    if not scope:
        return "freeze with an empty scope (a global stop is {'all': '*'})"
    if "all" in scope:
        return None if scope == GLOBAL_SCOPE else "'all' must be '*' and stand alone"
    if not (scope.keys() <= _DIMENSIONS and all(scope.values())):
        unknown = sorted(set(scope) - _DIMENSIONS)
        if unknown:
            return f"unknown scope dimension {unknown[0]!r}"
        empty = sorted(k for k, v in scope.items() if not v)
        return f"empty value for scope dimension {empty[0]!r}"
    if mode is FreezeMode.QUARANTINE_IDENTITY and "identity" not in scope:
        return "quarantine_identity needs an identity in its scope"
    return None


def expired_reason(command: ControlCommand, at: datetime, max_age: timedelta) -> str | None:
    """Why a command was already expired when appended at ``at``, or None."""
    if command.expires_at is not None and command.expires_at <= at:
        return f"expired at {command.expires_at.isoformat()}, appended at {at.isoformat()}"
    if at - command.issued_at > max_age:
        return f"issued at {command.issued_at.isoformat()}, older than {max_age} when appended"
    return None

