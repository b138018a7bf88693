"""Surgical rollback end to end: a Journal writing a real SQLite table through the real
broker, the projector, and ``backout rollback plan|apply``, ``state``, ``tasks``.

Also the faults: unknown run, empty scope, a log never projected, a target that cannot be
reached, and an executor killed in the middle of a plan.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backout.infra.broker import Broker
from backout.infra.cli import main
from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.producers import Journal, Reversibility, SqlTableTarget
from backout.producers.kafka import KafkaEventSink
from backout.producers.registry import Compensate
from backout.projections.projector import Projector
from backout.projections.store import SqlProjectionStore
from backout.rollback.executor import RollbackExecutor
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.codec import decode
from backout.schemas.events import ControlCommand, FreezeMode
from backout.schemas.signing import new_signing_key
from tests.conftest import fresh_settings
from tests.integration.test_projection import read_all

ERP: dict[str, sa.Engine] = {}
"""The ERP database of the running test (the compensating tool writes to it)."""


def refund(invoice_id: str, amount: int) -> str:
    """The compensating tool of ``charge`` (found by name through --compensators)."""
    with ERP["engine"].begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE invoices SET status = 'open', version = version + 1 "
                "WHERE id = :i AND status = 'charged'"
            ),
            {"i": invoice_id},
        )
    return f"refunded {amount} on {invoice_id}"


COMPENSATORS = {"refund": refund}


def make_erp(path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE invoices (id TEXT PRIMARY KEY, status TEXT, "
                "amount INTEGER, version INTEGER NOT NULL DEFAULT 1)"
            )
        )
        conn.execute(sa.text("CREATE TABLE audit (id TEXT, what TEXT)"))
        for event in ("UPDATE", "INSERT", "DELETE"):
            row = "OLD" if event == "DELETE" else "NEW"
            conn.execute(
                sa.text(
                    f"CREATE TRIGGER audit_{event.lower()} AFTER {event} ON invoices BEGIN "
                    f"INSERT INTO audit VALUES ({row}.id, '{event.lower()}'); END"
                )
            )
        for n in range(1, 8):
            conn.execute(
                sa.text("INSERT INTO invoices (id, status, amount) VALUES (:i, 'open', :a)"),
                {"i": f"inv{n}", "a": n * 100},
            )
        conn.execute(sa.text("DELETE FROM audit"))
    return engine


def rows(engine: sa.Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as conn:
        return {
            r.id: (r.status, r.amount)
            for r in conn.execute(sa.text("SELECT * FROM invoices ORDER BY id"))
        }


def audit(engine: sa.Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT id, what FROM audit"))]


def human(engine: sa.Engine, sql: str) -> None:
    """A person changing the table directly: nothing is journaled."""
    with engine.begin() as conn:
        conn.execute(sa.text(sql))


def write_targets(path: Path, url: str, *, key: str | None = "id") -> Path:
    """A ``--targets`` file naming the invoices table at ``url`` as system ``erp``."""
    text = f'[[targets]]\nsystem = "erp"\nurl = "{url}"\ntable = "invoices"\n'
    if key is not None:
        text += f'key = "{key}"\nversion = "version"\n'
    path.write_text(text)
    return path


@dataclass
class Story:
    settings: Settings
    engine: sa.Engine
    targets_file: Path
    key_id: str

    def store(self) -> SqlProjectionStore:
        """The projection the CLI commands of this story write."""
        return SqlProjectionStore(self.settings.db)


def declare(journal: Journal, engine: sa.Engine) -> dict[str, Any]:
    target = SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")

    def execute(sql: str, **params: Any) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), params)

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=target,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def set_status(invoice_id: str, status: str) -> None:
        execute(
            "UPDATE invoices SET status = :s, version = version + 1 WHERE id = :i",
            s=status,
            i=invoice_id,
        )

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=target,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def create_invoice(invoice_id: str, amount: int) -> None:
        execute(
            "INSERT INTO invoices (id, status, amount) VALUES (:i, 'draft', :a)",
            i=invoice_id,
            a=amount,
        )

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=target,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def delete_invoice(invoice_id: str) -> None:
        execute("DELETE FROM invoices WHERE id = :i", i=invoice_id)

    @journal.tool(
        reversibility=Reversibility.COMPENSATABLE,
        target=target,
        object_id=lambda invoice_id, **_: invoice_id,
        compensation=Compensate(
            tool="refund",
            window=timedelta(days=1),
            args=lambda invoice_id, amount, result: {"invoice_id": invoice_id, "amount": amount},
        ),
    )
    def charge(invoice_id: str, amount: int) -> None:
        execute("UPDATE invoices SET status = 'charged' WHERE id = :i", i=invoice_id)

    @journal.tool(
        reversibility=Reversibility.IRREVERSIBLE,
        target=target,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def send_reminder(invoice_id: str) -> None:
        execute("UPDATE invoices SET status = 'reminded' WHERE id = :i", i=invoice_id)

    return {
        f.__name__: f for f in (set_status, create_invoice, delete_invoice, charge, send_reminder)
    }


def play_incident(settings: Settings, bootstrap: str, engine: sa.Engine) -> None:
    sink = KafkaEventSink(settings, bootstrap)
    journal = Journal(settings, sink=sink, owns=(sink,))
    tools = declare(journal, engine)
    bad = {"agent": "billing-bot", "identity": "svc-billing", "tenant": "acme", "resume": False}
    with journal.run("wf_bad", **bad):
        tools["set_status"]("inv1", "void")
    with journal.run(
        "wf_other", agent="other-bot", identity="svc-other", tenant="acme", resume=False
    ):
        tools["set_status"]("inv1", "paid")  # someone else, in the middle
    with journal.run("wf_bad", **bad):
        tools["set_status"]("inv1", "void")
        tools["create_invoice"]("inv9", 900)
        tools["delete_invoice"]("inv3")
        tools["charge"]("inv4", 400)
        tools["send_reminder"]("inv5")
        tools["set_status"]("inv6", "void")
        with journal.run("wf_bad_child", resume=False):
            tools["set_status"]("inv2", "void")
    journal.close()
    human(engine, "UPDATE invoices SET amount = 999 WHERE id = 'inv2'")
    human(engine, "UPDATE invoices SET status = 'fixed by hand' WHERE id = 'inv6'")


@pytest.fixture
def story(
    kafka_settings: Settings, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Story]:
    engine = make_erp(tmp_path / "erp.db")
    ERP["engine"] = engine
    key = new_signing_key()
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(key.private_pem())
    targets = write_targets(tmp_path / "targets.toml", f"sqlite:///{tmp_path / 'erp.db'}")
    for name, value in (
        ("BOOTSTRAP", broker.bootstrap),
        ("TOPIC_PREFIX", kafka_settings.topic_prefix),
        ("DB", kafka_settings.db),
        ("STATE_DIR", str(tmp_path / "state")),
        ("ACTIONS_PARTITIONS", "3"),
        ("SIGNING_KEY_FILE", str(key_file)),
    ):
        monkeypatch.setenv(f"BACKOUT_{name}", value)
    play_incident(kafka_settings, broker.bootstrap, engine)
    human(engine, "DELETE FROM audit")  # from here on it records the rollback's writes
    yield Story(kafka_settings, engine, targets, key.key_id)
    engine.dispose()
    ERP.clear()


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> Any:
    got = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert got == code, err
    return json.loads(out)


def fail_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    got = main(list(argv))
    out, err = capsys.readouterr()
    assert got == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def apply_argv(story: Story) -> list[str]:
    """``backout rollback apply`` of the bad run with the story's targets and compensators."""
    return [
        "rollback",
        "apply",
        "--run",
        "wf_bad",
        "--targets",
        str(story.targets_file),
        "--compensators",
        "tests.integration.test_rollback:COMPENSATORS",
        "--yes",
    ]


def steps_by(plan: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(s["decision"], s["object_id"]): s for s in plan["steps"]}


def test_plan_shows_every_decision(story: Story, capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, "rollback", "plan", "--run", "wf_bad")
    steps = steps_by(plan)
    assert {k for k in steps if k[0] != "superseded"} == {
        ("restore", "inv1"),
        ("restore", "inv2"),
        ("restore", "inv6"),
        ("delete", "inv9"),
        ("recreate", "inv3"),
        ("compensate", "inv4"),
        ("manual", "inv5"),
    }
    inv1 = steps[("restore", "inv1")]["changes"][0]
    assert (inv1["field"], inv1["current"], inv1["restore_to"]) == ("status", "void", "paid")
    superseded = steps[("superseded", "inv1")]
    assert superseded["superseded_by"]["run_id"] == "wf_other"
    assert steps[("compensate", "inv4")]["tool"] == "refund"
    assert steps[("compensate", "inv4")]["args"] == {"invoice_id": "inv4", "amount": 400}
    saved = story.targets_file.parent / "plan.json"
    assert main(["rollback", "plan", "--run", "wf_bad", "--out", str(saved)]) == 0
    out = capsys.readouterr().out
    for column in ("record", "field", "current", "restore-to", "decision", "why"):
        assert column in out
    assert "erp/inv1" in out and "'paid'" in out
    same = run_json(capsys, "rollback", "plan", "--run", "wf_bad", "--diff", str(saved))
    assert same["diff"] == {"added": [], "removed": [], "changed": []}
    assert "is not a rollback plan" in fail_line(
        capsys, "rollback", "plan", "--run", "wf_bad", "--diff", str(story.targets_file)
    )


def test_apply_is_surgical_and_a_second_apply_writes_nothing(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    args = apply_argv(story)
    result = run_json(capsys, *args, code=1)  # exit 1: one conflict is left for a person
    summary = result["report"]["summary"]
    assert summary == {
        "restored": 4,
        "compensated": 1,
        "conflicts": 1,
        "manual": 1,
        "skipped": summary["skipped"],
        "pending": 0,
        "failed": 0,
    }
    assert rows(story.engine) == {
        "inv1": ("paid", 100),  # back to the other run's value, not to 'open'
        "inv2": ("open", 999),  # status restored; the human's amount kept
        "inv3": ("open", 300),  # recreated as it was
        "inv4": ("open", 400),  # refunded by the compensating tool
        "inv5": ("reminded", 500),  # irreversible: a task, not a write
        "inv6": ("fixed by hand", 600),  # conflict: nothing written
        "inv7": ("open", 700),  # never touched
    }
    conflict = next(r for r in result["report"]["results"] if r["outcome"] == "conflict")
    assert conflict["record"] == "erp/inv6"
    assert conflict["expected"] == {"status": "void"}
    assert conflict["live"] == {"status": "fixed by hand"}
    writes = len(audit(story.engine))

    again = run_json(capsys, *args, code=1)
    assert again["report"]["summary"]["restored"] == 0
    assert again["report"]["summary"]["compensated"] == 0
    assert len(audit(story.engine)) == writes
    decisions = {s["decision"] for s in again["plan"]["steps"]}
    assert "already_undone" in decisions

    tasks = run_json(capsys, "tasks")
    assert [(t["object_id"], t["status"], t["tool"]) for t in tasks] == [
        ("inv5", "open", "send_reminder")
    ]
    freeze_id = tasks[0]["freeze"]
    assert freeze_id.startswith("cmd_")
    freezes = [
        decode(v, ControlCommand) for _, v, _ in read_all(story.settings, _broker(story), "control")
    ]
    assert [(c.command_id, c.scope, c.mode, c.key_id) for c in freezes] == [
        (freeze_id, {"agent": "billing-bot", "tenant": "acme"}, FreezeMode.READ_ONLY, story.key_id)
    ]

    done = run_json(capsys, "tasks", "done", tasks[0]["task_id"], "--note", "called them")
    assert done["status"] == "done"
    assert run_json(capsys, "tasks") == []
    final = run_json(capsys, "rollback", "plan", "--run", "wf_bad")
    assert ("manual", "inv5") not in steps_by(final)
    assert ("already_undone", "inv5") in steps_by(final)


def test_state_shows_a_record_now_and_in_the_past(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    now = run_json(capsys, "state", "erp", "inv1")
    assert now["fields"]["status"] == "void" and now["exists"]
    assert [w["after"] for w in now["writes"] if w["field"] == "status"] == ["void", "paid", "void"]
    second = story.store().record("erp", "inv1").writes[1]  # type: ignore[union-attr]
    past = run_json(capsys, "state", "erp", "inv1", "--at", second.occurred_at.isoformat())
    assert past["fields"]["status"] == "paid"
    deleted = run_json(capsys, "state", "erp", "inv3")
    assert deleted["exists"] is False
    assert "no record erp/nope" in fail_line(capsys, "state", "erp", "nope")
    assert main(["state", "erp", "inv1"]) == 0
    assert "erp/inv1" in capsys.readouterr().out


def test_unreachable_target_leaves_steps_pending(
    story: Story, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = write_targets(tmp_path / "gone.toml", "sqlite:////nonexistent/dir/erp.db", key=None)
    before = rows(story.engine)
    result = run_json(
        capsys, "rollback", "apply", "--run", "wf_bad", "--targets", str(gone), "--yes", code=1
    )
    report = result["report"]
    assert report["pending_systems"] == ["erp"]
    assert report["summary"]["pending"] == 5 and report["summary"]["restored"] == 0
    assert rows(story.engine) == before
    steps = story.store().steps(report["plan_id"])
    assert all(s.status == "started" for s in steps.values() if s.outcome is None)
    assert not [s for s in steps.values() if s.outcome in ("applied", "already")]
    assert main(["rollback", "apply", "--run", "wf_bad", "--targets", str(gone), "--yes"]) == 1
    assert "pending (not done; run again when reachable): erp" in capsys.readouterr().out


def test_executor_killed_mid_plan_resumes_without_repeating_a_step(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = story.settings
    store = SqlProjectionStore(settings.db)
    with Projector(settings, settings.bootstrap or "", store=store) as projector:
        projector.catch_up(timeout=60)
    scope = RollbackScope(run="wf_bad")
    plan = plan_rollback(store.load(scope), scope, now=datetime.now(UTC))
    store.engine.dispose()
    target = SqlTableTarget(story.engine, "invoices", key="id", version="version", system="erp")
    pid = os.fork()
    if pid == 0:  # the executor's process, killed after its third step's write
        try:
            sink = _DyingSink(settings, settings.bootstrap or "", die_at=9)
            RollbackExecutor(settings, sink=sink, targets=[target], batch_size=1).apply(plan)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    done_before = audit(story.engine)
    assert done_before, "the killed executor wrote nothing: the test proves nothing"
    result = run_json(capsys, *apply_argv(story), code=1)
    writes = audit(story.engine)
    assert len(writes) == len(set(writes)), f"a record was written twice: {writes}"
    assert result["report"]["summary"]["failed"] == 0
    assert rows(story.engine)["inv1"] == ("paid", 100)


class _DyingSink(KafkaEventSink):
    """A sink whose process dies (no flush) at its n-th publish."""

    def __init__(self, settings: Settings, bootstrap: str, *, die_at: int) -> None:
        super().__init__(settings, bootstrap, background=True)
        self.count, self.die_at = 0, die_at

    def publish(self, topic: str, key: bytes | None, value: bytes, **options: Any) -> Any:
        self.count += 1
        if self.count >= self.die_at:
            os._exit(9)
        return super().publish(topic, key, value, **options)


def _broker(story: Story) -> Broker:
    return Broker(story.settings.bootstrap or "", "external")


def test_bad_input_is_one_clear_line(
    story: Story,
    capsys: pytest.CaptureFixture[str],
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "unknown run 'nope'" in fail_line(capsys, "rollback", "plan", "--run", "nope")
    assert "empty scope" in fail_line(capsys, "rollback", "plan")
    assert "empty scope" in fail_line(capsys, "rollback", "apply", "--yes")
    assert "no checkpoint 'zz'" in fail_line(
        capsys, "rollback", "plan", "--run", "wf_bad", "--after-checkpoint", "zz"
    )
    assert "no journaled tool calls" in fail_line(capsys, "rollback", "plan", "--agent", "ghost")
    assert "names no target" in fail_line(capsys, "rollback", "apply", "--run", "wf_bad", "--yes")
    assert "not interactive" in fail_line(
        capsys, "rollback", "apply", "--run", "wf_bad", "--targets", str(story.targets_file)
    )
    assert "cannot import" in fail_line(
        capsys, "rollback", "apply", "--run", "wf_bad", "--targets", "no_such_module:x", "--yes"
    )
    # A log that was never projected (an empty topic): a clear message, exit 1.
    empty = fresh_settings(broker.bootstrap, tmp_path / "empty")
    ensure_topics(empty, broker.bootstrap)
    monkeypatch.setenv("BACKOUT_TOPIC_PREFIX", empty.topic_prefix)
    monkeypatch.setenv("BACKOUT_DB", f"sqlite:///{tmp_path / 'empty.db'}")
    assert "nothing projected" in fail_line(capsys, "rollback", "plan", "--run", "wf_bad")


def test_project_once_and_rebuild(story: Story, capsys: pytest.CaptureFixture[str]) -> None:
    first = run_json(capsys, "project", "--once")
    assert first["events"] > 10 and first["projection"]["records"] == 7
    again = run_json(capsys, "project", "--once")
    assert again["events"] == 0
    rebuilt = run_json(capsys, "project", "--once", "--rebuild")
    assert rebuilt["events"] == first["events"]
    assert rebuilt["projection"] == first["projection"]


def test_every_command_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["project"],
        ["state"],
        ["rollback", "plan"],
        ["rollback", "apply"],
        ["tasks"],
        ["tasks", "done"],
    ):
        assert main([*argv, "--help"]) == 0
        assert "Example: backout" in capsys.readouterr().out


def test_project_runs_as_a_service_until_sigterm(story: Story, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = Path(sys.executable).parent / "backout"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "backout.infra.cli"]
    proc = subprocess.Popen(
        [*command, "project", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        store = story.store()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if store.counts()["events"] >= 17:
                    break
            except Exception:  # the tables may not exist yet
                pass
            time.sleep(0.2)
        assert store.counts()["events"] >= 17
        store.engine.dispose()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "projecting" in out and "stopped" in out
