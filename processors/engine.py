"""The detection engine: detectors, then the policy's graduated responses. Pure: no I/O.

The Faust app and replay both fold events through :meth:`Engine.step`, so live and
replayed findings and commands are the same for the same events. A response with the
same scope and mode as one issued less than ``policy.cooldown`` ago (by event time) is
not issued again; the finding still becomes a signal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from backout.processors.findings import EventRef, Finding, ScopeState, micros
from backout.processors.policy import Policy, cooldown_key
from backout.processors.rules import detect
from backout.schemas.events import ActionEvent, ControlCommand, Evidence, Signal

_ISSUED_KEEP = 64


@dataclass(frozen=True, slots=True)
class Step:
    """What one batch of an agent's events led to."""

    agent: ScopeState
    runs: dict[str, ScopeState]
    """New states of the runs the batch touched."""
    findings: list[Finding]
    commands: list[tuple[ControlCommand, Finding]]
    """Unsigned commands to issue, each with the finding that caused it."""
    expired_runs: list[str]
    """Runs idle for longer than a window: their state can be dropped."""
    skipped: int


class Engine:
    """Detectors plus responses for one policy.

    Args:
        policy: limits, responses, cooldown.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._limits_for = policy.resolver()
        self._cooldown_us = micros_of(policy.cooldown.total_seconds())

    def step(
        self,
        agent: ScopeState,
        runs: Mapping[str, ScopeState],
        batch: Iterable[tuple[ActionEvent, EventRef]],
    ) -> Step:
        """Fold ``batch`` (one agent's events, in order) into its states.

        The inputs are not changed; the new states come back in the result.
        """
        found = detect(agent, runs, batch, self._limits_for)
        commands = self.respond(found.findings, found.agent.issued)
        return Step(
            found.agent, found.runs, found.findings, commands, found.expired_runs, found.skipped
        )

    def respond(
        self, findings: Iterable[Finding], issued: dict[str, int]
    ) -> list[tuple[ControlCommand, Finding]]:
        """The commands for ``findings``, minus repeats still in cooldown.

        Args:
            issued: cooldown key -> quiet until (µs); updated in place.
        """
        out: list[tuple[ControlCommand, Finding]] = []
        newest = 0
        for finding in findings:
            at = micros(finding.at)
            newest = max(newest, at)
            for command in self.policy.commands_for(finding):
                key = cooldown_key(command)
                until = issued.get(key)
                if until is not None and at < until:
                    continue
                issued[key] = at + self._cooldown_us
                out.append((command, finding))
        if len(issued) > _ISSUED_KEEP:
            for key in [k for k, until in issued.items() if until <= newest]:
                del issued[key]
        return out


def micros_of(seconds: float) -> int:
    """Seconds as whole microseconds."""
    return round(seconds * 1_000_000)


def signal_of(finding: Finding) -> Signal:
    """The Signal that publishes ``finding`` (its id is the finding id)."""
    ctx = finding.context
    scope = {
        k: v
        for k, v in (
            ("run", ctx.run),
            ("agent", ctx.agent),
            ("identity", ctx.identity),
            ("tenant", ctx.tenant),
            ("workflow", ctx.workflow),
            ("environment", ctx.environment),
        )
        if v
    }
    evidence: list[Evidence] = []
    seen: set[str] = set()
    for ref in (finding.trigger, *finding.evidence):
        if ref.event_id not in seen:
            seen.add(ref.event_id)
            evidence.append(
                Evidence(
                    event_id=ref.event_id,
                    topic=ref.topic,
                    partition=ref.partition,
                    offset=ref.offset,
                )
            )
    details = {
        "subject": f"{finding.subject[0]}={finding.subject[1]}",
        "tool": ctx.tool,
        "trigger": finding.trigger.event_id,
        **finding.details,
    }
    return Signal(
        signal_id=finding.finding_id,
        detected_at=finding.at,
        detector=finding.detector,
        severity=finding.severity,
        scope=scope,
        summary=finding.summary,
        evidence=evidence,
        details=details,
    )


def signal_key(finding: Finding) -> str:
    """The signals topic key of a finding: its subject, ``run=...`` or ``agent=...``."""
    return f"{finding.subject[0]}={finding.subject[1]}"


def command_key(command: ControlCommand) -> str:
    """The control topic key of a command: its scope, ``agent=billing-bot``."""
    return ",".join(f"{k}={v}" for k, v in sorted(command.scope.items()))
