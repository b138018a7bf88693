"""A self-contained HTML incident page for a trace: timeline, diffs, freezes, signals. Pure.

The page has its CSS inline and references nothing outside itself, so an operator can
attach the one file to a ticket. Every value from the log is escaped (jinja2 autoescape in
the template, ``markupsafe.escape`` in the timeline rows built here): agent-supplied
arguments and reasons cannot inject markup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources

from jinja2 import Environment, Template, select_autoescape
from markupsafe import Markup, escape
from pydantic import JsonValue

from backout.infra.trace import Trace, TraceRun, TraceStep
from backout.infra.trace_model import FieldDiff

__all__ = ["render_incident_html"]


@dataclass(frozen=True, slots=True)
class _Row:
    depth: int
    run: TraceRun | None = None
    step: TraceStep | None = None


def _ts(at: datetime | None) -> str:
    return at.isoformat(timespec="milliseconds") if at is not None else ""


def _js(value: JsonValue) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _args(args: Mapping[str, JsonValue] | None) -> str:
    if not args:
        return ""
    return ", ".join(f"{k}={_js(v)}" for k, v in args.items())


def _scope(scope: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(scope.items()))


@cache
def _template() -> Template:
    env = Environment(
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ts=_ts, js=_js, args=_args, scope=_scope)
    source = (
        resources.files("backout.infra").joinpath("templates/incident.html.j2").read_text("utf-8")
    )
    return env.from_string(source)


def _rows(trace: Trace) -> list[_Row]:
    """The tree flattened in display order, with depths (no recursion)."""
    rows: list[_Row] = []
    stack: list[tuple[int, TraceRun | TraceStep]] = [(0, trace.root)]
    while stack:
        depth, item = stack.pop()
        if isinstance(item, TraceRun):
            rows.append(_Row(depth, run=item))
            kids: list[TraceRun | TraceStep] = [*item.steps, *item.child_runs]
        else:
            rows.append(_Row(depth, step=item))
            kids = [*item.children, *item.child_runs]
        stack.extend((depth + 1, kid) for kid in reversed(kids))
    return rows


# The timeline holds a row per step (10,000 and more in a large incident): it is built here
# with escaped f-strings, several times faster than the same markup through the template.
_ABSENT = '<span class="note">(absent)</span>'
_QUIET_ROLLBACK = ("applied", "already", "compensated")


def _run_row(depth: int, r: TraceRun) -> str:
    tenant = f"&middot; tenant {escape(r.tenant)}" if r.tenant else ""
    done = f'<span class="note">finished {_ts(r.finished_at)}</span>' if r.finished_at else ""
    error = f'<div class="note">{escape(r.error)}</div>' if r.error else ""
    status = escape(r.status)
    return (
        f'<tr class="run">\n<td class="mono">{_ts(r.started_at)}</td>\n'
        f'<td colspan="5"><span class="indent" style="width: {depth * 18}px"></span>run\n'
        f"<code>{escape(r.run_id)}</code> &middot; agent {escape(r.agent_id)} &middot; "
        f"identity {escape(r.identity)}\n{tenant}\n"
        f'&middot; <span class="status s-{status}">{status}</span>\n{done}\n{error}\n'
        "</td>\n</tr>\n"
    )


def _diff_item(d: FieldDiff) -> str:
    if not d.before_known:
        before = '<span class="note">?</span>'
    elif d.before_present:
        before = f'<span class="was">{escape(_js(d.before))}</span>'
    else:
        before = _ABSENT
    after = f'<span class="now">{escape(_js(d.after))}</span>' if d.after_present else _ABSENT
    return f"<li>{escape(d.field)}: {before} &rarr; {after}</li>"


def _step_row(depth: int, s: TraceStep) -> str:
    kind = s.kind.value
    out = [
        f'<tr id="e-{escape(s.event_id)}">\n<td class="mono">{_ts(s.occurred_at)}</td>\n'
        f'<td><span class="indent" style="width: {depth * 18}px"></span>'
        f"<strong>{escape(s.tool)}</strong>\n",
        f'<span class="note">[{escape(kind)}]</span>\n' if kind != "tool_call" else "",
        f'<div class="note">{escape(s.step_id)} &middot; {escape(s.identity)} &middot; '
        f"{escape(s.origin)}</div></td>\n"
        f'<td class="mono">{escape(s.target or "")}\n'
        f'<div class="rev-{s.reversibility.value}">{s.reversibility.value}</div></td>\n'
        f'<td><span class="status s-{s.status.value}">{s.status.value}</span>\n',
    ]
    if s.blocked_by:
        out.append(f'<div class="blocked">blocked by {escape(s.blocked_by.describe())}</div>\n')
    elif s.error:
        out.append(f'<div class="note">{escape(s.error)}</div>\n')
    if s.undone_by:
        undone = ", ".join(f"<code>{escape(u)}</code>" for u in s.undone_by)
        out.append(f'<div class="undone">undone by {undone}</div>\n')
    if s.rollback and s.rollback not in _QUIET_ROLLBACK:
        out.append(f'<div class="blocked">rollback: {escape(s.rollback)}</div>\n')
    if s.compensates:
        c = escape(s.compensates)
        out.append(f'<div class="undone">undoes <a href="#e-{c}"><code>{c}</code></a></div>\n')
    out.append(f'</td>\n<td class="mono">{escape(_args(s.requested_args))}\n')
    if s.args_narrowed:
        out.append(f'<div class="note">approved: {escape(_args(s.approved_args))}</div>')
    out.append("</td>\n<td>\n")
    if s.change in ("created", "deleted"):
        out.append(f'<div class="note">record {s.change}</div>\n')
    if s.diffs:
        items = "".join(_diff_item(d) for d in s.diffs)
        out.append(f'<ul class="diff mono">\n{items}\n</ul>\n')
    if s.version_before is not None or s.version_after is not None:
        out.append(
            f'<div class="note">version {escape(_js(s.version_before))} &rarr; '
            f"{escape(_js(s.version_after))}</div>\n"
        )
    out.append("</td>\n</tr>\n")
    return "".join(out)


def _timeline(trace: Trace) -> Markup:
    """The timeline table's rows, every value from the log escaped."""
    parts = []
    for row in _rows(trace):
        if row.run is not None:
            parts.append(_run_row(row.depth, row.run))
        elif row.step is not None:
            parts.append(_step_row(row.depth, row.step))
    return Markup("".join(parts))


def render_incident_html(trace: Trace, *, generated_at: datetime, title: str | None = None) -> str:
    """The incident page for ``trace`` as one HTML document.

    Args:
        generated_at: the time printed in the footer (passed in: this module is pure).
        title: the page title (default: ``Incident trace: run <id>``).
    """
    return _template().render(
        title=title or f"Incident trace: run {trace.root.run_id}",
        root=trace.root,
        summary=trace.summary,
        signals=trace.signals,
        freezes=trace.freezes,
        timeline=_timeline(trace),
        generated_at=generated_at,
    )
