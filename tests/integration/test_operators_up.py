"""``backout up`` as a real foreground process: broker, topics, services, metrics; Ctrl-C
and SIGTERM stop everything cleanly."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from backout.infra.broker import Broker, free_port
from backout.infra.stack import SERVICES, available_services


class Up:
    """A running ``backout up`` and the lines it printed."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backout.infra.cli", "up"],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 90.0) -> str:
        """The first line (printed so far or from now on) that holds ``text``."""
        for line in self.lines:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, "\n".join(self.lines)
                continue
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in:\n" + "\n".join(self.lines))

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(60)
        self.wait_for("backout up: stopped", timeout=10)
        return code


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env["BACKOUT_STATE_DIR"] = str(tmp_path / "state")
    env["BACKOUT_TOPIC_PREFIX"] = f"up{uuid.uuid4().hex[:8]}."
    env["BACKOUT_DB"] = f"sqlite:///{tmp_path / 'projection.db'}"
    return env


@pytest.fixture
def started() -> Iterator[list[Up]]:
    ups: list[Up] = []
    yield ups
    for up in ups:
        up.close()


def test_up_on_the_embedded_broker_and_ctrl_c(tmp_path: Path, started: list[Up]) -> None:
    env = base_env(tmp_path)
    port = free_port()
    env["BACKOUT_METRICS_PORT"] = str(port)
    up = Up(env, tmp_path)
    started.append(up)
    broker_line = up.wait_for("broker: ")
    up.wait_for("backout up: ready")
    state = json.loads((tmp_path / "state" / "broker.json").read_text())
    assert state["bootstrap"] in broker_line and "(embedded" in broker_line
    admin = AdminClient({"bootstrap.servers": state["bootstrap"]})
    topics = admin.list_topics(timeout=10).topics
    assert all(
        f"{env['BACKOUT_TOPIC_PREFIX']}{t}" in topics
        for t in ("actions", "control", "signals", "quarantine", "dlq")
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert b"backout_rollback_coverage_ratio" in reply.read()
    second = subprocess.run(
        [sys.executable, "-m", "backout.infra.cli", "up"],
        env={**env, "BACKOUT_METRICS_PORT": str(free_port())},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and "already running at" in second.stderr
    running, _ = available_services()
    service_pids = [
        int(up.wait_for(f"{s.name}: started").split("pid ")[1].split(")")[0].split(",")[0])
        for s in running
    ]
    assert up.stop(signal.SIGINT) == 0
    assert not (tmp_path / "state" / "broker.json").exists()
    assert not _alive(state["pid"])
    assert not any(_alive(pid) for pid in service_pids)
    assert "broker: stopped" in "\n".join(up.lines)


def test_up_on_an_external_broker_and_sigterm(
    tmp_path: Path, broker: Broker, started: list[Up]
) -> None:
    env = base_env(tmp_path)
    env["BACKOUT_BOOTSTRAP"] = broker.bootstrap
    up = Up(env, tmp_path)
    started.append(up)
    assert "(BACKOUT_BOOTSTRAP)" in up.wait_for("broker: ")
    up.wait_for("backout up: ready")
    assert up.stop(signal.SIGTERM) == 0
    assert "broker: stopped" not in "\n".join(up.lines)  # an external broker is left alone


def test_up_says_why_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env["BACKOUT_BOOTSTRAP"] = f"127.0.0.1:{free_port()}"
    env["BACKOUT_KAFKA"] = json.dumps({"socket.connection.setup.timeout.ms": "1000"})
    done = subprocess.run(
        [sys.executable, "-m", "backout.infra.cli", "up"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "cannot reach the broker" in done.stderr and "Traceback" not in done.stderr


def test_services_are_declared_by_command() -> None:
    names = {s.name: s.command[0] for s in SERVICES}
    assert names == {"processors": "processors", "projector": "project"}
    running, missing = available_services()
    assert {s.name for s in running} | {s.name for s in missing} == set(names)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): check its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
