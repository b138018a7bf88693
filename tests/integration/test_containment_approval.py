"""Approval gates on a real broker: the CLI decides, and a killed agent's successor finds
its pending request again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backout.infra.broker import Broker
from backout.infra.cli import main
from backout.infra.settings import Settings
from backout.producers.journal import Journal
from backout.schemas.codec import decode
from backout.schemas.errors import ApprovalDenied
from backout.schemas.events import ActionEvent, CallStatus, EventKind, Reversibility
from tests.containment_helpers import Commands, cli_env, containment_settings, read_all, wait_until

AGENT = """
from backout.infra.settings import Settings
from backout.producers.journal import Journal
from backout.schemas.events import Reversibility

journal = Journal.from_settings(Settings())

@journal.tool(reversibility=Reversibility.IRREVERSIBLE, system="bank",
              object_id=lambda order, **_: order,
              requires_approval=lambda amount, **_: amount > 500)
def refund(order: str, amount: int) -> str:
    return f"refunded {amount}"

with journal.run(agent="billing-bot", identity="svc-billing"):
    with journal.idempotency_key("refund-o1"):
        print(refund("o1", 800), flush=True)
"""


@pytest.fixture
def settings(broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    ops = Commands(issued_at=datetime.now(UTC))
    made = containment_settings(broker.bootstrap, tmp_path, ops, approval_timeout_s=60.0)
    for name, value in cli_env(made).items():
        monkeypatch.setenv(name, value)
    return made


def journal_with_refund(settings: Settings) -> tuple[Journal, Any]:
    journal = Journal.from_settings(settings)

    @journal.tool(
        reversibility=Reversibility.IRREVERSIBLE,
        system="bank",
        object_id=lambda order, **_: order,
        requires_approval=lambda amount, **_: amount > 500,
    )
    def refund(order: str, amount: int) -> str:
        return f"refunded {amount}"

    return journal, refund


def approval_events(settings: Settings, kind: EventKind) -> list[ActionEvent]:
    events = [
        decode(m.value(), ActionEvent)
        for m in read_all(settings, settings.bootstrap or "", "actions")
    ]
    return [e for e in events if e.kind is kind]


def call_in_thread(journal: Journal, refund: Any, amount: int) -> tuple[threading.Thread, dict]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with (
                journal.run(agent="billing-bot", identity="svc-billing"),
                journal.idempotency_key("refund-o1"),
            ):
                out["result"] = refund("o1", amount)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_operator_approves_with_narrowed_args_through_the_cli(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    journal, refund = journal_with_refund(settings)
    try:
        thread, out = call_in_thread(journal, refund, 800)
        wait_until(lambda: approval_events(settings, EventKind.APPROVAL_REQUESTED), 15.0)
        request = approval_events(settings, EventKind.APPROVAL_REQUESTED)[0]
        assert request.status is CallStatus.PENDING
        assert main(["approve", request.event_id, "--args", '{"amount": 500}', "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["refers_to"] == request.event_id
        thread.join(15)
        assert out == {"result": "refunded 500"}
    finally:
        journal.close()
    decided = approval_events(settings, EventKind.APPROVAL_DECIDED)
    assert decided[0].approved_args == {"order": "o1", "amount": 500}
    tool_call = approval_events(settings, EventKind.TOOL_CALL)[0]
    assert tool_call.approved_args == {"amount": 500} and tool_call.requested_args["amount"] == 800


def test_operator_denies_through_the_cli(settings: Settings) -> None:
    journal, refund = journal_with_refund(settings)
    try:
        thread, out = call_in_thread(journal, refund, 900)
        wait_until(lambda: approval_events(settings, EventKind.APPROVAL_REQUESTED), 15.0)
        request = approval_events(settings, EventKind.APPROVAL_REQUESTED)[0]
        assert main(["deny", request.event_id, "--reason", "too much"]) == 0
        thread.join(15)
        assert isinstance(out["error"], ApprovalDenied) and "too much" in str(out["error"])
    finally:
        journal.close()


def test_a_killed_agents_successor_finds_the_pending_request(settings: Settings) -> None:
    script = Path(settings.state_dir).parent / "agent.py"
    script.write_text(textwrap.dedent(AGENT))
    agent = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: approval_events(settings, EventKind.APPROVAL_REQUESTED), 30.0)
    finally:
        os.kill(agent.pid, signal.SIGKILL)  # the agent process dies while waiting
        agent.wait(10)
    request = approval_events(settings, EventKind.APPROVAL_REQUESTED)[0]

    journal, refund = journal_with_refund(settings)
    try:
        thread, out = call_in_thread(journal, refund, 800)
        time.sleep(1.5)  # the successor looks the request up and waits on it
        assert thread.is_alive() and out == {}
        assert main(["approve", request.event_id]) == 0
        thread.join(15)
        assert out == {"result": "refunded 800"}
    finally:
        journal.close()
    assert len(approval_events(settings, EventKind.APPROVAL_REQUESTED)) == 1
