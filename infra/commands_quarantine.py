"""Quarantine commands: ``release`` and ``discard`` records parked by freeze-aware consumers.

Both append markers to the quarantine topic and journal one ActionEvent (origin human) each;
``release`` sends back only records whose scope is no longer frozen.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from backout.infra.broker import resolve_bootstrap
from backout.infra.clikit import (
    JSON_OPTION,
    console,
    load_settings,
    print_json,
)
from backout.infra.commands_containment import control_view
from backout.producers.downstream import (
    Disposition,
    discard_parked,
    read_quarantine,
    release_parked,
)
from backout.producers.kafka import KafkaEventSink
from backout.schemas.errors import ConfigError


def _disposition_json(done: Disposition) -> dict[str, Any]:
    return {
        "action": done.kind,
        "count": len(done.handled),
        "records": [
            {"position": p.position, "topic": p.topic, "freeze": p.freeze_id} for p in done.handled
        ],
        "still_frozen": [{"position": p.position, "frozen_by": f} for p, f in done.still_frozen],
        "settled_before": done.settled_before,
        "journal_event": done.event_id,
    }


def _show(done: Disposition, json_out: bool, dry_run: bool) -> None:
    if json_out:
        print_json({**_disposition_json(done), "dry_run": dry_run})
        return
    verb = {"release": "released", "discard": "discarded"}[done.kind]
    prefix = "would have " if dry_run else ""
    console.print(
        f"{prefix}{verb} {len(done.handled)} parked record(s)"
        + (f"; journaled as {done.event_id}" if done.event_id else "")
    )
    for parked, blocker in done.still_frozen:
        console.print(f"  kept {parked.position}: still frozen by {blocker}")


def release(
    freeze_ids: Annotated[
        list[str] | None, typer.Option("--freeze", help="Only records parked by this freeze.")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Send them to this topic instead of their own.")
    ] = None,
    reason: Annotated[str, typer.Option("--reason")] = "",
    issuer: Annotated[str, typer.Option("--issuer")] = "operator",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what it would do.")] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """Replay parked records whose scope is no longer frozen back to their topic (journaled).

    Example: backout release --freeze cmd_5f2c... --dry-run
    """
    settings = load_settings()
    bootstrap = resolve_bootstrap(settings)
    guard = control_view(settings)
    sink = KafkaEventSink(settings, bootstrap)
    try:
        records = read_quarantine(settings, bootstrap)
        active = {f.command_id for f in guard.freezes()}
        done = release_parked(
            settings,
            sink,
            records,
            guard,
            active_ids=active,
            freeze_ids=set(freeze_ids) if freeze_ids else None,
            to=to,
            issuer=issuer,
            reason=reason,
            dry_run=dry_run,
        )
    finally:
        sink.close()
        guard.close()
    _show(done, json_out, dry_run)


def discard(
    freeze_ids: Annotated[
        list[str] | None, typer.Option("--freeze", help="Records parked by this freeze.")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every parked record.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="e.g. 'rolled back'.")] = "",
    issuer: Annotated[str, typer.Option("--issuer")] = "operator",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what it would do.")] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """Drop parked records for good (after a rollback): they are never released (journaled).

    Example: backout discard --freeze cmd_5f2c... --reason "rolled back by rb_12"
    """
    if not freeze_ids and not everything:
        raise ConfigError("give --freeze ID (repeatable) or --all")
    if not reason and not dry_run:
        raise ConfigError("give a --reason: the journal records it")
    settings = load_settings()
    bootstrap = resolve_bootstrap(settings)
    sink = KafkaEventSink(settings, bootstrap)
    try:
        records = read_quarantine(settings, bootstrap)
        done = discard_parked(
            settings,
            sink,
            records,
            freeze_ids=None if everything else set(freeze_ids or []),
            issuer=issuer,
            reason=reason,
            dry_run=dry_run,
        )
    finally:
        sink.close()
    _show(done, json_out, dry_run)


def register(app: typer.Typer) -> None:
    """Add the quarantine commands to ``app``."""
    app.command()(release)
    app.command()(discard)
