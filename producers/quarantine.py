"""Parked records: the headers a parked record carries, and what release or discard may do. Pure.

A downstream consumer parks a record from a frozen scope on the quarantine topic with its
original key, value and headers, plus ``backout-parked-*`` headers naming the freeze, the
call scope it was judged by and where it came from. ``backout release`` and ``backout
discard`` never delete anything: they append a *marker* (an empty record with
``backout-marker: released|discarded`` and ``backout-marker-of: <position>``) for each
record they handled, so a second run skips it, and journal one ActionEvent (origin human,
tool ``backout.release`` or ``backout.discard``) listing what they did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from backout.producers.freezes import Freeze
from backout.producers.ids import new_event_id
from backout.producers.scope import CallScope
from backout.schemas.events import ActionEvent, CallStatus, Origin, Reversibility

Headers = list[tuple[str, bytes]]

PARKED_BY = "backout-parked-by"
"""The freeze command id that parked the record."""
PARKED_REASON = "backout-parked-reason"
PARKED_SCOPE = "backout-parked-scope"
"""The call scope the record was judged by (JSON), re-checked on release."""
PARKED_FROM = "backout-parked-from"
"""``topic/partition@offset`` the record was consumed at."""
PARKED_TOPIC = "backout-parked-topic"
"""The original topic (where release sends it back)."""
PARKED_AT = "backout-parked-at"
PARKED_GROUP = "backout-parked-group"
MARKER = "backout-marker"
"""On a marker record: ``released`` or ``discarded``."""
MARKER_OF = "backout-marker-of"
"""On a marker record: the quarantine position of the parked record it settles."""
MARKER_EVENT = "backout-marker-event"
"""On a marker record: the journaled ActionEvent that did it."""
RELEASED_FROM = "backout-released-from"
"""On a released record: the quarantine position it came back from (a redelivery)."""

_OURS = (PARKED_BY, PARKED_REASON, PARKED_SCOPE, PARKED_FROM, PARKED_TOPIC, PARKED_AT, PARKED_GROUP)


def scope_json(scope: CallScope) -> bytes:
    """A call scope as compact JSON."""
    return json.dumps(
        {
            "tool": scope.tool,
            "agent": scope.agent,
            "identity": scope.identity,
            "run": scope.run,
            "ancestor_runs": list(scope.ancestor_runs),
            "workflow": scope.workflow,
            "tenant": scope.tenant,
            "environment": scope.environment,
            "reversibility": scope.reversibility.value,
        },
        separators=(",", ":"),
    ).encode()


def scope_from_json(raw: bytes) -> CallScope:
    """Inverse of :func:`scope_json`.

    Raises:
        ValueError: not a scope written by :func:`scope_json`.
    """
    data = json.loads(raw)
    try:
        return CallScope(
            str(data["tool"]),
            str(data["agent"]),
            str(data["identity"]),
            str(data["run"]),
            tuple(str(r) for r in data["ancestor_runs"]),
            data["workflow"],
            data["tenant"],
            str(data["environment"]),
            Reversibility(data["reversibility"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a parked scope: {exc}") from exc


def parked_headers(
    original: Headers,
    freeze: Freeze,
    scope: CallScope,
    *,
    topic: str,
    position: str,
    parked_at: datetime,
    group: str | None = None,
) -> Headers:
    """The original headers plus the ``backout-parked-*`` headers."""
    extra: Headers = [
        (PARKED_BY, freeze.command_id.encode()),
        (PARKED_REASON, freeze.reason.encode()),
        (PARKED_SCOPE, scope_json(scope)),
        (PARKED_FROM, position.encode()),
        (PARKED_TOPIC, topic.encode()),
        (PARKED_AT, parked_at.isoformat().encode()),
    ]
    if group:
        extra.append((PARKED_GROUP, group.encode()))
    return [*original, *extra]


@dataclass(frozen=True)
class ParkedRecord:
    """A record on the quarantine topic, as parked."""

    position: str
    """Where it sits on the quarantine topic."""
    key: bytes | None
    value: bytes
    headers: Headers
    """The original headers (without ours)."""
    freeze_id: str
    reason: str
    topic: str
    """The topic it was parked from (release sends it back there)."""
    parked_from: str
    scope: CallScope | None
    parked_at: str


@dataclass(frozen=True)
class Marker:
    """A release or discard of one parked record."""

    kind: str
    of: str
    event_id: str


def read_parked(
    position: str, key: bytes | None, value: bytes, headers: Headers
) -> ParkedRecord | Marker | None:
    """A quarantine message as a parked record or a marker (None: not ours)."""
    found = {name: raw for name, raw in headers}
    if MARKER in found:
        return Marker(
            found[MARKER].decode(),
            found.get(MARKER_OF, b"").decode(),
            found.get(MARKER_EVENT, b"").decode(),
        )
    if PARKED_BY not in found or PARKED_TOPIC not in found:
        return None
    try:
        scope = scope_from_json(found[PARKED_SCOPE]) if PARKED_SCOPE in found else None
    except ValueError:
        scope = None
    return ParkedRecord(
        position=position,
        key=key,
        value=value,
        headers=[(n, v) for n, v in headers if n not in _OURS],
        freeze_id=found[PARKED_BY].decode(),
        reason=found.get(PARKED_REASON, b"").decode(),
        topic=found[PARKED_TOPIC].decode(),
        parked_from=found.get(PARKED_FROM, b"").decode(),
        scope=scope,
        parked_at=found.get(PARKED_AT, b"").decode(),
    )


@dataclass
class ReleasePlan:
    """What a release may do now."""

    release: list[ParkedRecord] = field(default_factory=list)
    still_frozen: list[tuple[ParkedRecord, str]] = field(default_factory=list)
    """Records whose scope a freeze still covers, with that freeze's id."""
    settled: int = 0
    """Records already released or discarded earlier."""


def outstanding(records: Iterable[ParkedRecord | Marker]) -> tuple[list[ParkedRecord], int]:
    """Parked records without a marker, and how many have one."""
    parked: list[ParkedRecord] = []
    done: set[str] = set()
    for item in records:
        if isinstance(item, Marker):
            done.add(item.of)
        else:
            parked.append(item)
    left = [p for p in parked if p.position not in done]
    return left, len(parked) - len(left)


def plan_release(
    records: Iterable[ParkedRecord | Marker],
    still_blocking: Callable[[ParkedRecord], str | None],
    *,
    freeze_ids: set[str] | None = None,
) -> ReleasePlan:
    """Which parked records may go back: no freeze covers their scope any more.

    Args:
        records: the quarantine topic's parked records and markers.
        still_blocking: the id of a freeze that still covers a parked record, or None.
        freeze_ids: only records parked by these freezes (all when None).
    """
    left, settled = outstanding(records)
    plan = ReleasePlan(settled=settled)
    for parked in left:
        if freeze_ids is not None and parked.freeze_id not in freeze_ids:
            continue
        blocker = still_blocking(parked)
        if blocker is None:
            plan.release.append(parked)
        else:
            plan.still_frozen.append((parked, blocker))
    return plan


def plan_discard(
    records: Iterable[ParkedRecord | Marker], *, freeze_ids: set[str] | None
) -> tuple[list[ParkedRecord], int]:
    """Parked records to discard (those of ``freeze_ids``; all when None), and how many
    were settled before."""
    left, settled = outstanding(records)
    return [p for p in left if freeze_ids is None or p.freeze_id in freeze_ids], settled


def released_headers(parked: ParkedRecord) -> Headers:
    """The headers a released record goes back with: its original ones plus where from."""
    return [*parked.headers, (RELEASED_FROM, parked.position.encode())]


def marker_headers(kind: str, parked: ParkedRecord, event_id: str) -> Headers:
    """The headers of a marker settling one parked record."""
    return [
        (MARKER, kind.encode()),
        (MARKER_OF, parked.position.encode()),
        (MARKER_EVENT, event_id.encode()),
    ]


def journal_event(
    kind: str,
    handled: list[ParkedRecord],
    *,
    issuer: str,
    environment: str,
    reason: str,
    details: dict[str, str | int | None],
    now: datetime | None = None,
    event_id: str | None = None,
) -> ActionEvent:
    """The ActionEvent that journals a release or discard (origin human)."""
    event_id = event_id or new_event_id()
    run_id = f"run_{kind}_{event_id.lower()}"
    positions: list[str] = [p.position for p in handled[:1000]]
    return ActionEvent(
        event_id=event_id,
        occurred_at=now or datetime.now(UTC),
        run_id=run_id,
        agent_id="backout-cli",
        identity=issuer,
        step_id=f"{run_id}:1",
        tool=f"backout.{kind}",
        requested_args={
            **details,
            "reason": reason,
            "count": len(handled),
            "records": list(positions),
            "freezes": sorted({p.freeze_id for p in handled}),
        },
        reversibility=Reversibility.IRREVERSIBLE,
        idempotency_key=f"{kind}:{event_id}",
        status=CallStatus.SUCCEEDED,
        environment=environment,
        result={"count": len(handled)},
        origin=Origin.HUMAN,
        labels={"backout.containment": kind},
    )
