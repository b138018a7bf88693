"""Benchmark: containment against issue 3's targets.

    python -m bench.containment           # default sizes (about 40-60 s on 2 cores)
    python -m bench.containment --quick   # tiny sizes (CI smoke test)

1. Freeze latency: from the moment an operator starts publishing a signed freeze to the
   moment a Journal in ANOTHER PROCESS refuses its next call, while that process makes
   1,000 journaled calls/s (background delivery, events on the actions topic). Each round
   freezes the agent, waits for the refusal, lifts, waits for calls to pass again.
   Targets: p50 <= 10 ms, p99 <= 25 ms. (The lift latency is printed too, no target.)
2. Guard check cost with 1,000 active freezes of mixed scopes (1 to 3 dimensions, all
   modes, some on runs matched through ancestors): ``ControlGuard.check`` on a started
   guard, for calls that pass (the common case); blocked calls are timed separately.
   Target <= 20 us per check.
3. Rebuilding the freeze view from a control topic of 100,000 signed commands: 29,500
   freezes each lifted later, 1,000 freezes still active, 20,000 approvals and 20,000
   denials of approval requests. Target <= 5 s from ``start()`` to a usable view. Signature
   checks are deferred (see ``producers.control``); the time until every deferred
   signature has been checked in the background is printed too, no target.

The broker is BACKOUT_BOOTSTRAP when set, else an embedded Tansu broker started here.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.producers.guard import ControlGuard
from backout.producers.kafka import KafkaEventSink
from backout.producers.scope import CallScope
from backout.schemas.codec import encode
from backout.schemas.errors import Frozen
from backout.schemas.events import ControlAction, ControlCommand, FreezeMode, Reversibility
from backout.schemas.signing import SigningKey, new_signing_key, sign
from bench.figures import Figure, bench_broker, headline, measure, size_arguments


@dataclass(frozen=True)
class Sizes:
    rounds: int
    calls_per_s: int
    freezes: int
    checks: int
    history: int


DEFAULT = Sizes(rounds=150, calls_per_s=1_000, freezes=1_000, checks=200_000, history=100_000)
QUICK = Sizes(rounds=5, calls_per_s=200, freezes=50, checks=2_000, history=400)




def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def command(key: SigningKey, action: ControlAction, **fields: Any) -> ControlCommand:
    return sign(
        ControlCommand(
            command_id=f"cmd_{uuid.uuid4().hex}",
            issued_at=datetime.now(UTC),
            action=action,
            issuer="bench",
            **fields,
        ),
        key,
    )


def fresh(bootstrap: str, key: SigningKey) -> Settings:
    settings = Settings(
        bootstrap=bootstrap,
        topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
        actions_partitions=3,
        delivery="background",
        trusted_keys={key.key_id: key.public_b64},
    )
    ensure_topics(settings, bootstrap)
    return settings


# --- 1. freeze latency across processes -------------------------------------------------
def agent_process(settings_data: dict[str, Any], rate: int, conn: Connection, stop: Any) -> None:
    """The agent: a Journal (background delivery, ControlGuard) calling a tool ``rate``/s,
    reporting the first refusal after each freeze and the first pass after each lift."""
    from backout.producers.journal import Journal

    settings = Settings(**settings_data)
    sink = KafkaEventSink(settings, settings.bootstrap or "", background=True)
    guard = ControlGuard(settings, settings.bootstrap).start()
    journal = Journal(settings, sink=sink, guard=guard)

    @journal.tool(
        reversibility=Reversibility.IRREVERSIBLE, system="bench", object_id=lambda order, **_: order
    )
    def refund(order: str, amount: int) -> None:
        return None

    conn.send(("ready",))
    calls = 0
    blocked_by: str | None = None
    period = 1.0 / rate
    started = next_at = time.monotonic()
    with journal.run(agent="bench-agent", identity="svc-bench", resume=False):
        while not stop.is_set():
            try:
                refund(f"o{calls % 1000}", 10)
                if blocked_by is not None:
                    conn.send(("passed", blocked_by, time.monotonic()))
                    blocked_by = None
            except Frozen as frozen:
                if frozen.command_id != blocked_by:
                    blocked_by = frozen.command_id
                    conn.send(("refused", frozen.command_id, time.monotonic()))
            calls += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    conn.send(("rate", calls / (time.monotonic() - started)))
    journal.close()
    guard.close()
    sink.close()


def bench_latency(bootstrap: str, sizes: Sizes) -> list[Figure]:
    key = new_signing_key()
    settings = fresh(bootstrap, key)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    proc = ctx.Process(
        target=agent_process,
        daemon=True,
        args=(settings.model_dump(), sizes.calls_per_s, child, stop),
    )
    proc.start()
    operator = KafkaEventSink(settings, bootstrap, config={"linger.ms": 0})
    topic = settings.topic("control")
    freeze_ms: list[float] = []
    lift_ms: list[float] = []
    try:
        if not parent.poll(60) or parent.recv() != ("ready",):
            raise RuntimeError("the agent process did not start")
        warm = command(key, ControlAction.FREEZE, scope={"agent": "warm-up"}, reason="warm")
        operator.publish(topic, b"agent=warm-up", encode(warm))  # connects the producer
        time.sleep(1.0)  # the agent reaches its steady call rate
        for _ in range(sizes.rounds):
            freeze = command(
                key,
                ControlAction.FREEZE,
                scope={"agent": "bench-agent"},
                mode=FreezeMode.HALT,
                reason="bench",
            )
            raw = encode(freeze)
            began = time.monotonic()
            operator.publish(topic, b"agent=bench-agent", raw)
            kind, cid, at = _expect(parent, "refused")
            assert cid == freeze.command_id, (kind, cid)
            freeze_ms.append((at - began) * 1000)
            lift = encode(command(key, ControlAction.LIFT, refers_to=freeze.command_id))
            began = time.monotonic()
            operator.publish(topic, b"agent=bench-agent", lift)
            _expect(parent, "passed")
            lift_ms.append((time.monotonic() - began) * 1000)
            time.sleep(random.uniform(0.01, 0.04))
    finally:
        stop.set()
        rate = None
        while parent.poll(10):
            message = parent.recv()
            if message[0] == "rate":
                rate = message[1]
                break
        proc.join(15)
        operator.close()
    note = f"{len(freeze_ms)} rounds, agent at {rate or 0:,.0f} calls/s"
    return [
        Figure(
            "freeze publish -> other process refuses (p50)",
            pct(freeze_ms, 50),
            "ms",
            "<= 10",
            pct(freeze_ms, 50) <= 10,
            note,
        ),
        Figure(
            "freeze publish -> other process refuses (p99)",
            pct(freeze_ms, 99),
            "ms",
            "<= 25",
            pct(freeze_ms, 99) <= 25,
            f"max {max(freeze_ms):.1f} ms",
        ),
        Figure(
            "lift publish -> calls pass again (p50)",
            pct(lift_ms, 50),
            "ms",
            "-",
            True,
            f"p99 {pct(lift_ms, 99):.1f} ms",
        ),
    ]


def _expect(conn: Connection, kind: str) -> tuple[Any, ...]:
    while conn.poll(10):
        message: tuple[Any, ...] = conn.recv()
        if message[0] == kind:
            return message
    raise RuntimeError(f"no {kind!r} from the agent within 10 s")


# --- 2. guard check cost --------------------------------------------------------------------
_DIMS = ("tool", "agent", "identity", "run", "workflow", "tenant", "environment")


def _scope(rng: random.Random) -> dict[str, str]:
    return {d: f"{d}-{rng.randrange(1000)}" for d in rng.sample(_DIMS, rng.randint(1, 3))}


def bench_check(bootstrap: str, sizes: Sizes) -> list[Figure]:
    key = new_signing_key()
    settings = fresh(bootstrap, key)
    rng = random.Random(7)
    sink = KafkaEventSink(settings, bootstrap, config={"linger.ms": 5})
    for _ in range(sizes.freezes):
        mode = rng.choice(list(FreezeMode))
        scope = _scope(rng)
        if mode is FreezeMode.QUARANTINE_IDENTITY:
            scope = {"identity": f"identity-{rng.randrange(1000)}"}
        sink.publish(
            settings.topic("control"),
            b"bench",
            encode(command(key, ControlAction.FREEZE, scope=scope, mode=mode, reason="bench")),
            confirm=False,
        )
    sink.close()
    calls = [
        CallScope(
            f"tool-{rng.randrange(1000)}",
            f"agent-{rng.randrange(1000)}",
            f"identity-{rng.randrange(1000)}",
            f"run-{rng.randrange(1000)}",
            tuple(f"run-{rng.randrange(1000)}" for _ in range(rng.randint(0, 2))),
            f"workflow-{rng.randrange(1000)}",
            f"tenant-{rng.randrange(1000)}",
            f"environment-{rng.randrange(1000)}",
            rng.choice([Reversibility.REVERSIBLE, Reversibility.READ_ONLY]),
        )
        for _ in range(2_000)
    ]
    with ControlGuard(settings, bootstrap) as guard:
        active = len(guard.freezes())  # also checks every deferred signature
        passing = [c for c in calls if guard.blocking(c) is None]
        blocked = [c for c in calls if guard.blocking(c) is not None]
        per_pass = _time_checks(guard, passing, sizes.checks)
        per_block = _time_checks(guard, blocked, max(1, sizes.checks // 10))
    note = f"{active:,} active freezes; {len(blocked)}/{len(calls)} sample calls blocked"
    return [
        Figure("guard check, call passes (mean)", per_pass, "us", "<= 20", per_pass <= 20, note),
        Figure(
            "guard check, call refused (mean, raises)",
            per_block,
            "us",
            "-",
            True,
            "includes building the Frozen exception",
        ),
    ]


def _time_checks(guard: ControlGuard, calls: list[CallScope], n: int) -> float:
    if not calls:
        return 0.0
    check = guard.check
    rounds = max(1, n // len(calls))
    began = time.perf_counter()
    for _ in range(rounds):
        for call in calls:
            try:  # noqa: SIM105 - suppress() would add its own cost to what is measured
                check(call)
            except Frozen:
                pass
    return (time.perf_counter() - began) / (rounds * len(calls)) * 1e6


# --- 3. rebuild from 100,000 commands ---------------------------------------------------------
def bench_rebuild(bootstrap: str, sizes: Sizes) -> list[Figure]:
    key = new_signing_key()
    settings = fresh(bootstrap, key)
    n = sizes.history
    lifted = int(n * 0.295)
    active = int(n * 0.01)
    decisions = n - 2 * lifted - active
    began = time.perf_counter()
    records: list[bytes] = []
    open_freezes: list[str] = []
    rng = random.Random(11)
    for i in range(lifted + active):
        freeze = command(key, ControlAction.FREEZE, scope=_scope(rng), reason="history")
        records.append(encode(freeze))
        if i < lifted:
            open_freezes.append(freeze.command_id)
        if open_freezes and (rng.random() < 0.5 or i >= lifted):
            target = open_freezes.pop(0)
            records.append(encode(command(key, ControlAction.LIFT, refers_to=target)))
        if i % 3 == 0 and decisions > 0:
            action = ControlAction.APPROVE if decisions % 2 else ControlAction.DENY
            records.append(encode(command(key, action, refers_to=f"apr_{i}")))
            decisions -= 1
    for target in open_freezes:
        records.append(encode(command(key, ControlAction.LIFT, refers_to=target)))
    while decisions > 0:
        records.append(encode(command(key, ControlAction.APPROVE, refers_to=f"apr_x{decisions}")))
        decisions -= 1
    sink = KafkaEventSink(settings, bootstrap, config={"linger.ms": 20})
    for raw in records:
        sink.publish(settings.topic("control"), b"bench", raw, confirm=False)
    sink.close()
    print(
        f"  (history: {len(records):,} signed commands written in "
        f"{time.perf_counter() - began:.1f} s)",
        flush=True,
    )
    began = time.perf_counter()
    guard = ControlGuard(settings, bootstrap).start(timeout=120)
    ready = time.perf_counter() - began
    try:
        while guard.unsettled:
            time.sleep(0.05)
        settled = time.perf_counter() - began
        in_force = len(guard.freezes())
    finally:
        guard.close()
    return [
        Figure(
            f"rebuild from {len(records):,} commands (usable)",
            ready,
            "s",
            "<= 5",
            ready <= 5 and guard.rebuild_records == len(records),
            f"{guard.rebuild_records:,} folded, {in_force:,} freezes in force",
        ),
        Figure(
            "... every deferred signature checked",
            settled,
            "s",
            "-",
            True,
            "background, after the view is usable",
        ),
    ]


def run(sizes: Sizes, bootstrap: str | None) -> list[Figure]:
    """Run every part against the broker and print its figures; return them."""
    with bench_broker(bootstrap) as address:
        return measure(
            [partial(part, address, sizes) for part in (bench_latency, bench_check, bench_rebuild)],
            decimals=3,
        )


def main(argv: list[str] | None = None) -> None:
    args = size_arguments(__doc__, argv)
    sizes = QUICK if args.quick else DEFAULT
    headline(
        "containment",
        f"{'quick' if args.quick else 'default'} sizes: {sizes.rounds} freeze rounds at "
        f"{sizes.calls_per_s:,} calls/s, {sizes.freezes:,} active freezes, "
        f"{sizes.history:,}-command history",
    )
    run(sizes, Settings().bootstrap)  # the entrypoint: BACKOUT_* from the environment


if __name__ == "__main__":
    main()
