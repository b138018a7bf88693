"""``backout up``: the development stack in one foreground command. [adapter]

Starts, in order: the broker (``BACKOUT_BOOTSTRAP`` when set, else the embedded one, whose
address is recorded in ``state_dir`` so other commands in this directory find it), the
topics, then each service in :data:`SERVICES` whose command the CLI has, as a child process
(``python -m backout.infra.cli <command>``) with its output prefixed by its name. When
``metrics_port`` is set, the stack serves the incident figures there (a
:class:`~backout.infra.metrics.MetricsTap` over the topics) and gives each service the next
port up for its own metrics.

Ctrl-C or SIGTERM stops everything: services get SIGTERM (then SIGKILL after a grace
period), the metrics server and the broker stop, the state file is removed. A service that
exits on its own stops the stack with exit code 1. Adding a service is one line in
:data:`SERVICES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import IO

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from backout.infra.broker import (
    Broker,
    BrokerUnavailable,
    forget_running,
    kafka_config,
    record_running,
    resolve_bootstrap,
    start_embedded,
)
from backout.infra.settings import Settings
from backout.infra.topics import EnsureResult, ensure_topics
from backout.schemas.errors import ConfigError

__all__ = ["SERVICES", "Service", "Stack", "available_services", "run_stack"]


@dataclass(frozen=True)
class Service:
    """A long-running part of the stack: a ``backout`` sub-command run as a child process."""

    name: str
    command: tuple[str, ...]
    """The ``backout`` arguments that run it in the foreground."""


SERVICES: tuple[Service, ...] = (
    Service("processors", ("processors",)),
    Service("projector", ("project",)),
)
"""What ``backout up`` runs after the broker and topics, in order."""

REACH_S = 5.0
"""How long `up` waits for an external broker to answer before giving up."""
GRACE_S = 10.0
"""How long a service may take to stop after SIGTERM before it is killed."""


def _cli_commands() -> set[str]:
    from backout.infra.cli import COMMAND_MODULES

    return {name for names in COMMAND_MODULES.values() for name in names}


def available_services(
    wanted: Mapping[str, bool] | None = None,
) -> tuple[list[Service], list[Service]]:
    """(services the CLI can run, services it cannot run yet), among the wanted ones."""
    commands = _cli_commands()
    run: list[Service] = []
    missing: list[Service] = []
    for service in SERVICES:
        if wanted is not None and not wanted.get(service.name, True):
            continue
        (run if service.command[0] in commands else missing).append(service)
    return run, missing


def _recorded_broker(settings: Settings) -> str | None:
    """The address of a live embedded broker recorded in ``state_dir``, if any."""
    try:
        return resolve_bootstrap(settings.model_copy(update={"bootstrap": None}))
    except BrokerUnavailable:
        return None


def _death_signal() -> Callable[[], None] | None:
    """A function that asks Linux to SIGTERM the calling process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``), so services never outlive a killed ``backout up``.

    It is looked up here, in the parent: between fork and exec the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    service: Service
    proc: subprocess.Popen[bytes]
    pump: threading.Thread


@dataclass
class Stack:
    """A running stack; :func:`run_stack` drives it."""

    settings: Settings
    say: Callable[[str], None]
    broker: Broker | None = None
    children: list[_Child] = field(default_factory=list)
    metrics_port: int | None = None
    tap: object | None = None
    _signing_env: dict[str, str] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_broker(self) -> str:
        if self.settings.bootstrap:
            self.broker = Broker(self.settings.bootstrap, "external")
            self.say(f"broker: {self.broker.bootstrap} (BACKOUT_BOOTSTRAP)")
        else:
            running = _recorded_broker(self.settings)
            if running is not None:
                raise ConfigError(
                    f"an embedded broker started here is already running at {running} "
                    f"(see {self.settings.state_dir}); use it with BACKOUT_BOOTSTRAP={running} "
                    "backout up, or stop it first"
                )
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.broker = start_embedded(log_path=self.settings.state_dir / "broker.log")
            except BrokerUnavailable as exc:
                raise ConfigError(
                    f"{exc}. Point backout at a Kafka broker instead: "
                    "BACKOUT_BOOTSTRAP=host:port backout up"
                ) from exc
            record_running(self.settings, self.broker)
            self.say(
                f"broker: {self.broker.bootstrap} (embedded, pid {self.broker.pid}); "
                f"elsewhere: export BACKOUT_BOOTSTRAP={self.broker.bootstrap}"
            )
        return self.broker.bootstrap

    def start_metrics(self, bootstrap: str) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        from backout.infra.metrics import Metrics, MetricsTap, serve

        metrics = Metrics()
        serve(metrics, port)
        self.metrics_port = port
        self.tap = MetricsTap(self.settings, bootstrap, metrics).start()
        self.say(f"metrics: http://127.0.0.1:{port}/metrics")

    def child_env(self, bootstrap: str, index: int) -> dict[str, str]:
        # The services read their Settings from the environment like any entrypoint:
        # hand them this one, pointed at the stack's broker.
        env = dict(os.environ)
        env["BACKOUT_BOOTSTRAP"] = bootstrap
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.signing_env())
        env.pop("BACKOUT_METRICS_PORT", None)
        if self.metrics_port is not None:
            env["BACKOUT_METRICS_PORT"] = str(self.metrics_port + 1 + index)
        return env

    def signing_env(self) -> dict[str, str]:
        """Signing settings for the services: the configured key, or a development key.

        The processors sign their freezes. Without ``BACKOUT_SIGNING_KEY_FILE`` the stack
        makes (once) a key in the state directory and trusts it, so the development stack
        works out of the box; agents elsewhere must trust it too (printed at start).
        """
        if self._signing_env is not None:
            return self._signing_env
        if self.settings.signing_key_file is not None:
            self._signing_env = {}
            return self._signing_env
        from backout.schemas.signing import load_signing_key, new_signing_key

        path = self.settings.state_dir / "dev-signing-key.pem"
        if path.exists():
            key = load_signing_key(path)
        else:
            key = new_signing_key()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(key.private_pem())
            path.chmod(0o600)
        trusted = {**self.settings.trusted_keys, key.key_id: key.public_b64}
        self._signing_env = {"BACKOUT_SIGNING_KEY_FILE": str(path.resolve()),
                             "BACKOUT_TRUSTED_KEYS": json.dumps(trusted)}
        self.say(f"signing: development key {key.key_id} ({path}); agents trust it with "
                 f"export BACKOUT_TRUSTED_KEYS='{json.dumps(trusted)}'")
        return self._signing_env

    def start_service(self, service: Service, bootstrap: str, index: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backout.infra.cli", *service.command],
            env=self.child_env(bootstrap, index),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops the services in order
            preexec_fn=_death_signal(),
        )
        assert proc.stdout is not None
        pump = threading.Thread(
            target=self._pump,
            args=(service.name, proc.stdout),
            name=f"backout-up-{service.name}",
            daemon=True,
        )
        pump.start()
        self.children.append(_Child(service, proc, pump))
        extra = (
            f", metrics on port {self.metrics_port + 1 + index}"
            if self.metrics_port is not None
            else ""
        )
        self.say(f"{service.name}: started (pid {proc.pid}{extra})")

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.say(f"[{name}] {raw.decode('utf-8', 'replace').rstrip()}")
        stream.close()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def watch(self, poll: float = 0.2) -> int:
        """Wait for a stop request; 1 when a part of the stack died first."""
        while not self._stop.wait(poll):
            for child in self.children:
                code = child.proc.poll()
                if code is not None:
                    self.say(f"{child.service.name} exited with code {code}; stopping the stack")
                    return 1
            handle = self.broker._handle if self.broker is not None else None
            if isinstance(handle, subprocess.Popen) and handle.poll() is not None:
                self.say(f"the embedded broker exited with code {handle.returncode}; stopping")
                return 1
        return 0

    def stop(self) -> None:
        """Stop the services, the metrics and the broker (each step even if one fails)."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in reversed(self.children):
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.say(f"{child.service.name} did not stop in {GRACE_S:g}s: killed")
                child.proc.kill()
                child.proc.wait(5)
            child.pump.join(2)
            self.say(f"{child.service.name}: stopped (code {child.proc.returncode})")
        if self.tap is not None:
            self.tap.close()  # type: ignore[attr-defined]
        if self.metrics_port is not None:
            from backout.infra.metrics import stop_serving

            stop_serving(self.metrics_port)
        if self.broker is not None and self.broker.kind == "embedded":
            forget_running(self.settings)
            self.broker.stop()
            self.say("broker: stopped")


def _install_handlers(stack: Stack) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to a clean stop; returns how to restore the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        stack.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def run_stack(
    settings: Settings,
    *,
    processors: bool = True,
    projector: bool = True,
    say: Callable[[str], None] | None = None,
) -> int:
    """Run the stack until Ctrl-C or SIGTERM; returns the exit code.

    Raises:
        ConfigError: the embedded broker cannot start (and no BACKOUT_BOOTSTRAP), or the
            broker cannot be reached.
    """
    out = say or _say
    stack = Stack(settings, out)
    restore = _install_handlers(stack)
    try:
        bootstrap = stack.start_broker()
        created = [r.topic for r in _ensure_topics(settings, bootstrap) if r.created]
        out(f"topics: {settings.topic_prefix}* ready ({len(created)} created)")
        stack.start_metrics(bootstrap)
        run, missing = available_services({"processors": processors, "projector": projector})
        for service in missing:
            out(
                f"{service.name}: not available in this installation (no `backout "
                f"{service.command[0]}` command); skipped"
            )
        for index, service in enumerate(run):
            stack.start_service(service, bootstrap, index)
        out("backout up: ready; Ctrl-C stops everything")
        code = stack.watch()
    except KeyboardInterrupt:
        code = 0
    finally:
        try:
            stack.stop()
        finally:
            restore()
    out("backout up: stopped")
    return code


def _ensure_topics(settings: Settings, bootstrap: str) -> list[EnsureResult]:
    try:
        # A quick look first: an unreachable broker is reported in seconds, not at the
        # end of topic provisioning's longer timeout.
        AdminClient(kafka_config(settings, bootstrap)).list_topics(timeout=REACH_S)
        return ensure_topics(settings, bootstrap)
    except KafkaException as exc:
        raise ConfigError(f"cannot reach the broker at {bootstrap}: {exc.args[0].str()}") from exc


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
