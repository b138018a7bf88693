"""The demo's world: a small ERP/CRM in SQLite, its journaled tools, and what it should hold.

Two SQLite files: ``erp.db`` (``invoices``, ``refunds``) and ``crm.db`` (``customers``),
seen by backout as the systems ``erp.invoices``, ``erp.refunds`` and ``crm.customers``
(plus ``mail``, which nothing can take back). Every actor calls the same tools through its
own Journal. :class:`Expected` is the end state the demo must find after the rollback: the
seed, plus everything legitimate (the scheduled job, the operator, the agent's work before
its checkpoint, the database hot-fix), minus the agent's rogue writes, with its rogue
refunds reversed by their compensating tool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from backout.producers import Compensate, Journal, Reversibility, SqlTableTarget

TENANTS = ("acme", "globex", "initech")

CUSTOMERS: tuple[tuple[str, str, str, str, str], ...] = (
    # id, tenant, name, email, tier
    ("C-A1", "acme", "Ada Lovelace", "ada@acme.test", "gold"),
    ("C-A2", "acme", "Grace Hopper", "grace@acme.test", "silver"),
    ("C-A3", "acme", "Alan Turing", "alan@acme.test", "silver"),
    ("C-G1", "globex", "Hank Scorpio", "hank@globex.test", "gold"),
    ("C-G2", "globex", "Mindy Simmons", "mindy@globex.test", "bronze"),
    ("C-I1", "initech", "Bill Lumbergh", "bill@initech.test", "silver"),
    ("C-I2", "initech", "Peter Gibbons", "peter@initech.test", "bronze"),
)
INVOICES: tuple[tuple[str, str, str, float, str], ...] = (
    # id, tenant, customer, amount, status
    ("INV-A1", "acme", "C-A1", 120.0, "paid"),
    ("INV-A2", "acme", "C-A2", 250.0, "paid"),
    ("INV-A3", "acme", "C-A3", 310.0, "paid"),
    ("INV-A4", "acme", "C-A1", 95.0, "open"),
    ("INV-G1", "globex", "C-G1", 900.0, "paid"),
    ("INV-G2", "globex", "C-G2", 480.0, "paid"),
    ("INV-G3", "globex", "C-G1", 1200.0, "open"),
    ("INV-I1", "initech", "C-I1", 700.0, "paid"),
    ("INV-I2", "initech", "C-I2", 350.0, "paid"),
)

Row = dict[str, Any]
"""A table row without its version column."""


def _create(engine: Engine, ddl: list[str]) -> None:
    with engine.begin() as conn:
        for statement in ddl:
            conn.execute(text(statement))


@dataclass
class World:
    """The databases and their targets."""

    erp: Engine
    crm: Engine
    invoices: SqlTableTarget
    refunds: SqlTableTarget
    customers: SqlTableTarget

    @classmethod
    def create(cls, directory: Path) -> World:
        """Fresh databases in ``directory`` with the seed rows."""
        for name in ("erp.db", "crm.db"):
            (directory / name).unlink(missing_ok=True)
        erp = create_engine(f"sqlite:///{directory / 'erp.db'}")
        crm = create_engine(f"sqlite:///{directory / 'crm.db'}")
        _create(
            erp,
            [
                "CREATE TABLE invoices (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
                " customer_id TEXT, amount REAL NOT NULL, status TEXT NOT NULL,"
                " reminders INTEGER NOT NULL DEFAULT 0,"
                " version INTEGER NOT NULL DEFAULT 1)",
                "CREATE TABLE refunds (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, invoice_id TEXT"
                " NOT NULL, amount REAL NOT NULL, status TEXT NOT NULL,"
                " version INTEGER NOT NULL DEFAULT 1)",
            ],
        )
        _create(
            crm,
            [
                "CREATE TABLE customers (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT,"
                " email TEXT, status TEXT NOT NULL, tier TEXT, version INTEGER NOT NULL DEFAULT 1)",
            ],
        )
        with erp.begin() as conn:
            for inv in INVOICES:
                conn.execute(
                    text(
                        "INSERT INTO invoices (id, tenant, customer_id, amount, status) "
                        "VALUES (:i, :t, :c, :a, :s)"
                    ),
                    dict(zip(("i", "t", "c", "a", "s"), inv, strict=True)),
                )
        with crm.begin() as conn:
            for cust in CUSTOMERS:
                conn.execute(
                    text(
                        "INSERT INTO customers (id, tenant, name, email, status, tier) "
                        "VALUES (:i, :t, :n, :e, 'active', :r)"
                    ),
                    dict(zip(("i", "t", "n", "e", "r"), cust, strict=True)),
                )
        return cls(
            erp,
            crm,
            SqlTableTarget(erp, "invoices", key="id", version="version", system="erp.invoices"),
            SqlTableTarget(erp, "refunds", key="id", version="version", system="erp.refunds"),
            SqlTableTarget(crm, "customers", key="id", version="version", system="crm.customers"),
        )

    @property
    def targets(self) -> list[SqlTableTarget]:
        """Every restorable system."""
        return [self.invoices, self.refunds, self.customers]

    def rows(self) -> dict[str, dict[str, Row]]:
        """Every table's rows by id, without versions."""
        out: dict[str, dict[str, Row]] = {}
        for engine, table in (
            (self.erp, "invoices"),
            (self.erp, "refunds"),
            (self.crm, "customers"),
        ):
            with engine.connect() as conn:
                rows = conn.execute(text(f"SELECT * FROM {table} ORDER BY id")).mappings()
                out[table] = {r["id"]: {k: v for k, v in r.items() if k != "version"} for r in rows}
        return out

    def hotfix(self, invoice_id: str, status: str) -> None:
        """An out-of-band write: a DBA changes a row directly, nothing is journaled."""
        with self.erp.begin() as conn:
            conn.execute(
                text("UPDATE invoices SET status = :s WHERE id = :i"),
                {"s": status, "i": invoice_id},
            )

    def dispose(self) -> None:
        """Close the connection pools."""
        self.erp.dispose()
        self.crm.dispose()


@dataclass
class Tools:
    """The journaled tools of one actor's Journal."""

    get_invoice: Callable[..., Any]
    issue_refund: Callable[..., Any]
    reverse_refund: Callable[..., Any]
    set_invoice_status: Callable[..., Any]
    add_reminder: Callable[..., Any]
    update_customer: Callable[..., Any]
    send_email: Callable[..., Any]
    outbox: list[tuple[str, str]] = field(default_factory=list)
    """Emails sent: (to, template)."""


def declare_tools(journal: Journal, world: World) -> Tools:
    """Declare the demo's tools on ``journal`` (each actor has its own Journal)."""
    outbox: list[tuple[str, str]] = []

    def erp(sql: str, **params: object) -> None:
        with world.erp.begin() as conn:
            conn.execute(text(sql), params)

    @journal.tool(reversibility=Reversibility.READ_ONLY)
    def get_invoice(invoice_id: str) -> dict[str, Any]:
        return dict(world.invoices.read(invoice_id).fields)

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=world.refunds,
        object_id=lambda refund_id, **_: refund_id,
    )
    def reverse_refund(refund_id: str) -> None:
        erp(
            "UPDATE refunds SET status = 'reversed', version = version + 1 WHERE id = :r",
            r=refund_id,
        )

    @journal.tool(
        reversibility=Reversibility.COMPENSATABLE,
        target=world.refunds,
        object_id=lambda refund_id, **_: refund_id,
        value=lambda amount, **_: amount,
        compensation=Compensate(
            tool="reverse_refund",
            args=lambda refund_id, **_: {"refund_id": refund_id},
            window=timedelta(days=30),
        ),
    )
    def issue_refund(invoice_id: str, amount: float, refund_id: str) -> str:
        tenant = world.invoices.read(invoice_id).fields.get("tenant")
        erp(
            "INSERT INTO refunds (id, tenant, invoice_id, amount, status) "
            "VALUES (:r, :t, :i, :a, 'issued')",
            r=refund_id,
            t=tenant,
            i=invoice_id,
            a=amount,
        )
        return refund_id

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=world.invoices,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def set_invoice_status(invoice_id: str, status: str) -> None:
        erp(
            "UPDATE invoices SET status = :s, version = version + 1 WHERE id = :i",
            s=status,
            i=invoice_id,
        )

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=world.invoices,
        object_id=lambda invoice_id, **_: invoice_id,
    )
    def add_reminder(invoice_id: str) -> None:
        erp(
            "UPDATE invoices SET reminders = reminders + 1, version = version + 1 WHERE id = :i",
            i=invoice_id,
        )

    @journal.tool(
        reversibility=Reversibility.REVERSIBLE,
        target=world.customers,
        object_id=lambda customer_id, **_: customer_id,
    )
    def update_customer(customer_id: str, status: str) -> None:
        with world.crm.begin() as conn:
            conn.execute(
                text("UPDATE customers SET status = :s, version = version + 1 WHERE id = :c"),
                {"s": status, "c": customer_id},
            )

    @journal.tool(
        reversibility=Reversibility.IRREVERSIBLE, system="mail", object_id=lambda to, **_: to
    )
    def send_email(to: str, template: str) -> None:
        outbox.append((to, template))

    return Tools(
        get_invoice,
        issue_refund,
        reverse_refund,
        set_invoice_status,
        add_reminder,
        update_customer,
        send_email,
        outbox,
    )


class Expected:
    """The end state the demo must reach, kept alongside the actors' calls."""

    def __init__(self, world: World) -> None:
        self.tables = world.rows()

    def set(self, table: str, row_id: str, **values: Any) -> None:
        """A legitimate change that must survive the rollback."""
        self.tables[table][row_id].update(values)

    def add(self, table: str, row_id: str, row: Row) -> None:
        """A legitimate new row."""
        self.tables[table][row_id] = dict(row)

    def differences(self, world: World) -> list[str]:
        """What the databases hold that they should not (empty when all is as expected)."""
        found = world.rows()
        out = []
        for table, rows in self.tables.items():
            live = found.get(table, {})
            for row_id in sorted(set(rows) | set(live)):
                want, have = rows.get(row_id), live.get(row_id)
                if want == have:
                    continue
                if want is None or have is None:
                    what = "unexpected row" if want is None else "missing row"
                    out.append(f"{table}/{row_id}: {what}")
                    continue
                fields = ", ".join(
                    f"{k} {have.get(k)!r} (expected {v!r})"
                    for k, v in want.items()
                    if have.get(k) != v
                )
                out.append(f"{table}/{row_id}: {fields}")
        return out


__all__ = ["CUSTOMERS", "INVOICES", "TENANTS", "Expected", "Tools", "World", "declare_tools"]
