"""What the demo reads back from the log, and the checks that decide its exit code. [adapter]

Everything here comes from the topics and the databases after the fact: the timeline
(actions, signals and control commands by time), the freeze and when it was appended, the
incident report (:func:`backout.infra.report.build_report`, as ``backout report`` computes
it) and the manual tasks in the projection.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from backout.infra.forensics import LogScanner, ReplayFilter, replay
from backout.infra.report import IncidentReport, build_report, select_incident
from backout.infra.runlog import load_runs, read_control, read_signals, valid_freezes
from backout.projections.store import SqlProjectionStore
from backout.rollback.executor import RollbackReport, StepOutcome
from backout.rollback.plan import RollbackPlan
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    EventKind,
    Origin,
    Signal,
)
from backout.schemas.registry import make_codec

if TYPE_CHECKING:
    from backout.infra.demo import Demo

Check = tuple[str, bool, str]
_HIDDEN = (
    EventKind.RUN_STARTED,
    EventKind.RUN_FINISHED,
    EventKind.ROLLBACK_STEP_STARTED,
    EventKind.ROLLBACK_STEP_FINISHED,
)


def _when(record: ActionEvent | ControlCommand | Signal) -> datetime:
    if isinstance(record, ActionEvent):
        return record.occurred_at
    if isinstance(record, ControlCommand):
        return record.issued_at
    return record.detected_at


def timeline(records: list[ActionEvent | ControlCommand | Signal]) -> list[dict[str, Any]]:
    """The incident's story as rows (``t`` seconds from the first, who, run, what, target,
    result): every action but lifecycle and rollback bookkeeping, every signal and control
    command, by time."""
    shown = [
        r
        for r in records
        if not (isinstance(r, ActionEvent) and (r.kind in _HIDDEN or r.origin is Origin.ROLLBACK))
    ]
    shown.sort(key=_when)
    if not shown:
        return []
    t0 = _when(shown[0])
    return [{"t": round((_when(r) - t0).total_seconds(), 3), **_describe(r)} for r in shown]


def _describe(record: ActionEvent | ControlCommand | Signal) -> dict[str, str]:
    if isinstance(record, ActionEvent):
        who = record.identity if record.origin is Origin.HUMAN else record.agent_id
        what = (
            f"checkpoint {record.labels.get('checkpoint', '')}"
            if record.kind is EventKind.CHECKPOINT
            else record.tool
        )
        return {
            "kind": "action",
            "who": who,
            "run": record.run_id,
            "what": what,
            "target": record.target.key if record.target else "",
            "status": record.status.value,
            "result": _result(record),
        }
    if isinstance(record, ControlCommand):
        scope = ",".join(f"{k}={v}" for k, v in sorted(record.scope.items()))
        why = record.reason.split(":", 1)[0]
        return {
            "kind": record.action.value,
            "who": record.issuer,
            "run": "",
            "what": f"{record.action.value.upper()} {record.mode.value}",
            "target": scope,
            "status": "signed" if record.signature else "unsigned",
            "result": f"{record.command_id} ({why})",
        }
    return {
        "kind": "signal",
        "who": record.detector,
        "run": record.scope.get("run", ""),
        "what": f"SIGNAL {record.severity.value}",
        "target": "",
        "status": "",
        "result": record.summary,
    }


def _result(event: ActionEvent) -> str:
    if event.status is CallStatus.BLOCKED:
        return f"BLOCKED by {event.blocked_by}"
    if event.status is not CallStatus.SUCCEEDED:
        return event.status.value + (f": {event.error.message}" if event.error else "")
    before, after = event.before, event.after
    if before is not None and after is not None:
        if not before.exists and after.exists:
            return "created"
        changed = ", ".join(
            f"{k}: {before.fields.get(k)!r} -> {v!r}"
            for k, v in after.fields.items()
            if before.fields.get(k) != v
        )
        if changed:
            return changed
    return f"ok ({event.reversibility.value.replace('_', '-')})"


def collect(
    demo: Demo, store: SqlProjectionStore, plan: RollbackPlan, done: RollbackReport
) -> dict[str, Any]:
    """Read the log back, build the report and run the checks."""
    from backout.infra.demo import AGENT, INCIDENT_RUN

    settings, codec = demo.settings, make_codec(demo.settings.schema_registry_url)
    with LogScanner(settings, demo.bootstrap) as scanner:
        records: list[ActionEvent | ControlCommand | Signal] = []
        for topic in ("actions", "signals", "control"):
            records += [
                f.record
                for f in replay(scanner, codec, settings.topic(topic), ReplayFilter())
                if f.record is not None
            ]
        notes: list[str] = []
        control = read_control(scanner, codec)
        freezes, appended = valid_freezes(settings, control, notes)
        signals = read_signals(scanner, codec)
        log = load_runs(scanner, codec, [INCIDENT_RUN], with_control=False)
    ours = [
        c
        for c in freezes
        if c.scope.get("agent") == AGENT and c.key_id == demo.processors_key.key_id
    ]
    freeze = ours[0] if ours else None
    report: IncidentReport | None = None
    if freeze is not None:
        incident = select_incident(freeze.command_id, signals, freezes)
        runs = [INCIDENT_RUN, *sorted(log.runs - {INCIDENT_RUN})]
        report = build_report(
            incident,
            [e.event for e in log.events],
            [e.event for e in log.related],
            runs=runs,
            now=datetime.now(freeze.issued_at.tzinfo),
            appended=appended,
            notes=notes,
        )
    tasks = store.tasks(status="open")
    checks = _checks(demo, freeze, report, [e.event for e in log.events], done, tasks)
    return {
        "broker": {"bootstrap": demo.bootstrap, "kind": demo.broker.kind if demo.broker else ""},
        "topic_prefix": settings.topic_prefix,
        "policy": str(demo.policy_path),
        "incident_run": INCIDENT_RUN,
        "rogue_calls": list(demo.incident.rogue_done),
        "blocked_calls": list(demo.incident.blocked),
        "timeline": timeline(records),
        "freeze": freeze,
        "freeze_appended_at": appended.get(freeze.command_id) if freeze else None,
        "signal": next((s for s in signals if freeze and s.signal_id == freeze.cause), None),
        "plan": plan,
        "rollback": done,
        "report": report,
        "tasks": tasks,
        "checks": checks,
    }


def _checks(
    demo: Demo,
    freeze: ControlCommand | None,
    report: IncidentReport | None,
    events: list[ActionEvent],
    done: RollbackReport,
    tasks: list[Any],
) -> list[Check]:
    out: list[Check] = []
    seen = demo.incident
    out.append(
        (
            "the processors froze the agent (signed freeze)",
            freeze is not None
            and freeze.action is ControlAction.FREEZE
            and freeze.signature is not None,
            freeze.command_id if freeze else "no freeze of the agent on the control topic",
        )
    )
    blocked = [e for e in events if e.status is CallStatus.BLOCKED]
    out.append(
        (
            "its next calls were blocked and journaled",
            bool(seen.blocked)
            and len(blocked) == len(seen.blocked)
            and freeze is not None
            and all(e.blocked_by == freeze.command_id for e in blocked),
            f"{len(blocked)} blocked call(s) by {seen.freeze_id or '-'}",
        )
    )
    compensated = done.of(StepOutcome.COMPENSATED)
    out.append(
        (
            "every rogue refund reversed by its compensating tool",
            len(compensated) == len(seen.rogue_refunds) > 0,
            f"{len(compensated)} of {len(seen.rogue_refunds)} refund(s)",
        )
    )
    restored = done.of(StepOutcome.APPLIED, StepOutcome.ALREADY)
    out.append(
        (
            "rogue writes restored by compare-and-set",
            len(restored) > 0,
            f"{len(restored)} record(s)",
        )
    )
    conflicts = sorted(r.record or "" for r in done.of(StepOutcome.CONFLICT))
    out.append(
        (
            "the DBA's out-of-band write is a conflict, kept",
            conflicts == ["erp.invoices/INV-A3"],
            ", ".join(conflicts) or "none",
        )
    )
    kept = report.others_writes_kept if report else 0
    out.append(("others' writes kept (dunning job, operator)", kept >= 2, f"{kept} write(s)"))
    mail = [t for t in tasks if t.system == "mail"]
    out.append(
        (
            "the irreversible email is a manual task",
            len(mail) == 1 and mail[0].object_id == "grace@acme.test",
            ", ".join(f"{t.task_id} ({t.object_id})" for t in mail) or "none",
        )
    )
    ttc = report.time_to_containment_s if report else None
    out.append(
        (
            "the report measures time to containment",
            ttc is not None,
            "-" if ttc is None else f"{ttc:.3f} s",
        )
    )
    assert demo.expected is not None and demo.world is not None
    differences = demo.expected.differences(demo.world)
    out.append(
        (
            "the databases hold the expected end state",
            not differences,
            "; ".join(differences) or "all rows as expected",
        )
    )
    return out


__all__ = ["collect", "timeline"]
