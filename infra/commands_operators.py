"""Operator commands for the hour after an incident: ``trace``, ``replay``, ``blast-radius``,
``report`` and ``up``.

Everything here reads the log without side effects (no consumer group joins, no commits);
``up`` runs the development stack in the foreground (see ``stack.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from backout.infra.broker import resolve_bootstrap
from backout.infra.clikit import (
    JSON_OPTION,
    console,
    err_console,
    load_settings,
    parse_time,
    print_json,
    print_json_line,
    table,
)
from backout.infra.forensics import (
    TOPICS,
    Found,
    LogScanner,
    ReplayFilter,
    ReplayStats,
    paused_gc,
    replay,
)
from backout.infra.report import BlastRadius, IncidentReport, blast_radius, build_report
from backout.infra.report import select_incident as pick_incident
from backout.infra.runlog import (
    RunLog,
    consumer_group_offsets,
    load_runs,
    read_control,
    read_signals,
    runs_of,
    valid_freezes,
)
from backout.infra.settings import Settings
from backout.infra.trace import build_trace, render_text
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent, ControlCommand
from backout.schemas.registry import Codec, make_codec

Since = Annotated[
    str | None,
    typer.Option(help="Only records from this time: ISO-8601 or a duration ago (15m, 2h, 1d)."),
]


def _open(settings: Settings) -> tuple[LogScanner, Codec]:
    return LogScanner(settings, resolve_bootstrap(settings)), make_codec(
        settings.schema_registry_url
    )


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _positions(log: RunLog) -> dict[str, tuple[int, int]]:
    return {e.event.event_id: (e.position.partition, e.position.offset) for e in log.events}


# --- trace -------------------------------------------------------------------------------------
def trace(
    run: Annotated[str, typer.Argument(help="The run id.")],
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained incident page.")
    ] = None,
    since: Since = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Reconstruct a run from the log as a tree: its steps, child runs, diffs, blocked calls.

    Each step shows time, tool, identity, requested (and approved) arguments, target,
    field diffs, status and reversibility; a blocked call names the freeze that blocked it.

    Example: backout trace wf_2026_0042 --html incident.html
    """
    settings = load_settings()
    start = _time(since, "--since")
    scanner, codec = _open(settings)
    with scanner, paused_gc(freeze=True):
        log = load_runs(scanner, codec, [run], since=start, related="rollback")
        if not log.events:
            raise ConfigError(
                f"unknown run {run!r}: no events of it on the log"
                + (f" since {start.isoformat()}" if start else "")
            )
        _show_trace(run, log, html, json_out)


def _show_trace(run: str, log: RunLog, html: Path | None, json_out: bool) -> None:
    built = build_trace(
        run,
        [e.event for e in log.events],
        related=[e.event for e in log.related],
        commands=[c for _, c in log.commands],
        signals=[s for _, s in log.signals],
        positions={e.event.event_id: str(e.position) for e in log.events},
    )
    if html is not None:
        from backout.infra.incident_html import render_incident_html  # jinja2: only when asked

        try:
            html.write_text(
                render_incident_html(built, generated_at=datetime.now(UTC)), encoding="utf-8"
            )
        except OSError as exc:
            raise ConfigError(f"cannot write {str(html)!r}: {exc.strerror or exc}") from None
    if json_out:
        # One compact document: a big run's trace is megabytes, and only the compact form
        # goes through json's C encoder.
        sys.stdout.write(json.dumps(built.to_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render_text(built))
    sys.stdout.flush()
    if html is not None:
        err_console.print(f"incident page written to {escape(str(html))}")


# --- replay ------------------------------------------------------------------------------------
def _line(found: Found) -> str:
    record = found.record
    where = str(found.position)
    if record is None:
        reason = found.error.reason if found.error else "undecodable"
        return f"{where} UNDECODABLE {reason}"
    if isinstance(record, ActionEvent):
        target = record.target.key if record.target else "-"
        return (
            f"{where} {record.occurred_at.isoformat(timespec='milliseconds')} "
            f"run={record.run_id} agent={record.agent_id} {record.tool} {target} "
            f"{record.status.value}"
        )
    if isinstance(record, ControlCommand):
        scope = ",".join(f"{k}={v}" for k, v in sorted(record.scope.items()))
        return (
            f"{where} {record.issued_at.isoformat(timespec='milliseconds')} "
            f"{record.action.value} {record.command_id} {scope} {record.mode.value} "
            f"{record.reason}"
        )
    return (
        f"{where} {record.detected_at.isoformat(timespec='milliseconds')} "
        f"{record.detector} {record.severity.value} {record.summary}"
    )


def _json_line(found: Found) -> dict[str, Any]:
    if found.record is None:
        return {
            "position": str(found.position),
            "error": found.error.reason if found.error else "undecodable",
        }
    return {
        "position": str(found.position),
        "type": type(found.record).__name__,
        "record": found.record,
    }


def replay_cmd(
    run: Annotated[str | None, typer.Option("--run", help="Only this run's records.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's records.")] = None,
    since: Since = None,
    until: Annotated[
        str | None, typer.Option(help="Only records up to this time (ISO-8601 or 15m ago).")
    ] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            help="actions (default), control, signals, quarantine, dlq; repeat for several.",
        ),
    ] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Read topics by time, decode and filter, without side effects (forensics).

    Commands and signals match --run/--agent when their scope names them. Prints one line
    per record (JSON lines with --json) and a summary on stderr; exits 1 when nothing
    matches.

    Example: backout replay --agent billing-agent --since 2026-11-23T04:00Z --until 2h
    """
    settings = load_settings()
    chosen = list(dict.fromkeys(topic or ["actions"]))
    for name in chosen:
        if name not in TOPICS:
            raise ConfigError(f"unknown topic {name!r}: {', '.join(TOPICS)}")
    flt = ReplayFilter(
        run=run, agent=agent, since=_time(since, "--since"), until=_time(until, "--until")
    )
    scanner, codec = _open(settings)
    stats = ReplayStats()
    out = sys.stdout
    with scanner, paused_gc(freeze=True):
        for name in chosen:
            for found in replay(scanner, codec, settings.topic(name), flt, stats):
                if json_out:
                    print_json_line(_json_line(found))
                else:
                    out.write(_line(found) + "\n")
    out.flush()
    summary = (
        f"{stats.scanned} scanned in {stats.seconds:.2f}s ({stats.rate:,.0f}/s); "
        f"{stats.decoded} decoded, {stats.undecodable} undecodable"
    )
    if stats.matched == 0 and stats.undecodable == 0:
        raise ConfigError(f"no records match in {', '.join(chosen)}{_describe(flt)}: {summary}")
    err_console.print(f"{stats.matched} record(s) matched of {summary}", markup=False)


def _describe(flt: ReplayFilter) -> str:
    parts = [f"{k} {v!r}" for k, v in (("run", flt.run), ("agent", flt.agent)) if v]
    parts += [f"{k} {v.isoformat()}" for k, v in (("since", flt.since), ("until", flt.until)) if v]
    return f" ({', '.join(parts)})" if parts else " (the topics are empty)"


# --- blast radius ------------------------------------------------------------------------------
def _groups(settings: Settings, notes: list[str]) -> dict[str, dict[int, int]]:
    try:
        found = consumer_group_offsets(
            settings, resolve_bootstrap(settings), settings.topic("actions")
        )
    except ConfigError as exc:
        notes.append(f"downstream consumer groups unknown: {exc}")
        return {}
    return {g.group: g.offsets for g in found}


def _internal(settings: Settings) -> tuple[str, ...]:
    """Group id prefixes of backout's own readers (tools, projector, processors)."""
    return ("backout", settings.topic_prefix)


def _print_blast(blast: BlastRadius) -> None:
    console.print(
        f"{len(blast.runs)} run(s) ({len(blast.child_runs)} child), {blast.writes} write(s) on "
        f"{len(blast.records)} record(s); tenants: {escape(', '.join(blast.tenants) or '-')}; "
        f"systems: {escape(', '.join(blast.systems) or '-')}; value moved {blast.value_moved:g}"
    )
    console.print(
        table(
            "records",
            ["record", "status", "writes", "tenant", "last write", "detail"],
            [
                [
                    escape(e.record),
                    e.status,
                    e.writes,
                    escape(e.tenant or ""),
                    e.last_write_at.isoformat(timespec="milliseconds"),
                    escape(e.detail),
                ]
                for e in blast.exposures
            ],
        )
    )
    if blast.downstream:
        console.print(
            table(
                "downstream consumer groups that read the runs' events",
                ["group", "consumed", "of", "kind"],
                [
                    [
                        escape(g.group),
                        g.consumed,
                        g.total,
                        "backout" if g.internal else "downstream",
                    ]
                    for g in blast.downstream
                ],
            )
        )
    else:
        console.print("no consumer group has committed offsets past the runs' events")
    console.print(f"still exposed: {len(blast.still_exposed)} record(s)")


def blast_radius_cmd(
    run: Annotated[str, typer.Argument(help="The run id (its child runs are included).")],
    since: Since = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """What a run touched: records, tenants, systems, child runs, downstream consumer groups
    that consumed its events, and what is still exposed (not rolled back, irreversible,
    conflicts).

    Example: backout blast-radius wf_2026_0042 --json
    """
    settings = load_settings()
    scanner, codec = _open(settings)
    with scanner, paused_gc(freeze=True):
        log = load_runs(scanner, codec, [run], since=_time(since, "--since"), with_control=False)
    if not log.events:
        raise ConfigError(f"unknown run {run!r}: no events of it on the log")
    notes: list[str] = []
    groups = _groups(settings, notes)
    runs = [run, *sorted(log.runs - {run})]
    blast = blast_radius(
        runs,
        [e.event for e in log.events],
        [e.event for e in log.related],
        now=datetime.now(UTC),
        positions=_positions(log),
        groups=groups,
        internal_prefixes=_internal(settings),
    )
    if json_out:
        print_json({**blast.to_dict(), "notes": notes})
        return
    _print_blast(blast)
    for note in notes:
        console.print(escape(note))


# --- report ------------------------------------------------------------------------------------
def _print_report(rep: IncidentReport) -> None:
    inc = rep.incident

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    steps = rep.steps
    first_at = rep.first_offending_at.isoformat() if rep.first_offending_at else "-"
    rows: list[Sequence[Any]] = [
        ("incident", f"{inc.kind} {inc.incident_id}"),
        ("runs", ", ".join(rep.blast.runs)),
        ("first offending event", f"{rep.first_offending_event or '-'} at {first_at}"),
        ("detection latency", secs(rep.detection_latency_s)),
        ("time to containment", f"{secs(rep.time_to_containment_s)} ({rep.contained_by or '-'})"),
        ("blocked calls", rep.blocked_calls),
        (
            "consequential actions",
            f"{rep.consequential_actions} ({rep.undoable_actions} undoable, "
            f"{rep.irreversible_actions} irreversible)",
        ),
        ("rollback coverage", f"{share(rep.rollback_coverage)} ({rep.undone_actions} undone)"),
        (
            "rollback steps",
            f"{steps.succeeded} succeeded, {steps.conflicts} conflicts, "
            f"{steps.failed} failed, {steps.unfinished} unfinished, "
            f"{steps.manual} manual",
        ),
        ("rollback success rate", share(rep.rollback_success_rate)),
        ("recovery time", secs(rep.recovery_time_s)),
        ("records restored", rep.records_restored),
        ("others' writes kept", rep.others_writes_kept),
        ("open manual tasks", len(rep.open_tasks)),
        ("conflicts", ", ".join(rep.conflicts) or "0"),
        (
            "blast radius",
            f"{len(rep.blast.records)} record(s), {len(rep.blast.tenants)} "
            f"tenant(s), {len(rep.blast.systems)} system(s), "
            f"{len(rep.blast.child_runs)} child run(s); "
            f"{len(rep.blast.still_exposed)} still exposed",
        ),
    ]
    console.print(
        table(
            "incident report",
            ["figure", "value"],
            [[escape(str(a)), escape(str(b))] for a, b in rows],
        )
    )
    for note in rep.notes:
        console.print(f"note: {escape(note)}")


def report(
    incident: Annotated[
        str | None,
        typer.Option(
            "--incident",
            help="A freeze command id, signal id or run id "
            "(default: the latest freeze, else the latest signal).",
        ),
    ] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Incident report: time to containment, detection latency, rollback coverage, rollback
    success rate, recovery time and blast radius, computed from the log.

    Example: backout report --incident cmd_7f3a --json
    """
    settings = load_settings()
    notes: list[str] = []
    scanner, codec = _open(settings)
    with scanner, paused_gc(freeze=True):
        freezes, appended = valid_freezes(settings, read_control(scanner, codec), notes)
        signals = read_signals(scanner, codec)
        known = (incident,) if incident is not None else ()
        chosen = pick_incident(incident, signals, freezes, known_runs=known)
        roots = list(
            dict.fromkeys(
                [*chosen.runs, *runs_of(scanner, codec, chosen.evidence, chosen.freeze_ids)]
            )
        )
        if not roots:
            raise ConfigError(
                f"incident {chosen.incident_id!r} names no run, cites no event on "
                "the log and blocked no call: nothing to report on"
            )
        log = load_runs(scanner, codec, roots, with_control=False)
    if not log.events:
        raise ConfigError(
            f"unknown incident {chosen.incident_id!r}: no events of run(s) "
            f"{', '.join(roots)} on the log"
        )
    runs = [*roots, *sorted(log.runs - set(roots))]
    rep = build_report(
        chosen,
        [e.event for e in log.events],
        [e.event for e in log.related],
        runs=runs,
        now=datetime.now(UTC),
        appended=appended,
        positions=_positions(log),
        groups=_groups(settings, notes),
        internal_prefixes=_internal(settings),
        notes=notes,
    )
    if json_out:
        print_json(rep.to_dict())
        return
    _print_report(rep)


# --- up ------------------------------------------------------------------------------------------
def up(
    no_processors: Annotated[
        bool, typer.Option("--no-processors", help="Do not start the processors.")
    ] = False,
    no_projector: Annotated[
        bool, typer.Option("--no-projector", help="Do not start the projector.")
    ] = False,
) -> None:
    """Run the development stack in the foreground: the embedded broker (or BACKOUT_BOOTSTRAP),
    the topics, the processors and the projector. Ctrl-C stops everything cleanly.

    Metrics of every part are served on BACKOUT_METRICS_PORT when it is set.

    Example: BACKOUT_METRICS_PORT=9464 backout up
    """
    from backout.infra.stack import run_stack

    settings = load_settings()
    code = run_stack(settings, processors=not no_processors, projector=not no_projector)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the operator commands to ``app``."""
    app.command()(trace)
    app.command("replay")(replay_cmd)
    app.command("blast-radius")(blast_radius_cmd)
    app.command()(report)
    app.command()(up)


__all__ = ["register"]
