"""``backout demo``: a whole incident, end to end, on the embedded defaults. [adapter]

Everything is real: a broker (the embedded one, or ``BACKOUT_BOOTSTRAP``) with a fresh topic
prefix, the Faust processors running in this process, SQLite databases written through
journaled tools, signed control commands, the SQL projection and the rollback executor.

1. Normal traffic: the nightly dunning job reminds open invoices; the billing agent handles
   ticket 1041 (a refund and its confirmation email).
2. Ticket 1042: the agent refunds INV-A2, emails the customer and checkpoints
   ``ticket-resolved``. Then it goes rogue: refunds invoices nobody asked about, rewrites
   invoice and customer statuses, emails a customer that her account is closed, and carries
   the refund loop into other tenants (child runs).
3. The processors see the agent write to a second tenant (the demo policy gives
   ``billing-agent`` one tenant) and publish a signed freeze; the agent's next calls raise
   ``Frozen`` and are journaled as blocked.
4. Meanwhile the others keep working: the dunning job reminds INV-A4 (which the agent voided),
   operator alice puts customer C-A2 on hold, and a DBA hot-fixes INV-A3 in SQL directly.
5. The projection catches up; the rollback of ticket 1042 after its checkpoint is planned and
   applied surgically: restores by compare-and-set, refunds reversed by their compensating
   tool, the email handed to a person as a task; the DBA's write is a conflict and is kept.
6. The incident report, ``backout harden`` on the run, and a check of the databases against
   the expected end state: the command exits 1 when anything is off.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from backout.infra.broker import Broker
from backout.infra.clikit import JSON_OPTION, load_settings
from backout.infra.commands_harden import default_policy_path, run_harden
from backout.infra.demo_output import Narrator, render
from backout.infra.demo_stack import CountingSink, ProcessorsThread, quiet_logs, start_broker
from backout.infra.demo_world import Expected, Tools, World, declare_tools
from backout.infra.harden_files import HardenResult
from backout.infra.policy_edit import set_values
from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.processors.app import Processors
from backout.processors.policy import Policy, parse_policy
from backout.producers import Frozen, Journal
from backout.producers.guard import ControlGuard
from backout.producers.kafka import KafkaEventSink
from backout.projections.projector import Projector
from backout.projections.store import SqlProjectionStore
from backout.rollback.executor import RollbackExecutor, RollbackReport
from backout.rollback.plan import RollbackPlan
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.events import Origin
from backout.schemas.signing import new_signing_key

AGENT = "billing-agent"
INCIDENT_RUN = "ticket-1042"
BASELINE_RUN = "ticket-1041"
CHECKPOINT = "ticket-resolved"
AGENT_PACE_S = 0.1
"""Time the rogue agent "thinks" between calls: the processors race it."""
READY_TIMEOUT_S = 30.0
CONTAINED_TIMEOUT_S = 15.0


@dataclass
class Incident:
    """What happened, as the demo saw it from the actors' side."""

    rogue_done: list[str] = field(default_factory=list)
    rogue_refunds: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    freeze_id: str = ""


def demo_policy() -> str:
    """The bundled default policy, with one line for the billing agent: one tenant."""
    text = default_policy_path().read_text("utf-8")
    return set_values(text, {("agents", AGENT, "limits", "agent", "tenants"): 1}).text


class Demo:
    """One run of the demo: the parts it started and what it saw."""

    def __init__(self, base: Settings, workdir: Path, say: Narrator) -> None:
        self.base = base
        self.workdir = workdir
        self.say = say
        self.started = time.monotonic()
        self.published = [0]
        self.incident = Incident()
        self.processors_key = new_signing_key()
        self.operator_key = new_signing_key()
        self.broker: Broker | None = None
        self.settings = base
        self.bootstrap = ""
        self.world: World | None = None
        self.expected: Expected | None = None
        self.workers: ProcessorsThread | None = None
        self.journals: list[Journal] = []
        self.actors: dict[str, tuple[Journal, Tools]] = {}
        """``agent`` (the billing agent's process) and ``office`` (job and operator)."""
        self.policy_text = demo_policy()
        self.policy: Policy = parse_policy(self.policy_text, source="demo policy")
        self.policy_path = workdir / "policy.yaml"

    # --- setting up ---------------------------------------------------------------------
    def start(self) -> None:
        if self.broker is None:
            self.broker = start_broker(self.base)
        self.bootstrap = self.broker.bootstrap
        self.settings = self.base.model_copy(
            update={
                "bootstrap": self.bootstrap,
                "topic_prefix": f"demo{int(time.time() * 1000) % 10**10}.",
                "db": f"sqlite:///{self.workdir / 'projection.db'}",
                "state_dir": self.workdir / "state",
                "actions_partitions": 3,
                # The embedded broker stops at the end while idle clients may still be alive.
                "kafka": {"log.connection.close": "false", **self.base.kafka},
                "trusted_keys": {
                    k.key_id: k.public_b64 for k in (self.processors_key, self.operator_key)
                },
            }
        )
        ensure_topics(self.settings, self.bootstrap)
        self.policy_path.write_text(self.policy_text, "utf-8")
        (self.workdir / "projection.db").unlink(missing_ok=True)  # a --workdir used before
        self.world = World.create(self.workdir)
        self.expected = Expected(self.world)
        self.workers = ProcessorsThread(
            partial(
                Processors,
                self.settings,
                self.bootstrap,
                self.policy,
                self.processors_key,
                datadir=self.workdir / "processors",
            )
        ).start()

    def journal(self) -> tuple[Journal, Tools]:
        """A Journal for one actor's process: its own producer and freeze guard."""
        sink = CountingSink(
            KafkaEventSink(self.settings, self.bootstrap),
            self.settings.topic("actions"),
            self.published,
        )
        guard = ControlGuard(self.settings, self.bootstrap).start()
        journal = Journal(self.settings, sink=sink, guard=guard, owns=(sink, guard))
        self.journals.append(journal)
        assert self.world is not None
        return journal, declare_tools(journal, self.world)

    # --- the story ----------------------------------------------------------------------
    def normal_traffic(
        self, backoffice: tuple[Journal, Tools], agent: tuple[Journal, Tools]
    ) -> None:
        office, tools = backoffice
        exp = self.expected
        assert exp is not None
        for tenant, invoice in (("acme", "INV-A4"), ("globex", "INV-G3")):
            with office.run(
                f"dunning-{tenant}-1",
                agent="dunning-job",
                identity="svc-scheduler",
                tenant=tenant,
                workflow="dunning",
                origin=Origin.SYSTEM,
                resume=False,
            ):
                tools.add_reminder(invoice)
            exp.set("invoices", invoice, reminders=1)
        journal, t = agent
        with journal.run(
            BASELINE_RUN,
            agent=AGENT,
            identity="svc-billing",
            tenant="acme",
            workflow="refunds",
            resume=False,
        ):
            t.get_invoice("INV-A1")
            t.issue_refund("INV-A1", 120.0, "RF-1041")
            t.send_email("ada@acme.test", "refund_confirmation")
        exp.add("refunds", "RF-1041", _refund("RF-1041", "acme", "INV-A1", 120.0, "issued"))

    def rogue_plan(self, t: Tools) -> list[tuple[str | None, str, Callable[[], Any]]]:
        """The agent's calls after its checkpoint: (child-run tenant, label, call)."""
        calls: list[tuple[str | None, str, Callable[[], Any]]] = [
            (None, "refund INV-A3", lambda: t.issue_refund("INV-A3", 310.0, "RF-1042-2")),
            (None, "INV-A3 -> refunded", lambda: t.set_invoice_status("INV-A3", "refunded")),
            (None, "refund INV-A1 again", lambda: t.issue_refund("INV-A1", 120.0, "RF-1042-3")),
            (None, "INV-A4 -> void", lambda: t.set_invoice_status("INV-A4", "void")),
            (None, "C-A2 -> closed", lambda: t.update_customer("C-A2", "closed")),
            (
                None,
                "email grace: account closed",
                lambda: t.send_email("grace@acme.test", "account_closed"),
            ),
        ]
        n = 4
        loop = (
            ("globex", (("INV-G1", 900.0), ("INV-G2", 480.0))),
            ("initech", (("INV-I1", 700.0), ("INV-I2", 350.0))),
            ("acme", (("INV-A2", 250.0), ("INV-A3", 310.0))),
        )
        for tenant, invoices in loop * 2:  # the loop: enough calls to outlast a slow freeze
            for invoice, amount in invoices:
                refund_id = f"RF-1042-{n}"
                n += 1
                calls.append(
                    (tenant, f"refund {invoice}", _bind(t.issue_refund, invoice, amount, refund_id))
                )
                calls.append(
                    (
                        tenant,
                        f"{invoice} -> refunded",
                        _bind(t.set_invoice_status, invoice, "refunded"),
                    )
                )
        return calls

    def incident_run(self, agent: tuple[Journal, Tools]) -> None:
        journal, t = agent
        exp = self.expected
        assert exp is not None and self.world is not None
        with journal.run(
            INCIDENT_RUN,
            agent=AGENT,
            identity="svc-billing",
            tenant="acme",
            workflow="refunds",
            resume=False,
        ):
            t.get_invoice("INV-A2")
            t.issue_refund("INV-A2", 250.0, "RF-1042-1")
            t.send_email("grace@acme.test", "refund_confirmation")
            journal.checkpoint(CHECKPOINT)
            exp.add("refunds", "RF-1042-1", _refund("RF-1042-1", "acme", "INV-A2", 250.0, "issued"))
            with journal.annotate(reasoning="refund every paid invoice, in every tenant"):
                self._go_rogue(journal, t)

    def _go_rogue(self, journal: Journal, t: Tools) -> None:
        exp = self.expected
        assert exp is not None and self.world is not None
        calls = self.rogue_plan(t)
        i = 0
        while i < len(calls) and len(self.incident.blocked) < 2:
            tenant = calls[i][0]
            group = []
            while i < len(calls) and calls[i][0] == tenant:
                group.append(calls[i])
                i += 1
            context = (
                journal.run(f"{INCIDENT_RUN}.{tenant}", tenant=tenant, resume=False)
                if tenant is not None
                else contextlib.nullcontext()
            )
            with context:
                for _, label, call in group:
                    time.sleep(AGENT_PACE_S)
                    try:
                        result = call()
                    except Frozen as frozen:
                        self.incident.blocked.append(label)
                        self.incident.freeze_id = self.incident.freeze_id or frozen.command_id
                        if len(self.incident.blocked) >= 2:
                            break
                        continue
                    self.incident.rogue_done.append(label)
                    if isinstance(result, str) and result.startswith("RF-"):
                        self.incident.rogue_refunds.append(result)
                        row = self.world.refunds.read(result).fields
                        exp.add("refunds", result, {"id": result, **row, "status": "reversed"})

    def meanwhile(self, backoffice: tuple[Journal, Tools]) -> None:
        office, tools = backoffice
        exp = self.expected
        assert exp is not None and self.world is not None
        with office.run(
            "dunning-acme-2",
            agent="dunning-job",
            identity="svc-scheduler",
            tenant="acme",
            workflow="dunning",
            origin=Origin.SYSTEM,
            resume=False,
        ):
            tools.add_reminder("INV-A4")
        exp.set("invoices", "INV-A4", reminders=2)
        with office.run(
            "ops-2231",
            agent="ops-console",
            identity="alice@ops",
            tenant="acme",
            workflow="support",
            origin=Origin.HUMAN,
            resume=False,
        ):
            tools.update_customer("C-A2", "on_hold")
        exp.set("customers", "C-A2", status="on_hold")
        self.world.hotfix("INV-A3", "disputed")
        exp.set("invoices", "INV-A3", status="disputed")

    # --- rollback -----------------------------------------------------------------------
    def project(self, store: SqlProjectionStore) -> None:
        with Projector(self.settings, self.bootstrap, store=store) as projector:
            projector.catch_up(timeout=60)

    def rollback(self, store: SqlProjectionStore, t: Tools) -> tuple[RollbackPlan, RollbackReport]:
        assert self.world is not None
        self.project(store)
        scope = RollbackScope(run=INCIDENT_RUN, after_checkpoint=CHECKPOINT)
        plan = plan_rollback(store.load(scope), scope, now=datetime.now(UTC))
        sink = KafkaEventSink(self.settings, self.bootstrap, background=True)
        try:
            executor = RollbackExecutor(
                self.settings,
                sink=sink,
                targets=self.world.targets,
                compensators={"reverse_refund": t.reverse_refund},
                signing_key=self.operator_key,
                identity="operator:demo",
            )
            done = executor.apply(plan, prior=store.steps(plan.plan_id))
        finally:
            sink.close()
        self.project(store)
        return plan, done

    def harden(self) -> HardenResult:
        return run_harden(
            self.settings,
            INCIDENT_RUN,
            self.workdir / "harden",
            policy=self.policy_path,
            bootstrap=self.bootstrap,
            since=datetime.now(UTC) - timedelta(hours=1),
        )

    # --- tearing down -------------------------------------------------------------------
    def close(self) -> None:
        for journal in self.journals:
            with contextlib.suppress(Exception):
                journal.close(5)
        self.journals.clear()
        self.actors.clear()
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.world is not None:
            self.world.dispose()
        gc.collect()  # librdkafka clients go before the broker they talk to
        if self.broker is not None:
            self.broker.stop()


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def _refund(
    refund_id: str, tenant: str, invoice: str, amount: float, status: str
) -> dict[str, Any]:
    return {
        "id": refund_id,
        "tenant": tenant,
        "invoice_id": invoice,
        "amount": amount,
        "status": status,
    }


def run_demo(base: Settings, workdir: Path, say: Narrator) -> dict[str, Any]:
    """Run the whole incident; the outcome (``ok`` False when a check failed).

    Raises:
        ConfigError: no broker, or a part of the stack did not come up.
    """
    from backout.infra.demo_checks import collect

    demo = Demo(base, workdir, say)
    demo.broker = start_broker(base)  # before the progress display: its error is one line
    with quiet_logs(), say:
        try:
            with say.phase("starting the topics and the processors"):
                demo.start()
                demo.actors = {"office": demo.journal(), "agent": demo.journal()}
            assert demo.workers is not None
            with say.phase("normal traffic: dunning job, billing agent ticket 1041"):
                demo.normal_traffic(demo.actors["office"], demo.actors["agent"])
                demo.workers.wait_for(demo.published[0], READY_TIMEOUT_S)
            with say.phase("ticket 1042: the billing agent goes rogue"):
                demo.incident_run(demo.actors["agent"])
            with say.phase("containment: processors, signed freeze, blocked calls"):
                demo.workers.wait_for(demo.published[0], CONTAINED_TIMEOUT_S)
            with say.phase("meanwhile: dunning job, operator alice, a DBA hot-fix"):
                demo.meanwhile(demo.actors["office"])
            store = SqlProjectionStore(demo.settings.db)
            store.create()
            with say.phase("rollback: project, plan, apply surgically"):
                plan, done = demo.rollback(store, demo.actors["agent"][1])
            with say.phase("report and verification"):
                outcome = collect(demo, store, plan, done)
            with say.phase("harden: regression test and policy change"):
                hardened = demo.harden()
            outcome["harden"] = hardened
            change = hardened.proposal.change
            outcome["checks"].append(
                (
                    "harden contains the run earlier",
                    hardened.proposal.improves,
                    change.describe() if change else "no change found",
                )
            )
        finally:
            demo.close()
    outcome["seconds"] = time.monotonic() - demo.started
    outcome["ok"] = all(ok for _, ok, _ in outcome["checks"])
    return outcome


def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where the databases and outputs go (default: a temp dir).")
    ] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Run a whole incident end to end: a rogue billing agent is detected, frozen and rolled
    back surgically, then the databases are checked against the expected end state.

    Uses the embedded broker, or BACKOUT_BOOTSTRAP when set (with a fresh topic prefix).
    Exits 1 when any check fails.

    Example: backout demo
    """
    base = load_settings()
    directory = workdir or Path(tempfile.mkdtemp(prefix="backout-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    say = Narrator(quiet=json_out)
    outcome = run_demo(base, directory, say)
    render(outcome, directory, json_out=json_out)
    if not outcome["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command()(demo)
