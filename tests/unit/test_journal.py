"""The Journal on fakes: every call of a declared tool becomes one ActionEvent.

InMemoryEventSink stands in for Kafka, SinkCompletedCalls for the log scan of resumed runs,
and a real SqlTableTarget on a SQLite file captures before/after images.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backout.infra.settings import Settings
from backout.producers import (
    CallScope,
    Compensate,
    Frozen,
    InMemoryEventSink,
    Journal,
    Pending,
    PublishError,
    Reversibility,
    SqlTableTarget,
    TargetUnavailable,
)
from backout.producers.completed import SinkCompletedCalls
from backout.producers.sink import Headers, Published
from backout.schemas import ActionEvent, decode
from backout.schemas.errors import ConfigError
from backout.schemas.events import CallStatus, EventKind, Origin, RecordImage, TargetRef
from backout.schemas.registry import make_codec

ACTIONS = "backout.actions"


def make_settings(**extra: Any) -> Settings:
    values: dict[str, Any] = {
        "bootstrap": None,
        "topic_prefix": "backout.",
        "delivery": "confirm",
        "environment": "production",
        "schema_registry_url": None,
    }
    values.update(extra)
    return Settings(**values)


class FlakySink(InMemoryEventSink):
    """An InMemoryEventSink whose publishes fail while ``failing`` says so."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()
        """What fails: "tool" (tool-call events), "run" (lifecycle facts) or "all"."""

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        headers: Headers | None = None,
        confirm: bool = True,
    ) -> Published:
        event = decode(value, ActionEvent)
        kind = "tool" if event.kind is EventKind.TOOL_CALL else "run"
        if "all" in self.failing or kind in self.failing:
            raise PublishError("broker unreachable (test)", retryable=True)
        return super().publish(topic, key, value, headers=headers, confirm=confirm)


class RecordingGuard:
    """A CallGuard fake: records every scope it sees, freezes the tools it is told to."""

    def __init__(self) -> None:
        self.seen: list[CallScope] = []
        self.frozen_tools: dict[str, str] = {}

    def check(self, call: CallScope) -> None:
        self.seen.append(call)
        command = self.frozen_tools.get(call.tool)
        if command is not None:
            raise Frozen(
                f"{call.tool!r} is frozen by {command}", command_id=command, reason="incident 7"
            )


@dataclasses.dataclass
class World:
    """A journal on fakes, the invoices table and a counter of real side effects."""

    journal: Journal
    sink: FlakySink
    engine: sa.Engine
    target: SqlTableTarget
    guard: RecordingGuard
    effects: list[str]

    def events(self, kind: EventKind | None = EventKind.TOOL_CALL) -> list[ActionEvent]:
        out = [decode(r.value, ActionEvent) for r in self.sink.on(ACTIONS)]
        return [e for e in out if kind is None or e.kind is kind]

    def event(self) -> ActionEvent:
        (only,) = self.events()
        return only

    def row(self, invoice_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT * FROM invoices WHERE id = :id"), {"id": invoice_id}
            ).mappings()
            first = found.first()
            return dict(first) if first is not None else None


def new_journal(sink: InMemoryEventSink, guard: RecordingGuard | None, **settings: Any) -> Journal:
    cfg = make_settings(**settings)
    completed = SinkCompletedCalls(sink, make_codec(None), cfg.topic("actions"))
    return Journal(cfg, sink=sink, guard=guard, completed_calls=completed)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'erp.db'}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE invoices (id TEXT PRIMARY KEY, status TEXT, amount INTEGER, "
                "version INTEGER NOT NULL DEFAULT 1)"
            )
        )
        conn.execute(sa.text("INSERT INTO invoices VALUES ('inv1', 'open', 100, 1)"))
        conn.execute(sa.text("INSERT INTO invoices VALUES ('inv2', 'paid', 250, 4)"))
    sink = FlakySink()
    guard = RecordingGuard()
    journal = new_journal(sink, guard)
    target = SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")
    yield World(journal, sink, engine, target, guard, [])
    journal.close()
    engine.dispose()


def declare_invoice_tools(w: World, journal: Journal | None = None) -> dict[str, Any]:
    """The invoice tools of these tests, declared on ``journal`` (default: the world's)."""
    j = journal or w.journal
    by_id = {"object_id": lambda invoice_id, **_: invoice_id}

    @j.tool(reversibility=Reversibility.REVERSIBLE, target=w.target, **by_id)
    def set_status(invoice_id: str, status: str) -> dict[str, Any]:
        w.effects.append(f"set_status {invoice_id} {status}")
        with w.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE invoices SET status = :s, version = version + 1 WHERE id = :i"),
                {"s": status, "i": invoice_id},
            )
        return {"invoice": invoice_id, "status": status, "ok": True}

    @j.tool(reversibility="reversible", target=w.target, **by_id)
    def create_invoice(invoice_id: str, amount: int) -> None:
        w.effects.append(f"create {invoice_id}")
        with w.engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO invoices (id, status, amount) VALUES (:i, 'draft', :a)"),
                {"i": invoice_id, "a": amount},
            )

    @j.tool(reversibility="reversible", target=w.target, **by_id)
    def delete_invoice(invoice_id: str) -> None:
        w.effects.append(f"delete {invoice_id}")
        with w.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM invoices WHERE id = :i"), {"i": invoice_id})

    return {"set_status": set_status, "create": create_invoice, "delete": delete_invoice}


# --- images and versions -----------------------------------------------------------------------
def test_before_and_after_images_and_versions(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run(
        "wf_1", agent="billing-agent", identity="svc-billing", tenant="acme", workflow="dunning"
    ):
        result = tools["set_status"]("inv1", status="void")
    assert result == {"invoice": "inv1", "status": "void", "ok": True}
    event = world.event()
    assert event.kind is EventKind.TOOL_CALL and event.status is CallStatus.SUCCEEDED
    assert event.tool == "set_status" and event.reversibility is Reversibility.REVERSIBLE
    assert event.target == TargetRef(system="erp", object_id="inv1")
    assert event.before == RecordImage(
        exists=True, fields={"status": "open", "amount": 100}, version=1
    )
    assert event.after == RecordImage(
        exists=True, fields={"status": "void", "amount": 100}, version=2
    )
    assert event.requested_args == {"invoice_id": "inv1", "status": "void"}
    assert event.result == {"invoice": "inv1", "status": "void", "ok": True}
    assert event.compensation is not None and event.compensation.strategy == "restore_fields"
    assert (event.run_id, event.agent_id, event.identity) == (
        "wf_1",
        "billing-agent",
        "svc-billing",
    )
    assert (event.tenant, event.workflow, event.environment) == ("acme", "dunning", "production")
    assert event.origin is Origin.AGENT and event.error is None and event.is_write
    assert datetime.now(UTC) - event.occurred_at < timedelta(seconds=30)
    # Keyed by the target record; every record on the actions topic.
    tool_records = [r for r in world.sink.records if r.key == b"erp/inv1"]
    assert len(tool_records) == 1 and tool_records[0].topic == ACTIONS
    assert {r.topic for r in world.sink.records} == {ACTIONS}


def test_run_lifecycle_events_are_keyed_by_run(world: World) -> None:
    with world.journal.run("wf_2", agent="a", identity="i", resume=False):
        pass
    kinds = [(e.kind, e.status) for e in world.events(None)]
    assert kinds == [
        (EventKind.RUN_STARTED, CallStatus.SUCCEEDED),
        (EventKind.RUN_FINISHED, CallStatus.SUCCEEDED),
    ]
    assert [r.key for r in world.sink.records] == [b"wf_2", b"wf_2"]


def test_a_run_that_raises_finishes_failed(world: World) -> None:
    with pytest.raises(RuntimeError), world.journal.run("wf_3", agent="a", identity="i"):
        raise RuntimeError("agent crashed")
    finished = world.events(EventKind.RUN_FINISHED)[0]
    assert finished.status is CallStatus.FAILED
    assert finished.error is not None and finished.error.type == "RuntimeError"


def test_create_has_an_absent_before_image(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run(agent="a", identity="i"):
        tools["create"]("inv9", 42)
    event = world.event()
    assert event.before == RecordImage(exists=False, fields={}, version=None)
    assert event.after == RecordImage(
        exists=True, fields={"status": "draft", "amount": 42}, version=1
    )


def test_delete_has_an_absent_after_image(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run(agent="a", identity="i"):
        tools["delete"]("inv2")
    event = world.event()
    assert event.before == RecordImage(
        exists=True, fields={"status": "paid", "amount": 250}, version=4
    )
    assert event.after == RecordImage(exists=False)
    assert world.row("inv2") is None


# --- failures -------------------------------------------------------------------------------
def test_a_failed_call_is_journaled_and_reraised(world: World) -> None:
    boom = ValueError("amount must be positive")

    @world.journal.tool(
        reversibility="reversible", target=world.target, object_id=lambda invoice_id: invoice_id
    )
    def charge(invoice_id: str) -> None:
        with world.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE invoices SET amount = -1 WHERE id = :i"), {"i": invoice_id}
            )
        raise boom

    with world.journal.run(agent="a", identity="i"), pytest.raises(ValueError) as info:
        charge("inv1")
    assert info.value is boom
    event = world.event()
    assert event.status is CallStatus.FAILED
    assert event.error is not None
    assert (event.error.type, event.error.message, event.error.retryable) == (
        "ValueError",
        "amount must be positive",
        None,
    )
    # What the failing call left behind is captured too.
    assert event.after is not None and event.after.fields["amount"] == -1
    assert not event.is_write


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError("read timed out"),
        ConnectionError("connection reset"),
        ConnectionResetError("reset by peer"),
        TargetUnavailable("erp: down"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_timeouts_and_lost_connections_are_in_doubt(world: World, exc: Exception) -> None:
    @world.journal.tool(reversibility="irreversible", system="mail", object_id=lambda to: to)
    def send(to: str) -> None:
        raise exc

    with world.journal.run(agent="a", identity="i"), pytest.raises(type(exc)) as info:
        send("bob@example.com")
    assert info.value is exc
    event = world.event()
    assert event.status is CallStatus.UNKNOWN
    assert event.error is not None and event.error.type == type(exc).__name__
    assert event.error.retryable is True
    assert event.is_write  # in doubt: it may have changed the target
    assert event.target == TargetRef(system="mail", object_id="bob@example.com")


# --- async tools ----------------------------------------------------------------------------
async def test_async_tools(world: World) -> None:
    @world.journal.tool(
        reversibility="reversible",
        target=world.target,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    async def set_amount(invoice_id: str, amount: int) -> int:
        await asyncio.sleep(0)
        with world.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE invoices SET amount = :a, version = version + 1 WHERE id = :i"),
                {"a": amount, "i": invoice_id},
            )
        return amount

    @world.journal.tool(reversibility="irreversible", system="mail", object_id=lambda to: to)
    async def send(to: str) -> None:
        await asyncio.sleep(0)
        raise TimeoutError("smtp")

    @world.journal.tool(reversibility="read_only")
    async def failing_lookup(q: str) -> None:
        raise KeyError(q)

    async with world.journal.run("async-run", agent="a", identity="i"):
        assert await set_amount("inv1", 5) == 5
        with pytest.raises(TimeoutError):
            await send("x@example.com")
        with pytest.raises(KeyError):
            await failing_lookup("q")
        results = await asyncio.gather(set_amount("inv2", 7), set_amount("inv1", 8))
    assert results == [7, 8]
    events = world.events()
    assert [e.status for e in events[:3]] == [
        CallStatus.SUCCEEDED,
        CallStatus.UNKNOWN,
        CallStatus.FAILED,
    ]
    first = events[0]
    assert first.before is not None and first.before.fields["amount"] == 100
    assert first.after is not None and first.after.fields["amount"] == 5
    assert first.after.version == 2 and first.result == 5
    assert sorted(e.step_id for e in events) == [f"async-run:{n}" for n in range(1, 6)]
    assert [e.kind for e in world.events(None)][-1] is EventKind.RUN_FINISHED


async def test_async_tools_in_background_mode(tmp_path: Path) -> None:
    sink = InMemoryEventSink()
    journal = new_journal(sink, None, delivery="background")

    @journal.tool(reversibility="read_only")
    async def ping(n: int) -> int:
        return n + 1

    with journal.run(agent="a", identity="i"):
        assert await ping(1) == 2
    journal.close()
    assert sum(1 for r in sink.on(ACTIONS) if r.key is not None) == 3


# --- nesting ------------------------------------------------------------------------------------
def test_nested_runs(world: World) -> None:
    tools = declare_invoice_tools(world)
    j = world.journal
    with j.run("parent", agent="planner", identity="svc", tenant="acme", workflow="wf"):
        tools["set_status"]("inv1", "void")
        with j.run("child", agent="worker"):
            tools["set_status"]("inv2", "void")
            with j.run("grandchild", tenant="globex"):
                assert j.current_run() is not None
                assert j.current_run().ancestors == ("child", "parent")  # type: ignore[union-attr]
                tools["set_status"]("inv1", "open")
        assert j.current_run() is not None and j.current_run().run_id == "parent"  # type: ignore[union-attr]
    assert j.current_run() is None

    parent_call, child_call, grandchild_call = world.events()
    assert parent_call.parent_run_id is None and parent_call.parent_step_id is None
    assert child_call.run_id == "child" and child_call.parent_run_id == "parent"
    # A child run's first call is caused by the parent's last step.
    assert child_call.parent_step_id == parent_call.step_id == "parent:1"
    assert child_call.step_id == "child:1"
    # Children inherit what they do not override.
    assert (child_call.agent_id, child_call.identity, child_call.tenant) == (
        "worker",
        "svc",
        "acme",
    )
    assert child_call.workflow == "wf"
    assert grandchild_call.parent_run_id == "child"
    assert (grandchild_call.agent_id, grandchild_call.tenant) == ("worker", "globex")
    scopes = {s.run: s.ancestor_runs for s in world.guard.seen}
    assert scopes == {"parent": (), "child": ("parent",), "grandchild": ("child", "parent")}
    started = world.events(EventKind.RUN_STARTED)
    assert [(e.run_id, e.parent_run_id) for e in started] == [
        ("parent", None),
        ("child", "parent"),
        ("grandchild", "child"),
    ]


def test_nested_calls_get_the_outer_step_as_parent(world: World) -> None:
    tools = declare_invoice_tools(world)

    @world.journal.tool(reversibility="irreversible", system="erp", object_id=lambda batch: batch)
    def void_all(batch: str) -> int:
        tools["set_status"]("inv1", "void")
        tools["set_status"]("inv2", "void")
        return 2

    with world.journal.run("r", agent="a", identity="i"):
        void_all("b1")
        tools["set_status"]("inv1", "open")
    inner1, inner2, outer, after = world.events()
    assert outer.tool == "void_all" and outer.step_id == "r:1"
    assert (inner1.step_id, inner2.step_id) == ("r:2", "r:3")
    assert inner1.parent_step_id == inner2.parent_step_id == "r:1"
    assert outer.parent_step_id is None
    assert after.step_id == "r:4" and after.parent_step_id is None


def test_step_ids_and_checkpoints(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run("r", agent="a", identity="i"):
        tools["set_status"]("inv1", "a")
        checkpoint = world.journal.checkpoint("before-bulk")
        tools["set_status"]("inv1", "b")
    assert checkpoint == "r:2"
    assert [e.step_id for e in world.events()] == ["r:1", "r:3"]
    (mark,) = world.events(EventKind.CHECKPOINT)
    assert mark.step_id == "r:2" and mark.labels == {"checkpoint": "before-bulk"}
    assert mark.status is CallStatus.SUCCEEDED and not mark.is_write


# --- idempotency and resume ---------------------------------------------------------------------
def test_idempotency_keys(world: World) -> None:
    tools = declare_invoice_tools(world)

    @world.journal.tool(
        reversibility="irreversible",
        system="payments",
        object_id=lambda order_id, **_: order_id,
        idempotency_key=lambda order_id, amount: f"pay-{order_id}-{amount}",
    )
    def pay(order_id: str, amount: int) -> None: ...

    with world.journal.run("r", agent="a", identity="i"):
        tools["set_status"]("inv1", "a")
        pay("o1", 5)
        with world.journal.idempotency_key("caller-key-1"):
            tools["set_status"]("inv1", "b")
        tools["set_status"]("inv1", "c")
    assert [e.idempotency_key for e in world.events()] == [
        "r:1",
        "pay-o1-5",
        "caller-key-1",
        "r:4",
    ]


def test_resume_returns_the_recorded_result_without_running_again(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run("wf_42", agent="a", identity="i"):
        first = tools["set_status"]("inv1", "void")
    assert world.effects == ["set_status inv1 void"]

    # The agent's process "crashes" and the run is replayed with the same run id.
    with world.journal.run("wf_42", agent="a", identity="i"):
        again = tools["set_status"]("inv1", "void")
        tools["set_status"]("inv2", "void")  # a new step: it runs
    assert again == first == {"invoice": "inv1", "status": "void", "ok": True}
    assert world.effects == ["set_status inv1 void", "set_status inv2 void"]
    assert [e.step_id for e in world.events()] == ["wf_42:1", "wf_42:2"]
    assert world.row("inv1") == {"id": "inv1", "status": "void", "amount": 100, "version": 2}


def test_a_new_journal_on_the_same_log_resumes(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run("wf_7", agent="a", identity="i"):
        tools["set_status"]("inv1", "void")
        with world.journal.idempotency_key("custom"):
            tools["set_status"]("inv2", "void")

    restarted = new_journal(world.sink, None)
    again = declare_invoice_tools(world, restarted)
    with restarted.run("wf_7", agent="a", identity="i"):
        assert again["set_status"]("inv1", "void")["ok"] is True
        with restarted.idempotency_key("custom"):
            again["set_status"]("inv2", "void")
    assert world.effects == ["set_status inv1 void", "set_status inv2 void"]
    restarted.close()


def test_failed_calls_run_again_on_resume(world: World) -> None:
    attempts: list[int] = []

    @world.journal.tool(reversibility="irreversible", system="mail", object_id=lambda to: to)
    def send(to: str) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("smtp said no")
        return "sent"

    with pytest.raises(RuntimeError), world.journal.run("wf_r", agent="a", identity="i"):
        send("bob")
    with world.journal.run("wf_r", agent="a", identity="i"):
        assert send("bob") == "sent"
    assert len(attempts) == 2


def test_resume_false_and_fresh_runs_always_execute(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run("wf_x", agent="a", identity="i"):
        tools["set_status"]("inv1", "void")
    with world.journal.run("wf_x", agent="a", identity="i", resume=False):
        tools["set_status"]("inv1", "void")
    with world.journal.run(agent="a", identity="i"):  # a fresh run id
        tools["set_status"]("inv1", "void")
    assert len(world.effects) == 3
    fresh = world.events()[-1]
    assert fresh.run_id.startswith("run_") and fresh.run_id != "wf_x"


def test_resuming_needs_a_completed_calls_source(world: World) -> None:
    journal = Journal(make_settings(), sink=InMemoryEventSink())

    @journal.tool(reversibility="read_only")
    def look() -> None: ...

    with journal.run(agent="a", identity="i"):
        look()  # a fresh run does not look anything up
    with (
        journal.run("named", agent="a", identity="i"),
        pytest.raises(ConfigError, match="cannot resume"),
    ):
        look()


# --- pending, compensation, annotations ------------------------------------------------------
def test_pending_jobs(world: World) -> None:
    @world.journal.tool(reversibility="irreversible", system="batch", object_id=lambda name: name)
    def start_export(name: str) -> Pending:
        return Pending(job_id="job-123", result={"accepted": True})

    with world.journal.run(agent="a", identity="i"):
        assert start_export("nightly") == {"accepted": True}
    event = world.event()
    assert event.status is CallStatus.PENDING and event.job_id == "job-123"
    assert event.result == {"accepted": True} and event.is_write


def test_compensation_is_recorded_with_its_window(world: World) -> None:
    @world.journal.tool(
        reversibility="compensatable",
        system="payments",
        object_id=lambda order_id, **_: order_id,
        compensation=Compensate(
            tool="cancel_refund",
            args=lambda order_id, amount, result: {"refund_id": result, "amount": amount},
            window=timedelta(hours=2),
        ),
        value=lambda amount, **_: amount,
    )
    def refund(order_id: str, amount: int) -> str:
        return "rf-1"

    @world.journal.tool(reversibility="irreversible", system="mail", object_id=lambda to: to)
    def send(to: str) -> None: ...

    @world.journal.tool(reversibility="read_only")
    def lookup(to: str) -> None: ...

    with world.journal.run(agent="a", identity="i"):
        refund("o-9", 30)
        send("bob")
        lookup("bob")
    refunded, sent, looked = world.events()
    assert refunded.compensation is not None
    assert refunded.compensation.strategy == "compensating_tool"
    assert refunded.compensation.tool == "cancel_refund"
    assert refunded.compensation.args == {"refund_id": "rf-1", "amount": 30}
    assert refunded.compensation.allowed_until == refunded.occurred_at + timedelta(hours=2)
    assert refunded.value == 30.0 and isinstance(refunded.value, float)
    assert sent.compensation is not None and sent.compensation.strategy == "manual"
    assert looked.compensation is None and looked.target is None
    assert looked.reversibility is Reversibility.READ_ONLY and not looked.is_write


def test_a_failing_value_extractor_fails_before_the_side_effect(world: World) -> None:
    ran: list[int] = []

    @world.journal.tool(
        reversibility="irreversible",
        system="payments",
        object_id=lambda order_id, **_: order_id,
        value=lambda amount, **_: amount["cents"],
    )
    def pay(order_id: str, amount: Any) -> None:
        ran.append(1)

    with world.journal.run(agent="a", identity="i"), pytest.raises(TypeError):
        pay("o-1", 5)
    assert ran == [] and world.events() == []


def test_a_failing_compensation_builder_still_journals_the_call(world: World) -> None:
    @world.journal.tool(
        reversibility="compensatable",
        system="payments",
        object_id=lambda order_id, **_: order_id,
        compensation=Compensate("cancel_refund", lambda order_id, result: {"id": result["id"]}),
    )
    def refund(order_id: str) -> Any:
        raise ValueError("gateway said no")

    with world.journal.run(agent="a", identity="i"), pytest.raises(ValueError, match="gateway"):
        refund("o-2")  # the builder cannot index result=None; the tool's error still surfaces
    event = world.event()
    assert event.status is CallStatus.FAILED and event.error is not None
    assert event.error.type == "ValueError"
    assert event.compensation is not None and event.compensation.strategy == "manual"
    assert event.compensation.tool == "cancel_refund"
    assert event.compensation.allowed_until is not None
    assert event.labels["compensation_error"].startswith("TypeError")


def test_annotations(world: World) -> None:
    tools = declare_invoice_tools(world)
    j = world.journal
    with j.run(agent="a", identity="i"):
        with j.annotate(
            confidence=0.35,
            reasoning="the customer seemed to ask for a void",
            correlation_id="ticket-77",
            labels={"uncertainty": "parse_failure"},
        ):
            tools["set_status"]("inv1", "void")
        tools["set_status"]("inv2", "void")
    noted, plain = world.events()
    assert noted.confidence == 0.35
    assert noted.reasoning_summary == "the customer seemed to ask for a void"
    assert noted.correlation_id == "ticket-77"
    assert noted.labels == {"uncertainty": "parse_failure"}
    assert (plain.confidence, plain.reasoning_summary, plain.correlation_id) == (None, None, None)
    assert plain.labels == {} and plain.value is None


def test_arguments_and_results_become_json(world: World) -> None:
    @dataclasses.dataclass
    class Line:
        sku: str
        qty: int

    @world.journal.tool(reversibility="read_only")
    def quote(lines: list[Line], when: datetime, tags: tuple[str, ...]) -> dict[str, Any]:
        return {"total": 1.0, "lines": lines}

    when = datetime(2026, 1, 1, tzinfo=UTC)
    with world.journal.run(agent="a", identity="i"):
        quote([Line("a", 2)], when, ("x", "y"))
    event = world.event()
    assert event.requested_args == {
        "lines": [{"sku": "a", "qty": 2}],
        "when": "2026-01-01T00:00:00+00:00",
        "tags": ["x", "y"],
    }
    assert event.result == {"total": 1.0, "lines": [{"sku": "a", "qty": 2}]}


# --- guard ------------------------------------------------------------------------------------
def test_a_frozen_call_is_blocked_journaled_and_not_executed(world: World) -> None:
    tools = declare_invoice_tools(world)
    world.guard.frozen_tools["set_status"] = "cmd-freeze-1"
    with world.journal.run("r", agent="billing", identity="svc", tenant="acme"):
        with pytest.raises(Frozen) as info:
            tools["set_status"]("inv1", "void")
        tools["delete"]("inv2")  # other tools still run
    assert info.value.command_id == "cmd-freeze-1" and info.value.reason == "incident 7"
    assert world.effects == ["delete inv2"]
    assert world.row("inv1") == {"id": "inv1", "status": "open", "amount": 100, "version": 1}
    blocked, deleted = world.events()
    assert blocked.status is CallStatus.BLOCKED and blocked.blocked_by == "cmd-freeze-1"
    assert blocked.error is not None and blocked.error.type == "Frozen"
    assert blocked.target == TargetRef(system="erp", object_id="inv1")
    assert blocked.before is None and blocked.after is None and blocked.compensation is None
    assert not blocked.is_write
    assert deleted.status is CallStatus.SUCCEEDED
    scope = world.guard.seen[0]
    assert scope == CallScope(
        tool="set_status",
        agent="billing",
        identity="svc",
        run="r",
        ancestor_runs=(),
        workflow=None,
        tenant="acme",
        environment="production",
        reversibility=Reversibility.REVERSIBLE,
    )


async def test_a_frozen_async_call_is_not_executed(world: World) -> None:
    ran: list[int] = []

    @world.journal.tool(reversibility="irreversible", system="mail", object_id=lambda to: to)
    async def send(to: str) -> None:
        ran.append(1)

    world.guard.frozen_tools["send"] = "cmd-2"
    with world.journal.run(agent="a", identity="i"), pytest.raises(Frozen):
        await send("bob")
    assert ran == [] and world.event().status is CallStatus.BLOCKED


# --- publish failures --------------------------------------------------------------------------
def test_publish_failure_after_the_side_effect_says_the_tool_ran(world: World) -> None:
    tools = declare_invoice_tools(world)
    with pytest.raises(PublishError) as info, world.journal.run("r", agent="a", identity="i"):
        world.sink.failing = {"all"}  # the broker goes away mid-run
        tools["set_status"]("inv1", "void")
    error = info.value
    # The exception that reaches the caller is the tool's, not the run_finished one.
    assert error.side_effect_done is True and error.retryable is True
    assert "'set_status' already ran" in str(error)
    assert "status succeeded" in str(error)
    assert world.effects == ["set_status inv1 void"]
    row = world.row("inv1")
    assert row is not None and row["status"] == "void"
    assert any("run_finished" in note for note in getattr(error, "__notes__", []))


def test_publish_failure_of_a_failed_call_mentions_both(world: World) -> None:
    @world.journal.tool(reversibility="irreversible", system="mail", object_id=lambda to: to)
    def send(to: str) -> None:
        raise ValueError("bad address")

    with world.journal.run("r", agent="a", identity="i"):
        world.sink.failing = {"tool"}
        with pytest.raises(PublishError) as info:
            send("bob")
    assert info.value.side_effect_done is True
    assert "the tool itself raised ValueError" in str(info.value)
    assert isinstance(info.value.__cause__, PublishError)


def test_publish_failure_of_a_blocked_call_is_not_a_side_effect(world: World) -> None:
    tools = declare_invoice_tools(world)
    world.guard.frozen_tools["set_status"] = "cmd-3"
    with world.journal.run("r", agent="a", identity="i"):
        world.sink.failing = {"tool"}
        with pytest.raises(PublishError) as info:
            tools["set_status"]("inv1", "void")
    assert info.value.side_effect_done is False and world.effects == []


def test_publish_failure_at_run_start_stops_before_any_call(world: World) -> None:
    world.sink.failing = {"run"}
    with pytest.raises(PublishError) as info, world.journal.run(agent="a", identity="i"):
        raise AssertionError("the run body must not start")
    assert info.value.side_effect_done is False
    assert world.journal.current_run() is None  # the failed run does not stay current


# --- usage mistakes ----------------------------------------------------------------------------
async def test_calling_a_tool_outside_a_run_is_a_config_error(world: World) -> None:
    tools = declare_invoice_tools(world)

    @world.journal.tool(reversibility="read_only")
    async def fetch() -> None: ...

    with pytest.raises(ConfigError, match="outside a run"):
        tools["set_status"]("inv1", "void")
    with pytest.raises(ConfigError, match="outside a run"):
        await fetch()
    with pytest.raises(ConfigError, match="outside a run"):
        world.journal.checkpoint("c")
    assert world.effects == [] and world.events(None) == []


def test_a_run_needs_agent_and_identity(world: World) -> None:
    with pytest.raises(ConfigError, match="agent= and identity="):
        world.journal.run("r", agent="a")
    with pytest.raises(ConfigError, match="agent= and identity="):
        world.journal.run("r", identity="i")


def test_a_closed_journal_refuses_calls(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run(agent="a", identity="i"):
        world.journal.close()
        with pytest.raises(ConfigError, match="closed"):
            tools["set_status"]("inv1", "void")
    assert world.effects == []


def test_wrong_arguments_fail_like_a_direct_call(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run(agent="a", identity="i"), pytest.raises(TypeError):
        tools["set_status"]("inv1")
    assert world.effects == [] and world.events() == []


def test_origin_and_environment_of_a_run(world: World) -> None:
    tools = declare_invoice_tools(world)
    with world.journal.run(agent="ops", identity="alice", origin="human", environment="staging"):
        tools["set_status"]("inv1", "void")
    event = world.event()
    assert event.origin is Origin.HUMAN and event.environment == "staging"


# --- declaring: one set of options for journal.tool and declare ---------------------------------
def test_unknown_or_missing_tool_options_fail_like_bad_keywords(world: World) -> None:
    from backout.producers.registry import declare

    def noop(x: int) -> None:
        return None

    with pytest.raises(TypeError, match="unexpected keyword argument 'reversability'"):
        world.journal.tool(reversability="read_only")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument"):
        world.journal.tool()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        declare(noop, reversibility="read_only", bogus=1)  # type: ignore[call-arg]
    assert world.journal.tools == {}


# --- the events the Journal builds (without validation) look like validated ones ----------------
class CapturingCodec:
    """Single-object encoding that keeps every record it encodes."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.inner = make_codec(None)

    def encode(self, record: Any) -> bytes:
        self.records.append(record)
        return self.inner.encode(record)

    def decode(self, raw: bytes, expected: Any = None) -> Any:
        return self.inner.decode(raw, expected)


@pytest.mark.parametrize("reversibility", ["reversible", "irreversible", "read_only"])
def test_built_events_match_validated_models(world: World, reversibility: str) -> None:
    codec = CapturingCodec()
    journal = Journal(make_settings(), sink=InMemoryEventSink(), codec=codec)
    options: dict[str, Any] = {"reversibility": reversibility}
    if reversibility == "reversible":
        options.update(target=world.target, object_id=lambda invoice_id, **_: invoice_id)
    elif reversibility == "irreversible":
        options.update(system="erp", object_id=lambda invoice_id, **_: invoice_id)

    @journal.tool(**options)
    def touch(invoice_id: str, amount: int = 3) -> dict[str, Any]:
        return {"ok": True, "id": invoice_id}

    with journal.run(agent="a", identity="i"), journal.annotate(labels={"l": "1"}):
        touch("inv1")
    (event,) = [e for e in codec.records if e.kind is EventKind.TOOL_CALL]
    validated = ActionEvent.model_validate(event.model_dump())
    assert validated == event
    assert list(event.__dict__) == list(ActionEvent.model_fields)  # prints like `validated`
    assert repr(event) == repr(validated)
    assert event.model_fields_set == set(ActionEvent.model_fields) - {"kind", "compensates"}
    assert event.requested_args == {"invoice_id": "inv1", "amount": 3}
    if event.target is not None:
        assert event.target.model_fields_set == {"system", "object_id"}
    if event.compensation is not None:
        assert event.compensation.model_fields_set == {"strategy"}
        assert event.compensation.strategy == (
            "restore_fields" if reversibility == "reversible" else "manual"
        )
    assert decode(codec.encode(event)) == event
    journal.close()


def test_event_ids_are_ulids(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import os

    from backout.producers import ids

    crockford = str.maketrans(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    )
    for now_ns, random_bytes in [
        (0, bytes(10)),
        (1_763_870_400_123_456_789, bytes(range(10))),
        (2**48 * 1_000_000 - 1, b"\xff" * 10),
        (1_763_870_400_123_456_789, os.urandom(10)),
    ]:
        ms = now_ns // 1_000_000
        raw = (ms & 0xFFFF_FFFF_FFFF).to_bytes(6, "big") + random_bytes
        expected = base64.b32encode(b"\x00" * 4 + raw).decode()[6:32].translate(crockford)
        monkeypatch.setattr(ids.os, "urandom", lambda n, b=random_bytes: b[:n])
        assert ids.new_event_id(now_ns) == expected
        assert ids.new_event_id(now_ns) == expected  # the cached time prefix
    monkeypatch.undo()
    assert ids.new_event_id() != ids.new_event_id()
    assert ids.new_event_id(10**15) < ids.new_event_id(10**15 + 10**6)  # a ms later sorts after


def test_the_kafka_sinks_fast_published_is_a_published() -> None:
    from backout.producers.kafka import published

    for args in [("t", b"k", b"v", []), ("t", None, b"v", [("h", b"1")], 3, 17)]:
        fast, plain = published(*args), Published(*args)  # type: ignore[arg-type]
        assert fast == plain and repr(fast) == repr(plain)
        assert dataclasses.asdict(fast) == dataclasses.asdict(plain)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.offset = 1  # type: ignore[misc]
