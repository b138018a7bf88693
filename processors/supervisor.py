"""Supervisor sampling: re-check a share of succeeded writes on the live target. [adapter]

The route stage sees every journaled write of a record in order (the actions topic is
keyed by record), so it is where writes are sampled: :func:`~backout.processors.sampling.sampled`
picks events by a hash of their id, deterministically. ``recheck_after`` later the record
is read through its :class:`~backout.producers.targets.Target` and compared with the
sampled after-image (:func:`~backout.processors.sampling.drift_finding`).

A newer journaled write of the same record replaces the pending check, so legitimate
later writes are never reported. A drift is held for ``confirm_after`` seconds before it
is reported, so a write that happened on the target just before the read, and whose
event is still on its way, cancels it instead. Pending checks live in memory: after a
restart or a rebalance the records reprocessed are sampled again, older ones are not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backout.processors.engine import Engine
from backout.processors.findings import EventRef, Finding
from backout.processors.policy import SupervisorSpec
from backout.processors.sampling import drift_finding, samplable, sampled
from backout.processors.stages import Emitter, Incoming
from backout.producers.targets import Target, TargetUnavailable
from backout.schemas.errors import DecodeError
from backout.schemas.events import ActionEvent, Severity
from backout.schemas.registry import Codec

log = logging.getLogger("backout.processors.supervisor")

_ATTEMPTS = 3


@dataclass
class _Pending:
    event: ActionEvent
    ref: EventRef
    partition: int
    due: float
    finding: Finding | None = None
    attempts: int = 0


class Supervisor:
    """Samples writes in the route stage and re-checks them on their targets.

    Args:
        spec: share, delay and bound from the policy.
        targets: where records can be read, by ``Target.system``.
        engine: turns drift findings into commands (with the policy's cooldown).
        emitter: publishes the signals and commands.
        codec: decodes sampled records the route stage did not decode.
        actions: the actions topic (for evidence).
        severity: severity of a drift finding.
        confirm_after_s: how long a drift waits for a late journal event before it counts.
        clock: monotonic seconds (a fake in tests).
    """

    def __init__(
        self,
        spec: SupervisorSpec,
        targets: Iterable[Target],
        engine: Engine,
        emitter: Emitter,
        codec: Codec,
        *,
        actions: str,
        severity: Severity,
        confirm_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._share = spec.share
        self._recheck_after = spec.recheck_after.total_seconds()
        self._max_pending = spec.max_pending
        self._targets = {t.system: t for t in targets}
        self._engine = engine
        self._emitter = emitter
        self._codec = codec
        self._actions = actions
        self._severity = severity
        self._confirm_after = confirm_after_s
        self._clock = clock
        self._pending: dict[bytes, _Pending] = {}
        self._issued: dict[str, int] = {}
        self.dropped = 0

    @property
    def active(self) -> bool:
        """True when sampling is on and there is a target to re-check against."""
        return self._share > 0 and bool(self._targets)

    @property
    def pending(self) -> int:
        """Checks waiting."""
        return len(self._pending)

    def observe(self, record: Incoming, event_id: str, event: ActionEvent | None) -> None:
        """See one action record in log order (``event`` when already decoded)."""
        key = record.key
        if key is None:
            return
        waiting = self._pending.get(key)
        if waiting is None and not sampled(event_id, self._share):
            return
        event = event if event is not None else self._decode(record)
        if event is None or not samplable(event) or event.target is None:
            if waiting is not None:
                del self._pending[key]  # a write we cannot judge replaced the sampled one
            return
        if event.target.system not in self._targets:
            return
        if waiting is None and len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        if waiting is None:
            self._emitter.stats.sampled += 1
        ref = EventRef(event.event_id, self._actions, record.partition, record.offset)
        self._pending[key] = _Pending(
            event, ref, record.partition, self._clock() + self._recheck_after
        )

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop checks of records on partitions this worker no longer reads."""
        gone = set(partitions)
        for key in [k for k, p in self._pending.items() if p.partition in gone]:
            del self._pending[key]

    async def run(self, tick_s: float = 0.5) -> None:
        """Re-check due records until cancelled."""
        while True:
            await asyncio.sleep(tick_s)
            try:
                await self.tick()
            except Exception:  # a broken target must not stop sampling
                log.exception("supervisor re-check failed")

    async def tick(self) -> None:
        """Re-check every record whose time has come; report confirmed drifts."""
        now = self._clock()
        for key, pending in [(k, p) for k, p in self._pending.items() if p.due <= now]:
            if self._pending.get(key) is not pending:
                continue
            if pending.finding is not None:
                del self._pending[key]
                await self._report(pending.finding)
                continue
            finding = await self._recheck(pending)
            if self._pending.get(key) is not pending:
                continue  # replaced by a newer write while the target was read
            if finding is None:
                if pending.attempts == 0 or pending.attempts >= _ATTEMPTS:
                    del self._pending[key]
                else:
                    pending.due = self._clock() + self._recheck_after
                continue
            pending.finding = finding
            pending.due = self._clock() + self._confirm_after

    async def _recheck(self, pending: _Pending) -> Finding | None:
        event = pending.event
        assert event.target is not None
        target = self._targets[event.target.system]
        try:
            live = await asyncio.to_thread(target.read, event.target.object_id)
        except TargetUnavailable as exc:
            pending.attempts += 1
            log.warning("cannot re-check %s: %s", event.target.key, exc)
            return None
        pending.attempts = 0
        self._emitter.stats.rechecked += 1
        return drift_finding(event, pending.ref, live, self._severity)

    async def _report(self, finding: Finding) -> None:
        self._emitter.stats.drifted += 1
        commands = self._engine.respond([finding], self._issued)
        await asyncio.gather(*self._emitter.outcome([finding], commands))

    def _decode(self, record: Incoming) -> ActionEvent | None:
        try:
            event: ActionEvent = self._codec.decode(record.value or b"", ActionEvent)
        except DecodeError:
            return None
        return event
