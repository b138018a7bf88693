"""Benchmark: detection against issue 4's targets.

    python -m bench.detection           # default sizes (about 60 s on 2 cores)
    python -m bench.detection --quick   # tiny sizes (CI smoke test)
    python -m bench.detection --full    # replay of 1,000,000 actions, longer live runs

1. Throughput: one worker (the Faust app, in this process) over actions already on the
   actions topic, through every detector of the packaged default policy (plus an
   allow-list of tenants), from its first batch to the last action detected.
   Target >= 10,000 actions/s.
2. Latency: a worker in its own process (``backout processors``) while this process
   publishes 1,000 actions/s; one in 50 is offending (a write to a tenant the policy does
   not allow, each in a new run, so each calls for its own freeze). Measured from just
   before its publish to reading its freeze on the control topic. Target p99 <= 250 ms.
3. Replay: an Avro container file of actions through ``backout detect``'s code path
   (read, decode, every detector, every response). Target >= 30,000 actions/s. The
   default file has 200,000 actions (the rate holds for any size: the fold is linear);
   ``--full`` replays 1,000,000.

The action mix: 40 agents, runs of about 50 calls, 60 % succeeded writes (a third with a
value), 25 % reads, 10 % failed, 5 % in doubt, a few low-confidence and retried calls.

The broker is BACKOUT_BOOTSTRAP when set, else an embedded Tansu broker started here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from backout.processors.findings import digest
from backout.processors.policy import Policy
from backout.processors.replay import write_container
from backout.processors.replay_file import default_workers, replay_file
from backout.schemas import codec
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlCommand,
    RecordImage,
    Reversibility,
    TargetRef,
)
from backout.schemas.signing import new_signing_key
from bench.figures import Figure, bench_broker, headline, measure, size_arguments


@dataclass(frozen=True)
class Sizes:
    """How much each part does."""

    throughput: int
    latency_s: float
    latency_rate: int
    replay: int


QUICK = Sizes(throughput=3_000, latency_s=4.0, latency_rate=200, replay=5_000)
DEFAULT = Sizes(throughput=60_000, latency_s=15.0, latency_rate=1_000, replay=200_000)
FULL = Sizes(throughput=200_000, latency_s=60.0, latency_rate=1_000, replay=1_000_000)
OFFENDING_EVERY = 50


def bench_policy_data() -> dict[str, Any]:
    """The packaged default policy, plus an allow-list of the mix's tenants."""
    text = resources.files("backout.infra").joinpath("policies/default.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    data["defaults"]["allow"] = {"tenants": [f"tenant-{n}" for n in range(8)]}
    return data


def bench_policy() -> Policy:
    return Policy.model_validate(bench_policy_data())


def actions(
    n: int, *, start: datetime, spacing_s: float, seed: int = 7, offending_every: int = 0
) -> Iterator[ActionEvent]:
    """A deterministic mix of ``n`` actions, ``spacing_s`` apart in event time."""
    rng = random.Random(seed)
    run_of: dict[int, tuple[str, int]] = {}
    for i in range(n):
        agent = rng.randrange(40)
        run, left = run_of.get(agent, ("", 0))
        if left <= 0:
            run, left = f"run-{agent}-{i}", rng.randint(30, 70)
        run_of[agent] = (run, left - 1)
        roll = rng.random()
        record = f"inv-{rng.randrange(50_000)}"
        tenant = f"tenant-{agent % 8}"
        write = roll < 0.75
        status = (
            CallStatus.SUCCEEDED
            if roll < 0.60 or 0.75 <= roll < 0.90
            else CallStatus.FAILED
            if roll < 0.70
            else CallStatus.UNKNOWN
        )
        fields: dict[str, Any] = {}
        if offending_every and i % offending_every == offending_every - 1:
            tenant, run, write, status = "not-allowed", f"bad-run-{i}", True, CallStatus.SUCCEEDED
            fields["labels"] = {"bench": "offending"}
        if rng.random() < 0.01:
            fields["confidence"] = 0.2
        yield ActionEvent(
            event_id=f"ev-{seed}-{i:08d}",
            occurred_at=start + timedelta(seconds=i * spacing_s),
            run_id=run,
            agent_id=f"agent-{agent}",
            identity=f"svc-{agent}",
            tenant=tenant,
            workflow=f"wf-{agent % 5}",
            step_id=f"s{i}",
            tool="set_status" if write else "get_invoice",
            requested_args={"invoice_id": record, "status": "void" if write else None},
            target=TargetRef(system="erp" if agent % 3 else "crm", object_id=record),
            reversibility=Reversibility.REVERSIBLE if write else Reversibility.READ_ONLY,
            before=RecordImage(exists=True, fields={"status": "open", "amount": 120.5}, version=3)
            if write
            else None,
            after=RecordImage(exists=True, fields={"status": "void", "amount": 120.5}, version=4)
            if write
            else None,
            idempotency_key=f"idem-{i}",
            status=status,
            value=round(rng.uniform(1, 500), 2) if write and rng.random() < 0.33 else None,
            **fields,
        )


def _settings(bootstrap: str, tmp: Path, partitions: int = 3) -> Settings:
    tmp.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        bootstrap=bootstrap,
        topic_prefix=f"bd{uuid.uuid4().hex[:8]}.",
        actions_partitions=partitions,
        state_dir=tmp / "state",
    )
    ensure_topics(settings, bootstrap)
    return settings


def _produce(settings: Settings, events: Iterator[ActionEvent]) -> int:
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap,
            "linger.ms": 5,
            "queue.buffering.max.messages": 500_000,
        }
    )
    topic = settings.topic("actions")
    n = 0
    for event in events:
        producer.produce(topic, codec.encode(event), event.key.encode())
        n += 1
        if n % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)
    return n


# --- 1. throughput ------------------------------------------------------------------------
def bench_throughput(bootstrap: str, n: int, tmp: Path) -> list[Figure]:
    from backout.processors.app import Processors, serve

    settings = _settings(bootstrap, tmp)
    start = datetime.now(UTC)
    _produce(settings, actions(n, start=start, spacing_s=0.0001))
    timing: dict[str, float] = {}

    async def main() -> Processors:
        done = asyncio.Event()

        def on_batch(stage: str, count: int) -> None:
            timing.setdefault("first", time.perf_counter())
            timing.setdefault("cpu0", time.process_time())
            if worker.stats.detected + worker.stats.skipped >= n and "last" not in timing:
                timing["last"] = time.perf_counter()
                timing["cpu1"] = time.process_time()
                done.set()

        worker = Processors(
            settings,
            bootstrap,
            bench_policy(),
            new_signing_key(),
            on_batch=on_batch,
            datadir=tmp / "faust",
        )
        asyncio.get_running_loop().set_exception_handler(lambda *_: None)  # quiet shutdown
        await serve(worker, done)
        return worker

    worker = asyncio.run(main())
    seconds = timing["last"] - timing["first"]
    rate = n / seconds
    cpu_us = (timing["cpu1"] - timing["cpu0"]) / n * 1e6
    stats = worker.stats
    return [
        Figure(
            "throughput, one worker",
            rate,
            "actions/s",
            ">= 10,000/s",
            rate >= 10_000,
            f"{n:,} actions in {seconds:.2f}s; ratio {rate / 10_000:.2f}",
        ),
        Figure(
            "  CPU per action in that worker",
            cpu_us,
            "us",
            "(info)",
            True,
            f"{stats.findings:,} findings, {stats.commands:,} freezes issued",
        ),
    ]


# --- 2. latency ---------------------------------------------------------------------------
def bench_latency(bootstrap: str, seconds: float, rate: int, tmp: Path) -> list[Figure]:
    settings = _settings(bootstrap, tmp)
    key = new_signing_key()
    key_file = tmp / "processors.key"
    key_file.write_bytes(key.private_pem())
    policy_file = tmp / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(bench_policy_data()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env.update(
        {
            "BACKOUT_BOOTSTRAP": bootstrap,
            "BACKOUT_TOPIC_PREFIX": settings.topic_prefix,
            "BACKOUT_ACTIONS_PARTITIONS": str(settings.actions_partitions),
            "BACKOUT_STATE_DIR": str(settings.state_dir),
            "BACKOUT_SIGNING_KEY_FILE": str(key_file),
            "BACKOUT_TRUSTED_KEYS": json.dumps({key.key_id: key.public_b64}),
        }
    )
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backout.infra.cli",
            "processors",
            "--policy",
            str(policy_file),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    issued: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_control, args=(settings, seen, issued, stop), daemon=True
    )
    watcher.start()
    try:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        topic = settings.topic("actions")
        # warm up: one offending action; the worker is ready once its freeze is out
        *_, warm = actions(
            OFFENDING_EVERY,
            start=datetime.now(UTC),
            spacing_s=0.001,
            seed=1,
            offending_every=OFFENDING_EVERY,
        )
        producer.produce(topic, codec.encode(warm), warm.key.encode())
        producer.flush(10)
        deadline = time.monotonic() + 120
        while _cause(warm) not in seen:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(
                    "the worker did not come up: "
                    + (tmp / "worker.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.1)
        total = int(seconds * rate)
        started = time.monotonic()
        for i, event in enumerate(
            actions(
                total,
                start=datetime.now(UTC),
                spacing_s=1 / rate,
                seed=2,
                offending_every=OFFENDING_EVERY,
            )
        ):
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            raw = codec.encode(event)
            if event.labels.get("bench") == "offending":
                sent[_cause(event)] = time.time()
            producer.produce(topic, raw, event.key.encode())
            producer.poll(0)
        producer.flush(10)
        deadline = time.monotonic() + 30
        while not set(sent) <= set(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    latencies = sorted((seen[c] - t) * 1000 for c, t in sent.items() if c in seen)
    # the freeze's record timestamp is when the worker sent it: the part up to it is the
    # worker's (and the actions hop's), the rest is the control hop to this reader
    worker_ms = sorted((issued[c] - t) * 1000 for c, t in sent.items() if c in issued)
    lost = len(sent) - len(latencies)
    p50 = statistics.median(latencies) if latencies else float("inf")
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("inf")
    note = f"{len(latencies)} freezes at {rate:,} actions/s" + (f"; {lost} MISSING" if lost else "")
    return [
        Figure(
            "offending action -> its freeze, p99",
            p99,
            "ms",
            "<= 250 ms",
            p99 <= 250 and not lost,
            note,
        ),
        Figure(
            "  same, p50",
            p50,
            "ms",
            "(info)",
            True,
            f"max {latencies[-1]:.1f} ms" if latencies else "",
        ),
        Figure(
            "  publish -> freeze sent by the worker, p99",
            worker_ms[max(0, int(len(worker_ms) * 0.99) - 1)] if worker_ms else float("inf"),
            "ms",
            "(info)",
            True,
            f"p50 {statistics.median(worker_ms):.1f} ms (the rest: control topic -> reader)"
            if worker_ms
            else "",
        ),
    ]


def _cause(event: ActionEvent) -> str:
    return "f_" + digest("policy_violation", event.event_id)


def _watch_control(
    settings: Settings, seen: dict[str, float], issued: dict[str, float], stop: threading.Event
) -> None:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": "bench-watch",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    consumer.assign([TopicPartition(settings.topic("control"), 0, 0)])
    while not stop.is_set():
        # poll, not consume(100, ...): consume waits for 100 records or its whole timeout,
        # which would add up to that timeout to every freeze read
        message = consumer.poll(0.05)
        value = message.value() if message is not None and message.error() is None else None
        if message is not None and value is not None:
            arrived = time.time()
            command = codec.decode(value, ControlCommand)
            if command.cause:
                seen.setdefault(command.cause, arrived)
                issued.setdefault(command.cause, message.timestamp()[1] / 1000)
    consumer.close()


# --- 3. replay ----------------------------------------------------------------------------
def bench_replay(n: int, tmp: Path) -> list[Figure]:
    path = tmp / "recorded.avro"
    write_container(path, actions(n, start=datetime(2026, 1, 5, tzinfo=UTC), spacing_s=0.01))
    policy = bench_policy()
    gc.disable()  # as `backout detect` does
    try:
        started = time.perf_counter()
        result = replay_file(path, policy)  # `backout detect --replay FILE`'s code path
        seconds = time.perf_counter() - started
    finally:
        gc.enable()
    rate = result.events / seconds
    size = path.stat().st_size / 1e6
    return [
        Figure(
            "replay from an Avro container file",
            rate,
            "actions/s",
            ">= 30,000/s",
            rate >= 30_000,
            f"{result.events:,} actions ({size:.0f} MB) in {seconds:.2f}s on "
            f"{default_workers()} processes, decode included; {len(result.findings):,} "
            f"findings; ratio {rate / 30_000:.2f}",
        )
    ]


PARTS = ("throughput", "latency", "replay")


def run(sizes: Sizes, bootstrap: str | None, only: str | None = None) -> list[Figure]:
    """Run every part (or ``only`` one) and print its figures; return them."""
    with bench_broker(bootstrap) as address, tempfile.TemporaryDirectory() as tmp:
        parts = {
            "throughput": lambda: bench_throughput(address, sizes.throughput, Path(tmp) / "t"),
            "latency": lambda: bench_latency(
                address, sizes.latency_s, sizes.latency_rate, Path(tmp) / "l"
            ),
            "replay": lambda: bench_replay(sizes.replay, Path(tmp)),
        }
        return measure([part for name, part in parts.items() if only in (None, name)])


def main(argv: list[str] | None = None) -> None:
    args = size_arguments(__doc__, argv, full="1,000,000-action replay, longer runs", parts=PARTS)
    sizes = QUICK if args.quick else FULL if args.full else DEFAULT
    name = "quick" if args.quick else "full" if args.full else "default"
    headline(
        "detection",
        f"{name} sizes: {sizes.throughput:,} actions through one worker, {sizes.latency_s:g}s "
        f"at {sizes.latency_rate:,} actions/s, replay of {sizes.replay:,}",
    )
    run(sizes, Settings().bootstrap, args.only)  # the entrypoint: BACKOUT_* from the environment


if __name__ == "__main__":
    main()
