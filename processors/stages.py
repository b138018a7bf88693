"""The two processor stages, free of Faust: route by agent, then detect and respond.
[adapter: codec, signing; output through the ``Outbox`` and ``StateStore`` ports]

``RouteStage`` reads the actions topic (keyed by record) and forwards each record's
bytes to the routed topic, batched per routed partition (an agent's records always go
to the same partition). ``DetectStage`` reads the routed topic,
decodes each record once, folds it through the :class:`~backout.processors.engine.Engine`
with the agent's and its runs' states from the ``StateStore``, publishes a Signal per
finding and a signed ControlCommand per response, and then stores the new states.

Both stages split a batch's work from waiting for the broker, so a worker keeps
processing while earlier batches are in flight: ``process`` does the work and queues
the outputs (signals and commands leave at once), returning their acknowledgements.
``DetectStage`` keeps the states it changed in memory (decoded, so the next batches do
not parse them again) and writes each changed state once per :meth:`DetectStage.checkpoint`,
not once per batch. The app acknowledges records (so their offsets can be committed)
only after their outputs and the checkpoint that covers them are durable.

Delivery: a checkpoint snapshots the states when it starts, waits until the outputs of
every batch processed before that are acknowledged, then stores the snapshot. After a
crash, records are processed again: states remember the newest source offset they
applied and skip older ones, findings and commands are recomputed with the same ids,
and commands already on the control topic (the ``Ledger``) are not sent again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backout.processors.engine import Engine, Step, command_key, signal_key, signal_of
from backout.processors.envelope import Routed, pack, partition_for, route_fields, unpack
from backout.processors.findings import EventRef, Finding, ScopeState
from backout.schemas.errors import DecodeError
from backout.schemas.events import ActionEvent, ControlCommand
from backout.schemas.registry import Codec
from backout.schemas.signing import SigningKey, sign

log = logging.getLogger("backout.processors")

Headers = list[tuple[str, bytes]]
Store = Callable[[], Awaitable[None]]
"""Stores a checkpoint's snapshot; completes when it is durable."""
DLQ_REASON = "backout-dlq-reason"
"""Dead-letter header: why the record could not be processed."""
DLQ_FROM = "backout-dlq-from"
"""Dead-letter header: ``topic/partition@offset`` the record was read at."""
DLQ_CONSUMER = "backout-dlq-consumer"
"""Dead-letter header: which stage gave up on it (``processors:route``, ``processors:detect``)."""


class Incoming(Protocol):
    """A consumed record: a :class:`Record`, or the Kafka client's record as it came."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


def position_of(record: Incoming) -> str:
    """``topic/partition@offset`` of ``record``."""
    return f"{record.topic}/{record.partition}@{record.offset}"


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed record with its position."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)

    @property
    def position(self) -> str:
        """``topic/partition@offset``."""
        return f"{self.topic}/{self.partition}@{self.offset}"


class Outbox(Protocol):
    """Where stages publish records."""

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Awaitable[object]:
        """Queue a record (to ``partition``, else by key); the awaitable completes once the
        broker acknowledged it."""
        ...


class StateStore(Protocol):
    """Detector state by key, partitioned like the routed topic."""

    def read(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes, partition: int) -> Awaitable[object]: ...

    def drop(self, key: bytes, partition: int) -> Awaitable[object] | None: ...

    def seal(self, partitions: Iterable[int]) -> Awaitable[None]:
        """Mark the end of a checkpoint on ``partitions`` (after its writes are durable)."""
        ...


class Ledger(Protocol):
    """Command ids already on the control topic."""

    def holds(self, command_id: str) -> bool: ...

    def add(self, command_id: str) -> None: ...


@dataclass
class Stats:
    """Counters a worker reports."""

    routed: int = 0
    detected: int = 0
    skipped: int = 0
    """Records already applied before a restart."""
    findings: int = 0
    commands: int = 0
    commands_known: int = 0
    """Commands not sent because the control topic already had them."""
    dead_letters: int = 0
    sampled: int = 0
    rechecked: int = 0
    drifted: int = 0


class Emitter:
    """Publishes signals, signed commands and dead letters.

    Args:
        outbox: where records go.
        codec: encodes Signals and ControlCommands.
        key: signs every command.
        topics: full names of the signals, control and dlq topics.
        ledger: command ids already published (None: send every command).
    """

    def __init__(
        self,
        outbox: Outbox,
        codec: Codec,
        key: SigningKey,
        *,
        signals: str,
        control: str,
        dlq: str,
        ledger: Ledger | None,
        stats: Stats,
    ) -> None:
        self._outbox = outbox
        self._codec = codec
        self._key = key
        self._signals, self._control, self._dlq = signals, control, dlq
        self._ledger = ledger
        self.stats = stats

    def finding(self, finding: Finding) -> Awaitable[object]:
        """Publish the Signal of ``finding``."""
        self.stats.findings += 1
        return self._outbox.send(
            self._signals, signal_key(finding).encode(), self._codec.encode(signal_of(finding))
        )

    def command(self, command: ControlCommand) -> Awaitable[object] | None:
        """Sign and publish ``command``, unless the control topic already has its id."""
        if self._ledger is not None and self._ledger.holds(command.command_id):
            self.stats.commands_known += 1
            return None
        signed = sign(command, self._key)
        self.stats.commands += 1
        sent = self._outbox.send(
            self._control, command_key(signed).encode(), self._codec.encode(signed)
        )
        if self._ledger is not None:
            self._ledger.add(command.command_id)
        return sent

    def outcome(
        self, findings: Iterable[Finding], commands: Iterable[tuple[ControlCommand, Finding]]
    ) -> list[Awaitable[object]]:
        """Publish every finding's signal and every command."""
        sent = [self.finding(f) for f in findings]
        for command, _ in commands:
            future = self.command(command)
            if future is not None:
                sent.append(future)
        return sent

    def dead_letter(
        self,
        record: Incoming,
        reason: str,
        stage: str,
        *,
        value: bytes | None = None,
        source: str | None = None,
    ) -> Awaitable[object]:
        """Park ``record`` (or ``value`` taken from it) on the dead-letter topic."""
        self.stats.dead_letters += 1
        where = source or position_of(record)
        log.warning("dead-lettering %s (%s): %s", where, stage, reason)
        return self._outbox.send(
            self._dlq,
            record.key,
            value if value is not None else (record.value or b""),
            headers=[
                (DLQ_REASON, reason.encode()),
                (DLQ_FROM, where.encode()),
                (DLQ_CONSUMER, f"processors:{stage}".encode()),
            ],
        )


class Sampler(Protocol):
    """Supervisor sampling hook of the route stage."""

    def observe(self, record: Incoming, event_id: str, event: ActionEvent | None) -> None:
        """See one action record (``event`` when it was already decoded)."""
        ...


class RouteStage:
    """Forwards action records to the routed topic, one batch per routed partition."""

    def __init__(
        self,
        outbox: Outbox,
        emitter: Emitter,
        codec: Codec,
        *,
        routed: str,
        partitions: int,
        envelope_bytes: int = 512 * 1024,
        sampler: Sampler | None = None,
    ) -> None:
        self._partitions = partitions
        self._outbox = outbox
        self._emitter = emitter
        self._codec = codec
        self._routed = routed
        self._envelope_bytes = envelope_bytes
        self._sampler = sampler

    async def handle(self, records: Sequence[Incoming]) -> None:
        """Route ``records`` and wait until the routed batches are acknowledged."""
        await asyncio.gather(*self.process(records))

    def process(self, records: Sequence[Incoming]) -> list[Awaitable[object]]:
        """Route ``records``; returns the acknowledgements of what was sent."""
        groups: dict[int, list[Routed]] = {}
        pending: list[Awaitable[object]] = []
        where: dict[str, int] = {}
        for record in records:
            raw = record.value
            if not raw:
                pending.append(self._emitter.dead_letter(record, "empty record value", "route"))
                continue
            fields, event = route_fields(raw), None
            if fields is None:
                try:
                    event = self._codec.decode(raw, ActionEvent)
                except DecodeError as exc:
                    pending.append(self._emitter.dead_letter(record, exc.reason, "route"))
                    continue
                fields = (event.event_id, event.agent_id)
            agent = fields[1]
            partition = where.get(agent)
            if partition is None:
                partition = where[agent] = partition_for(agent, self._partitions)
            groups.setdefault(partition, []).append((record.partition, record.offset, raw))
            if self._sampler is not None:
                self._sampler.observe(record, fields[0], event)
        for partition, items in groups.items():
            for blob in self._split(items):
                pending.append(self._outbox.send(self._routed, None, blob, partition=partition))
        self._emitter.stats.routed += sum(len(items) for items in groups.values())
        return pending

    def _split(self, items: list[Routed]) -> Iterable[bytes]:
        chunk: list[Routed] = []
        size = 0
        for item in items:
            if chunk and size + len(item[2]) + 30 > self._envelope_bytes:
                yield pack(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item[2]) + 30
        if chunk:
            yield pack(chunk)


def agent_key(agent: str) -> bytes:
    """State key of an agent."""
    return b"agent\x1f" + agent.encode()


def run_key(agent: str, run: str) -> bytes:
    """State key of a run (per agent, so two agents reusing a run id never share it)."""
    return b"run\x1f" + agent.encode() + b"\x1f" + run.encode()


@dataclass
class _Group:
    partition: int
    batch: list[tuple[ActionEvent, EventRef]] = field(default_factory=list)


class DetectStage:
    """Decodes routed records, runs the engine, publishes, and checkpoints states.

    Args:
        engine: detectors and responses.
        emitter: publishes signals, commands and dead letters.
        store: durable states (a Faust table in the app).
        codec: decodes ActionEvents.
        actions: the actions topic (for evidence).
        max_cached: clean states kept decoded in memory after a checkpoint.
    """

    def __init__(
        self,
        engine: Engine,
        emitter: Emitter,
        store: StateStore,
        codec: Codec,
        *,
        actions: str,
        max_cached: int = 5_000,
    ) -> None:
        self._engine = engine
        self._emitter = emitter
        self._store = store
        self._codec = codec
        self._actions = actions
        self._max_cached = max_cached
        self._cache: dict[bytes, ScopeState | None] = {}
        """Decoded states; None: deleted, not yet stored."""
        self._dirty: dict[bytes, int] = {}
        """Keys changed since the last checkpoint snapshot -> their partition."""

    async def handle(self, records: Sequence[Incoming]) -> None:
        """Process ``records`` and wait until outputs and states are durable."""
        await asyncio.gather(*self.process(records))
        await self.checkpoint()()

    def process(self, records: Sequence[Incoming]) -> list[Awaitable[object]]:
        """Process routed ``records``; returns the acknowledgements of the outputs."""
        stats = self._emitter.stats
        pending: list[Awaitable[object]] = []
        groups: dict[str, _Group] = {}
        for record in records:
            try:
                items = unpack(record.value or b"")
            except ValueError as exc:
                pending.append(self._emitter.dead_letter(record, str(exc), "detect"))
                continue
            for partition, offset, raw in items:
                try:
                    event = self._codec.decode(raw, ActionEvent)
                except DecodeError as exc:
                    pending.append(
                        self._emitter.dead_letter(
                            record,
                            exc.reason,
                            "detect",
                            value=raw,
                            source=f"{self._actions}/{partition}@{offset}",
                        )
                    )
                    continue
                group = groups.get(event.agent_id)
                if group is None:
                    group = groups[event.agent_id] = _Group(record.partition)
                group.batch.append(
                    (event, EventRef(event.event_id, self._actions, partition, offset))
                )
        for agent, group in groups.items():
            step = self._step(agent, group.batch)
            pending.extend(self._emitter.outcome(step.findings, step.commands))
            stats.detected += len(group.batch) - step.skipped
            stats.skipped += step.skipped
            self._keep(agent, group.partition, step)
        return pending

    def checkpoint(self) -> Store:
        """Snapshot the states changed so far; the result stores the snapshot.

        Call it only once the outputs of every batch processed so far are acknowledged
        (or await those first, without processing more in between).
        """
        snapshot: list[tuple[bytes, bytes | None, int]] = []
        for key, partition in self._dirty.items():
            state = self._cache[key]
            snapshot.append((key, state.to_bytes() if state is not None else None, partition))
        self._dirty = {}

        async def store() -> None:
            written = []
            partitions = set()
            for key, value, partition in snapshot:
                partitions.add(partition)
                if value is None:
                    dropped = self._store.drop(key, partition)
                    if dropped is not None:
                        written.append(dropped)
                    if self._cache.get(key, b"") is None and key not in self._dirty:
                        del self._cache[key]
                else:
                    written.append(self._store.put(key, value, partition))
            await asyncio.gather(*written)
            if partitions:
                await self._store.seal(sorted(partitions))
            if len(self._cache) > self._max_cached:
                self._cache = {k: v for k, v in self._cache.items() if k in self._dirty}

        return store

    @property
    def dirty(self) -> int:
        """States changed since the last checkpoint snapshot."""
        return len(self._dirty)

    def reset(self) -> None:
        """Forget cached and unsaved states (after a rebalance the store is the truth)."""
        self._cache.clear()
        self._dirty.clear()

    def _state(self, key: bytes) -> ScopeState:
        if key in self._cache:
            return self._cache[key] or ScopeState()
        state = ScopeState.from_bytes(self._store.read(key))
        self._cache[key] = state
        return state

    def _step(self, agent: str, batch: list[tuple[ActionEvent, EventRef]]) -> Step:
        runs = {}
        for event, _ in batch:
            if event.run_id not in runs:
                runs[event.run_id] = self._state(run_key(agent, event.run_id))
        return self._engine.step(self._state(agent_key(agent)), runs, batch)

    def _keep(self, agent: str, partition: int, step: Step) -> None:
        changes: list[tuple[bytes, ScopeState | None]] = [(agent_key(agent), step.agent)]
        changes += [(run_key(agent, run), state) for run, state in step.runs.items()]
        changes += [(run_key(agent, run), None) for run in step.expired_runs]
        for key, state in changes:
            self._cache[key] = state
            self._dirty[key] = partition
