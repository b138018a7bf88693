"""``backout demo``: an agent's tool calls flowing onto a real broker, end to end.

Runs on the embedded defaults: starts the embedded broker (or uses BACKOUT_BOOTSTRAP),
creates the topics, lets a billing agent journal calls against a real SQLite ERP table,
then reads the actions topic back and prints what the log knows.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import create_engine, text

from backout.infra.broker import Broker, BrokerUnavailable, start_embedded
from backout.infra.clikit import JSON_OPTION, console, load_settings, print_json, table
from backout.infra.commands_core import _row, tail_records
from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.producers import Journal, Reversibility, SqlTableTarget
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent
from backout.schemas.registry import make_codec


def _start_broker(settings: Settings) -> Broker:
    if settings.bootstrap:
        return Broker(settings.bootstrap, "external")
    try:
        return start_embedded()
    except BrokerUnavailable as exc:
        raise ConfigError(
            f"{exc}. Point backout at a Kafka broker instead: BACKOUT_BOOTSTRAP=host:port "
            "backout demo") from exc


def demo(
    workdir: Annotated[Path | None, typer.Option(help="Where the demo's SQLite files go.")] = None,
    json_out: bool = JSON_OPTION,
) -> None:
    """Run the main job on the embedded defaults: journaled tool calls on a real broker.

    Example: backout demo
    """
    base = load_settings()
    directory = workdir or Path(tempfile.mkdtemp(prefix="backout-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    broker = _start_broker(base)
    try:
        settings = base.model_copy(update={"bootstrap": broker.bootstrap,
                                           "topic_prefix": f"demo{int(time.time())}.",
                                           "db": f"sqlite:///{directory / 'projection.db'}"})
        ensure_topics(settings, broker.bootstrap)
        events = _run_agent(settings, directory)
        records = [r for _, r in tail_records(settings, make_codec(None), settings.topic("actions"),
                                              follow=False)]
        actions = [r for r in records if isinstance(r, ActionEvent)]
        if json_out:
            print_json({"broker": broker.bootstrap, "events": actions})
            return
        console.print(f"broker {broker.bootstrap} ({broker.kind}); ERP database in {directory}")
        console.print(table(settings.topic("actions"),
                            ["#", "time", "run", "agent", "tool", "target", "status",
                             "change"],
                            [_row(str(i), r) for i, r in enumerate(
                                sorted(actions, key=lambda e: e.occurred_at))]))
        console.print(f"{events} tool calls journaled; {len(actions)} events on the log")
        if len(actions) < events:
            raise ConfigError(f"only {len(actions)} of {events} events reached the log")
    finally:
        broker.stop()


def _run_agent(settings: Settings, directory: Path) -> int:
    engine = create_engine(f"sqlite:///{directory / 'erp.db'}")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS invoices"))
        conn.execute(text("CREATE TABLE invoices (id TEXT PRIMARY KEY, tenant TEXT, "
                          "status TEXT, amount REAL, version INTEGER NOT NULL)"))
        for i, (tenant, amount) in enumerate([("acme", 120.0), ("acme", 75.5),
                                              ("globex", 990.0)]):
            conn.execute(text("INSERT INTO invoices VALUES (:id, :t, 'open', :a, 1)"),
                         {"id": f"inv_{88421 + i}", "t": tenant, "a": amount})
    invoices = SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")
    journal = Journal.from_settings(settings)

    @journal.tool(reversibility=Reversibility.REVERSIBLE, target=invoices,
                  object_id=lambda invoice_id, **_: invoice_id)
    def set_status(invoice_id: str, status: str) -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE invoices SET status = :s, version = version + 1 "
                              "WHERE id = :i"), {"s": status, "i": invoice_id})

    @journal.tool(reversibility=Reversibility.READ_ONLY)
    def lookup(invoice_id: str) -> str:
        return invoices.read(invoice_id).fields.get("status") or "missing"

    try:
        with journal.run(agent="billing-agent", identity="svc-billing", tenant="acme",
                         workflow="refunds"):
            lookup("inv_88421")
            set_status("inv_88421", "void")
            set_status("inv_88422", "refunded")
        return 5  # run_started, 3 calls, run_finished
    finally:
        journal.close()


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command()(demo)
