"""Run contexts: who is acting, in which run, at which step. Nestable.

A run is current in a thread or asyncio task through context variables, so tools find it
without being passed it; a run started inside another is its child (parent run, parent
step). ``journal.run(...)`` builds them; entering one journals ``run_started``, leaving
it ``run_finished``.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backout.schemas.errors import PublishError
from backout.schemas.events import ActionEvent, CallStatus, EventKind, Origin

if TYPE_CHECKING:
    from backout.producers.journal import Journal


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

    def event_fields(self) -> dict[str, Any]:
        """The ActionEvent fields every event of this run carries (who, where, which run)."""
        return {
            "run_id": self.run_id,
            "parent_run_id": self.parent.run_id if self.parent else None,
            "agent_id": self.agent,
            "identity": self.identity,
            "tenant": self.tenant,
            "environment": self.environment,
            "workflow": self.workflow,
            "origin": self.origin,
        }

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
        self._token = CURRENT_RUN.set(self)
        try:
            self.journal._lifecycle(self, EventKind.RUN_STARTED, CallStatus.SUCCEEDED)
        except BaseException:
            # __exit__ will not run: do not leave this run current for later calls.
            CURRENT_RUN.reset(self._token)
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
                CURRENT_RUN.reset(self._token)

    async def __aenter__(self) -> RunContext:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.__exit__(exc_type, exc, tb)


CURRENT_RUN: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "backout_run", default=None
)
"""The run the current thread or task is in."""
CURRENT_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "backout_step", default=None
)
"""The step of the tool call executing now: the causal parent of calls it makes."""
ANNOTATION: contextvars.ContextVar[Annotation | None] = contextvars.ContextVar(
    "backout_annotation", default=None
)
"""What ``journal.annotate(...)`` attaches to the calls made inside its block."""
KEY_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "backout_idempotency_key", default=None
)
"""The idempotency key ``journal.idempotency_key(...)`` gives the calls inside its block."""
