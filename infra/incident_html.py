"""A self-contained HTML incident page for a trace: timeline, diffs, freezes, signals. Pure.

The page has its CSS inline and references nothing outside itself, so an operator can
attach the one file to a ticket. Every value from the log is escaped (jinja2 autoescape):
agent-supplied arguments and reasons cannot inject markup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources

from jinja2 import Environment, Template, select_autoescape
from pydantic import JsonValue

from backout.infra.trace import Trace, TraceRun, TraceStep

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
        rows=_rows(trace),
        generated_at=generated_at,
    )
