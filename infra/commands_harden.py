"""``backout harden``: turn an incident run into a regression test and a policy change.

Reads the run (with its child runs) and the baseline from the log without side effects,
then hands them to :mod:`backout.infra.harden` (see there for the search and the
"declared job").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from backout.infra.broker import resolve_bootstrap
from backout.infra.clikit import JSON_OPTION, console, load_settings, parse_time, print_json
from backout.infra.forensics import LogScanner, ReplayFilter, paused_gc, replay
from backout.infra.harden import Containment, propose
from backout.infra.harden_files import HardenResult, read_events, write_outputs
from backout.infra.harden_template import POLICY_ENV
from backout.infra.runlog import load_runs
from backout.infra.settings import Settings
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent, CallStatus, Origin
from backout.schemas.registry import Codec, make_codec


def default_policy_path() -> Path:
    """The bundled default containment policy (``infra/policies/default.yaml``)."""
    return Path(str(resources.files("backout.infra").joinpath("policies", "default.yaml")))


def _read_policy(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"policy {str(path)!r} is not UTF-8 text") from None


def _in_order(events: Sequence[ActionEvent]) -> list[ActionEvent]:
    return sorted(events, key=lambda e: e.occurred_at)


def load_incident(
    scanner: LogScanner, codec: Codec, run: str
) -> tuple[list[ActionEvent], set[str]]:
    """The run tree's events in time order, and its run ids.

    Raises:
        ConfigError: the log has no event of ``run``.
    """
    log = load_runs(scanner, codec, [run], with_control=False, related="rollback")
    if not log.events:
        raise ConfigError(f"unknown run {run!r}: no events of it on the log")
    return [e.event for e in log.events], set(log.runs)


def load_baseline(
    scanner: LogScanner,
    codec: Codec,
    given: Sequence[str],
    *,
    agents: Sequence[str],
    exclude: set[str],
    since: datetime,
) -> list[ActionEvent]:
    """Normal traffic: the runs or Avro files given, else the agents' other runs on the log.

    Automatic baseline: runs of the incident's agents appended since ``since``, outside the
    incident's run tree, with no blocked call and no rollback write.
    """
    events: list[ActionEvent] = []
    if given:
        for item in given:
            path = Path(item)
            if path.suffix == ".avro" or path.is_file():
                events.extend(read_events(path))
                continue
            log = load_runs(scanner, codec, [item], with_control=False, related="rollback")
            if not log.events:
                raise ConfigError(f"--baseline {item!r}: no such run on the log, and no such file")
            events.extend(e.event for e in log.events)
        return _in_order(events)
    topic = scanner.settings.topic("actions")
    by_run: dict[str, list[ActionEvent]] = {}
    for agent in agents:
        for found in replay(scanner, codec, topic, ReplayFilter(agent=agent, since=since)):
            record = found.record
            if isinstance(record, ActionEvent) and record.run_id not in exclude:
                by_run.setdefault(record.run_id, []).append(record)
    for run_events in by_run.values():
        if any(e.status is CallStatus.BLOCKED or e.origin is Origin.ROLLBACK for e in run_events):
            continue
        events.extend(run_events)
    return _in_order(events)


def run_harden(
    settings: Settings,
    run: str,
    out: Path,
    *,
    policy: Path | None = None,
    baseline: Sequence[str] = (),
    since: datetime | None = None,
    bootstrap: str | None = None,
) -> HardenResult:
    """Harden ``run``: read it and its baseline from the log, search, write ``out``.

    Raises:
        ConfigError: unknown run, unreadable policy or baseline, unwritable ``out``.
    """
    policy_path = policy or default_policy_path()
    text = _read_policy(policy_path)
    codec = make_codec(settings.schema_registry_url)
    scanner = LogScanner(settings, bootstrap or resolve_bootstrap(settings))
    with scanner, paused_gc():
        events, tree = load_incident(scanner, codec, run)
        agents = list(dict.fromkeys(e.agent_id for e in events))
        normal = load_baseline(
            scanner, codec, baseline, agents=agents, exclude=tree, since=since or parse_time("7d")
        )
    proposal = propose(
        _in_order(events), text, run_id=run, baseline=normal, source=str(policy_path)
    )
    return write_outputs(proposal, out, policy_path=policy_path, generated_at=datetime.now(UTC))


def _contained(found: Containment | None) -> str:
    if found is None:
        return "never frozen"
    return (
        f"first freeze after event {found.index} ({found.detector} {found.severity}: "
        f"{found.summary})"
    )


def print_result(result: HardenResult) -> None:
    """The harden outcome for people."""
    p = result.proposal
    say = console.print
    say(
        f"run {escape(p.run_id)}: {len(p.events)} events; "
        f"policy {escape(str(result.policy_path))}; "
        f"baseline {len(p.baseline_runs)} run(s), {p.baseline_events} event(s)"
    )
    say(f"in force:   {escape(_contained(p.old))}")
    if p.proposed_by == "limits" and p.change is not None:
        say(f"proposed:   {escape(p.change.describe())}")
    elif p.proposed_by == "permission":
        say("proposed:   the narrower permission below")
    else:
        say("proposed:   no change contains the run earlier")
    say(f"            {escape(_contained(p.proposed))}")
    for candidate, why in p.rejected:
        say(f"rejected:   {escape(candidate.describe())} (would freeze baseline: {escape(why)})")
    for perm in p.permissions:
        excess = "; ".join(f"{d} {', '.join(v)}" for d, v in perm.excess.items() if v)
        if not excess:
            say(f"permission: {escape(perm.agent)} stayed within its declared job")
            continue
        say(f"permission: {escape(perm.agent)} wrote outside its declared job: {escape(excess)}")
        sources = "; ".join(f"{d}: {s}" for d, s in perm.source.items())
        say(f"            declared job from {escape(sources)}")
        for dim, names in perm.allow().items():
            say(
                f"            suggest agents.{escape(perm.agent)}.allow.{dim}: "
                f"[{escape(', '.join(names))}]"
            )
    if any(perm.allow() for perm in p.permissions):
        say(f"            with it too: {escape(_contained(p.with_permission))}")
    for note in p.notes:
        say(f"note: {escape(note)}")
    say("wrote: " + ", ".join(escape(str(f)) for f in result.files.values()))
    diff = result.files["policy_diff"].read_text("utf-8")
    if diff:
        console.print(escape(diff), end="")
    test = result.files.get("test")
    if test is not None:
        say(
            f"check: {POLICY_ENV}={escape(str(result.files['proposed_policy']))} "
            f"pytest {escape(str(test))}"
        )


def harden(
    run: Annotated[str, typer.Argument(help="The incident's run id (child runs included).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the test, events, policies.")],
    policy: Annotated[
        Path | None,
        typer.Option(help="The policy in force (default: the bundled policies/default.yaml)."),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="Normal traffic: a run id on the log or an Avro file of events (repeatable). "
            "Default: the run's agents' other runs on the log without blocked calls.",
        ),
    ] = None,
    since: Annotated[
        str, typer.Option(help="How far back the automatic baseline looks (ISO-8601 or 7d).")
    ] = "7d",
    json_out: bool = JSON_OPTION,
) -> None:
    """Turn an incident into a regression test and a policy change that contains it earlier.

    Writes into --out: the run's events (Avro container), a pytest module asserting the
    first freeze comes by event N, the proposed policy and its diff (the loosest tighter
    limit that contains the run earlier without freezing the baseline), and the narrower
    permission the run's declared job suggests.

    Example: backout harden wf_2026_0042 --out hardening/ --policy policy.yaml
    """
    settings = load_settings()
    result = run_harden(
        settings, run, out, policy=policy, baseline=baseline or (), since=parse_time(since)
    )
    if json_out:
        print_json(result.to_dict())
        return
    print_result(result)


def register(app: typer.Typer) -> None:
    """Add ``harden`` to ``app``."""
    app.command()(harden)


__all__ = ["default_policy_path", "load_baseline", "load_incident", "register", "run_harden"]
