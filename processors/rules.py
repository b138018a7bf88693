"""Detectors: ``(state, events) -> (state, findings)``. Pure: no I/O, no clock.

Time comes from event timestamps (``occurred_at``) only, so the same events always give
the same findings, live or in replay. Detectors and what they watch:

============================ ==================== ==========================================
detector                     subject              fires when
============================ ==================== ==========================================
``policy_violation``         the event's run      a write attempt uses a tool, system or
                                                  tenant outside the policy's ``allow`` lists
``failed_postcondition``     the event's run      the tool's verifier failed
                                                  (``labels["postcondition"] == "failed"``),
                                                  a write ended ``unknown`` (in doubt), or
                                                  the call partially failed
                                                  (``labels["partial_failure"]``)
``tool_uncertainty``         the event's run      ``confidence`` below ``min_confidence``, or
                                                  ``labels["uncertainty"]`` carries flags
``rate_anomaly``             run, agent           tool calls in the window above the limit
``retry_loop``               run                  the same tool, target and arguments N times
                                                  in the window
``mutation_volume``          run, agent           distinct records written, or value moved
                                                  (sum of ``|value|``), in the window above
                                                  the limit
``blast_radius``             run, agent           distinct tenants or systems written in the
                                                  window above the limit
``supervisor_drift``         the event's run      a sampled write's after-image no longer
                                                  matches the live record (see
                                                  :func:`drift_finding`)
============================ ==================== ==========================================

Labels the journal sets on ``ActionEvent.labels`` for these detectors:

- ``uncertainty``: comma-separated flags: ``low_confidence`` (the model or tool said it
  was unsure), ``decode_failure`` (the tool's output could not be parsed),
  ``schema_drift`` (the target answered with fields or types the tool did not declare).
  Unknown flags are reported as they are.
- ``postcondition``: ``failed`` or ``passed``, the verdict of the tool's declared verifier
  on the observed after-image; ``postcondition_detail``: why, in a few words.
- ``partial_failure``: set when a call succeeded only in part, e.g. ``"3/10"`` items
  failed; ``""``, ``"0"`` and ``"false"`` mean no.

Rollback's own inverse writes and compensations (``origin == "rollback"``) are recorded as
applied but judged by no detector: they undo an incident, and counting them as the
rolled-back agent's activity would freeze the recovery itself.

Windowed detectors count over a sliding window split into :data:`WINDOW_BUCKETS`
buckets; the oldest bucket is weighted by how much of it is still inside the window.
They fire once when a limit is crossed, again when the overshoot reaches the policy's
``high`` or ``critical`` ratio, and again once per window while it lasts. State is a
small :class:`ScopeState` per run and per agent that serialises to compact JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeAlias

from backout.processors.findings import (
    EPOCH,
    LABEL_PARTIAL_FAILURE,
    LABEL_POSTCONDITION,
    LABEL_POSTCONDITION_DETAIL,
    LABEL_UNCERTAINTY,
    Context,
    Detection,
    DetectorName,
    EventRef,
    Finding,
    Limits,
    ScopeState,
    SubjectKind,
    digest,
    micros,
)
from backout.processors.windows import CallFacts, observe, retry
from backout.schemas.events import ActionEvent, CallStatus, EventKind, Origin, Reversibility

_READ_ONLY = Reversibility.READ_ONLY
_TOOL_CALL = EventKind.TOOL_CALL
_ROLLBACK = Origin.ROLLBACK
_NO_PARTIAL = frozenset({"", "0", "false", "no"})

LimitsFor: TypeAlias = Callable[[ActionEvent], Limits]


# --- the fold ---------------------------------------------------------------------------
def detect(
    agent: ScopeState,
    runs: Mapping[str, ScopeState],
    batch: Iterable[tuple[ActionEvent, EventRef]],
    limits_for: LimitsFor,
) -> Detection:
    """Run every detector over ``batch``, events of one agent, in order.

    Args:
        agent: the agent's state (not changed; a new one is returned).
        runs: states of the runs in the batch that have one (not changed).
        batch: the agent's events with their positions, in log order per partition.
        limits_for: the policy's limits for an event.

    Returns:
        The new agent state, the new states of the runs touched, the findings in event
        order, the runs idle for longer than a window, and how many events were skipped.
    """
    agent = agent.copy()
    agent_runs = agent.runs
    touched: dict[str, ScopeState] = {}
    findings: list[Finding] = []
    skipped = 0
    retain = 0
    agent_subject: tuple[SubjectKind, str] | None = None
    for event, ref in batch:
        run_id = event.run_id
        run = touched.get(run_id)
        if run is None:
            base = runs.get(run_id)
            run = touched[run_id] = base.copy() if base is not None else ScopeState()
        if ref.partition is None or ref.offset is None:  # from a file: nothing to claim
            fresh_agent = fresh_run = True
        else:
            fresh_agent, fresh_run = agent.claim(ref), run.claim(ref)
            if not (fresh_agent or fresh_run):
                skipped += 1
                continue
        if event.origin is _ROLLBACK:
            continue  # recovery, not the agent's own activity: see the module docstring
        limits = limits_for(event)
        if limits.window_us > retain:
            retain = limits.window_us
        at = event.occurred_at
        if at.tzinfo is None:
            t = micros(at)
        else:  # micros(), inlined for the usual aware time
            delta = at - EPOCH
            t = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        facts = CallFacts(event, ref, t) if event.kind is _TOOL_CALL else None
        if fresh_agent:
            if facts is not None:
                found = event_findings(event, ref, limits)
                if found:
                    findings.extend(found)
                if agent_subject is None:
                    agent_subject = ("agent", event.agent_id)
                if agent_subject is not None:  # narrows the type for mypy
                    observe(agent, agent_subject, limits.agent, facts, limits, findings)
            agent_runs.pop(run_id, None)
            agent_runs[run_id] = t
            if t > agent.last_us:
                agent.last_us = t
        if fresh_run and facts is not None:
            subject: tuple[SubjectKind, str] = ("run", run_id)
            observe(run, subject, limits.run, facts, limits, findings)
            if limits.retry_loop is not None and event.reversibility is not _READ_ONLY:
                retry(run, subject, facts, limits, findings)
    expired = _expire_runs(agent, retain, touched)
    return Detection(agent, touched, findings, expired, skipped)


def _expire_runs(agent: ScopeState, retain_us: int, touched: Mapping[str, ScopeState]) -> list[str]:
    if not retain_us:
        return []
    horizon = agent.last_us - retain_us
    expired: list[str] = []
    for run_id, last in agent.runs.items():
        if last > horizon:
            break
        if run_id not in touched:
            expired.append(run_id)
    for run_id in expired:
        del agent.runs[run_id]
    return expired


# --- per-event detectors ----------------------------------------------------------------
def event_findings(event: ActionEvent, ref: EventRef, limits: Limits) -> list[Finding]:
    """Findings that need no state: policy violation, failed postcondition, uncertainty."""
    if event.kind is not EventKind.TOOL_CALL:
        return []
    out: list[Finding] = []
    attempt = (
        event.reversibility is not Reversibility.READ_ONLY
        and event.status is not CallStatus.BLOCKED
    )
    if (
        not event.labels
        and event.status is not CallStatus.UNKNOWN
        and (
            event.confidence is None
            or limits.min_confidence is None
            or event.confidence >= limits.min_confidence
        )
        and (
            not attempt
            or (
                limits.allowed_tools is None
                and limits.allowed_systems is None
                and limits.allowed_tenants is None
            )
        )
    ):
        return out
    if attempt:
        problems = _violations(event, limits)
        if problems:
            out.append(
                _event_finding(
                    "policy_violation",
                    event,
                    ref,
                    limits,
                    "write outside the policy: " + "; ".join(problems),
                    {"violations": "; ".join(problems)},
                )
            )
    quiet = not event.labels  # most calls: no labels, so only status and confidence matter
    reasons = (
        _postcondition(event, attempt) if not quiet or event.status is CallStatus.UNKNOWN else None
    )
    if reasons:
        out.append(
            _event_finding(
                "failed_postcondition",
                event,
                ref,
                limits,
                "postcondition: " + "; ".join(reasons),
                {"reasons": "; ".join(reasons)},
            )
        )
    flags = _uncertainty(event, limits) if not quiet or event.confidence is not None else None
    if flags:
        out.append(
            _event_finding(
                "tool_uncertainty",
                event,
                ref,
                limits,
                f"tool {event.tool!r} is unsure: " + ", ".join(flags),
                {"flags": ",".join(flags)},
            )
        )
    return out


def _violations(event: ActionEvent, limits: Limits) -> list[str]:
    problems: list[str] = []
    if limits.allowed_tools is not None and event.tool not in limits.allowed_tools:
        problems.append(f"tool {event.tool!r} not allowed")
    system = event.target.system if event.target is not None else None
    if (
        limits.allowed_systems is not None
        and system is not None
        and system not in limits.allowed_systems
    ):
        problems.append(f"system {system!r} not allowed")
    if limits.allowed_tenants is not None and event.tenant not in limits.allowed_tenants:
        problems.append(f"tenant {event.tenant!r} not allowed")
    return problems


def _postcondition(event: ActionEvent, attempt: bool) -> list[str]:
    reasons: list[str] = []
    if event.labels.get(LABEL_POSTCONDITION) == "failed":
        detail = event.labels.get(LABEL_POSTCONDITION_DETAIL)
        reasons.append("verifier failed" + (f" ({detail})" if detail else ""))
    if attempt and event.status is CallStatus.UNKNOWN:
        reasons.append("status unknown (the write may or may not have happened)")
    partial = event.labels.get(LABEL_PARTIAL_FAILURE)
    if partial is not None and partial.strip().lower() not in _NO_PARTIAL:
        reasons.append(f"partial failure ({partial})")
    return reasons


def _uncertainty(event: ActionEvent, limits: Limits) -> list[str]:
    flags = [f.strip() for f in event.labels.get(LABEL_UNCERTAINTY, "").split(",") if f.strip()]
    if (
        limits.min_confidence is not None
        and event.confidence is not None
        and event.confidence < limits.min_confidence
        and "low_confidence" not in flags
    ):
        flags.insert(0, "low_confidence")
    if "low_confidence" in flags and event.confidence is not None:
        flags[flags.index("low_confidence")] = f"low_confidence={event.confidence:g}"
    return flags


def _event_finding(
    detector: DetectorName,
    event: ActionEvent,
    ref: EventRef,
    limits: Limits,
    summary: str,
    details: dict[str, str],
) -> Finding:
    return Finding(
        "f_" + digest(detector, event.event_id),
        detector,
        limits.severity[detector],
        event.occurred_at,
        ("run", event.run_id),
        Context.of(event),
        summary,
        ref,
        (ref,),
        details,
    )
