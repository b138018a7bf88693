"""Benchmark: projection, planning and restore throughput against the issue's targets.

    python -m bench.rollback                   # default sizes (about a minute on 2 cores)
    python -m bench.rollback --quick           # tiny sizes (CI smoke test)
    python -m bench.rollback --only planning   # one part (and what it needs first)

1. projection: N encoded ActionEvents are published to a real topic (the broker named by
   BACKOUT_BOOTSTRAP, else an embedded one), then a Projector catches up into a SQLite
   file; events/s is measured over the whole catch-up (worker processes starting, reading,
   committing, and the empty poll that confirms the end).  Target >= 20,000/s.
2. planning: a 100,000-action run touching 20,000 records, interleaved with other runs'
   writes, loaded from that projection and planned.  Target <= 3 s (pure planning; the
   SQL load is reported next to it).
3. restores: the plan's restore steps executed on a SQLite table through SqlTableTarget
   compare-and-set, each inverse write journaled to the broker.  Target >= 2,000 records/s.
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, event, text

from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.producers.kafka import KafkaEventSink
from backout.producers.targets import SqlTableTarget
from backout.projections.projector import Projector
from backout.projections.store import SqlProjectionStore
from backout.rollback.executor import RollbackExecutor
from backout.rollback.plan import Decision
from backout.rollback.planner import plan_rollback
from backout.rollback.scope import RollbackScope
from backout.schemas.codec import encode
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    RecordImage,
    Reversibility,
    TargetRef,
)
from bench.figures import Figure, bench_broker, headline, measure, size_arguments

RUN = "bench-run"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Sizes:
    """How big each part is."""

    actions: int
    records: int
    other_share: float
    restores: int


DEFAULT = Sizes(actions=100_000, records=20_000, other_share=0.15, restores=5_000)
SMALL = Sizes(actions=3_000, records=600, other_share=0.15, restores=300)


def synth_history(sizes: Sizes, *, seed: int = 7) -> Iterator[ActionEvent]:
    """A run's ``sizes.actions`` writes over ``sizes.records`` records, with other runs'
    writes interleaved (``other_share`` of the total on top), as the Journal records them."""
    rng = random.Random(seed)
    records: dict[str, dict[str, object]] = {
        f"inv_{i:06d}": {"status": "open", "amount": i % 997, "note": ""}
        for i in range(sizes.records)
    }
    names = sorted(records)
    restore = Compensation(strategy="restore_fields")
    total = int(sizes.actions * (1 + sizes.other_share))
    for n in range(total):
        mine = n * sizes.actions // total != (n + 1) * sizes.actions // total
        run = RUN if mine else f"other-{n % 7}"
        # The run touches every record once before it repeats, so all 20,000 are touched.
        object_id = names[(n * sizes.actions // total) % len(names)] if mine else rng.choice(names)
        before = dict(records[object_id])
        change = rng.choice(
            (
                {"status": rng.choice(("void", "paid", "sent", "open"))},
                {"amount": rng.randint(0, 10_000)},
                {"note": f"n{n}", "status": "held"},
            )
        )
        after = {**before, **change}
        records[object_id] = after
        step = n + 1
        yield ActionEvent(
            event_id=f"ev{n:08d}{rng.getrandbits(24):06x}",
            occurred_at=T0 + timedelta(milliseconds=n),
            run_id=run,
            agent_id="billing-bot" if mine else "other-bot",
            identity="svc-billing" if mine else "svc-other",
            tenant="acme",
            step_id=f"{run}:{step}",
            tool="set_fields",
            requested_args={"invoice_id": object_id, **change},
            target=TargetRef(system="erp", object_id=object_id),
            reversibility=Reversibility.REVERSIBLE,
            before=RecordImage(exists=True, fields=before, version=None),
            after=RecordImage(exists=True, fields=after, version=None),
            idempotency_key=f"{run}:{step}",
            status=CallStatus.SUCCEEDED,
            compensation=restore,
        )


PARTS = ("projection", "planning", "restores")


def run(
    sizes: Sizes,
    workdir: Path,
    *,
    workers: int = 2,
    bootstrap: str | None = None,
    only: str | None = None,
) -> list[Figure]:
    """Run the three parts (or ``only`` one: the parts after projection need it, so they
    project first without judging it) and print their figures; return them.

    Args:
        bootstrap: a broker to use (default: an embedded one).
    """
    with bench_broker(bootstrap) as address:
        settings = Settings(
            bootstrap=address,
            topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
            db=f"sqlite:///{workdir / 'projection.db'}",
            state_dir=workdir,
        )
        ensure_topics(settings, address)
        events = list(synth_history(sizes))
        print(f"{len(events):,} events on {sizes.records:,} records", flush=True)
        store = SqlProjectionStore(settings.db)
        loaded: dict[str, object] = {}

        def projection() -> Iterator[Figure]:
            sink = KafkaEventSink(settings, address, background=True)
            topic = settings.topic("actions")
            for e in events:
                sink.publish(topic, e.key.encode(), encode(e), confirm=False)
            sink.close()
            with Projector(settings, address, store=store, workers=workers) as projector:
                stats = projector.catch_up(timeout=300)
            if only in (None, "projection"):
                yield Figure(
                    f"projection into SQLite ({workers} proc)",
                    stats.rate,
                    "events/s",
                    ">= 20,000/s",
                    stats.rate >= 20_000,
                    f"{stats.events:,} events from a real topic in {stats.seconds:.2f} s",
                )

        def planning() -> Iterator[Figure]:
            scope = RollbackScope(run=RUN)
            started = time.perf_counter()
            history = loaded["history"] = store.load(scope)
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            plan = loaded["plan"] = plan_rollback(history, scope, now=T0 + timedelta(days=1))
            plan_s = time.perf_counter() - started
            counts = plan.counts()
            if only in (None, "planning"):
                yield Figure(
                    "planning (pure)",
                    plan_s,
                    "s",
                    "<= 3 s",
                    plan_s <= 3,
                    f"{plan.writes_in_scope:,} writes on {plan.records:,} records -> "
                    f"{counts['restore']:,} restore, {counts['superseded']:,} superseded steps",
                )
                yield Figure("loading the scope from SQL", load_s, "s", "(info)", True)

        def restores() -> Iterator[Figure]:
            rate = _restores(
                settings, address, loaded["plan"], loaded["history"], sizes.restores, workdir
            )
            yield Figure(
                "restores on SQLite (CAS + journal)",
                rate,
                "records/s",
                ">= 2,000/s",
                rate >= 2_000,
                f"{sizes.restores:,} restore steps, compare-and-set, each journaled",
            )

        wanted = PARTS[: PARTS.index(only) + 1] if only else PARTS
        chosen = {"projection": projection, "planning": planning, "restores": restores}
        return measure([chosen[name] for name in wanted], decimals=2)


def _restores(
    settings: Settings, bootstrap: str, plan: object, history: object, limit: int, workdir: Path
) -> float:
    from backout.projections.fold import Projection
    from backout.rollback.plan import RollbackPlan

    assert isinstance(plan, RollbackPlan) and isinstance(history, Projection)
    steps = [s for s in plan.steps if s.decision is Decision.RESTORE][:limit]
    engine = create_engine(f"sqlite:///{workdir / 'erp.db'}")

    @event.listens_for(engine, "connect")
    def _wal(dbapi_conn: object, _record: object) -> None:
        cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE invoices (id TEXT PRIMARY KEY, status TEXT, "
                "amount INTEGER, note TEXT, version INTEGER NOT NULL)"
            )
        )
        rows = []
        for key in {s.record_key for s in steps}:
            assert key is not None
            fields = history.records[key].state.fields
            rows.append(
                {
                    "id": key.split("/", 1)[1],
                    "status": fields["status"],
                    "amount": fields["amount"],
                    "note": fields["note"],
                    "version": 1,
                }
            )
        conn.execute(
            text("INSERT INTO invoices VALUES (:id, :status, :amount, :note, :version)"), rows
        )
    target = SqlTableTarget(engine, "invoices", key="id", version="version", system="erp")
    sink = KafkaEventSink(settings, bootstrap, background=True)
    executor = RollbackExecutor(settings, sink=sink, targets=[target])
    subset = plan.with_steps(tuple(steps))
    started = time.perf_counter()
    report = executor.apply(subset)
    elapsed = time.perf_counter() - started
    sink.close()
    summary = report.summary()
    if summary["restored"] != len(steps):
        raise SystemExit(f"restores did not all apply: {summary}")
    return len(steps) / elapsed


def main(argv: list[str] | None = None) -> None:
    args = size_arguments(__doc__, argv, parts=PARTS)
    sizes = SMALL if args.quick else DEFAULT
    headline(
        "rollback",
        f"{'quick' if args.quick else 'default'} sizes: {sizes.actions:,}-action run on "
        f"{sizes.records:,} records, {sizes.restores:,} restores",
    )
    with tempfile.TemporaryDirectory(prefix="backout-bench-") as tmp:
        # the entrypoint: BACKOUT_* from the environment
        run(sizes, Path(tmp), bootstrap=Settings().bootstrap, only=args.only)


if __name__ == "__main__":
    main()
