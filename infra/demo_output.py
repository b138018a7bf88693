"""How ``backout demo`` shows itself: phase progress on stderr, the story on stdout.

For people: a checklist of phases with spinners while they run, then the timeline, the
freeze, the rollback plan and its outcome, the incident report, what ``harden`` proposes
and the checks. For machines (``--json``): one JSON document with the same content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from backout.infra.clikit import console, err_console, print_json, table, to_jsonable
from backout.infra.harden_files import HardenResult
from backout.infra.report import IncidentReport
from backout.projections.fold import EXISTS
from backout.rollback.executor import RollbackReport, StepOutcome
from backout.rollback.plan import Decision, PlanStep, RollbackPlan
from backout.schemas.events import ControlCommand


class Narrator:
    """Phase progress on stderr (nothing when ``quiet``)."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None

    def __enter__(self) -> Narrator:
        if not self.quiet:
            self._progress = Progress(
                SpinnerColumn(finished_text=""),
                TextColumn("{task.fields[mark]}{task.description}"),
                TimeElapsedColumn(),
                console=err_console,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Show ``label`` with a spinner while the block runs; a tick (or cross) after."""
        progress = self._progress
        task: TaskID | None = None
        if progress is not None:
            task = progress.add_task(escape(label), total=1, mark="")
        try:
            yield
        except BaseException:
            if progress is not None and task is not None:
                progress.update(task, completed=1, mark="[red]✗[/] ")
            raise
        if progress is not None and task is not None:
            progress.update(task, completed=1, mark="[green]✓[/] ")


def render(outcome: dict[str, Any], workdir: Path, *, json_out: bool) -> None:
    """Print the demo's outcome."""
    if json_out:
        print_json(_as_json(outcome, workdir))
        return
    say = console.print
    broker = outcome["broker"]
    say(
        f"\n[bold]backout demo[/]: a rogue billing agent, end to end "
        f"(broker {escape(broker['bootstrap'])} {broker['kind']}, topics "
        f"{escape(outcome['topic_prefix'])}*)"
    )
    say(
        table(
            "timeline",
            ["+s", "who", "run", "what", "target", "result"],
            [_row(r) for r in outcome["timeline"]],
        )
    )
    _freeze(outcome)
    plan: RollbackPlan = outcome["plan"]
    say(
        table(
            f"rollback plan {plan.plan_id}: {plan.scope.describe()}",
            ["record", "decision", "change", "why"],
            [_step(s) for s in plan.steps],
        )
    )
    _rollback(outcome["rollback"])
    report: IncidentReport | None = outcome["report"]
    if report is not None:
        _report(report)
    hardened: HardenResult | None = outcome.get("harden")
    if hardened is not None:
        _harden(hardened)
    checks = outcome["checks"]
    say(
        table(
            "checks",
            ["", "check", "detail"],
            [
                ["[green]✓[/]" if ok else "[red]✗[/]", escape(name), escape(detail)]
                for name, ok, detail in checks
            ],
        )
    )
    verdict = "[green]passed[/]" if outcome["ok"] else "[red]FAILED[/]"
    say(
        f"demo {verdict} in {outcome['seconds']:.1f} s; databases, projection and harden "
        f"output in {escape(str(workdir))}"
    )
    if broker["kind"] == "external":
        say(
            f"explore the log: BACKOUT_BOOTSTRAP={escape(broker['bootstrap'])} "
            f"BACKOUT_TOPIC_PREFIX={escape(outcome['topic_prefix'])} "
            f"backout trace {escape(outcome['incident_run'])}"
        )
    else:
        say(
            "the embedded broker kept the log in memory and is gone; to explore it afterwards "
            "(trace, report, blast-radius), start `backout broker` in another terminal and "
            "run the demo with the BACKOUT_BOOTSTRAP it prints"
        )


def _row(row: dict[str, Any]) -> list[str]:
    kind = row["kind"]
    style = {"blocked": "red", "signal": "yellow", "freeze": "bold red"}.get(
        row["status"] if kind == "action" else kind, ""
    )
    cells = [f"{row['t']:.3f}", row["who"], row["run"], row["what"], row["target"], row["result"]]
    out = [escape(str(c)) for c in cells]
    return [f"[{style}]{c}[/]" for c in out] if style else out


def _step(step: PlanStep) -> list[str]:
    if step.decision is Decision.COMPENSATE:
        args = ", ".join(f"{k}={v!r}" for k, v in step.args.items())
        change = f"{step.tool}({args})"
    elif step.decision is Decision.SUPERSEDED and step.superseded_by is not None:
        change = ", ".join(f"{c.field}: {c.describe_current()} kept" for c in step.changes)
    else:
        change = ", ".join(
            f"{'(record)' if c.field == EXISTS else c.field}: {c.describe_current()} -> "
            f"{c.describe_restore()}"
            for c in step.changes
        )
    why = step.reason.split(" (allowed until")[0]
    return [
        escape(step.record_key or f"({step.tool})"),
        step.decision.value,
        escape(change),
        escape(why),
    ]


def _freeze(outcome: dict[str, Any]) -> None:
    freeze: ControlCommand | None = outcome["freeze"]
    if freeze is None:
        console.print("[red]no freeze of the agent was issued[/]")
        return
    scope = ", ".join(f"{k}={v}" for k, v in sorted(freeze.scope.items()))
    appended = outcome["freeze_appended_at"]
    latency = (appended - freeze.issued_at).total_seconds() * 1000 if appended else None
    lines = [
        ("command", freeze.command_id),
        ("scope / mode", f"{scope} / {freeze.mode.value}"),
        ("reason", freeze.reason),
        ("issuer", f"{freeze.issuer}, signed with key {freeze.key_id}"),
        (
            "applied",
            f"{latency:.0f} ms after the call that triggered it" if latency is not None else "-",
        ),
        ("blocked", ", ".join(outcome["blocked_calls"]) or "-"),
    ]
    console.print(table("the freeze", ["", ""], [[escape(a), escape(b)] for a, b in lines]))


def _rollback(done: RollbackReport) -> None:
    summary = done.summary()
    console.print(table(f"rollback {done.rollback_run}", list(summary), [list(summary.values())]))
    attention = done.of(
        StepOutcome.CONFLICT, StepOutcome.MANUAL, StepOutcome.PENDING, StepOutcome.FAILED
    )
    if attention:
        console.print(
            table(
                "needs a person",
                ["record", "outcome", "detail"],
                [[escape(r.record or ""), r.outcome.value, escape(r.detail)] for r in attention],
            )
        )


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _report(rep: IncidentReport) -> None:
    rows = [
        (
            "time to containment",
            f"{_secs(rep.time_to_containment_s)} (first offending event to freeze applied)",
        ),
        ("detection latency", _secs(rep.detection_latency_s)),
        ("blocked calls", str(rep.blocked_calls)),
        ("records restored", str(rep.records_restored)),
        ("others' writes kept", str(rep.others_writes_kept)),
        ("conflicts", ", ".join(rep.conflicts) or "0"),
        ("manual tasks", ", ".join(rep.open_tasks) or "0"),
        (
            "rollback coverage",
            "-"
            if rep.rollback_coverage is None
            else f"{rep.rollback_coverage:.0%} of {rep.consequential_actions} consequential "
            "actions (before the checkpoint is out of scope)",
        ),
        (
            "rollback success rate",
            "-" if rep.rollback_success_rate is None else f"{rep.rollback_success_rate:.0%}",
        ),
        ("recovery time", _secs(rep.recovery_time_s)),
        (
            "blast radius",
            f"{len(rep.blast.records)} record(s), tenants "
            f"{', '.join(rep.blast.tenants)}, systems {', '.join(rep.blast.systems)}",
        ),
    ]
    console.print(
        table("incident report", ["figure", "value"], [[escape(a), escape(b)] for a, b in rows])
    )


def _harden(result: HardenResult) -> None:
    p = result.proposal
    lines = []
    if p.old is not None:
        lines.append(
            (
                "in force",
                f"froze the run after event {p.old.index} of {len(p.events)} ({p.old.detector})",
            )
        )
    if p.change is not None and p.proposed is not None:
        lines.append(("proposed", p.change.describe()))
        lines.append(
            (
                "would have",
                f"frozen it after event {p.proposed.index} "
                f"({p.proposed.detector}: {p.proposed.summary})",
            )
        )
    for perm in p.permissions:
        for dim, names in perm.allow().items():
            lines.append(
                (
                    f"narrower {dim}",
                    f"{', '.join(names)} (the run also wrote {', '.join(perm.excess[dim])})",
                )
            )
    if "test" in result.files:
        lines.append(("regression test", str(result.files["test"])))
    lines.append(("policy diff", str(result.files["policy_diff"])))
    console.print(table("harden", ["", ""], [[escape(a), escape(b)] for a, b in lines]))


def _command(command: ControlCommand | None) -> dict[str, Any] | None:
    if command is None:
        return None
    data: dict[str, Any] = to_jsonable(command.model_dump(exclude={"signature"}))
    data["signature"] = command.signature.hex() if command.signature else None
    return data


def _as_json(outcome: dict[str, Any], workdir: Path) -> dict[str, Any]:
    plan: RollbackPlan = outcome["plan"]
    done: RollbackReport = outcome["rollback"]
    report: IncidentReport | None = outcome["report"]
    hardened: HardenResult | None = outcome.get("harden")
    return {
        "ok": outcome["ok"],
        "seconds": round(outcome["seconds"], 3),
        "workdir": str(workdir),
        "broker": outcome["broker"],
        "topic_prefix": outcome["topic_prefix"],
        "policy": outcome["policy"],
        "incident_run": outcome["incident_run"],
        "rogue_calls": outcome["rogue_calls"],
        "blocked_calls": outcome["blocked_calls"],
        "timeline": outcome["timeline"],
        "freeze": _command(outcome["freeze"]),
        "freeze_appended_at": to_jsonable(outcome["freeze_appended_at"]),
        "signal": to_jsonable(outcome["signal"]),
        "plan": plan.to_dict(),
        "rollback": {
            "rollback_run": done.rollback_run,
            "summary": done.summary(),
            "results": to_jsonable(list(done.results)),
            "notes": list(done.notes),
        },
        "report": report.to_dict() if report is not None else None,
        "tasks": to_jsonable(outcome["tasks"]),
        "harden": hardened.to_dict() if hardened is not None else None,
        "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in outcome["checks"]],
    }


__all__ = ["Narrator", "render"]
