"""The Journal: what agent code imports to make every tool call an ActionEvent.

For each call of a declared tool inside ``journal.run(...)``: check the guard (a freeze
raises ``Frozen`` and the call is journaled as blocked), capture the target's before-image
and version, execute, capture the after-image, publish one ActionEvent, return the result.
Exceptions are journaled as failed and re-raised; timeouts and lost connections are
journaled as unknown (in doubt). A resumed run (same run id) returns the recorded result
of a call whose idempotency key already succeeded, without executing it again.

Run contexts live in ``run.py``; the call in flight and the events built from it in
``call.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, Protocol, TypeVar, Unpack

from backout.infra.settings import Settings
from backout.producers.call import (
    IN_DOUBT_ERRORS,
    Pending,
    ToolCall,
    run_fact,
    tool_event,
)
from backout.producers.completed import CompletedCalls
from backout.producers.ids import new_run_id
from backout.producers.registry import ToolOptions, ToolSpec, check_options, declare
from backout.producers.registry import to_json_value as _json
from backout.producers.run import (
    ANNOTATION,
    CURRENT_RUN,
    CURRENT_STEP,
    KEY_OVERRIDE,
    Annotation,
    RunContext,
)
from backout.producers.scope import CallGuard, CallScope
from backout.producers.sink import EventSink
from backout.producers.targets import TargetUnavailable
from backout.schemas.errors import ConfigError, Frozen, PublishError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    ErrorInfo,
    EventKind,
    JsonMap,
    Origin,
    RecordImage,
)
from backout.schemas.registry import Codec, make_codec

__all__ = ["IN_DOUBT_ERRORS", "ApprovalGate", "Journal", "Pending", "RunContext"]

P = ParamSpec("P")
R = TypeVar("R")

_Call = ToolCall
"""The name ``producers.approval`` knows the call in flight by."""


@dataclass(frozen=True)
class _Connected:
    sink: EventSink
    codec: Codec
    guard: CallGuard
    completed_calls: CompletedCalls
    approvals: ApprovalGate
    owns: tuple[Any, ...]


def _connect(settings: Settings, codec: Codec) -> _Connected:
    """The Kafka-backed parts of a Journal, from settings."""
    from backout.infra.broker import resolve_bootstrap
    from backout.producers.approval import ApprovalGate as KafkaApprovalGate
    from backout.producers.approval import KafkaRequestLookup
    from backout.producers.completed import KafkaCompletedCalls
    from backout.producers.guard import ControlGuard
    from backout.producers.kafka import KafkaEventSink

    bootstrap = resolve_bootstrap(settings)
    sink = KafkaEventSink(settings, bootstrap, background=settings.delivery == "background")
    completed = KafkaCompletedCalls(settings, bootstrap, codec)
    # The guard rebuilds the freeze view from the control topic before the first call;
    # agents never report invalid commands (one reporter per cluster does).
    guard = ControlGuard(settings, bootstrap, codec=codec).start()
    approvals = KafkaApprovalGate(
        settings, guard, lookup=KafkaRequestLookup(settings, bootstrap, codec))
    return _Connected(sink, codec, guard, completed, approvals, (sink, guard))


class Journal:
    """Journals tool calls as ActionEvents on the actions topic.

    Args:
        settings: topics, delivery mode, environment.
        sink: where encoded events go; omitted, everything is connected from settings
            (KafkaEventSink, ControlGuard, resume from the log, approval gate).
        codec: record encoding; from settings when omitted.
        guard: checked before every call (a ControlGuard from ``from_settings``).
        completed_calls: finds a resumed run's finished calls on the log.
        approvals: decides calls whose tool requires approval.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sink: EventSink | None = None,
        codec: Codec | None = None,
        guard: CallGuard | None = None,
        completed_calls: CompletedCalls | None = None,
        approvals: ApprovalGate | None = None,
        owns: tuple[Any, ...] = (),
    ) -> None:
        if sink is None:
            # Connect everything from settings; explicit parts (tests, fakes) are used as given.
            connected = _connect(settings, codec or make_codec(settings.schema_registry_url))
            sink, codec = connected.sink, connected.codec
            guard = guard if guard is not None else connected.guard
            completed_calls = completed_calls or connected.completed_calls
            approvals = approvals or connected.approvals
            owns = (*owns, *connected.owns)
        self.settings = settings
        self.sink = sink
        self.codec = codec or make_codec(settings.schema_registry_url)
        self.guard = guard
        self.approvals = approvals
        self._completed_calls = completed_calls
        self.topic = settings.topic("actions")
        self.confirm = settings.delivery == "confirm"
        self.tools: dict[str, ToolSpec] = {}
        self._owns = owns
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Journal:
        """A Journal on the broker the settings name (``BACKOUT_*`` environment by default).

        It publishes with a KafkaEventSink, checks every call against a ControlGuard built
        from the control topic, resumes runs from the actions topic and waits for approvals.
        ``Journal(settings)`` is the same.
        """
        return cls(settings or Settings())

    @property
    def completed_calls(self) -> CompletedCalls:
        """Where resumed runs find their finished calls."""
        if self._completed_calls is None:
            raise ConfigError("this Journal cannot resume runs: it has no completed_calls source")
        return self._completed_calls

    # --- declaring tools ------------------------------------------------------------------
    def tool(self, **options: Unpack[ToolOptions]) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Declare a journaled tool.

        Args:
            **options: how the tool is journaled and undone (``registry.ToolOptions``):
                reversibility (required), target, system, object_id, compensation, value,
                idempotency_key, requires_approval, name.

        Raises:
            ConfigError: the declaration is inconsistent (see ``registry.declare``).
            TypeError: an unknown option, or no ``reversibility``.
        """
        check_options("tool", options)

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            spec = declare(fn, **options)
            if spec.name in self.tools:
                raise ConfigError(f"tool {spec.name!r} is declared twice")
            self.tools[spec.name] = spec
            if spec.is_async:

                @functools.wraps(fn)
                async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                    return await self._call_async(spec, args, kwargs)

                async_wrapper.__backout_tool__ = spec  # type: ignore[attr-defined]
                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                return self._call_sync(spec, args, kwargs)  # type: ignore[no-any-return]

            wrapper.__backout_tool__ = spec  # type: ignore[attr-defined]
            return wrapper

        return decorate

    # --- runs -------------------------------------------------------------------------------
    def run(
        self,
        run_id: str | None = None,
        *,
        agent: str | None = None,
        identity: str | None = None,
        tenant: str | None = None,
        environment: str | None = None,
        workflow: str | None = None,
        origin: Origin | str = Origin.AGENT,
        resume: bool | None = None,
    ) -> RunContext:
        """A run context; inside another run it is a child run (inherits what is not given).

        Args:
            run_id: the run's id; give the same id to resume a run after a crash.
            resume: look up the run's finished calls on the log (default: when run_id given).
        """
        parent = CURRENT_RUN.get()
        agent = agent or (parent.agent if parent else None)
        identity = identity or (parent.identity if parent else None)
        if not agent or not identity:
            raise ConfigError("journal.run(...) needs agent= and identity=")
        return RunContext(
            self,
            run_id or new_run_id(),
            agent=agent,
            identity=identity,
            tenant=tenant if tenant is not None else (parent.tenant if parent else None),
            environment=environment
            or (parent.environment if parent else self.settings.environment),
            workflow=workflow if workflow is not None else (parent.workflow if parent else None),
            origin=Origin(origin),
            parent=parent,
            resume=run_id is not None if resume is None else resume,
        )

    @staticmethod
    def current_run() -> RunContext | None:
        """The run the current thread or task is in, if any."""
        return CURRENT_RUN.get()

    @contextlib.contextmanager
    def annotate(
        self,
        *,
        confidence: float | None = None,
        reasoning: str | None = None,
        correlation_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Iterator[None]:
        """Attach confidence, a reasoning summary, a correlation id or labels to the calls
        made inside the block (labels such as ``uncertainty=parse_failure`` feed detectors)."""
        token = ANNOTATION.set(
            Annotation(confidence, reasoning, correlation_id, dict(labels or {}))
        )
        try:
            yield
        finally:
            ANNOTATION.reset(token)

    @contextlib.contextmanager
    def idempotency_key(self, key: str) -> Iterator[None]:
        """Use ``key`` as the idempotency key of the next call(s) made inside the block."""
        token = KEY_OVERRIDE.set(key)
        try:
            yield
        finally:
            KEY_OVERRIDE.reset(token)

    def checkpoint(self, name: str) -> str:
        """Mark a point in the current run that a rollback can be limited to ("after C")."""
        run = self._require_run("checkpoint")
        step_id = run.next_step_id()
        self._publish(
            run_fact(
                run, EventKind.CHECKPOINT, step_id, CallStatus.SUCCEEDED,
                labels={"checkpoint": name},
            )
        )
        return step_id

    # --- the call path ----------------------------------------------------------------------
    def _require_run(self, what: str | ToolSpec) -> RunContext:
        run = CURRENT_RUN.get()
        if run is None:
            if isinstance(what, ToolSpec):
                what = f"tool {what.name!r} called"
            raise ConfigError(f"{what} outside a run: wrap it in `with journal.run(...)`")
        if self._closed:
            raise ConfigError("the journal is closed")
        return run

    def _begin(self, spec: ToolSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ToolCall:
        run = self._require_run(spec)
        bound = spec.bind(args, kwargs)
        step_id = run.next_step_id()
        override = KEY_OVERRIDE.get()
        key = (
            override
            if override is not None
            else str(spec.idempotency_key(**bound))
            if spec.idempotency_key is not None
            else step_id
        )
        call = ToolCall(
            spec,
            run,
            step_id,
            CURRENT_STEP.get() or run.parent_step_id,
            key,
            bound,
            datetime.now(UTC),
        )
        if spec.object_id is not None:
            call.object_id = str(spec.object_id(**bound))
        if spec.value is not None:
            # From the arguments, before the side effect: a bad extractor fails the call
            # while nothing has happened, instead of losing the event afterwards.
            call.value = float(spec.value(**bound))
        return call

    def _recorded(self, call: ToolCall) -> ActionEvent | None:
        done = call.run.completed().get(call.key)
        return done if done is not None and done.status is CallStatus.SUCCEEDED else None

    def _check_guard(self, call: ToolCall) -> None:
        if self.guard is None:
            return
        run = call.run
        scope = CallScope(
            call.spec.name,
            run.agent,
            run.identity,
            run.run_id,
            run.ancestors,
            run.workflow,
            run.tenant,
            run.environment,
            call.spec.reversibility,
        )
        try:
            self.guard.check(scope)
        except Frozen as frozen:
            self._publish(
                tool_event(
                    call,
                    CallStatus.BLOCKED,
                    blocked_by=frozen.command_id,
                    error=ErrorInfo(type="Frozen", message=str(frozen), retryable=False),
                )
            )
            raise

    def _approve(self, call: ToolCall) -> None:
        """Approval hook: when the tool requires approval for these arguments, wait for it."""
        predicate = call.spec.requires_approval
        if predicate is None or not predicate(**call.args):
            return
        if self.approvals is None:
            raise ConfigError(
                f"tool {call.spec.name!r} requires approval but this Journal has no approval gate"
            )
        call.approved_args = self.approvals.decide(self, call)
        # The wait may have been long: a freeze that arrived meanwhile still refuses the call.
        self._check_guard(call)

    @staticmethod
    def _capture(call: ToolCall) -> RecordImage | None:
        target = call.spec.target
        if target is None or call.object_id is None:
            return None
        return target.read(call.object_id)

    def _capture_after(self, call: ToolCall) -> RecordImage | None:
        try:
            return self._capture(call)
        except TargetUnavailable:
            return None

    @staticmethod
    def _invoke_args(
        call: ToolCall, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], Mapping[str, Any]]:
        if call.approved_args is None:
            return args, kwargs
        return (), {**call.args, **call.approved_args}

    def _call_sync(self, spec: ToolSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        call = self._begin(spec, args, kwargs)
        if call.run.resume:
            recorded = self._recorded(call)
            if recorded is not None:
                return recorded.result
        # Each step is skipped when the spec or journal has nothing for it (the hot path).
        if self.guard is not None:
            self._check_guard(call)
        if spec.requires_approval is not None:
            self._approve(call)
        if spec.target is not None:
            call.before = self._capture(call)
        call_args, call_kwargs = self._invoke_args(call, args, kwargs)
        token = CURRENT_STEP.set(call.step_id)
        try:
            result = spec.fn(*call_args, **call_kwargs)
        except BaseException as exc:
            CURRENT_STEP.reset(token)
            self._finish_failed(call, exc)
            raise
        CURRENT_STEP.reset(token)
        return self._finish(call, result)

    async def _call_async(
        self, spec: ToolSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        call = self._begin(spec, args, kwargs)
        recorded = await asyncio.to_thread(self._recorded, call) if call.run.resume else None
        if recorded is not None:
            return recorded.result
        self._check_guard(call)
        if spec.requires_approval is not None:
            await asyncio.to_thread(contextvars.copy_context().run, self._approve, call)
        call.before = self._capture(call)
        call_args, call_kwargs = self._invoke_args(call, args, kwargs)
        token = CURRENT_STEP.set(call.step_id)
        try:
            result = await spec.fn(*call_args, **call_kwargs)
        except BaseException as exc:
            CURRENT_STEP.reset(token)
            if self.confirm:
                await asyncio.to_thread(self._finish_failed, call, exc)
            else:
                self._finish_failed(call, exc)
            raise
        CURRENT_STEP.reset(token)
        if self.confirm:
            return await asyncio.to_thread(self._finish, call, result)
        return self._finish(call, result)

    def _finish(self, call: ToolCall, result: Any) -> Any:
        status, job_id, value = CallStatus.SUCCEEDED, None, result
        if isinstance(result, Pending):
            status, job_id, value = CallStatus.PENDING, result.job_id, result.result
        after = self._capture_after(call) if call.spec.target is not None else None
        event = tool_event(call, status, after=after, result=_json(value), job_id=job_id)
        self._publish(event, side_effect=True)
        return value if isinstance(result, Pending) else result

    def _finish_failed(self, call: ToolCall, exc: BaseException) -> None:
        in_doubt = isinstance(exc, IN_DOUBT_ERRORS)
        status = CallStatus.UNKNOWN if in_doubt else CallStatus.FAILED
        error = ErrorInfo(
            type=type(exc).__name__, message=str(exc)[:2000], retryable=True if in_doubt else None
        )
        self._publish(
            tool_event(call, status, after=self._capture_after(call), error=error),
            side_effect=True,
            tool_error=exc,
        )

    # --- publishing events --------------------------------------------------------------------
    def _lifecycle(
        self,
        run: RunContext,
        kind: EventKind,
        status: CallStatus,
        error: BaseException | None = None,
    ) -> None:
        info = (
            ErrorInfo(type=type(error).__name__, message=str(error)[:2000])
            if error is not None
            else None
        )
        self._publish(run_fact(run, kind, f"{run.run_id}:{kind.value}", status, error=info))

    def publish(self, event: ActionEvent) -> None:
        """Publish an already-built event (rollback and operator tools use this)."""
        self._publish(event)

    def _publish(
        self,
        event: ActionEvent,
        *,
        side_effect: bool = False,
        tool_error: BaseException | None = None,
    ) -> None:
        value = self.codec.encode(event)
        try:
            self.sink.publish(self.topic, event.key.encode(), value, confirm=self.confirm)
        except PublishError as exc:
            if not side_effect:
                raise
            also = f"; the tool itself raised {type(tool_error).__name__}" if tool_error else ""
            raise PublishError(
                f"tool {event.tool!r} already ran (status {event.status.value}, "
                f"event {event.event_id}) but its event could not be journaled: {exc}{also}",
                retryable=exc.retryable,
                side_effect_done=True,
            ) from exc

    def close(self, timeout: float | None = None) -> None:
        """Flush queued events and release the clients this Journal created.

        Raises:
            PublishError: events are still undelivered when the timeout ends.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.sink.flush(timeout)
        finally:
            for owned in self._owns:
                close = getattr(owned, "close", None)
                if callable(close):
                    close(timeout)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApprovalGate(Protocol):
    """Decides calls whose tool requires approval (see ``producers.approval``)."""

    def decide(self, journal: Journal, call: ToolCall) -> JsonMap:
        """Publish the request, wait for the decision, return the approved arguments.

        Raises:
            ApprovalDenied: denied, or no decision in time.
        """
        ...
