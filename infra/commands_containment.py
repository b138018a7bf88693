"""Containment commands: ``keys new``, ``freeze``, ``lift``, ``freezes``, ``approve``,
``deny``, ``control-audit`` (``release`` and ``discard`` are in ``commands_quarantine``).

Control commands are signed with the key in ``BACKOUT_SIGNING_KEY_FILE`` (``backout keys
new`` makes one) and published to the control topic; guards trust the public keys in
``BACKOUT_TRUSTED_KEYS``. ``release`` and ``discard`` append markers to the quarantine
topic and journal one ActionEvent (origin human) each.
"""

from __future__ import annotations

import json
import os
import queue
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import JsonValue

from backout.infra.broker import resolve_bootstrap
from backout.infra.clikit import (
    JSON_OPTION,
    console,
    err_console,
    load_settings,
    print_json,
    print_json_line,
    table,
)
from backout.infra.settings import Settings
from backout.producers.freezes import GLOBAL_SCOPE, Freeze, Outcome, malformed_reason, scope_key
from backout.producers.guard import ControlGuard
from backout.producers.kafka import KafkaEventSink
from backout.producers.scope import SCOPE_DIMENSIONS
from backout.schemas.errors import ConfigError, ControlError
from backout.schemas.events import ControlAction, ControlCommand, FreezeMode
from backout.schemas.registry import make_codec
from backout.schemas.signing import SigningKey, load_signing_key, new_signing_key, sign

keys_app = typer.Typer(help="Signing keys for control commands.", no_args_is_help=True)

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Tool = Annotated[str | None, typer.Option("--tool", help="Scope: tool name.")]
Agent = Annotated[str | None, typer.Option("--agent", help="Scope: agent id.")]
Identity = Annotated[str | None, typer.Option("--identity", help="Scope: identity used.")]
Run = Annotated[str | None, typer.Option("--run", help="Scope: run id (and its child runs).")]
Workflow = Annotated[str | None, typer.Option("--workflow", help="Scope: workflow.")]
Tenant = Annotated[str | None, typer.Option("--tenant", help="Scope: tenant.")]
Environment = Annotated[str | None, typer.Option("--environment", help="Scope: environment.")]
Issuer = Annotated[
    str | None, typer.Option("--issuer", help="Who issues it (default: the signing key id).")
]


# --- helpers ------------------------------------------------------------------------------
def _signing_key(settings: Settings) -> SigningKey:
    if settings.signing_key_file is None:
        raise ConfigError(
            "no signing key: set BACKOUT_SIGNING_KEY_FILE (create one with `backout keys new`)"
        )
    key = load_signing_key(settings.signing_key_file)
    if settings.trusted_keys.get(key.key_id) != key.public_b64:
        err_console.print(
            f"warning: key {key.key_id} is not in BACKOUT_TRUSTED_KEYS here; guards that do "
            "not trust it will ignore this command"
        )
    return key


def _publish(settings: Settings, command: ControlCommand) -> dict[str, Any]:
    """Sign and publish a command; returns what to print."""
    key = _signing_key(settings)
    if not command.issuer:
        command = command.model_copy(update={"issuer": key.key_id})
    signed = sign(command, key)
    bootstrap = resolve_bootstrap(settings)
    sink = KafkaEventSink(settings, bootstrap, config={"linger.ms": 0})
    try:
        published = sink.publish(
            settings.topic("control"),
            scope_key(signed.scope or {"refers_to": signed.refers_to or ""}).encode(),
            make_codec(settings.schema_registry_url).encode(signed),
        )
    finally:
        sink.close()
    data: dict[str, Any] = {
        "command_id": signed.command_id,
        "action": signed.action.value,
        "issuer": signed.issuer,
        "key_id": signed.key_id,
        "offset": published.offset,
    }
    if signed.action is ControlAction.FREEZE:
        data.update(scope=signed.scope, mode=signed.mode.value, expires_at=signed.expires_at)
    else:
        data["refers_to"] = signed.refers_to
    if signed.approved_args is not None:
        data["approved_args"] = signed.approved_args
    return data


def _command(action: ControlAction, **fields: Any) -> ControlCommand:
    return ControlCommand(
        command_id=f"cmd_{uuid.uuid4().hex}",
        issued_at=datetime.now(UTC),
        action=action,
        **fields,
    )


def _scope(**given: str | None) -> dict[str, str]:
    return {k: v for k, v in given.items() if v is not None and k in SCOPE_DIMENSIONS}


def parse_expiry(text: str, *, now: datetime | None = None) -> datetime:
    """A duration from now (``30m``, ``2h``, ``1d``) or an ISO-8601 time, in the future.

    Raises:
        ConfigError: neither form, or not in the future.
    """
    now = now or datetime.now(UTC)
    text = text.strip()
    if text and text[-1] in _DURATION and text[:-1].replace(".", "", 1).isdigit():
        when = now + timedelta(seconds=float(text[:-1]) * _DURATION[text[-1]])
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"bad expiry {text!r}: use a duration (30m, 2h, 1d) or ISO-8601"
            ) from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when <= now:
        raise ConfigError(f"expiry {text!r} is not in the future")
    return when


def control_view(settings: Settings) -> ControlGuard:
    """A guard synced with the control topic (the current freezes); ControlError if not."""
    guard = ControlGuard(settings, resolve_bootstrap(settings)).start(timeout=15.0)
    if not guard.synced:
        guard.close()
        raise ControlError(f"cannot read the control topic {settings.topic('control')!r}")
    return guard


def _freeze_row(freeze: Freeze) -> list[Any]:
    return [
        freeze.command_id,
        "ALL" if freeze.is_global else scope_key(freeze.scope_map),
        freeze.mode.value,
        freeze.reason,
        freeze.issuer,
        freeze.issued_at.isoformat(timespec="seconds"),
        freeze.expires_at.isoformat(timespec="seconds") if freeze.expires_at else "",
    ]


def _freeze_json(freeze: Freeze) -> dict[str, Any]:
    return {
        "command_id": freeze.command_id,
        "scope": freeze.scope_map,
        "mode": freeze.mode.value,
        "reason": freeze.reason,
        "issuer": freeze.issuer,
        "cause": freeze.cause,
        "issued_at": freeze.issued_at,
        "expires_at": freeze.expires_at,
        "key_id": freeze.key_id,
        "position": freeze.position,
    }


def _say(data: dict[str, Any], json_out: bool, line: str) -> None:
    if json_out:
        print_json(data)
    else:
        console.print(line)


# --- commands -------------------------------------------------------------------------------
@keys_app.command("new")
def keys_new(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write the private key (default: the "
            "BACKOUT_SIGNING_KEY_FILE setting, else <state_dir>/signing.key).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """Create an Ed25519 key pair for signing control commands.

    The private key goes to a file readable only by you; add the printed public key to
    BACKOUT_TRUSTED_KEYS of every agent, consumer and processor. Give agents no key.

    Example: backout keys new --out ~/.backout/oncall.key
    """
    settings = load_settings()
    path = out or settings.signing_key_file or settings.state_dir / "signing.key"
    if path.exists() and not force:
        raise ConfigError(f"{str(path)!r} exists; pass --force to overwrite it")
    key = new_signing_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_pem())
    os.chmod(path, 0o600)
    trusted = {**settings.trusted_keys, key.key_id: key.public_b64}
    data = {
        "key_id": key.key_id,
        "public_key": key.public_b64,
        "path": str(path),
        "trusted_keys": trusted,
    }
    if json_out:
        print_json(data)
        return
    console.print(f"key {key.key_id} written to {path}")
    console.print(f"export BACKOUT_SIGNING_KEY_FILE={path}")
    console.print(f"export BACKOUT_TRUSTED_KEYS='{json.dumps(trusted)}'")


def freeze(
    tool: Tool = None,
    agent: Agent = None,
    identity: Identity = None,
    run: Run = None,
    workflow: Workflow = None,
    tenant: Tenant = None,
    environment: Environment = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Global stop: every call everywhere.")
    ] = False,
    mode: Annotated[
        FreezeMode, typer.Option("--mode", help="halt, read_only or quarantine_identity.")
    ] = FreezeMode.HALT,
    reason: Annotated[str, typer.Option("--reason", help="Why (shown to blocked callers).")] = "",
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lift itself after 30m, 2h, ... or at a time.")
    ] = None,
    cause: Annotated[
        str | None, typer.Option("--cause", help="The signal or incident id behind it.")
    ] = None,
    issuer: Issuer = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Freeze a scope: every agent and downstream consumer refuses calls in it at once.

    Example: backout freeze --agent billing-bot --tenant acme --mode halt --reason "refund loop"
    """
    settings = load_settings()
    scope = _scope(
        tool=tool,
        agent=agent,
        identity=identity,
        run=run,
        workflow=workflow,
        tenant=tenant,
        environment=environment,
    )
    if everything:
        if scope:
            raise ConfigError("--all is a global stop; it takes no other scope option")
        scope = dict(GLOBAL_SCOPE)
    if not scope:
        raise ConfigError("give a scope (--agent, --tenant, ...) or --all for a global stop")
    if mode is FreezeMode.QUARANTINE_IDENTITY and set(scope) != {"identity"}:
        raise ConfigError("--mode quarantine_identity takes --identity and no other scope")
    if not reason:
        raise ConfigError("give a --reason: blocked callers and the audit trail show it")
    command = _command(
        ControlAction.FREEZE,
        scope=scope,
        mode=mode,
        reason=reason,
        issuer=issuer or "",
        cause=cause,
        expires_at=parse_expiry(expires) if expires else None,
    )
    problem = malformed_reason(command)
    if problem is not None:
        raise ConfigError(f"bad freeze: {problem}")
    data = _publish(settings, command)
    _say(
        data,
        json_out,
        f"frozen: {data['command_id']} ({mode.value} on "
        f"{'ALL' if everything else scope_key(scope)})",
    )


def lift(
    ids: Annotated[list[str] | None, typer.Argument(help="Freeze command ids to lift.")] = None,
    tool: Tool = None,
    agent: Agent = None,
    identity: Identity = None,
    run: Run = None,
    workflow: Workflow = None,
    tenant: Tenant = None,
    environment: Environment = None,
    everything: Annotated[bool, typer.Option("--all", help="Lift the global stop(s).")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why it is safe again.")] = "",
    issuer: Issuer = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Lift freezes by id, or every active freeze whose scope is exactly the one given.

    Example: backout lift cmd_5f2c... --reason "rolled back"   |   backout lift --agent billing-bot
    """
    settings = load_settings()
    scope = _scope(
        tool=tool,
        agent=agent,
        identity=identity,
        run=run,
        workflow=workflow,
        tenant=tenant,
        environment=environment,
    )
    if everything:
        scope = dict(GLOBAL_SCOPE)
    targets = list(ids or [])
    if scope:
        guard = control_view(settings)
        try:
            targets += [f.command_id for f in guard.freezes() if f.scope_map == scope]
        finally:
            guard.close()
        if not targets:
            raise ConfigError(f"no active freeze has exactly the scope {scope_key(scope)}")
    if not targets:
        raise ConfigError("give freeze ids, or a scope (--agent ...) to lift")
    lifted = [
        _publish(
            settings,
            _command(ControlAction.LIFT, refers_to=target, reason=reason, issuer=issuer or ""),
        )
        for target in dict.fromkeys(targets)
    ]
    if json_out:
        print_json(lifted)
        return
    for data in lifted:
        console.print(f"lifted: {data['refers_to']} (by {data['command_id']})")


def freezes(json_out: bool = JSON_OPTION) -> None:
    """List the freezes in force now (signatures checked, expired ones left out).

    Example: backout freezes --json
    """
    settings = load_settings()
    guard = control_view(settings)
    try:
        active = guard.freezes()
    finally:
        guard.close()
    if json_out:
        print_json([_freeze_json(f) for f in active])
        return
    if not active:
        console.print("no active freezes")
        return
    console.print(
        table(
            f"{len(active)} active freeze(s)",
            ["id", "scope", "mode", "reason", "issuer", "issued", "expires"],
            [_freeze_row(f) for f in active],
        )
    )


def approve(
    request_id: Annotated[str, typer.Argument(help="The approval request id (apr_...).")],
    args: Annotated[
        str | None,
        typer.Option("--args", help='Narrowed arguments as a JSON object, e.g. {"amount": 500}.'),
    ] = None,
    reason: Annotated[str, typer.Option("--reason")] = "",
    issuer: Issuer = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Approve a call waiting at an approval gate, optionally narrowing its arguments.

    Example: backout approve apr_4f1e... --args '{"amount": 500}'
    """
    settings = load_settings()
    approved: dict[str, JsonValue] | None = None
    if args is not None:
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--args is not JSON: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("--args must be a JSON object of argument names to values")
        approved = parsed
    data = _publish(
        settings,
        _command(
            ControlAction.APPROVE,
            refers_to=request_id,
            approved_args=approved,
            reason=reason,
            issuer=issuer or "",
        ),
    )
    _say(data, json_out, f"approved: {request_id} (by {data['command_id']})")


def deny(
    request_id: Annotated[str, typer.Argument(help="The approval request id (apr_...).")],
    reason: Annotated[str, typer.Option("--reason")] = "",
    issuer: Issuer = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Deny a call waiting at an approval gate.

    Example: backout deny apr_4f1e... --reason "refund too large"
    """
    settings = load_settings()
    data = _publish(
        settings,
        _command(ControlAction.DENY, refers_to=request_id, reason=reason, issuer=issuer or ""),
    )
    _say(data, json_out, f"denied: {request_id} (by {data['command_id']})")


def control_audit(
    once: Annotated[
        bool, typer.Option("--once", help="Check the history, report, and exit.")
    ] = False,
    json_out: bool = JSON_OPTION,
) -> None:
    """Verify every control command and publish a control_integrity Signal for each invalid
    one (unsigned, forged, replayed, expired, malformed). Run one per cluster: agents'
    guards do not report, and signal ids repeat for the same record, so a second auditor
    or a restart only repeats ids that signal consumers drop.

    Example: backout control-audit --once --json
    """
    settings = load_settings()
    found: queue.Queue[Outcome] = queue.Queue()
    guard = ControlGuard(
        settings, resolve_bootstrap(settings), report_invalid=True, on_invalid=found.put
    )
    guard.start(timeout=120.0)
    reported: list[dict[str, Any]] = []
    try:
        if not guard.synced:
            raise ControlError(f"cannot read the control topic {settings.topic('control')!r}")
        while True:
            try:
                outcome = found.get(timeout=0.2)
            except queue.Empty:
                if once:
                    break
                continue
            item = {
                "verdict": outcome.verdict.value,
                "position": outcome.position,
                "command_id": outcome.command_id,
                "reason": outcome.reason,
            }
            reported.append(item)
            if json_out and not once:
                print_json_line(item)
            elif not json_out:
                console.print(
                    f"{outcome.verdict.value}: {outcome.position} "
                    f"{outcome.command_id or ''} {outcome.reason}"
                )
    except KeyboardInterrupt:
        pass
    finally:
        guard.close()
    if once and json_out:
        print_json(reported)
    elif once and not reported:
        console.print("no invalid control commands")


def register(app: typer.Typer) -> None:
    """Add the containment commands to ``app``."""
    app.add_typer(keys_app, name="keys")
    app.command()(freeze)
    app.command()(lift)
    app.command()(freezes)
    app.command()(approve)
    app.command()(deny)
    app.command("control-audit")(control_audit)
