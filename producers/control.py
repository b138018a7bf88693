"""The freeze view: a fold of the control topic into active freezes and decisions. Pure.

Every record of the control topic goes through :meth:`FreezeView.apply` in log order.
A command changes the view only when it is well signed, new and well formed:

1. undecodable bytes: ``malformed``;
2. no signature or key id: ``unsigned``;
3. a key id not in ``trusted_keys``: ``forged``;
4. a command id already taken: ``replayed`` (or ``forged`` when its signature is wrong).
   An id is taken by its first occurrence signed with a trusted key id, whatever its
   signature is worth. Command ids are random, so nobody can take an id before its
   operator publishes it;
5. a wrong signature: ``forged``;
6. a bad scope, a lift or decision that refers to nothing: ``malformed``;
7. expired when appended (``expires_at``, or older than ``max_age``): ``expired``;
8. otherwise a freeze becomes active, a lift ends the freeze it refers to, and the first
   approve or deny of an approval request becomes its decision.

Invalid commands change nothing; the adapter turns each into a ``control_integrity``
Signal (:func:`integrity_signal`).

Signature checks cost about 0.1 ms each, so rebuilding from a long history applies
records with ``verify=False``: steps 5 to 8 run, but the signature of a freeze and of
the lifts aimed at it are checked only when that freeze first matches a call, when
:meth:`FreezeView.settle` runs, or when a freeze is listed. The answer is the same as
verifying eagerly (a property test proves it); only the time the work is done moves.

A freeze's scope is a conjunction over the call's dimensions (tool, agent, identity,
run, workflow, tenant, environment); ``run`` also matches child runs of that run;
``{'all': '*'}`` matches every call. Modes: ``halt`` blocks every call in scope,
``read_only`` blocks all but read-only tools, ``quarantine_identity`` blocks every call
made with the scope's identity, whoever makes it (other dimensions are ignored).
Freezes are indexed by one dimension value each, so a check costs a handful of dict
lookups whatever the number of active freezes.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from backout.producers.scope import SCOPE_DIMENSIONS, CallScope
from backout.schemas.events import (
    ControlAction,
    ControlCommand,
    Evidence,
    FreezeMode,
    JsonMap,
    Reversibility,
    Severity,
    Signal,
)
from backout.schemas.signing import SignatureInvalid, verify

GLOBAL_SCOPE: dict[str, str] = {"all": "*"}
"""The scope of a global stop."""

DEFAULT_MAX_AGE = timedelta(days=1)
"""A command appended longer than this after it was issued is expired."""

INTEGRITY_DETECTOR = "control_integrity"
"""The detector name of the Signals raised for invalid control commands."""

# The dimension a freeze is indexed by: the first of these its scope names.
_ANCHOR_ORDER = ("run", "identity", "tool", "agent", "workflow", "tenant", "environment")
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
_SEVERITY = {
    Verdict.FORGED: Severity.CRITICAL,
    Verdict.UNSIGNED: Severity.HIGH,
    Verdict.REPLAYED: Severity.HIGH,
    Verdict.EXPIRED: Severity.MEDIUM,
    Verdict.MALFORMED: Severity.MEDIUM,
}


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


class FreezeView:
    """Active freezes and approval decisions folded from control records.

    Not thread-safe: the guard serialises access with a lock.

    Args:
        trusted_keys: key id to base64 Ed25519 public key.
        max_age: commands appended longer than this after ``issued_at`` are expired.
    """

    def __init__(
        self, trusted_keys: dict[str, str], *, max_age: timedelta = DEFAULT_MAX_AGE
    ) -> None:
        self._trusted = dict(trusted_keys)
        self._max_age = max_age
        self._taken: set[str] = set()
        self._active: dict[str, Freeze] = {}
        self._global: dict[str, Freeze] = {}
        self._index: dict[str, dict[str, dict[str, Freeze]]] = {d: {} for d in _ANCHOR_ORDER}
        self._unsettled: set[str] = set()
        self._unverified: dict[str, ControlCommand] = {}
        self._pending_lifts: dict[str, list[tuple[ControlCommand, ControlRecord]]] = {}
        self._decisions: dict[str, Decision] = {}
        self._pending_decisions: dict[str, list[tuple[ControlCommand, ControlRecord]]] = {}
        self._late: deque[Outcome] = deque(maxlen=10_000)
        self.applied = 0
        """Records applied so far."""

    # --- the fold -----------------------------------------------------------------------
    def apply(self, record: ControlRecord, *, verify: bool = True) -> Outcome:
        """Fold one control record into the view (records must come in log order).

        Args:
            verify: check signatures now; False defers them (rebuild), see the module doc.
        """
        self.applied += 1
        command = record.command
        if command is None:
            return _outcome(Verdict.MALFORMED, record, None, record.error or "undecodable")
        if command.signature is None or command.key_id is None:
            return _outcome(Verdict.UNSIGNED, record, command, "no signature")
        if command.key_id not in self._trusted:
            return _outcome(
                Verdict.FORGED, record, command, f"signed by untrusted key {command.key_id!r}"
            )
        forged = self._forgery(command) if verify else None
        if command.command_id in self._taken:
            if forged is not None:
                return _outcome(Verdict.FORGED, record, command, forged)
            return _outcome(Verdict.REPLAYED, record, command, "command id already used")
        self._taken.add(command.command_id)
        if forged is not None:
            return _outcome(Verdict.FORGED, record, command, forged)
        problem = malformed_reason(command)
        if problem is not None:
            return _outcome(Verdict.MALFORMED, record, command, problem)
        expired = expired_reason(command, record.at, self._max_age)
        if expired is not None:
            return _outcome(Verdict.EXPIRED, record, command, expired)
        if command.action is ControlAction.FREEZE:
            return self._start(command, record, verified=verify)
        if command.action is ControlAction.LIFT:
            return self._lift(command, record, verified=verify)
        return self._decide(command, record, verified=verify)

    def _forgery(self, command: ControlCommand) -> str | None:
        try:
            verify(command, self._trusted)
        except SignatureInvalid as exc:
            return str(exc)
        return None

    def _start(self, command: ControlCommand, record: ControlRecord, *, verified: bool) -> Outcome:
        freeze = Freeze.of(command, record.position)
        self._active[freeze.command_id] = freeze
        if freeze.is_global:
            self._global[freeze.command_id] = freeze
        else:
            anchor = _anchor(freeze)
            self._index[anchor[0]].setdefault(anchor[1], {})[freeze.command_id] = freeze
        if verified:
            return _outcome(Verdict.APPLIED, record, command, "freeze started")
        self._unverified[freeze.command_id] = command
        self._unsettled.add(freeze.command_id)
        return _outcome(Verdict.DEFERRED, record, command, "freeze taken, signature deferred")

    def _lift(self, command: ControlCommand, record: ControlRecord, *, verified: bool) -> Outcome:
        target = command.refers_to or ""
        if target not in self._active:
            return _outcome(Verdict.NO_EFFECT, record, command, f"no active freeze {target!r}")
        if verified:
            self._remove(target)
            return _outcome(Verdict.APPLIED, record, command, f"lifted {target}")
        self._pending_lifts.setdefault(target, []).append((command, record))
        self._unsettled.add(target)
        return _outcome(Verdict.DEFERRED, record, command, f"lift of {target} deferred")

    def _decide(self, command: ControlCommand, record: ControlRecord, *, verified: bool) -> Outcome:
        request = command.refers_to or ""
        if not verified:
            if request in self._decisions:
                return _outcome(Verdict.NO_EFFECT, record, command, f"{request} already decided")
            self._pending_decisions.setdefault(request, []).append((command, record))
            return _outcome(Verdict.DEFERRED, record, command, "decision deferred")
        if self.decision(request) is not None:
            return _outcome(Verdict.NO_EFFECT, record, command, f"{request} already decided")
        self._decisions[request] = _decision_of(command)
        return _outcome(Verdict.APPLIED, record, command, f"decided {request}")

    def _remove(self, command_id: str) -> None:
        freeze = self._active.pop(command_id, None)
        self._unsettled.discard(command_id)
        self._unverified.pop(command_id, None)
        self._pending_lifts.pop(command_id, None)
        if freeze is None:
            return
        if freeze.is_global:
            self._global.pop(command_id, None)
            return
        dimension, value = _anchor(freeze)
        bucket = self._index[dimension].get(value)
        if bucket is not None:
            bucket.pop(command_id, None)
            if not bucket:
                del self._index[dimension][value]

    # --- deferred signatures ------------------------------------------------------------
    def _settle_one(self, command_id: str) -> bool:
        """Check the deferred signatures of one freeze; True when it stays active."""
        self._unsettled.discard(command_id)
        for lift, record in self._pending_lifts.pop(command_id, ()):
            forged = self._forgery(lift)
            if forged is None:
                self._remove(command_id)
                return False
            self._late.append(_outcome(Verdict.FORGED, record, lift, forged))
        command = self._unverified.pop(command_id, None)
        if command is not None:
            forged = self._forgery(command)
            if forged is not None:
                freeze = self._active[command_id]
                self._remove(command_id)
                self._late.append(_late_freeze(freeze, command, forged))
                return False
        return command_id in self._active

    def settle(self, limit: int | None = None) -> int:
        """Check up to ``limit`` deferred freezes (all when None); returns how many are left."""
        for done, command_id in enumerate(list(self._unsettled)):
            if limit is not None and done >= limit:
                break
            self._settle_one(command_id)
        return len(self._unsettled)

    @property
    def unsettled(self) -> int:
        """Freezes whose deferred signatures are not checked yet."""
        return len(self._unsettled)

    def drain_late(self) -> list[Outcome]:
        """Invalid commands found while settling deferred signatures (each once)."""
        out = list(self._late)
        self._late.clear()
        return out

    # --- queries --------------------------------------------------------------------------
    def blocking(self, call: CallScope, now: datetime | float) -> Freeze | None:
        """The freeze that refuses this call at ``now``, or None when it may run.

        Args:
            now: a datetime, or POSIX seconds.
        """
        now_ts = now if isinstance(now, float) else now.timestamp()
        found: Freeze | None = None
        for freeze in self._candidates(call):
            if not freeze.blocks(call, now_ts):
                continue
            if freeze.command_id in self._unsettled and not self._settle_one(freeze.command_id):
                continue
            if found is None or freeze.rank() < found.rank():
                found = freeze
        return found

    def _candidates(self, call: CallScope) -> list[Freeze]:
        """Freezes indexed under one of the call's values (a copy: settling may remove some)."""
        index = self._index
        out: list[Freeze] = list(self._global.values()) if self._global else []
        for dimension, value in (
            ("identity", call.identity),
            ("tool", call.tool),
            ("agent", call.agent),
            ("workflow", call.workflow),
            ("tenant", call.tenant),
            ("environment", call.environment),
        ):
            if value is not None:
                bucket = index[dimension].get(value)
                if bucket:
                    out.extend(bucket.values())
        runs = index["run"]
        if runs:
            bucket = runs.get(call.run)
            if bucket:
                out.extend(bucket.values())
            for run in call.ancestor_runs:
                bucket = runs.get(run)
                if bucket:
                    out.extend(bucket.values())
        return out

    def active(self, now: datetime) -> list[Freeze]:
        """Every freeze in force at ``now`` (deferred signatures checked), oldest first."""
        self.settle()
        now_ts = now.timestamp()
        return sorted(
            (f for f in self._active.values() if f.expires_ts > now_ts),
            key=lambda f: (f.issued_at, f.command_id),
        )

    def get(self, command_id: str) -> Freeze | None:
        """The active (not lifted) freeze with this id, signatures checked; expiry ignored."""
        if command_id in self._unsettled and not self._settle_one(command_id):
            return None
        return self._active.get(command_id)

    def prune(self, now: datetime) -> int:
        """Drop freezes that expired by ``now``; returns how many."""
        now_ts = now.timestamp()
        gone = [cid for cid, f in self._active.items() if f.expires_ts <= now_ts]
        for command_id in gone:
            self._remove(command_id)
        return len(gone)

    def decision(self, request_id: str) -> Decision | None:
        """The decision on an approval request, or None while undecided."""
        found = self._decisions.get(request_id)
        if found is not None:
            return found
        for command, record in self._pending_decisions.pop(request_id, ()):
            forged = self._forgery(command)
            if forged is None:
                self._decisions[request_id] = decision = _decision_of(command)
                return decision
            self._late.append(_outcome(Verdict.FORGED, record, command, forged))
        return None

    def __len__(self) -> int:
        return len(self._active)


def fold(
    records: Iterable[ControlRecord],
    trusted_keys: dict[str, str],
    *,
    max_age: timedelta = DEFAULT_MAX_AGE,
    verify: bool = True,
) -> tuple[FreezeView, list[Outcome]]:
    """A view folded from ``records`` in order, with the outcome of each record."""
    view = FreezeView(trusted_keys, max_age=max_age)
    return view, [view.apply(record, verify=verify) for record in records]


def _anchor(freeze: Freeze) -> tuple[str, str]:
    scope = freeze.scope_map
    if freeze.mode is FreezeMode.QUARANTINE_IDENTITY:
        return "identity", scope["identity"]
    for dimension in _ANCHOR_ORDER:
        if dimension in scope:
            return dimension, scope[dimension]
    raise AssertionError(f"freeze {freeze.command_id} has no scope")  # excluded by apply


def _decision_of(command: ControlCommand) -> Decision:
    return Decision(
        request_id=command.refers_to or "",
        command_id=command.command_id,
        approved=command.action is ControlAction.APPROVE,
        approved_args=command.approved_args,
        issuer=command.issuer,
        reason=command.reason,
        decided_at=command.issued_at,
    )


def _outcome(
    verdict: Verdict, record: ControlRecord, command: ControlCommand | None, reason: str
) -> Outcome:
    return Outcome(
        verdict,
        record.position,
        command.command_id if command is not None else None,
        command.action if command is not None else None,
        reason,
        command,
        record,
    )


def _late_freeze(freeze: Freeze, command: ControlCommand, reason: str) -> Outcome:
    return Outcome(
        Verdict.FORGED, freeze.position, freeze.command_id, command.action, reason, command
    )


# --- run lineage (downstream consumers see only each event's parent run) -----------------
class RunLineage:
    """Parent links of the runs seen so far (bounded), to find every ancestor of a run.

    Args:
        max_runs: how many runs to remember; the oldest are forgotten first.
    """

    _MAX_DEPTH = 64

    def __init__(self, max_runs: int = 200_000) -> None:
        self._parents: dict[str, str] = {}
        self._max = max_runs

    def observe(self, run: str, parent: str | None) -> None:
        """Remember that ``run`` is a child of ``parent``."""
        if parent is None or parent == run or self._parents.get(run) == parent:
            return
        self._parents[run] = parent
        if len(self._parents) > self._max:
            del self._parents[next(iter(self._parents))]

    def ancestors(self, run: str) -> tuple[str, ...]:
        """Parent, grandparent, ... of ``run`` as far as known (cycles are cut)."""
        out: list[str] = []
        current = self._parents.get(run)
        while current is not None and current not in out and current != run:
            out.append(current)
            if len(out) >= self._MAX_DEPTH:
                break
            current = self._parents.get(current)
        return tuple(out)


# --- signals for invalid commands ---------------------------------------------------------
def integrity_signal_id(outcome: Outcome) -> str:
    """A deterministic id: every process that reports the same record reports the same id."""
    digest = hashlib.sha256(f"{outcome.position}|{outcome.verdict.value}".encode()).hexdigest()
    return f"sig_ctl_{digest[:24]}"


def integrity_signal(outcome: Outcome, *, detected_at: datetime | None = None) -> Signal:
    """The Signal raised for an invalid control command."""
    command = outcome.command
    topic, partition, offset = _split_position(outcome.position)
    details = {"verdict": outcome.verdict.value, "reason": outcome.reason[:1000]}
    if command is not None:
        details.update(
            action=command.action.value,
            issuer=command.issuer,
            key_id=command.key_id or "",
            refers_to=command.refers_to or "",
        )
    what = f"{command.action.value} {command.command_id!r}" if command is not None else "record"
    return Signal(
        signal_id=integrity_signal_id(outcome),
        detected_at=detected_at or datetime.now(UTC),
        detector=INTEGRITY_DETECTOR,
        severity=_SEVERITY.get(outcome.verdict, Severity.MEDIUM),
        scope=dict(command.scope) if command is not None else {},
        summary=f"{outcome.verdict.value} control {what} at {outcome.position} ignored: "
        f"{outcome.reason}"[:2000],
        evidence=[
            Evidence(
                event_id=outcome.command_id or outcome.position,
                topic=topic,
                partition=partition,
                offset=offset,
            )
        ],
        details=details,
    )


def _split_position(position: str) -> tuple[str | None, int | None, int | None]:
    topic, _, rest = position.rpartition("/")
    partition, _, offset = rest.partition("@")
    try:
        return topic or None, int(partition), int(offset)
    except ValueError:
        return None, None, None
