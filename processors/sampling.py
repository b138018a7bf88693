"""Supervisor sampling: which writes are re-checked against the live record, and the
finding when the record drifted from what the tool wrote. Pure.

The adapter that re-reads the records is ``supervisor.py``.
"""

from __future__ import annotations

import hashlib

from backout.processors.findings import DEFAULT_SEVERITY, Context, EventRef, Finding, digest
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    EventKind,
    RecordImage,
    Reversibility,
    Severity,
)


def samplable(event: ActionEvent) -> bool:
    """True for a succeeded write whose after-image the supervisor can re-check."""
    return (
        event.kind is EventKind.TOOL_CALL
        and event.status is CallStatus.SUCCEEDED
        and event.reversibility is not Reversibility.READ_ONLY
        and event.target is not None
        and event.after is not None
    )


def sampled(event_id: str, share: float) -> bool:
    """Deterministic sampling: the same event id is always in or out for a given share."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")
    return h < share * 2**64


def drift(expected: RecordImage, live: RecordImage) -> dict[str, str]:
    """Fields whose live value differs from the after-image (``{}`` when none)."""
    if expected.exists != live.exists:
        return {"exists": f"expected {expected.exists}, live {live.exists}"}
    if not expected.exists:
        return {}
    return {
        name: f"expected {value!r}, live {live.fields.get(name)!r}"
        for name, value in sorted(expected.fields.items())
        if live.fields.get(name) != value
    }


def drift_finding(
    event: ActionEvent,
    ref: EventRef,
    live: RecordImage,
    severity: Severity = DEFAULT_SEVERITY["supervisor_drift"],
) -> Finding | None:
    """A ``supervisor_drift`` finding when the live record no longer matches ``event``.

    The caller re-reads the record through its Target and only asks about the newest
    journaled write of that record, so a later journaled write is not mistaken for drift.
    """
    if event.after is None or event.target is None:
        return None
    changed = drift(event.after, live)
    if not changed:
        return None
    fields = ", ".join(sorted(changed))
    return Finding(
        "f_" + digest("supervisor_drift", event.event_id),
        "supervisor_drift",
        severity,
        event.occurred_at,
        ("run", event.run_id),
        Context.of(event),
        f"{event.target.key} drifted from what {event.tool!r} wrote: {fields}",
        ref,
        (ref,),
        {"target": event.target.key, **{f"field.{k}": v for k, v in changed.items()}},
    )
