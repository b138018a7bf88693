"""The Journal: what agent code imports to make every tool call an ActionEvent.

For each call of a declared tool inside ``journal.run(...)``: check the guard (a freeze
raises ``Frozen`` and the call is journaled as blocked), capture the target's before-image
and version, execute, capture the after-image, publish one ActionEvent, return the result.
Exceptions are journaled as failed and re-raised; timeouts and lost connections are
journaled as unknown (in doubt). A resumed run (same run id) returns the recorded result
of a call whose idempotency key already succeeded, without executing it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, Protocol, TypeVar

from pydantic import JsonValue

from backout.infra.settings import Settings
from backout.producers.completed import CompletedCalls
from backout.producers.ids import new_event_id, new_run_id
from backout.producers.registry import ArgsFn, Compensate, ToolSpec, declare, json_args
from backout.producers.registry import to_json_value as _json
from backout.producers.scope import CallGuard, CallScope
from backout.producers.sink import EventSink
from backout.producers.targets import Target, TargetUnavailable
from backout.schemas.errors import ConfigError, Frozen, PublishError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    Compensation,
    ErrorInfo,
    EventKind,
    JsonMap,
    Origin,
    RecordImage,
    Reversibility,
    TargetRef,
    trusted_constructor,
)
from backout.schemas.registry import Codec, make_codec

P = ParamSpec("P")
R = TypeVar("R")

_new_event = trusted_constructor(ActionEvent)

IN_DOUBT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    TargetUnavailable,
)
"""Exceptions after which the side effect may or may not have happened: status unknown."""


@dataclass(frozen=True)
class Pending:
    """Return this from a tool that started an asynchronous job: journaled as pending."""

    job_id: str
    result: Any = None


@dataclass(frozen=True)
class Annotation:
    """Per-call facts the agent knows: confidence, reasoning, correlation, labels."""

    confidence: float | None = None
    reasoning: str | None = None
    correlation_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class RunContext:
    """One run of an agent: ids, identity, and the step counter. Nestable."""

    def __init__(
        self,
        journal: Journal,
        run_id: str,
        *,
        agent: str,
        identity: str,
        tenant: str | None,
        environment: str,
        workflow: str | None,
        origin: Origin,
        parent: RunContext | None,
        resume: bool,
    ) -> None:
        self.journal = journal
        self.run_id = run_id
        self.agent = agent
        self.identity = identity
        self.tenant = tenant
        self.environment = environment
        self.workflow = workflow
        self.origin = origin
        self.parent = parent
        self.parent_step_id = parent.last_step_id if parent is not None else None
        self.ancestors: tuple[str, ...] = (
            (parent.run_id, *parent.ancestors) if parent is not None else ()
        )
        self.resume = resume
        self.last_step_id: str | None = None
        self._steps = itertools.count(1)
        self._completed: dict[str, ActionEvent] | None = None
        self._lock = threading.Lock()
        self._token: contextvars.Token[RunContext | None] | None = None

    def next_step_id(self) -> str:
        """A new step id in this run: ``<run id>:<n>``."""
        step_id = f"{self.run_id}:{next(self._steps)}"
        self.last_step_id = step_id
        return step_id

    def completed(self) -> dict[str, ActionEvent]:
        """Succeeded calls of this run by idempotency key, read once from the log."""
        if not self.resume:
            return {}
        with self._lock:
            if self._completed is None:
                # Step ids restart at 1, so a resumed run that replays its calls in the same
                # order gets the same default idempotency keys.
                self._completed = self.journal.completed_calls.load(self.run_id)
            return self._completed

    def __enter__(self) -> RunContext:
        self._token = _current_run.set(self)
        try:
            self.journal._lifecycle(self, EventKind.RUN_STARTED, CallStatus.SUCCEEDED)
        except BaseException:
            # __exit__ will not run: do not leave this run current for later calls.
            _current_run.reset(self._token)
            self._token = None
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        try:
            status = CallStatus.SUCCEEDED if exc is None else CallStatus.FAILED
            self.journal._lifecycle(self, EventKind.RUN_FINISHED, status, error=exc)
        except PublishError as lost:
            if exc is None:
                raise
            # Keep the caller's exception: it may say a tool's side effect already happened.
            exc.add_note(f"backout: the run_finished event could not be journaled either: {lost}")
        finally:
            if self._token is not None:
                _current_run.reset(self._token)

    async def __aenter__(self) -> RunContext:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.__exit__(exc_type, exc, tb)


_current_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "backout_run", default=None
)
_current_step: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "backout_step", default=None
)
_annotation: contextvars.ContextVar[Annotation | None] = contextvars.ContextVar(
    "backout_annotation", default=None
)
_key_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "backout_idempotency_key", default=None
)


@dataclass
class _Call:
    """One call in flight."""

    spec: ToolSpec
    run: RunContext
    step_id: str
    parent_step_id: str | None
    key: str
    args: dict[str, Any]
    occurred_at: datetime
    object_id: str | None = None
    approved_args: JsonMap | None = None
    before: RecordImage | None = None
    value: float | None = None


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
    def tool(
        self,
        *,
        reversibility: Reversibility | str,
        target: Target | None = None,
        system: str | None = None,
        object_id: ArgsFn | None = None,
        compensation: Compensate | None = None,
        value: ArgsFn | None = None,
        idempotency_key: ArgsFn | None = None,
        requires_approval: ArgsFn | None = None,
        name: str | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Declare a journaled tool.

        Args:
            reversibility: reversible, compensatable, irreversible or read_only.
            target: the Target holding the record the tool changes (before/after images).
            system: the system name when there is no Target (irreversible tools).
            object_id: finds the target record id from the call's arguments.
            compensation: for compensatable tools, the compensating tool and its window.
            value: the value moved by a call (money, units), from its arguments.
            idempotency_key: a caller-defined key from the arguments (default: run + step).
            requires_approval: a predicate over the arguments; when true the call waits for
                an operator's approve/deny.
            name: the tool name in events (default: the function name).

        Raises:
            ConfigError: the declaration is inconsistent (see ``registry.declare``).
        """

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            spec = declare(
                fn,
                reversibility=reversibility,
                target=target,
                system=system,
                object_id=object_id,
                compensation=compensation,
                value=value,
                idempotency_key=idempotency_key,
                requires_approval=requires_approval,
                name=name,
            )
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
        parent = _current_run.get()
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
        return _current_run.get()

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
        token = _annotation.set(
            Annotation(confidence, reasoning, correlation_id, dict(labels or {}))
        )
        try:
            yield
        finally:
            _annotation.reset(token)

    @contextlib.contextmanager
    def idempotency_key(self, key: str) -> Iterator[None]:
        """Use ``key`` as the idempotency key of the next call(s) made inside the block."""
        token = _key_override.set(key)
        try:
            yield
        finally:
            _key_override.reset(token)

    def checkpoint(self, name: str) -> str:
        """Mark a point in the current run that a rollback can be limited to ("after C")."""
        run = self._require_run("checkpoint")
        step_id = run.next_step_id()
        self._publish(
            self._fact(
                run,
                EventKind.CHECKPOINT,
                step_id,
                CallStatus.SUCCEEDED,
                labels={"checkpoint": name},
            )
        )
        return step_id

    # --- the call path ----------------------------------------------------------------------
    def _require_run(self, what: str) -> RunContext:
        run = _current_run.get()
        if run is None:
            raise ConfigError(f"{what} outside a run: wrap it in `with journal.run(...)`")
        if self._closed:
            raise ConfigError("the journal is closed")
        return run

    def _begin(self, spec: ToolSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _Call:
        run = self._require_run(f"tool {spec.name!r} called")
        bound = spec.bind(args, kwargs)
        step_id = run.next_step_id()
        override = _key_override.get()
        key = (
            override
            if override is not None
            else str(spec.idempotency_key(**bound))
            if spec.idempotency_key is not None
            else step_id
        )
        call = _Call(
            spec,
            run,
            step_id,
            _current_step.get() or run.parent_step_id,
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

    def _recorded(self, call: _Call) -> ActionEvent | None:
        done = call.run.completed().get(call.key)
        return done if done is not None and done.status is CallStatus.SUCCEEDED else None

    def _check_guard(self, call: _Call) -> None:
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
                self._event(
                    call,
                    CallStatus.BLOCKED,
                    blocked_by=frozen.command_id,
                    error=ErrorInfo(type="Frozen", message=str(frozen), retryable=False),
                )
            )
            raise

    def _approve(self, call: _Call) -> None:
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

    def _capture(self, call: _Call) -> RecordImage | None:
        target = call.spec.target
        if target is None or call.object_id is None:
            return None
        return target.read(call.object_id)

    def _capture_after(self, call: _Call) -> RecordImage | None:
        try:
            return self._capture(call)
        except TargetUnavailable:
            return None

    def _invoke_args(
        self, call: _Call, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if call.approved_args is None:
            return args, dict(kwargs)
        return (), {**call.args, **call.approved_args}

    def _call_sync(self, spec: ToolSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        call = self._begin(spec, args, kwargs)
        recorded = self._recorded(call)
        if recorded is not None:
            return recorded.result
        self._check_guard(call)
        self._approve(call)
        call.before = self._capture(call)
        call_args, call_kwargs = self._invoke_args(call, args, kwargs)
        token = _current_step.set(call.step_id)
        try:
            result = spec.fn(*call_args, **call_kwargs)
        except BaseException as exc:
            _current_step.reset(token)
            self._finish_failed(call, exc)
            raise
        _current_step.reset(token)
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
        token = _current_step.set(call.step_id)
        try:
            result = await spec.fn(*call_args, **call_kwargs)
        except BaseException as exc:
            _current_step.reset(token)
            if self.confirm:
                await asyncio.to_thread(self._finish_failed, call, exc)
            else:
                self._finish_failed(call, exc)
            raise
        _current_step.reset(token)
        if self.confirm:
            return await asyncio.to_thread(self._finish, call, result)
        return self._finish(call, result)

    def _finish(self, call: _Call, result: Any) -> Any:
        status, job_id, value = CallStatus.SUCCEEDED, None, result
        if isinstance(result, Pending):
            status, job_id, value = CallStatus.PENDING, result.job_id, result.result
        event = self._event(
            call, status, after=self._capture_after(call), result=_json(value), job_id=job_id
        )
        self._publish(event, side_effect=True)
        return value if isinstance(result, Pending) else result

    def _finish_failed(self, call: _Call, exc: BaseException) -> None:
        in_doubt = isinstance(exc, IN_DOUBT_ERRORS)
        status = CallStatus.UNKNOWN if in_doubt else CallStatus.FAILED
        error = ErrorInfo(
            type=type(exc).__name__, message=str(exc)[:2000], retryable=True if in_doubt else None
        )
        self._publish(
            self._event(call, status, after=self._capture_after(call), error=error),
            side_effect=True,
            tool_error=exc,
        )

    # --- building and publishing events --------------------------------------------------------
    def _event(
        self,
        call: _Call,
        status: CallStatus,
        *,
        after: RecordImage | None = None,
        result: JsonValue = None,
        job_id: str | None = None,
        error: ErrorInfo | None = None,
        blocked_by: str | None = None,
    ) -> ActionEvent:
        spec, run = call.spec, call.run
        note = _annotation.get()
        requested = json_args(call.args)
        target = (
            TargetRef(system=spec.system, object_id=call.object_id)
            if spec.system is not None and call.object_id is not None
            else None
        )
        labels = dict(note.labels) if note else {}
        compensation = None
        if status is not CallStatus.BLOCKED:
            compensation, problem = self._compensation(call, result)
            if problem is not None:
                labels["compensation_error"] = problem
        # Built from values this module already typed: skip re-validation (hot path).
        return _new_event(
            event_id=new_event_id(),
            occurred_at=call.occurred_at,
            run_id=run.run_id,
            parent_run_id=run.parent.run_id if run.parent else None,
            agent_id=run.agent,
            identity=run.identity,
            tenant=run.tenant,
            environment=run.environment,
            workflow=run.workflow,
            step_id=call.step_id,
            parent_step_id=call.parent_step_id,
            tool=spec.name,
            requested_args=requested,
            approved_args=call.approved_args,
            target=target,
            reversibility=spec.reversibility,
            before=call.before,
            after=after,
            idempotency_key=call.key,
            status=status,
            job_id=job_id,
            result=result,
            error=error,
            compensation=compensation,
            origin=run.origin,
            correlation_id=note.correlation_id if note else None,
            value=call.value,
            confidence=note.confidence if note else None,
            reasoning_summary=note.reasoning if note else None,
            blocked_by=blocked_by,
            labels=labels,
        )

    def _compensation(
        self, call: _Call, result: JsonValue
    ) -> tuple[Compensation | None, str | None]:
        """The call's compensation, and why its args builder failed (if it did)."""
        spec = call.spec
        if spec.compensation is not None:
            comp = spec.compensation
            allowed_until = call.occurred_at + comp.window
            try:
                args = json_args(comp.args(**call.args, result=result))
            except Exception as exc:
                # The side effect already happened: journal the call anyway (its undo
                # becomes a manual task) rather than lose the event or the tool's own error.
                problem = f"{type(exc).__name__}: {exc}"[:500]
                manual = Compensation(
                    strategy="manual", tool=comp.tool, allowed_until=allowed_until
                )
                return manual, problem
            return Compensation(
                strategy="compensating_tool",
                tool=comp.tool,
                args=args,
                allowed_until=allowed_until,
            ), None
        if spec.reversibility is Reversibility.REVERSIBLE:
            return Compensation(strategy="restore_fields"), None
        if spec.reversibility is Reversibility.IRREVERSIBLE:
            return Compensation(strategy="manual"), None
        return None, None

    def _fact(
        self,
        run: RunContext,
        kind: EventKind,
        step_id: str,
        status: CallStatus,
        *,
        labels: dict[str, str] | None = None,
        error: ErrorInfo | None = None,
    ) -> ActionEvent:
        return ActionEvent(
            event_id=new_event_id(),
            occurred_at=datetime.now(UTC),
            kind=kind,
            run_id=run.run_id,
            parent_run_id=run.parent.run_id if run.parent else None,
            agent_id=run.agent,
            identity=run.identity,
            tenant=run.tenant,
            environment=run.environment,
            workflow=run.workflow,
            step_id=step_id,
            parent_step_id=run.parent_step_id,
            tool=f"backout.{kind.value}",
            reversibility=Reversibility.READ_ONLY,
            idempotency_key=f"{run.run_id}:{kind.value}"
            + (f":{step_id}" if kind is EventKind.CHECKPOINT else ""),
            status=status,
            error=error,
            origin=run.origin,
            labels=labels or {},
        )

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
        self._publish(self._fact(run, kind, f"{run.run_id}:{kind.value}", status, error=info))

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

    def decide(self, journal: Journal, call: _Call) -> JsonMap:
        """Publish the request, wait for the decision, return the approved arguments.

        Raises:
            ApprovalDenied: denied, or no decision in time.
        """
        ...
