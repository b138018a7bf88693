"""Rollback execution: a plan applied through Target adapters with compare-and-set.

Every step is journaled on the actions topic: ``rollback_step_started`` before acting,
the inverse write itself (an ActionEvent with origin ``rollback``, ``compensates`` and the
``rollback.undoes`` label naming what it undid, before/after images), then
``rollback_step_finished`` with the outcome. The projection folds these, so a second
plan of the same scope finds the writes already undone, and a crashed rollback resumes:
finished steps are skipped, CAS steps are simply tried again (compare-and-set makes that
harmless), and a compensation that started but never finished is not run twice but
handed to a person.

- restore / delete / recreate: ``compare_and_set`` / ``delete_if`` / ``insert_if_absent``
  against the values the log says the record has. ``CONFLICT``: nothing is written and
  both values are reported. ``TargetUnavailable``: the step stays pending, the system is
  not tried again in this run, nothing is marked done.
- compensate: the compensating tool, found by name among the ``compensators`` passed in
  (a Journal tool's undecorated function is called, so it is journaled once, here).
- manual: the step finishes as ``manual``, which opens a task in the projection, and a
  signed ``read_only`` freeze of the action's agent (in its tenant) stops follow-on
  automation; without a signing key that is recorded as not done, and said.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from backout.infra.settings import Settings
from backout.producers.registry import to_json_value
from backout.producers.sink import EventSink
from backout.producers.targets import (
    BatchTarget,
    CasOutcome,
    CasResult,
    Target,
    TargetUnavailable,
)
from backout.projections.fold import (
    LABEL_CAS,
    LABEL_DETAIL,
    LABEL_FREEZE,
    LABEL_OUTCOME,
    LABEL_REASON,
    LABEL_RUN,
    LABEL_TOOL,
    StepState,
)
from backout.rollback.journaling import RollbackJournal
from backout.rollback.plan import Decision, PlanStep, RollbackPlan
from backout.rollback.results import DONE_OUTCOMES, RollbackReport, StepOutcome, StepResult
from backout.schemas.errors import ConfigError, PublishError, RollbackError
from backout.schemas.events import (
    CallStatus,
    EventKind,
    JsonMap,
    RecordImage,
    Reversibility,
)
from backout.schemas.registry import Codec, make_codec
from backout.schemas.signing import SigningKey

__all__ = ["RollbackExecutor", "RollbackReport", "StepOutcome", "StepResult", "targets_by_system"]

Compensator = Callable[..., Any]
"""A compensating tool: called with the compensation's arguments as keywords."""


def targets_by_system(targets: Iterable[Target] | Mapping[str, Target]) -> dict[str, Target]:
    """Targets keyed by system name.

    Raises:
        ConfigError: two targets claim the same system, or an item is not a Target.
    """
    items = list(targets.values()) if isinstance(targets, Mapping) else list(targets)
    out: dict[str, Target] = {}
    for item in items:
        if not isinstance(item, Target):
            raise ConfigError(f"{item!r} is not a Target (system, read, compare_and_set, ...)")
        if item.system in out:
            raise ConfigError(f"two targets for system {item.system!r}")
        out[item.system] = item
    return out


class RollbackExecutor:
    """Applies rollback plans and journals every inverse write.

    Args:
        settings: topics, environment, codec choice.
        sink: where journal events and freeze commands are published.
        targets: the live systems, by system name (or an iterable of Targets).
        compensators: compensating tools by name (Journal tools or plain callables).
        signing_key: signs the freezes that protect manual steps' targets.
        codec: record encoding; from settings when omitted.
        identity: the identity rollback events are attributed to (the operator).
        clock: the time source (tests pass a fixed one).
        flush_every: compare-and-set steps journaled between two flushes of the sink.
        batch_size: consecutive restores on one BatchTarget (such as SqlTableTarget)
            sent in one ``compare_and_set_many`` (1 turns batching off).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sink: EventSink,
        targets: Iterable[Target] | Mapping[str, Target] = (),
        compensators: Mapping[str, Compensator] | None = None,
        signing_key: SigningKey | None = None,
        codec: Codec | None = None,
        identity: str = "backout-rollback",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        flush_every: int = 500,
        batch_size: int = 200,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.targets = targets_by_system(targets)
        self.compensators = dict(compensators or {})
        self.signing_key = signing_key
        self.codec = codec or make_codec(settings.schema_registry_url)
        self.identity = identity
        self.clock = clock
        self.flush_every = max(1, flush_every)
        self.batch_size = max(1, batch_size)
        self.topic = settings.topic("actions")

    def apply(
        self,
        plan: RollbackPlan,
        *,
        prior: Mapping[str, StepState] | None = None,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> RollbackReport:
        """Execute ``plan`` in order.

        Args:
            plan: the plan (from ``plan_rollback``).
            prior: step states from earlier attempts (``SqlProjectionStore.steps``).
            on_step: called after each step (progress bars).

        Raises:
            RollbackError: journaling failed; steps done so far are safe to re-run.
        """
        run = _Run(self, plan, prior or {})
        results = []
        try:
            run.journal.lifecycle(EventKind.RUN_STARTED, CallStatus.SUCCEEDED)
            for done in run.execute_all(plan.steps):
                results.append(done)
                if on_step is not None:
                    on_step(done)
            status = (
                CallStatus.SUCCEEDED
                if all(r.outcome not in (StepOutcome.PENDING, StepOutcome.FAILED) for r in results)
                else CallStatus.FAILED
            )
            run.journal.lifecycle(EventKind.RUN_FINISHED, status)
            self.sink.flush()
        except PublishError as exc:
            raise RollbackError(
                f"rollback {plan.plan_id}: journaling failed after {len(results)} step(s): {exc}."
                " Targets already written are safe: re-run the same rollback to journal "
                "them (compare-and-set finds them done)"
            ) from exc
        return RollbackReport(
            plan.plan_id, run.journal.run_id, tuple(results), tuple(run.journal.notes)
        )

    def compensator(self, name: str) -> tuple[Compensator, Target | None] | None:
        """The callable for a compensating tool and the Target it declares, if any."""
        found = self.compensators.get(name)
        if found is None:
            return None
        spec = getattr(found, "__backout_tool__", None)
        if spec is not None:  # a Journal tool: call the undecorated function, journal here
            return spec.fn, spec.target
        fn = getattr(found, "fn", None)
        if callable(fn) and hasattr(found, "reversibility"):  # a ToolSpec
            return fn, getattr(found, "target", None)
        return found, None


class _Run:
    """One execution of one plan."""

    def __init__(
        self, executor: RollbackExecutor, plan: RollbackPlan, prior: Mapping[str, StepState]
    ) -> None:
        self.x = executor
        self.plan = plan
        self.prior = prior
        self.journal = RollbackJournal(
            plan,
            settings=executor.settings,
            sink=executor.sink,
            codec=executor.codec,
            identity=executor.identity,
            clock=executor.clock,
            signing_key=executor.signing_key,
            flush_every=executor.flush_every,
        )
        self.unavailable: dict[str, str] = {}
        self.batching: dict[str, BatchTarget | None] = {}

    # --- dispatch ---------------------------------------------------------------------------
    def execute_all(self, steps: Sequence[PlanStep]) -> Iterator[StepResult]:
        """Results in plan order; consecutive restores on one BatchTarget go in batches."""
        i = 0
        while i < len(steps):
            writer = self.batch_target(steps[i])
            if writer is None:
                yield self.execute(steps[i])
                i += 1
                continue
            group = [steps[i]]
            while (
                i + len(group) < len(steps)
                and len(group) < self.x.batch_size
                and self.batch_target(steps[i + len(group)]) is writer
            ):
                group.append(steps[i + len(group)])
            yield from self.restore_batch(writer, group)
            i += len(group)

    def batch_target(self, step: PlanStep) -> BatchTarget | None:
        """The target to batch a restore step on, when the step will really run and its
        target implements ``compare_and_set_many``."""
        if step.decision is not Decision.RESTORE or self.done_before(step) is not None:
            return None
        system = step.system or ""
        if system in self.unavailable:
            return None
        if system not in self.batching:
            target = self.x.targets.get(system)
            self.batching[system] = target if isinstance(target, BatchTarget) else None
        return self.batching[system]

    def done_before(self, step: PlanStep) -> str | None:
        """The outcome of this step in an earlier attempt, when it must not run again."""
        before = self.prior.get(step.step_id)
        if before is not None and before.status == "finished" and before.outcome in DONE_OUTCOMES:
            return before.outcome
        return None

    def execute(self, step: PlanStep) -> StepResult:
        before = self.prior.get(step.step_id)
        if not step.actionable:
            return self.result(step, StepOutcome.SKIPPED, step.reason)
        earlier = self.done_before(step)
        if earlier is not None:
            return self.result(
                step, StepOutcome.SKIPPED, f"finished in an earlier attempt ({earlier})"
            )
        if step.decision is Decision.MANUAL:
            return self.manual(step, step.reason)
        if step.decision is Decision.COMPENSATE:
            if before is not None and before.status == "started":
                return self.manual(
                    step,
                    (
                        f"compensation {step.tool!r} started in an earlier attempt but never "
                        "finished: check whether it ran before doing anything"
                    ),
                )
            return self.compensate(step)
        return self.guarded_write(step)

    # --- compare-and-set steps --------------------------------------------------------------
    def guarded_write(self, step: PlanStep) -> StepResult:
        system = step.system or ""
        target = self.x.targets.get(system)
        if target is None:
            return self.result(
                step,
                StepOutcome.PENDING,
                f"no target configured for system {system!r} (pass --targets)",
            )
        if system in self.unavailable:
            return self.result(step, StepOutcome.PENDING, self.unavailable[system])
        assert step.object_id is not None
        self.journal.marker(step, EventKind.ROLLBACK_STEP_STARTED, {}, confirm=False)
        expected, desired = step.expected(), step.desired()
        try:
            if step.decision is Decision.RESTORE:
                cas = target.compare_and_set(step.object_id, expected, desired)
            elif step.decision is Decision.DELETE:
                cas = target.delete_if(step.object_id, expected)
            else:
                cas = target.insert_if_absent(step.object_id, desired)
        except TargetUnavailable as exc:
            self.unavailable[system] = f"{system} unreachable: {exc}"
            return self.result(step, StepOutcome.PENDING, self.unavailable[system])
        return self.finish_cas(step, cas, expected)

    def restore_batch(self, writer: BatchTarget, group: list[PlanStep]) -> list[StepResult]:
        """Restore consecutive steps on one target with one ``compare_and_set_many``."""
        for step in group:
            self.journal.marker(step, EventKind.ROLLBACK_STEP_STARTED, {}, confirm=False)
        items = [(step.object_id or "", step.expected(), step.desired()) for step in group]
        try:
            results = writer.compare_and_set_many(items)
        except TargetUnavailable as exc:
            system = group[0].system or ""
            self.unavailable[system] = f"{system} unreachable: {exc}"
            return [self.result(s, StepOutcome.PENDING, self.unavailable[system]) for s in group]
        return [
            self.finish_cas(step, cas, item[1])
            for step, cas, item in zip(group, results, items, strict=True)
        ]

    def finish_cas(self, step: PlanStep, cas: CasResult, expected: JsonMap) -> StepResult:
        """Journal a compare-and-set step's outcome."""
        desired = step.desired()
        if cas.outcome is CasOutcome.CONFLICT:
            live = _live_values(cas.live, expected or desired)
            detail = _conflict_detail(step, expected, cas)
            self.journal.marker(
                step,
                EventKind.ROLLBACK_STEP_FINISHED,
                {
                    LABEL_OUTCOME: "conflict",
                    LABEL_DETAIL: json.dumps(
                        {"expected": expected, "live": live, "exists": cas.live.exists}
                    ),
                },
                confirm=False,
            )
            self.journal.tick()
            return self.result(step, StepOutcome.CONFLICT, detail, expected=expected, live=live)
        inverse = self.inverse(step, cas, expected)
        outcome = StepOutcome.APPLIED if cas.outcome is CasOutcome.APPLIED else StepOutcome.ALREADY
        self.journal.marker(
            step, EventKind.ROLLBACK_STEP_FINISHED, {LABEL_OUTCOME: outcome.value}, confirm=False
        )
        self.journal.tick()
        return self.result(step, outcome, "", expected=expected, inverse=inverse)

    def inverse(self, step: PlanStep, cas: CasResult, expected: JsonMap) -> str:
        """Journal the inverse write of a CAS step; returns its event id."""
        if step.decision is Decision.DELETE:
            before = RecordImage(exists=True, fields=expected)
        elif step.decision is Decision.RECREATE:
            before = RecordImage(exists=False)
        else:
            before = RecordImage(exists=True, fields={**cas.live.fields, **expected})
        event = self.journal.event(
            step,
            EventKind.TOOL_CALL,
            tool=f"backout.{step.decision.value}",
            reversibility=Reversibility.REVERSIBLE,
            before=before,
            after=cas.live,
            compensates=step.undoes[0] if step.undoes else None,
            labels={LABEL_CAS: cas.outcome.value},
            suffix="write",
        )
        self.journal.publish(event, confirm=False)
        return event.event_id

    # --- compensations ----------------------------------------------------------------------
    def compensate(self, step: PlanStep) -> StepResult:
        name = step.tool or ""
        found = self.x.compensator(name)
        if found is None:
            return self.result(
                step,
                StepOutcome.FAILED,
                (f"no compensating tool {name!r} registered (pass --compensators)"),
            )
        fn, tool_target = found
        target = tool_target or self.x.targets.get(step.system or "")
        self.x.sink.flush()
        self.journal.marker(step, EventKind.ROLLBACK_STEP_STARTED, {}, confirm=True)
        before = self.read(target, step)
        try:
            result = fn(**dict(step.args))
        except Exception as exc:  # the tool's own failure, whatever it is
            retry = getattr(exc, "retryable", None)
            detail = f"{name} failed: {type(exc).__name__}: {exc}"
            self.journal.marker(
                step,
                EventKind.ROLLBACK_STEP_FINISHED,
                {LABEL_OUTCOME: "failed", LABEL_DETAIL: detail[:2000]},
                confirm=True,
            )
            suffix = " (retryable)" if retry else ""
            return self.result(step, StepOutcome.FAILED, detail + suffix)
        after = self.read(target, step)
        has_images = before is not None and after is not None
        event = self.journal.event(
            step,
            EventKind.TOOL_CALL,
            tool=name,
            reversibility=Reversibility.IRREVERSIBLE,
            before=before if has_images else None,
            after=after if has_images else None,
            compensates=step.undoes[0] if step.undoes else None,
            suffix="compensate",
            result=to_json_value(result),
            with_target=has_images,
            args=dict(step.args),
        )
        self.journal.publish(event, confirm=True)
        self.journal.marker(
            step, EventKind.ROLLBACK_STEP_FINISHED, {LABEL_OUTCOME: "compensated"}, confirm=True
        )
        return self.result(step, StepOutcome.COMPENSATED, f"ran {name}", inverse=event.event_id)

    def read(self, target: Target | None, step: PlanStep) -> RecordImage | None:
        if target is None or step.object_id is None:
            return None
        try:
            return target.read(step.object_id)
        except TargetUnavailable:
            return None

    # --- manual steps -----------------------------------------------------------------------
    def manual(self, step: PlanStep, reason: str) -> StepResult:
        freeze = self.journal.freeze_follow_on(step, reason)
        self.x.sink.flush()
        self.journal.marker(
            step,
            EventKind.ROLLBACK_STEP_FINISHED,
            {
                LABEL_OUTCOME: "manual",
                LABEL_REASON: reason[:2000],
                LABEL_FREEZE: freeze,
                LABEL_RUN: step.run_id or "",
                LABEL_TOOL: step.tool or "",
            },
            confirm=True,
        )
        return self.result(step, StepOutcome.MANUAL, reason, freeze=freeze)

    def result(
        self,
        step: PlanStep,
        outcome: StepOutcome,
        detail: str,
        *,
        expected: JsonMap | None = None,
        live: JsonMap | None = None,
        inverse: str | None = None,
        freeze: str | None = None,
    ) -> StepResult:
        return StepResult(
            step.step_id,
            step.index,
            step.decision,
            outcome,
            step.record_key,
            detail,
            expected or {},
            live,
            inverse,
            freeze,
        )


def _live_values(live: RecordImage, fields: JsonMap) -> JsonMap:
    if not live.exists:
        return {}
    return {name: live.fields.get(name) for name in fields}


def _conflict_detail(step: PlanStep, expected: JsonMap, cas: CasResult) -> str:
    if step.decision is Decision.RECREATE:
        return f"the record exists again with {dict(cas.live.fields)!r}: nothing written"
    if not cas.live.exists:
        return "the record no longer exists: nothing written"
    differs = {
        k: (v, cas.live.fields.get(k)) for k, v in expected.items() if cas.live.fields.get(k) != v
    }
    shown = ", ".join(f"{k}: log says {a!r}, live is {b!r}" for k, (a, b) in differs.items())
    return f"changed outside the log ({shown or 'values differ'}): nothing written"
