"""Projection commands: ``project`` (the projector as a service, or ``--once``) and ``state``."""

from __future__ import annotations

import signal
import threading
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape

from backout.infra.broker import resolve_bootstrap
from backout.infra.clikit import (
    JSON_OPTION,
    console,
    load_settings,
    parse_time,
    print_json,
    table,
)
from backout.infra.settings import Settings
from backout.projections.fold import (
    EXISTS,
    Absent,
    RecordHistory,
    fold,
)
from backout.projections.projector import Projector, ProjectorStats
from backout.projections.store import SqlProjectionStore
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
)
from backout.schemas.registry import make_codec


# --- the projection ----------------------------------------------------------------------------
def projection_store(settings: Settings) -> SqlProjectionStore:
    """The SQL projection named by ``BACKOUT_DB``."""
    return SqlProjectionStore(settings.db)


def catch_up(
    settings: Settings, store: SqlProjectionStore, *, workers: int = 1, timeout: float = 300.0
) -> ProjectorStats:
    """Bring ``store`` up to the end of the actions topic."""
    with Projector(
        settings, resolve_bootstrap(settings), store=store, workers=workers
    ) as projector:
        return projector.catch_up(timeout=timeout)


def project(
    once: Annotated[
        bool, typer.Option("--once", help="Catch up to the end of the log, exit.")
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Drop the projection and rebuild it from offset 0.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Processes to split partitions over.")] = 1,
    json_out: bool = JSON_OPTION,
) -> None:
    """Fold the actions topic into the SQL projection (BACKOUT_DB), as a service.

    Runs until Ctrl-C or SIGTERM; --once catches up to the end of the log and exits;
    --rebuild drops every projection table first and starts again from offset 0.

    Example: backout project --once --rebuild
    """
    settings = load_settings()
    store = projection_store(settings)
    if rebuild:
        store.reset()
    if once:
        stats = catch_up(settings, store, workers=workers)
        _print_stats(stats, store, json_out, "caught up")
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with Projector(
            settings, resolve_bootstrap(settings), store=store, workers=workers
        ) as projector:
            if not json_out:
                console.print(
                    f"projecting {settings.topic('actions')} into "
                    f"{escape(_safe_url(store))}; Ctrl-C stops"
                )
            try:
                stats = projector.run_forever(stop, on_batch=None if json_out else _progress_line)
            except KeyboardInterrupt:
                stop.set()
                stats = projector.stats
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_stats(stats, store, json_out, "stopped")


def _progress_line(stats: ProjectorStats) -> None:
    console.print(
        f"{stats.events} event(s) projected ({stats.rate:,.0f}/s), "
        f"{stats.dead_lettered} dead-lettered"
    )


def _print_stats(
    stats: ProjectorStats, store: SqlProjectionStore, json_out: bool, what: str
) -> None:
    counts = store.counts()
    if json_out:
        print_json(
            {
                "events": stats.events,
                "duplicates": stats.duplicates,
                "dead_lettered": stats.dead_lettered,
                "seconds": stats.seconds,
                "rate": stats.rate,
                "projection": counts,
            }
        )
        return
    console.print(
        f"{what}: {stats.events} new event(s), {stats.duplicates} duplicate(s), "
        f"{stats.dead_lettered} dead-lettered in {stats.seconds:.1f}s; projection has "
        f"{counts['events']} event(s) on {counts['records']} record(s), "
        f"{counts['open_tasks']} open task(s)"
    )


def _safe_url(store: SqlProjectionStore) -> str:
    return store.engine.url.render_as_string(hide_password=True)


# --- state -------------------------------------------------------------------------------------
def state(
    system: Annotated[str, typer.Argument(help="The system name (erp, crm, ...).")],
    object_id: Annotated[str, typer.Argument(metavar="OBJECT", help="The record's id.")],
    at: Annotated[
        str | None,
        typer.Option(help="Show it as it was at this time: ISO-8601 or a duration ago (15m, 2h)."),
    ] = None,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline", help="Read the projection as it is; do not catch up with the log."
        ),
    ] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """Show a record as the log says it is (or was at --at), with its write history.

    Example: backout state erp inv_88421 --at 2026-11-23T04:00:00Z
    """
    settings = load_settings()
    store = projection_store(settings)
    store.create()
    if not offline:
        catch_up(settings, store)
    history = store.record(system, object_id)
    if history is None:
        raise ConfigError(f"the log has no record {system}/{object_id}")
    when = parse_time(at) if at is not None else None
    if when is not None:
        codec = make_codec(settings.schema_registry_url)
        events = [
            codec.decode(raw, ActionEvent)
            for raw in store.record_payloads(system, object_id, until=when)
        ]
        past = fold(events).records.get(f"{system}/{object_id}")
        if past is None:
            raise ConfigError(
                f"the log knows nothing of {system}/{object_id} at {when.isoformat()}"
            )
        history = past
    _print_state(history, when, json_out)


def _print_state(history: RecordHistory, when: datetime | None, json_out: bool) -> None:
    current = history.state
    writes: list[dict[str, Any]] = [
        {
            "seq": w.seq,
            "field": "(record)" if w.field == EXISTS else w.field,
            "before": _cell(w.before),
            "after": _cell(w.after),
            "event_id": w.event_id,
            "run_id": w.run_id,
            "origin": w.origin.value if w.origin else "unjournaled",
            "at": w.occurred_at,
        }
        for w in history.writes
    ]
    if json_out:
        print_json(
            {
                "record": current.key,
                "at": when,
                "exists": current.exists,
                "fields": dict(current.fields),
                "version": current.version,
                "last_event_id": current.last_event_id,
                "writes": writes,
                "in_doubt": list(history.opaque),
            }
        )
        return
    label = f" at {when.isoformat()}" if when else ""
    shown = "exists" if current.exists else "absent (deleted or never created)"
    console.print(f"{escape(current.key)}{label}: {shown}, version {current.version!r}")
    if current.exists:
        console.print(
            table(
                "fields",
                ["field", "value"],
                [[escape(k), escape(repr(v))] for k, v in sorted(current.fields.items())],
            )
        )
    console.print(
        table(
            "writes (oldest first)",
            ["#", "field", "before", "after", "by", "event", "at"],
            [
                [
                    w["seq"],
                    escape(str(w["field"])),
                    escape(str(w["before"])),
                    escape(str(w["after"])),
                    escape(f"{w['origin']} {w['run_id'] or ''}".strip()),
                    w["event_id"],
                    w["at"].isoformat(timespec="seconds"),
                ]
                for w in writes
            ],
        )
    )
    if history.opaque:
        console.print(f"in doubt (no after-image): {', '.join(history.opaque)}")


def _cell(value: object) -> object:
    return "(absent)" if isinstance(value, Absent) else value


def register(app: typer.Typer) -> None:
    """Add the projection commands to ``app``."""
    app.command()(project)
    app.command()(state)
