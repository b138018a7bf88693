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
Signal (:func:`backout.producers.integrity.integrity_signal`).

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

from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta

from backout.producers.freezes import (
    DEFAULT_MAX_AGE,
    ControlRecord,
    Decision,
    Freeze,
    Outcome,
    Verdict,
    expired_reason,
    malformed_reason,
)
from backout.producers.scope import CallScope
from backout.schemas.events import ControlAction, ControlCommand, FreezeMode
from backout.schemas.signing import SignatureInvalid, verify

# The dimension a freeze is indexed by: the first of these its scope names.
_ANCHOR_ORDER = ("run", "identity", "tool", "agent", "workflow", "tenant", "environment")


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
