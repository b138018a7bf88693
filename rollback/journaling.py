"""What a rollback publishes: its lifecycle, step markers, inverse writes, and the signed
freezes that guard the targets of manual steps.

Every event is an ActionEvent of the rollback's own run (``rollback-<plan id>``) with
origin ``rollback`` and the plan and step labels the projection folds (see
``executor.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from pydantic import JsonValue

from backout.infra.settings import Settings
from backout.producers.freezes import malformed_reason, scope_key
from backout.producers.ids import new_event_id
from backout.producers.sink import EventSink
from backout.projections.fold import LABEL_PLAN, LABEL_STEP, LABEL_UNDOES
from backout.rollback.plan import PlanStep, RollbackPlan
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ControlAction,
    ControlCommand,
    ErrorInfo,
    EventKind,
    FreezeMode,
    JsonMap,
    Origin,
    RecordImage,
    Reversibility,
    TargetRef,
)
from backout.schemas.registry import Codec
from backout.schemas.signing import SigningKey, sign


class RollbackJournal:
    """Publishes one plan's execution as events of its rollback run.

    Args:
        plan: the plan being executed.
        settings: topics and environment.
        sink: where events and freeze commands go.
        codec: record encoding.
        identity: the identity rollback events are attributed to.
        clock: the time source.
        signing_key: signs freezes; without one, manual steps are not frozen (said in
            ``notes``).
        flush_every: compare-and-set steps journaled between two flushes of the sink.
    """

    def __init__(
        self,
        plan: RollbackPlan,
        *,
        settings: Settings,
        sink: EventSink,
        codec: Codec,
        identity: str,
        clock: Callable[[], datetime],
        signing_key: SigningKey | None,
        flush_every: int,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.sink = sink
        self.codec = codec
        self.identity = identity
        self.clock = clock
        self.signing_key = signing_key
        self.flush_every = flush_every
        self.topic = settings.topic("actions")
        self.run_id = f"rollback-{plan.plan_id}"
        self.freezes: dict[str, str] = {}
        """Scope key -> the freeze command id (or why there is none)."""
        self.notes: list[str] = []
        self.since_flush = 0

    def event(
        self,
        step: PlanStep | None,
        kind: EventKind,
        *,
        tool: str,
        reversibility: Reversibility = Reversibility.READ_ONLY,
        before: RecordImage | None = None,
        after: RecordImage | None = None,
        compensates: str | None = None,
        labels: Mapping[str, str] | None = None,
        suffix: str,
        status: CallStatus = CallStatus.SUCCEEDED,
        result: JsonValue = None,
        with_target: bool = True,
        args: JsonMap | None = None,
        error: ErrorInfo | None = None,
    ) -> ActionEvent:
        """An event of the rollback run, for ``step`` (None: the run itself)."""
        target = None
        if step is not None and step.system and step.object_id and with_target:
            target = TargetRef(system=step.system, object_id=step.object_id)
        all_labels = {LABEL_PLAN: self.plan.plan_id}
        if step is not None:
            all_labels |= {LABEL_STEP: step.step_id, LABEL_UNDOES: " ".join(step.undoes)}
        step_id = f"{step.step_id}:{suffix}" if step is not None else f"{self.run_id}:{suffix}"
        return ActionEvent(
            event_id=new_event_id(),
            occurred_at=self.clock(),
            kind=kind,
            run_id=self.run_id,
            agent_id="backout",
            identity=self.identity,
            tenant=step.tenant if step is not None else self.plan.scope.tenant,
            environment=self.settings.environment,
            step_id=step_id,
            tool=tool,
            requested_args=args or {},
            target=target,
            reversibility=reversibility,
            before=before,
            after=after,
            idempotency_key=step_id,
            status=status,
            result=result,
            error=error,
            origin=Origin.ROLLBACK,
            compensates=compensates,
            labels={**all_labels, **(labels or {})},
        )

    def marker(
        self, step: PlanStep, kind: EventKind, labels: Mapping[str, str], *, confirm: bool
    ) -> None:
        """Publish a step's ``rollback_step_started`` or ``rollback_step_finished``."""
        suffix = "started" if kind is EventKind.ROLLBACK_STEP_STARTED else "finished"
        self.publish(
            self.event(step, kind, tool=f"backout.{kind.value}", labels=labels, suffix=suffix),
            confirm=confirm,
        )

    def lifecycle(self, kind: EventKind, status: CallStatus) -> None:
        """Publish the rollback run's start or finish."""
        self.publish(
            self.event(None, kind, tool=f"backout.{kind.value}", status=status, suffix=kind.value),
            confirm=False,
        )

    def publish(self, event: ActionEvent, *, confirm: bool) -> None:
        """Publish ``event`` on the actions topic (``confirm``: wait for the broker)."""
        self.sink.publish(
            self.topic, event.key.encode(), self.codec.encode(event), confirm=confirm
        )

    def tick(self) -> None:
        """Count a journaled compare-and-set step; flush the sink every ``flush_every``."""
        self.since_flush += 1
        if self.since_flush >= self.flush_every:
            self.sink.flush()
            self.since_flush = 0

    def freeze_follow_on(self, step: PlanStep, reason: str) -> str:
        """Freeze follow-on automation of the action's agent in its tenant (read-only)."""
        scope = {"agent": step.agent_id or ""}
        if step.tenant:
            scope["tenant"] = step.tenant
        key = scope_key(scope)
        if key in self.freezes:
            return self.freezes[key]
        key_file = self.settings.signing_key_file
        if self.signing_key is None:
            note = (
                "not frozen: no signing key configured (set BACKOUT_SIGNING_KEY_FILE to "
                f"freeze {key} automatically)"
            )
            self.notes.append(
                f"could not freeze follow-on automation for {key}: no signing key"
                + (f" (cannot use {key_file})" if key_file else "")
            )
            self.freezes[key] = note
            return note
        command = ControlCommand(
            command_id=f"cmd_{new_event_id().lower()}",
            issued_at=self.clock(),
            action=ControlAction.FREEZE,
            scope=scope,
            mode=FreezeMode.READ_ONLY,
            reason=f"rollback {self.plan.plan_id}: manual step {step.step_id} on "
            f"{step.record_key or step.tool}: {reason}"[:1000],
            issuer=self.identity,
            cause=step.undoes[0] if step.undoes else None,
        )
        problem = malformed_reason(command)
        if problem is not None:
            note = f"not frozen: {problem}"
            self.notes.append(f"could not freeze follow-on automation for {key}: {problem}")
            self.freezes[key] = note
            return note
        signed = sign(command, self.signing_key)
        self.sink.publish(
            self.settings.topic("control"),
            key.encode(),
            self.codec.encode(signed),
            confirm=True,
        )
        self.freezes[key] = signed.command_id
        return signed.command_id
