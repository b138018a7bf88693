"""Signals for invalid control commands: what a refused command reports. Pure."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from backout.producers.freezes import Outcome, Verdict
from backout.schemas.events import Evidence, Severity, Signal

INTEGRITY_DETECTOR = "control_integrity"
"""The detector name of the Signals raised for invalid control commands."""

_SEVERITY = {
    Verdict.FORGED: Severity.CRITICAL,
    Verdict.UNSIGNED: Severity.HIGH,
    Verdict.REPLAYED: Severity.HIGH,
    Verdict.EXPIRED: Severity.MEDIUM,
    Verdict.MALFORMED: Severity.MEDIUM,
}


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
