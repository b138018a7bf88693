"""A trace drawn as an indented tree for a terminal (``backout trace`` without ``--json``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from pydantic import JsonValue

from backout.infra.trace_model import Trace, TraceRun, TraceStep
from backout.schemas.events import (
    CallStatus,
    EventKind,
    Reversibility,
)


def _clock(at: datetime | None) -> str:
    return at.strftime("%H:%M:%S.%f")[:-3] if at is not None else "--:--:--.---"


def _args(args: Mapping[str, JsonValue], limit: int = 80) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _step_line(step: TraceStep) -> str:
    bits = [_clock(step.occurred_at), step.tool]
    if step.kind is not EventKind.TOOL_CALL:
        bits.append(f"[{step.kind.value}]")
    if step.target:
        bits.append(step.target)
    bits.append(step.status.value.upper() if step.status is not CallStatus.SUCCEEDED else "ok")
    if step.reversibility is not Reversibility.READ_ONLY:
        bits.append(step.reversibility.value)
    if step.identity:
        bits.append(f"as {step.identity}")
    line = " ".join(bits)
    if step.requested_args:
        line += f" ({_args(step.requested_args)})"
    return line


def _step_details(step: TraceStep) -> list[str]:
    out = []
    if step.args_narrowed and step.approved_args is not None:
        out.append(f"approved args differ: {_args(step.approved_args)}")
    if step.change in ("created", "deleted"):
        out.append(f"record {step.change}")
    out.extend(d.describe() for d in step.diffs[:12])
    if len(step.diffs) > 12:
        out.append(f"… {len(step.diffs) - 12} more field(s)")
    if step.blocked_by is not None:
        out.append(f"blocked by {step.blocked_by.describe()}")
    elif step.error:
        out.append(f"error: {step.error}")
    if step.compensates:
        out.append(f"undoes {step.compensates}")
    if step.undone_by:
        out.append(f"undone by {', '.join(step.undone_by)}")
    if step.rollback and step.rollback not in ("applied", "already", "compensated"):
        out.append(f"rollback: {step.rollback}")
    return out


def _run_line(run: TraceRun) -> str:
    who = f"agent {run.agent_id}, identity {run.identity}"
    if run.tenant:
        who += f", tenant {run.tenant}"
    if run.workflow:
        who += f", workflow {run.workflow}"
    end = f" -> {_clock(run.finished_at)}" if run.finished_at else ""
    text = f"run {run.run_id} ({who}) {_clock(run.started_at)}{end} {run.status}"
    if run.error:
        text += f": {run.error}"
    return text


def render_text(trace: Trace) -> str:
    """The trace as an indented tree for a terminal (plain text, no markup)."""
    lines: list[str] = []
    # Work items: (prefix for this item's line, prefix for its children, item)
    stack: list[tuple[str, str, TraceRun | TraceStep]] = [("", "", trace.root)]
    while stack:
        lead, indent, item = stack.pop()
        if isinstance(item, TraceRun):
            lines.append(lead + _run_line(item))
            kids: list[TraceRun | TraceStep] = [*item.steps, *item.child_runs]
        else:
            lines.append(lead + _step_line(item))
            detail_pad = indent + ("│  " if (item.children or item.child_runs) else "   ")
            lines.extend(detail_pad + d for d in _step_details(item))
            kids = [*item.children, *item.child_runs]
        for i in range(len(kids) - 1, -1, -1):
            last = i == len(kids) - 1
            stack.append(
                (indent + ("└─ " if last else "├─ "), indent + ("   " if last else "│  "), kids[i])
            )
    s = trace.summary
    lines.append("")
    lines.append(
        f"{s.runs} run(s), {s.steps} step(s): {s.writes} write(s) on {len(s.records)} record(s)"
        f" in {len(s.tenants)} tenant(s); {s.blocked} blocked, {s.failed} failed, "
        f"{s.in_doubt} in doubt, {s.undone} undone"
    )
    for freeze in trace.freezes:
        lines.append(f"freeze: {freeze.describe()}")
    for signal in trace.signals:
        lines.append(
            f"signal {signal.signal_id} {_clock(signal.detected_at)} {signal.detector} "
            f"{signal.severity.value}: {signal.summary}"
        )
    return "\n".join(lines) + "\n"
