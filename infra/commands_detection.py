"""Detection commands: ``processors`` (run the stream processors) and ``detect`` (replay)."""

from __future__ import annotations

import gc
import importlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

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
from backout.infra.settings import Settings
from backout.processors.policy import Policy, load_policy, parse_policy
from backout.processors.replay import ReplayResult, read_topic, replay
from backout.processors.replay_file import replay_file
from backout.producers.targets import Target
from backout.schemas.errors import ConfigError
from backout.schemas.signing import SigningKey, load_signing_key

log = logging.getLogger("backout.processors")

_RESTART_BACKOFF_S = 2.0
_SHORT_TOPICS = ("actions", "control", "signals", "quarantine", "dlq")

PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Policy YAML (default: BACKOUT_POLICY_FILE, else the packaged default.yaml).",
        dir_okay=False,
    ),
]


def register(app: typer.Typer) -> None:
    """Add ``processors`` and ``detect`` to ``app``."""
    app.command("processors")(processors)
    app.command("detect")(detect)


def policy_for(path: Path | None, settings: Settings) -> Policy:
    """The policy at ``path``, else ``settings.policy_file``, else the packaged default.

    Raises:
        PolicyError: the file is unreadable or invalid (file, line and field path).
    """
    chosen = path or settings.policy_file
    if chosen is not None:
        return load_policy(chosen)
    text = resources.files("backout.infra").joinpath("policies/default.yaml").read_text("utf-8")
    return parse_policy(text, source="<packaged default.yaml>")


def signing_key_for(settings: Settings) -> SigningKey:
    """The processors' signing key: ``BACKOUT_SIGNING_KEY_FILE``, else ``<state_dir>/signing.key``.

    Raises:
        ConfigError: no key (create one with ``backout keys new``) or not a key.
    """
    path = settings.signing_key_file
    if path is None and (settings.state_dir / "signing.key").exists():
        path = settings.state_dir / "signing.key"
    if path is None:
        raise ConfigError(
            "the processors sign their freezes: set BACKOUT_SIGNING_KEY_FILE "
            "(create a key with `backout keys new`)"
        )
    key = load_signing_key(path)
    if settings.trusted_keys.get(key.key_id) != key.public_b64:
        err_console.print(
            f"warning: key {key.key_id} is not in BACKOUT_TRUSTED_KEYS here; "
            "guards that do not trust it will ignore the processors' freezes"
        )
    return key


def targets_from(spec: str | None) -> list[Target]:
    """The Target objects named by ``module:attr`` (an iterable of Targets, or a callable
    returning one).

    Raises:
        ConfigError: the name does not resolve to Targets.
    """
    if not spec:
        return []
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--targets {spec!r}: use module:attr")
    try:
        found: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--targets {spec!r}: {exc}") from exc
    if callable(found) and not isinstance(found, Iterable):
        found = found()
    targets = list(found) if isinstance(found, Iterable) else [found]
    bad = [t for t in targets if not isinstance(t, Target)]
    if bad:
        raise ConfigError(f"--targets {spec!r}: {bad[0]!r} is not a Target")
    return targets


def processors(
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="Worker processes to run here; they split the partitions "
            "(so do workers started elsewhere with the same topic prefix).",
        ),
    ] = 1,
    policy: PolicyOption = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets", help="module:attr of an iterable of Targets, for supervisor sampling."
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    worker_id: Annotated[str, typer.Option("--worker-id", hidden=True)] = "0",
) -> None:
    """Run the stream processors: every action through the detectors, Signals and signed
    freezes out, per the policy. Runs until Ctrl-C or SIGTERM.

    Example: backout processors --workers 2 --policy infra/policies/strict.yaml
    """
    settings = load_settings()
    chosen = policy_for(policy, settings)  # refuse a bad policy before starting anything
    key = signing_key_for(settings)
    found = targets_from(targets)
    bootstrap = resolve_bootstrap(settings)
    if workers > 1:
        _supervise(workers, policy, targets, log_level)
        return
    _run_one(settings, bootstrap, chosen, key, found, log_level, worker_id)


def _run_one(
    settings: Settings,
    bootstrap: str,
    policy: Policy,
    key: SigningKey,
    targets: list[Target],
    log_level: str,
    worker_id: str,
) -> None:
    from backout.processors.app import Processors, run_worker
    from backout.processors.ledger import ControlLedger

    ledger = ControlLedger(settings, bootstrap).start()
    try:
        worker = Processors(
            settings,
            bootstrap,
            policy,
            key,
            ledger=ledger,
            targets=targets,
            datadir=settings.state_dir / "processors" / f"worker-{worker_id}",
        )
        console.print(
            f"processors worker {worker_id}: policy {policy.name!r}, "
            f"actions {settings.topic('actions')!r}, broker {bootstrap}"
        )
        run_worker(worker, loglevel=log_level)
    finally:
        ledger.close()


def _supervise(workers: int, policy: Path | None, targets: str | None, log_level: str) -> None:
    """Run ``workers`` child processes, restart any that dies, stop all on a signal."""

    def argv(index: int) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "backout.infra.cli",
            "processors",
            "--workers",
            "1",
            "--worker-id",
            str(index),
            "--log-level",
            log_level,
        ]
        if policy is not None:
            args += ["--policy", str(policy)]
        if targets:
            args += ["--targets", targets]
        return args

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    children = {i: subprocess.Popen(argv(i)) for i in range(workers)}
    console.print(
        f"started {workers} processors workers: pids "
        f"{', '.join(str(p.pid) for p in children.values())}"
    )
    try:
        while not stopping:
            time.sleep(0.2)
            for index, child in list(children.items()):
                code = child.poll()
                if code is not None and not stopping:
                    err_console.print(
                        f"worker {index} (pid {child.pid}) exited with {code}; "
                        f"restarting in {_RESTART_BACKOFF_S:g}s"
                    )
                    time.sleep(_RESTART_BACKOFF_S)
                    children[index] = subprocess.Popen(argv(index))
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def detect(
    replay_from: Annotated[
        str,
        typer.Option(
            "--replay",
            help="An Avro container file of ActionEvents, or a topic (actions, or a "
            "full topic name).",
        ),
    ],
    policy: PolicyOption = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Topic replay: from this time (ISO-8601, or a duration ago: 2h)."
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help="Topic replay: up to this time (default: the topic's end now)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="File replay: processes to share the agents over (default: every core).",
        ),
    ] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Replay recorded actions through the detectors and print the findings and the freezes
    they would issue, each with the event at which it fires. Publishes nothing.

    Example: backout detect --replay incident.avro --policy infra/policies/strict.yaml --json
    """
    settings = load_settings()
    chosen = policy_for(policy, settings)
    path = Path(replay_from)
    gc.disable()  # replay allocates millions of objects that all live to the end
    try:
        if path.is_file():
            if since or until:
                raise ConfigError("--since/--until apply to a topic, not to a file")
            result = replay_file(path, chosen, workers=workers)
        elif path.suffix == ".avro" or "/" in replay_from:
            raise ConfigError(f"no file {replay_from!r}")
        else:
            topic = settings.topic(replay_from) if replay_from in _SHORT_TOPICS else replay_from
            events, bad = read_topic(
                settings,
                resolve_bootstrap(settings),
                topic,
                since=parse_time(since) if since else None,
                until=parse_time(until) if until else None,
            )
            result = replay(events, chosen, undecodable=bad)
    finally:
        gc.enable()
    if json_out:
        print_json(result.to_json())
        return
    _print(result)


def _print(result: ReplayResult) -> None:
    data = result.to_json()
    if data["findings"]:
        console.print(
            table(
                "Findings",
                ("#", "event", "detector", "severity", "subject", "summary"),
                (
                    (
                        f["event_index"],
                        f["event_id"],
                        f["detector"],
                        f["severity"],
                        f["subject"],
                        f["summary"],
                    )
                    for f in data["findings"]
                ),
            )
        )
    if data["commands"]:
        console.print(
            table(
                "Commands it would issue",
                ("#", "event", "command", "freeze", "scope", "cause"),
                (
                    (
                        c["event_index"],
                        c["event_id"],
                        c["command_id"],
                        c["mode"],
                        ", ".join(f"{k}={v}" for k, v in c["scope"].items()),
                        c["cause"],
                    )
                    for c in data["commands"]
                ),
            )
        )
    for bad in data["undecodable"]:
        console.print(f"undecodable: {bad['position']}: {bad['reason']}")
    console.print(
        f"{data['events']} events, {len(data['findings'])} findings, "
        f"{len(data['commands'])} commands"
        + (
            f", {data['sampled']} writes sampled for re-check (not re-checked in replay)"
            if data["sampled"]
            else ""
        )
    )
