"""Rollback commands: ``rollback plan|apply`` and ``tasks``.

``rollback plan`` and ``rollback apply`` first bring the projection up to the end of the
log, so a plan never misses the newest writes. ``rollback apply`` exits 1 when anything
is left pending, failed or in conflict (after printing what and why).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from backout.infra.broker import resolve_bootstrap
from backout.infra.clikit import (
    JSON_OPTION,
    console,
    err_console,
    load_settings,
    parse_time,
    print_json,
    table,
)
from backout.infra.commands_projection import catch_up, projection_store
from backout.infra.settings import Settings
from backout.producers.ids import new_event_id
from backout.producers.kafka import KafkaEventSink
from backout.projections.fold import (
    LABEL_TASK,
    LABEL_TASK_STATUS,
    Task,
)
from backout.projections.store import SqlProjectionStore
from backout.rollback.executor import RollbackExecutor, RollbackReport, StepOutcome, StepResult
from backout.rollback.plan import Decision, PlanDiff, RollbackPlan, diff_plans
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.rollback.targets_config import load_compensators, load_targets
from backout.schemas.errors import ConfigError, PlanningError, RollbackError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Origin,
    Reversibility,
    TargetRef,
)
from backout.schemas.registry import make_codec
from backout.schemas.signing import SigningKey, load_signing_key

rollback_app = typer.Typer(help="Plan and apply surgical rollbacks.", no_args_is_help=True)
tasks_app = typer.Typer(invoke_without_command=True)

_WRITES = (Decision.RESTORE, Decision.DELETE, Decision.RECREATE)


# --- rollback ----------------------------------------------------------------------------------
Run = Annotated[str | None, typer.Option("--run", help="Roll back this run (and child runs).")]
Agent = Annotated[str | None, typer.Option(help="Only writes by this agent.")]
Identity = Annotated[str | None, typer.Option(help="Only writes made with this identity.")]
Tenant = Annotated[str | None, typer.Option(help="Only writes in this tenant.")]
Since = Annotated[str | None, typer.Option(help="Only writes from this time (ISO-8601 or 15m).")]
Until = Annotated[str | None, typer.Option(help="Only writes up to this time.")]
Events = Annotated[list[str] | None, typer.Option("--event", help="Only these event ids.")]
AfterCheckpoint = Annotated[
    str | None,
    typer.Option("--after-checkpoint", help="Only the run's writes after this checkpoint."),
]
NoChildren = Annotated[
    bool, typer.Option("--no-child-runs", help="Leave the run's child runs out.")
]
Targets = Annotated[
    str | None,
    typer.Option(help="Where the systems live: module:attr (Target objects) or FILE.toml."),
]


def _scope(
    run: str | None,
    agent: str | None,
    identity: str | None,
    tenant: str | None,
    since: str | None,
    until: str | None,
    events: list[str] | None,
    after_checkpoint: str | None,
    no_child_runs: bool,
) -> RollbackScope:
    try:
        scope = RollbackScope(
            run=run,
            include_child_runs=not no_child_runs,
            agent=agent,
            identity=identity,
            tenant=tenant,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            event_ids=tuple(events or ()),
            after_checkpoint=after_checkpoint,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"bad scope: {first.get('msg', 'invalid')}") from None
    if scope.is_empty():
        raise ConfigError(
            "empty scope: give --run, --agent, --identity, --tenant, --since/--until or --event"
        )
    return scope


def _plan(
    settings: Settings, scope: RollbackScope, now: datetime
) -> tuple[RollbackPlan, SqlProjectionStore]:
    store = projection_store(settings)
    store.create()
    catch_up(settings, store)
    if store.counts()["events"] == 0:
        raise ConfigError(
            f"nothing projected: {settings.topic('actions')} is empty "
            "(check BACKOUT_TOPIC_PREFIX and BACKOUT_BOOTSTRAP)"
        )
    if scope.run is not None and not store.known_run(scope.run):
        raise PlanningError(
            f"unknown run {scope.run!r}: no event of it was ever projected "
            f"from {settings.topic('actions')}"
        )
    return plan_rollback(store.load(scope), scope, now=now), store


def plan_cmd(
    run: Run = None,
    agent: Agent = None,
    identity: Identity = None,
    tenant: Tenant = None,
    since: Since = None,
    until: Until = None,
    event: Events = None,
    after_checkpoint: AfterCheckpoint = None,
    no_child_runs: NoChildren = False,
    out: Annotated[Path | None, typer.Option(help="Also write the plan as JSON here.")] = None,
    diff: Annotated[
        Path | None,
        typer.Option(
            help="Compare with a plan saved earlier (--out): steps added, removed, changed."
        ),
    ] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Plan the surgical rollback of a scope: per record and field, what to restore and why.

    Example: backout rollback plan --run wf_2026_0042 --after-checkpoint approved
    """
    settings = load_settings()
    scope = _scope(
        run, agent, identity, tenant, since, until, event, after_checkpoint, no_child_runs
    )
    earlier = _read_plan(diff) if diff is not None else None
    plan, _ = _plan(settings, scope, datetime.now(UTC))
    if out is not None:
        out.write_text(plan.to_json(indent=2))
    changes = diff_plans(earlier, plan) if earlier is not None else None
    if json_out:
        print_json(
            plan.to_dict()
            if changes is None
            else {
                "plan": plan.to_dict(),
                "diff": {
                    "added": [s.step_id for s in changes.added],
                    "removed": [s.step_id for s in changes.removed],
                    "changed": [new.step_id for _, new in changes.changed],
                },
            }
        )
        return
    _print_plan(plan)
    if changes is not None:
        _print_diff(changes)


def _read_plan(path: Path) -> RollbackPlan:
    try:
        return RollbackPlan.from_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read plan {str(path)!r}: {exc.strerror}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{str(path)!r} is not a rollback plan (write one with --out)") from exc


def _print_diff(changes: PlanDiff) -> None:
    if changes.empty:
        console.print("same steps as the earlier plan")
        return
    rows = [("added", s) for s in changes.added] + [("removed", s) for s in changes.removed]
    rows += [("changed", new) for _, new in changes.changed]
    console.print(
        table(
            "since the earlier plan",
            ["change", "record", "decision", "why"],
            [
                [what, escape(s.record_key or s.tool or ""), s.decision.value, escape(s.reason)]
                for what, s in rows
            ],
        )
    )


def _print_plan(plan: RollbackPlan) -> None:
    console.print(
        table(
            f"rollback plan {plan.plan_id}",
            ["record", "field", "current", "restore-to", "decision", "why"],
            [[escape(str(c)) for c in row] for row in plan.rows()],
        )
    )
    counts = ", ".join(f"{k} {v}" for k, v in plan.counts().items() if v)
    console.print(
        f"{escape(plan.scope.describe())}: {plan.writes_in_scope} write(s) on "
        f"{plan.records} record(s); {counts or 'no steps'}"
    )
    for note in plan.notes:
        console.print(f"note: {escape(note)}")


def apply_cmd(
    run: Run = None,
    agent: Agent = None,
    identity: Identity = None,
    tenant: Tenant = None,
    since: Since = None,
    until: Until = None,
    event: Events = None,
    after_checkpoint: AfterCheckpoint = None,
    no_child_runs: NoChildren = False,
    targets: Targets = None,
    compensators: Annotated[
        str | None,
        typer.Option(
            help="Compensating tools: module:attr of a Journal or a name->callable mapping."
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """Apply the surgical rollback of a scope through its targets, with compare-and-set.

    Restores, deletes and recreates only when the live record still has the values the
    log says; conflicts are reported, unreachable systems stay pending, manual steps open
    tasks (see `backout tasks`). Running it again writes nothing new.

    Example: backout rollback apply --run wf_2026_0042 --targets targets.toml --yes
    """
    settings = load_settings()
    scope = _scope(
        run, agent, identity, tenant, since, until, event, after_checkpoint, no_child_runs
    )
    plan, store = _plan(settings, scope, datetime.now(UTC))
    found = load_targets(targets) if targets else {}
    needed = sorted({s.system or "" for s in plan.actionable if s.decision in _WRITES})
    missing = [s for s in needed if s not in found]
    if missing:
        raise ConfigError(
            f"the plan writes to system(s) {', '.join(missing)} but --targets "
            "names no target for them"
        )
    tools = load_compensators(compensators) if compensators else {}
    if not json_out:
        _print_plan(plan)
    if not plan.actionable:
        _finish(None, plan, json_out)
        return
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to apply without --yes when not interactive")
        typer.confirm(f"apply {len(plan.actionable)} step(s)?", abort=True)
    sink = KafkaEventSink(settings, resolve_bootstrap(settings), background=True)
    try:
        executor = RollbackExecutor(
            settings,
            sink=sink,
            targets=found,
            compensators=tools,
            signing_key=_signing_key(settings),
            identity=_operator(),
        )
        with _progress(len(plan.steps), json_out) as advance:
            report = executor.apply(plan, prior=store.steps(plan.plan_id), on_step=advance)
    finally:
        sink.close()
    catch_up(settings, store)
    _finish(report, plan, json_out)
    if not report.complete:
        left = report.summary()
        raise RollbackError(
            f"rollback {report.plan_id} incomplete: {left['conflicts']} conflict(s), "
            f"{left['pending']} pending, {left['failed']} failed (see the summary above)"
        )


def _signing_key(settings: Settings) -> SigningKey | None:
    if settings.signing_key_file is None:
        return None
    return load_signing_key(settings.signing_key_file)


def _operator() -> str:
    import getpass

    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Any]:
    if quiet:
        yield lambda _result: None
        return
    with Progress(
        TextColumn("rolling back"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task("", total=total)

        def advance(result: StepResult) -> None:
            bar.update(task, advance=1, description=escape(result.record or ""))

        yield advance


def _finish(report: RollbackReport | None, plan: RollbackPlan, json_out: bool) -> None:
    if json_out:
        print_json(
            {
                "plan": plan.to_dict(),
                "report": None
                if report is None
                else {
                    "plan_id": report.plan_id,
                    "rollback_run": report.rollback_run,
                    "summary": report.summary(),
                    "pending_systems": report.pending_systems,
                    "results": list(report.results),
                    "notes": list(report.notes),
                },
            }
        )
        return
    if report is None:
        console.print("nothing to apply")
        return
    summary = report.summary()
    console.print(table("summary", list(summary), [list(summary.values())]))
    problems = report.of(
        StepOutcome.CONFLICT, StepOutcome.PENDING, StepOutcome.FAILED, StepOutcome.MANUAL
    )
    if problems:
        console.print(
            table(
                "needs attention",
                ["record", "outcome", "detail"],
                [[escape(r.record or ""), r.outcome.value, escape(r.detail)] for r in problems],
            )
        )
    if report.pending_systems:
        console.print(
            f"pending (not done; run again when reachable): {', '.join(report.pending_systems)}"
        )
    for note in report.notes:
        console.print(f"note: {escape(note)}")


# --- tasks -------------------------------------------------------------------------------------
@tasks_app.callback()
def tasks(
    ctx: typer.Context,
    show_all: Annotated[bool, typer.Option("--all", help="Also done tasks.")] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """List manual rollback tasks (irreversible, expired or in-doubt actions).

    Example: backout tasks --json
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings()
    store = projection_store(settings)
    store.create()
    catch_up(settings, store)
    found = store.tasks(status=None if show_all else "open")
    if json_out:
        print_json(found)
        return
    console.print(
        table(
            "tasks",
            ["task", "status", "record", "tool", "run", "why", "freeze"],
            [_task_row(t) for t in found],
        )
    )


def _task_row(task: Task) -> list[str]:
    record = f"{task.system}/{task.object_id}" if task.system else ""
    return [
        escape(v)
        for v in (
            task.task_id,
            task.status,
            record,
            task.tool,
            task.run_id or "",
            task.reason,
            task.freeze,
        )
    ]


@tasks_app.command("done")
def task_done(
    task_id: Annotated[str, typer.Argument(help="The task id (from `backout tasks`).")],
    note: Annotated[str, typer.Option(help="What was done by hand.")] = "",
    json_out: bool = JSON_OPTION,
) -> None:
    """Mark a manual task done; the log records that its action was undone by hand.

    Example: backout tasks done rb_3f2a9c1e:0a1b2c3d4e5f --note "refund issued in the ERP"
    """
    settings = load_settings()
    store = projection_store(settings)
    store.create()
    catch_up(settings, store)
    task = next((t for t in store.tasks(status=None) if t.task_id == task_id), None)
    if task is None:
        raise ConfigError(f"no task {task_id!r} (see `backout tasks --all`)")
    if task.status == "done":
        raise ConfigError(f"task {task_id!r} is already done")
    operator = _operator()
    event = ActionEvent(
        event_id=new_event_id(),
        occurred_at=datetime.now(UTC),
        run_id=f"task-{task_id}",
        agent_id="backout",
        identity=operator,
        step_id=f"{task_id}:done",
        tool="backout.task_done",
        requested_args={"note": note},
        target=TargetRef(system=task.system, object_id=task.object_id)
        if task.system and task.object_id
        else None,
        reversibility=Reversibility.READ_ONLY,
        idempotency_key=f"{task_id}:done",
        status=CallStatus.SUCCEEDED,
        origin=Origin.HUMAN,
        compensates=task.event_id,
        labels={LABEL_TASK: task_id, LABEL_TASK_STATUS: "done"},
    )
    sink = KafkaEventSink(settings, resolve_bootstrap(settings))
    try:
        sink.publish(
            settings.topic("actions"),
            event.key.encode(),
            make_codec(settings.schema_registry_url).encode(event),
            confirm=True,
        )
    finally:
        sink.close()
    catch_up(settings, store)
    if json_out:
        print_json({"task_id": task_id, "event_id": event.event_id, "status": "done"})
        return
    console.print(f"task {escape(task_id)} done (event {event.event_id})")
    if task.freeze.startswith("cmd_"):
        console.print(
            f"its freeze {task.freeze} is still active: lift it with "
            f"`backout lift {task.freeze}` when automation may resume"
        )


def register(app: typer.Typer) -> None:
    """Add the rollback commands to ``app``."""
    rollback_app.command("plan")(plan_cmd)
    rollback_app.command("apply")(apply_cmd)
    app.add_typer(rollback_app, name="rollback")
    app.add_typer(tasks_app, name="tasks")
