"""The backout exception tree. Every error backout raises on purpose is one of these.

```
BackoutError
├── ConfigError            a usage mistake by the developer (bad declaration, bad setting)
│   └── PolicyError        a containment policy file is unreadable or invalid (file, line, path)
├── SchemaError
│   └── DecodeError        bytes that are not a record we can read; keeps the raw bytes
├── PublishError           an event could not be published (retryable says if a retry may help)
├── ControlError           a control command could not be built, signed or sent
├── Frozen                 a call was refused because a freeze covers its scope
├── ApprovalDenied         an approval gate said no (or timed out)
├── ProjectionError        the SQL read model is unusable or behind
└── RollbackError
    ├── PlanningError      no safe plan can be made for the requested scope
    └── CompensationFailed a compensation tool failed (retryable says if a retry may help)
SkipEvent                  control flow only: drop this record, not an error
```
"""

from __future__ import annotations


class BackoutError(Exception):
    """Base class of every error backout raises on purpose."""


class ConfigError(BackoutError):
    """A usage mistake by the developer: a bad declaration, setting or argument."""


class PolicyError(ConfigError):
    """A containment policy file is unreadable or invalid.

    Attributes:
        file: the policy file (or the name given to the text).
        line: the 1-based line of the first problem, when known.
        path: the dotted field path of the first problem, when known.
        problems: every problem found, one readable line each.
    """

    def __init__(self, message: str, *, file: str, line: int | None = None,
                 path: str | None = None, problems: list[str] | None = None) -> None:
        self.file = file
        self.line = line
        self.path = path
        self.problems = problems if problems is not None else [message]
        super().__init__(message)


class SchemaError(BackoutError):
    """A record does not fit the event contract."""


class DecodeError(SchemaError):
    """Bytes that cannot be decoded into a backout record.

    Attributes:
        raw: the undecodable bytes, kept whole so they can go to the dead-letter topic.
        position: where the bytes came from (``topic/partition@offset``), when known.
        reason: a short, human-readable reason.
    """

    def __init__(self, reason: str, *, raw: bytes, position: str | None = None) -> None:
        self.reason = reason
        self.raw = raw
        self.position = position
        where = f" at {position}" if position else ""
        super().__init__(f"cannot decode record{where}: {reason}")

    def at(self, position: str) -> DecodeError:
        """Return a copy of this error that knows where the record came from."""
        return DecodeError(self.reason, raw=self.raw, position=position)


class PublishError(BackoutError):
    """An event could not be published to the broker.

    Attributes:
        retryable: whether retrying the publish may succeed.
        side_effect_done: the tool's side effect already happened when publishing failed,
            so the caller must not assume the call had no effect.
    """

    def __init__(self, message: str, *, retryable: bool, side_effect_done: bool = False) -> None:
        self.retryable = retryable
        self.side_effect_done = side_effect_done
        super().__init__(message)


class ControlError(BackoutError):
    """A control command could not be built, signed, verified or sent."""


class Frozen(BackoutError):
    """A tool call was refused because an active freeze covers its scope.

    Attributes:
        command_id: the freeze command that blocked the call ("" when failing closed).
        reason: the freeze's reason, or why the guard failed closed.
    """

    def __init__(self, message: str, *, command_id: str, reason: str) -> None:
        self.command_id = command_id
        self.reason = reason
        super().__init__(message)


class ApprovalDenied(BackoutError):
    """An approval gate denied a call, or no decision arrived in time."""

    def __init__(self, message: str, *, request_id: str, timed_out: bool = False) -> None:
        self.request_id = request_id
        self.timed_out = timed_out
        super().__init__(message)


class ProjectionError(BackoutError):
    """The SQL projection cannot serve the request (missing, behind, or inconsistent)."""


class RollbackError(BackoutError):
    """A rollback could not be planned or executed."""


class PlanningError(RollbackError):
    """No safe rollback plan can be made for the requested scope."""


class CompensationFailed(RollbackError):
    """A compensation tool failed while undoing an action."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        self.retryable = retryable
        super().__init__(message)


class SkipEvent(Exception):
    """Raised inside a processing step to drop the current record without error."""
