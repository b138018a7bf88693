"""Approval gates: a call whose tool requires approval waits for an operator's decision. [adapter]

When a tool's ``requires_approval`` predicate holds for a call's arguments, the Journal
asks the gate. The gate publishes an ActionEvent ``kind=approval_requested, status=pending``
whose event id is the request id, waits for a signed ``approve`` or ``deny`` whose
``refers_to`` is that id (``backout approve ID [--args JSON]`` / ``backout deny ID``), and
journals the outcome as ``kind=approval_decided`` (requested and approved arguments,
``status`` succeeded or blocked). No decision within ``approval_timeout_s`` of the
request is a denial.

The request id is derived from the tool and the call's idempotency key, so a restarted
agent that makes the same call computes the same id: it finds a decision already made on
the control topic, or finds its pending request on the actions topic (by the
``backout-approval-request`` header) and keeps waiting until the *original* deadline.

An approver may narrow arguments: ``approved_args`` replaces those arguments (it may only
name arguments the call has). The gate returns the arguments the approver changed (``{}``
when approved as requested), which the Journal merges over the call's own and records as
the tool call's ``approved_args``; the ``approval_decided`` event holds the full set.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from confluent_kafka import Consumer

from backout.infra.broker import kafka_config
from backout.infra.settings import Settings
from backout.producers.control import FreezeView
from backout.producers.freezes import ControlRecord, Decision
from backout.producers.registry import json_args
from backout.producers.sink import Headers, InMemoryEventSink
from backout.schemas.errors import ApprovalDenied, DecodeError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ErrorInfo,
    EventKind,
    JsonMap,
    TargetRef,
)
from backout.schemas.registry import Codec

if TYPE_CHECKING:
    from backout.producers.journal import Journal, _Call

log = logging.getLogger("backout.approval")

REQUEST_HEADER = "backout-approval-request"
"""Header carrying the request id on approval events, so a restarted agent finds them."""


# --- pure parts ---------------------------------------------------------------------------
def request_id_for(tool: str, idempotency_key: str) -> str:
    """The approval request id of a call: the same for the same tool and idempotency key."""
    digest = hashlib.sha256(f"{tool}\x00{idempotency_key}".encode()).hexdigest()
    return f"apr_{digest[:24]}"


def narrowed_args(requested: JsonMap, decision: Decision) -> JsonMap:
    """The arguments an approval changes (``{}`` when approved as requested).

    Raises:
        ValueError: the approval names an argument the call does not have.
    """
    approved = decision.approved_args or {}
    unknown = sorted(set(approved) - set(requested))
    if unknown:
        raise ValueError(f"the approval sets unknown argument {unknown[0]!r}")
    return {k: v for k, v in approved.items() if requested.get(k) != v}


def _base_event(
    call: _Call,
    *,
    request_id: str,
    event_id: str,
    kind: EventKind,
    status: CallStatus,
    now: datetime,
) -> ActionEvent:
    spec, run = call.spec, call.run
    target = (
        TargetRef(system=spec.system, object_id=call.object_id)
        if spec.system is not None and call.object_id is not None
        else None
    )
    return ActionEvent(
        event_id=event_id,
        occurred_at=now,
        kind=kind,
        **run.event_fields(),
        step_id=call.step_id,
        parent_step_id=call.parent_step_id,
        tool=spec.name,
        requested_args=json_args(call.args),
        target=target,
        reversibility=spec.reversibility,
        idempotency_key=call.key,
        status=status,
        labels={"approval_request": request_id},
    )


# --- ports and adapters ----------------------------------------------------------------------
class DecisionSource(Protocol):
    """Where decisions on approval requests are found (a started ControlGuard)."""

    def decision(self, request_id: str) -> Decision | None: ...

    def wait_decision(self, request_id: str, timeout: float) -> Decision | None: ...


class RequestLookup(Protocol):
    """Finds an approval request published earlier (by this or a previous process)."""

    def find(self, request_id: str, since: datetime) -> ActionEvent | None: ...


class LocalDecisions:
    """A DecisionSource over a FreezeView fed by hand: the fake for unit tests."""

    def __init__(self, trusted_keys: dict[str, str]) -> None:
        self.view = FreezeView(trusted_keys)
        self._changed = threading.Condition()

    def apply(self, record: ControlRecord) -> None:
        """Fold one control record and wake waiters."""
        with self._changed:
            self.view.apply(record)
            self._changed.notify_all()

    def decision(self, request_id: str) -> Decision | None:
        with self._changed:
            return self.view.decision(request_id)

    def wait_decision(self, request_id: str, timeout: float) -> Decision | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := self.view.decision(request_id)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return found


class SinkRequestLookup:
    """Finds requests in an InMemoryEventSink: the fake for unit tests."""

    def __init__(self, sink: InMemoryEventSink, codec: Codec, topic: str) -> None:
        self._sink, self._codec, self._topic = sink, codec, topic

    def find(self, request_id: str, since: datetime) -> ActionEvent | None:
        for record in self._sink.on(self._topic):
            if (REQUEST_HEADER, request_id.encode()) in record.headers:
                event: ActionEvent = self._codec.decode(record.value, ActionEvent)
                if event.kind is EventKind.APPROVAL_REQUESTED:
                    return event
        return None


class KafkaRequestLookup:
    """Scans the actions topic from ``since`` to its end for the request's header. [adapter]

    Only records carrying the request header are decoded, so the scan costs a fetch of
    the approval window, not a decode of it.
    """

    def __init__(self, settings: Settings, bootstrap: str, codec: Codec) -> None:
        self._settings, self._bootstrap, self._codec = settings, bootstrap, codec

    def find(self, request_id: str, since: datetime) -> ActionEvent | None:
        from backout.producers.downstream import scan_topic

        consumer = Consumer(
            kafka_config(
                self._settings,
                self._bootstrap,
                **{
                    "group.id": "backout-approval-lookup",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 10,
                },
            )
        )
        wanted = (REQUEST_HEADER, request_id.encode())
        try:
            for msg in scan_topic(consumer, self._settings.topic("actions"), since=since):
                if wanted not in (msg.headers() or []):
                    continue
                try:
                    event: ActionEvent = self._codec.decode(msg.value() or b"", ActionEvent)
                except DecodeError:
                    continue
                if event.kind is EventKind.APPROVAL_REQUESTED:
                    return event
            return None
        finally:
            consumer.close()


class ApprovalGate:
    """Publishes approval requests and waits for their decisions (the Journal's hook).

    Args:
        settings: ``approval_timeout_s``.
        decisions: where decisions show up (the Journal's ControlGuard).
        lookup: finds a request published before a restart (None: always publish anew).
        clock: the current time (tests pass a fake).
    """

    def __init__(
        self,
        settings: Settings,
        decisions: DecisionSource,
        *,
        lookup: RequestLookup | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.timeout = timedelta(seconds=settings.approval_timeout_s)
        self._decisions = decisions
        self._lookup = lookup
        self._clock = clock

    def decide(self, journal: Journal, call: _Call) -> JsonMap:
        """Publish the request (unless found), wait for the decision, return changed args.

        Raises:
            ApprovalDenied: denied, timed out, or the approval names unknown arguments.
        """
        request_id = request_id_for(call.spec.name, call.key)
        decision = self._decisions.decision(request_id)
        requested_at = self._clock()
        if decision is None:
            found = (
                self._lookup.find(request_id, requested_at - self.timeout - timedelta(minutes=1))
                if self._lookup is not None
                else None
            )
            if found is not None:
                requested_at = found.occurred_at
                log.info("approval request %s found again; waiting", request_id)
            else:
                self._publish(
                    journal,
                    call,
                    request_id,
                    EventKind.APPROVAL_REQUESTED,
                    CallStatus.PENDING,
                    requested_at,
                )
                log.warning(
                    "call to %r waits for approval: backout approve %s (or deny)",
                    call.spec.name,
                    request_id,
                )
            remaining = (requested_at + self.timeout - self._clock()).total_seconds()
            if remaining > 0:
                decision = self._decisions.wait_decision(request_id, remaining)
        return self._conclude(journal, call, request_id, decision)

    def _conclude(
        self, journal: Journal, call: _Call, request_id: str, decision: Decision | None
    ) -> JsonMap:
        tool = call.spec.name
        if decision is None:
            message = (
                f"no decision on approval request {request_id} for {tool!r} within "
                f"{self.timeout.total_seconds():g}s: denied by default (approve it with "
                f"`backout approve {request_id}` and retry)"
            )
            self._denied(journal, call, request_id, None, message)
            raise ApprovalDenied(message, request_id=request_id, timed_out=True)
        if not decision.approved:
            message = (
                f"call to {tool!r} denied by {decision.issuer or 'an operator'} "
                f"({decision.command_id}): {decision.reason or 'no reason given'}"
            )
            self._denied(journal, call, request_id, decision, message)
            raise ApprovalDenied(message, request_id=request_id)
        requested = json_args(call.args)
        try:
            changed = narrowed_args(requested, decision)
        except ValueError as exc:
            message = f"approval {decision.command_id} of {tool!r} is unusable: {exc}"
            self._denied(journal, call, request_id, decision, message)
            raise ApprovalDenied(message, request_id=request_id) from None
        self._publish(
            journal,
            call,
            request_id,
            EventKind.APPROVAL_DECIDED,
            CallStatus.SUCCEEDED,
            self._clock(),
            approved_args={**requested, **changed},
            decided_by=decision,
        )
        return changed

    def _denied(
        self,
        journal: Journal,
        call: _Call,
        request_id: str,
        decision: Decision | None,
        message: str,
    ) -> None:
        self._publish(
            journal,
            call,
            request_id,
            EventKind.APPROVAL_DECIDED,
            CallStatus.BLOCKED,
            self._clock(),
            decided_by=decision,
            error=ErrorInfo(type="ApprovalDenied", message=message, retryable=False),
        )

    def _publish(
        self,
        journal: Journal,
        call: _Call,
        request_id: str,
        kind: EventKind,
        status: CallStatus,
        now: datetime,
        *,
        approved_args: JsonMap | None = None,
        decided_by: Decision | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        event_id = (
            request_id
            if kind is EventKind.APPROVAL_REQUESTED
            else request_id.replace("apr_", "apd_", 1)
        )
        event = _base_event(
            call, request_id=request_id, event_id=event_id, kind=kind, status=status, now=now
        )
        labels = dict(event.labels)
        if decided_by is not None:
            labels.update(decided_by=decided_by.command_id, approver=decided_by.issuer)
        event = event.model_copy(
            update={
                "approved_args": approved_args,
                "error": error,
                "blocked_by": decided_by.command_id
                if decided_by is not None and status is CallStatus.BLOCKED
                else None,
                "labels": labels,
            }
        )
        headers: Headers = [(REQUEST_HEADER, request_id.encode())]
        journal.sink.publish(
            journal.topic,
            event.key.encode(),
            journal.codec.encode(event),
            headers=headers,
            confirm=True,
        )
