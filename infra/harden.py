"""Harden: search a policy change that contains an incident run earlier. Pure: no I/O.

The search is pure: the run's events are replayed through
:class:`~backout.processors.engine.Engine`, the code the processors run, one event at a
time (states start empty: the run is judged on its own, so agent-wide limits see only its
events). *Containment* is the first event after which the policy issues a freeze.

- **Policy change** (:func:`propose`): for every limit (``run.*``, ``agent.*``,
  ``retry_loop``, ``min_confidence``) a binary search finds the loosest value, set for the
  run's agent(s) under ``agents.<agent>.limits``, that contains the run at an earlier event
  than the policy did (or at all). That is the smallest change of that limit. A candidate
  is dropped when, replayed over the baseline (normal traffic), it issues a freeze the
  current policy does not. Among the rest the earliest containment wins, then the smallest
  relative change. When no limit works, the narrower permission below is proposed instead.
- **Narrower permission**: the allow-lists of the run's *declared job*
  (:mod:`backout.infra.declared_job`), replayed on top of the change.

:mod:`backout.infra.harden_files` writes the results: the run's events as an Avro object
container file, a pytest module that replays them and asserts the first containment comes
no later than event N, the proposed policy, the diffs and a JSON summary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from backout.infra.declared_job import Permission, permissions
from backout.infra.policy_edit import Path as KeyPath
from backout.infra.policy_edit import Value, set_values, with_values
from backout.processors.engine import Engine, Step
from backout.processors.findings import EventRef, Limits, ScopeState
from backout.processors.policy import Policy, parse_policy
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent, EventKind

__all__ = [
    "METRICS",
    "Containment",
    "LimitChange",
    "Metric",
    "Proposal",
    "first_containment",
    "freezes_issued",
    "propose",
]


# --- replay ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Containment:
    """The first freeze a policy issues while a run is replayed."""

    index: int
    """1-based number of the event after which the freeze was issued."""
    event_id: str
    detector: str
    severity: str
    summary: str
    freezes: tuple[str, ...]
    """``mode scope`` of each freeze, e.g. ``halt agent=billing-agent,environment=prod``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "event": self.index,
            "event_id": self.event_id,
            "detector": self.detector,
            "severity": self.severity,
            "summary": self.summary,
            "freezes": list(self.freezes),
        }


def _replay(events: Sequence[ActionEvent], policy: Policy) -> Iterator[tuple[int, Step]]:
    """Fold ``events`` one by one through the engine, as the processors do per agent."""
    engine = Engine(policy)
    agents: dict[str, ScopeState] = {}
    runs: dict[tuple[str, str], ScopeState] = {}
    for index, event in enumerate(events, 1):
        known = runs.get((event.agent_id, event.run_id))
        agent = agents.get(event.agent_id)
        step = engine.step(
            agent if agent is not None else ScopeState(),
            {event.run_id: known} if known is not None else {},
            [(event, EventRef(event.event_id))],
        )
        agents[event.agent_id] = step.agent
        for run_id, state in step.runs.items():
            runs[(event.agent_id, run_id)] = state
        for run_id in step.expired_runs:
            runs.pop((event.agent_id, run_id), None)
        yield index, step


def first_containment(events: Sequence[ActionEvent], policy: Policy) -> Containment | None:
    """The first freeze ``policy`` issues over ``events`` (in order), or None."""
    for index, step in _replay(events, policy):
        if step.commands:
            _, finding = step.commands[0]
            return Containment(
                index,
                finding.trigger.event_id,
                finding.detector,
                finding.severity.value,
                finding.summary,
                tuple(_describe(c) for c, _ in step.commands),
            )
    return None


def freezes_issued(events: Sequence[ActionEvent], policy: Policy) -> frozenset[str]:
    """Every distinct freeze (mode and scope) ``policy`` issues over ``events``."""
    return frozenset(_describe(c) for _, step in _replay(events, policy) for c, _ in step.commands)


def _describe(command: Any) -> str:
    scope = ",".join(f"{k}={v}" for k, v in sorted(command.scope.items()))
    return f"{command.mode.value} {scope}"


# --- the policy change ------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One limit the search may tighten."""

    name: str
    path: tuple[str, ...]
    """Under a rule set: ``("limits", "run", "value")``."""
    minimum: int = 1


METRICS: tuple[Metric, ...] = (
    *(
        Metric(f"{scope}.{m}", ("limits", scope, m))
        for scope in ("run", "agent")
        for m in ("actions", "records", "tenants", "systems", "value")
    ),
    Metric("retry_loop", ("limits", "retry_loop"), minimum=2),
    Metric("min_confidence", ("limits", "min_confidence")),
)
"""The limits :func:`propose` searches, in the order ties are broken."""


@dataclass(frozen=True)
class LimitChange:
    """One limit set tighter for the run's agent(s), and what that would have done."""

    metric: str
    agents: tuple[str, ...]
    old: float | None
    """The loosest value in force for the run's events (None: not set)."""
    new: float
    contained: Containment

    @property
    def relative(self) -> float:
        """How much the limit moves, relative to its old value (1.0 for a new limit)."""
        if self.old is None or self.old == 0:
            return 1.0
        return abs(self.old - self.new) / abs(self.old)

    def paths(self) -> dict[KeyPath, Value]:
        """Where the change goes in the policy file."""
        rest = next(m.path for m in METRICS if m.name == self.metric)
        value: Value = int(self.new) if float(self.new).is_integer() else self.new
        return {("agents", agent, *rest): value for agent in self.agents}

    def describe(self) -> str:
        """``agents.billing-agent.limits.run.value: 50000 -> 535``."""
        old = "unset" if self.old is None else f"{self.old:g}"
        where = ", ".join(".".join(p) for p in self.paths())
        return f"{where}: {old} -> {self.new:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "metric": self.metric,
            "agents": list(self.agents),
            "old": self.old,
            "new": self.new,
            "paths": [".".join(p) for p in self.paths()],
            "relative_change": round(self.relative, 6),
            "contained": self.contained.to_dict(),
        }


@dataclass(frozen=True)
class Proposal:
    """Everything :func:`propose` found for one run."""

    run_id: str
    events: tuple[ActionEvent, ...]
    policy_text: str
    old: Containment | None
    change: LimitChange | None
    rejected: tuple[tuple[LimitChange, str], ...]
    """Candidates dropped because they froze baseline traffic, with the freeze."""
    permissions: tuple[Permission, ...]
    proposed_text: str
    """The policy with ``change`` (or, without one, the permission) applied."""
    proposed: Containment | None
    """Containment under ``proposed_text``."""
    proposed_by: Literal["limits", "permission", "none"]
    permission_text: str
    """``proposed_text`` with the suggested allow-lists added too."""
    with_permission: Containment | None
    baseline_runs: tuple[str, ...]
    baseline_events: int
    notes: tuple[str, ...] = ()

    @property
    def contained_by(self) -> int | None:
        """N: the event the regression test asserts containment at or before."""
        return self.proposed.index if self.proposed is not None else None

    @property
    def improves(self) -> bool:
        """True when the proposed policy contains the run earlier than the old one."""
        return self.proposed is not None and (
            self.old is None or self.proposed.index < self.old.index
        )


def _policy(data: Mapping[str, Any], changes: Mapping[KeyPath, Value]) -> Policy | None:
    try:
        return Policy.model_validate(with_values(data, changes))
    except (ValidationError, ConfigError):
        return None


def _tool_calls(events: Sequence[ActionEvent]) -> list[ActionEvent]:
    return [e for e in events if e.kind is EventKind.TOOL_CALL]


def _effective(policy: Policy, events: Sequence[ActionEvent], metric: Metric) -> float | None:
    """The loosest value of ``metric`` in force for the run's tool calls (None: unset)."""
    values: list[float] = []
    for event in _tool_calls(events):
        found = _limit(policy.limits_for(event), metric)
        if found is None:
            return None
        values.append(found)
    if not values:
        return None
    return min(values) if metric.name == "min_confidence" else max(values)


def _limit(limits: Limits, metric: Metric) -> float | None:
    if metric.name == "retry_loop":
        return limits.retry_loop
    if metric.name == "min_confidence":
        return limits.min_confidence
    scope, name = metric.name.split(".")
    value: float | None = getattr(limits.run if scope == "run" else limits.agent, name)
    return value


def _ceiling(events: Sequence[ActionEvent], metric: Metric) -> int:
    """A value of ``metric`` the run cannot exceed (search bound for an unset limit)."""
    if metric.name.endswith(".value"):
        return math.ceil(sum(abs(e.value or 0.0) for e in events if e.is_write)) + 1
    return len(_tool_calls(events)) + 1


class _Search:
    """The binary search of one run over one metric."""

    def __init__(
        self,
        events: Sequence[ActionEvent],
        data: Mapping[str, Any],
        agents: tuple[str, ...],
        old: Containment | None,
    ) -> None:
        self.events = events
        self.data = data
        self.agents = agents
        self.old = old.index if old is not None else None
        # Only a containment before the old one counts: replay no further than that.
        self.prefix = events[: self.old - 1] if self.old is not None else events

    def at(self, metric: Metric, value: float) -> Containment | None:
        """Containment with ``metric`` set to ``value`` for the agents, if earlier than the
        old one (replaying stops there: later containments are not looked for)."""
        rest: Value = int(value) if float(value).is_integer() else value
        policy = _policy(self.data, {("agents", a, *metric.path): rest for a in self.agents})
        return first_containment(self.prefix, policy) if policy is not None else None

    def earlier(self, found: Containment | None) -> bool:
        return found is not None and (self.old is None or found.index < self.old)

    def loosest(self, metric: Metric, current: float | None) -> LimitChange | None:
        """The loosest value of ``metric`` that contains the run earlier, if any."""
        if metric.name == "min_confidence":
            return self._raise_confidence(metric, current)
        lo = metric.minimum
        hi = (math.ceil(current) - 1) if current is not None else _ceiling(self.events, metric)
        if hi < lo:
            return None
        best = self.at(metric, lo)
        if not self.earlier(best):
            return None
        chosen = lo
        while lo < hi:  # invariant: lo contains earlier; find the largest such value
            mid = (lo + hi + 1) // 2
            found = self.at(metric, mid)
            if self.earlier(found):
                lo, chosen, best = mid, mid, found
            else:
                hi = mid - 1
        assert best is not None
        return LimitChange(metric.name, self.agents, current, float(chosen), best)

    def _raise_confidence(self, metric: Metric, current: float | None) -> LimitChange | None:
        seen = sorted({e.confidence for e in _tool_calls(self.events) if e.confidence is not None})
        steps = sorted({min(1.0, math.floor(c * 100 + 1) / 100) for c in seen})
        steps = [s for s in steps if current is None or s > current]
        for value in steps:  # raising the floor: the smallest raise that contains earlier
            found = self.at(metric, value)
            if self.earlier(found):
                assert found is not None
                return LimitChange(metric.name, self.agents, current, value, found)
        return None


def _agents(events: Sequence[ActionEvent]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(e.agent_id for e in events))


def propose(
    events: Sequence[ActionEvent],
    policy_text: str,
    *,
    run_id: str,
    baseline: Sequence[ActionEvent] = (),
    source: str = "<policy>",
) -> Proposal:
    """Search a tighter policy for the run ``events`` (time order) and a narrower permission.

    Args:
        policy_text: the policy in force (YAML text).
        baseline: normal traffic, in time order; a change must not freeze anything in it
            that the policy in force does not.

    Raises:
        ConfigError: no events, or the policy text is invalid (PolicyError).
    """
    if not events:
        raise ConfigError(f"run {run_id!r} has no events to harden")
    policy = parse_policy(policy_text, source=source)
    data: dict[str, Any] = yaml.safe_load(policy_text) or {}
    agents = _agents(events)
    old = first_containment(events, policy)
    search = _Search(events, data, agents, old)
    quiet = freezes_issued(baseline, policy) if baseline else frozenset()
    found = [
        c
        for metric in METRICS
        if (c := search.loosest(metric, _effective(policy, events, metric))) is not None
    ]
    order = {m.name: i for i, m in enumerate(METRICS)}
    found.sort(key=lambda c: (c.contained.index, c.relative, order[c.metric]))
    change: LimitChange | None = None
    rejected: list[tuple[LimitChange, str]] = []
    for candidate in found:
        loud = _new_freezes(baseline, data, candidate.paths(), quiet)
        if loud:
            rejected.append((candidate, loud))
            continue
        change = candidate
        break
    perms = permissions(events, policy, baseline)
    perm_paths = {k: v for p in perms for k, v in p.paths().items()}
    notes: list[str] = []
    if not baseline:
        notes.append("no baseline traffic: the change was not checked against normal runs")
    limits_paths = change.paths() if change is not None else {}
    by: Literal["limits", "permission", "none"] = "limits" if change is not None else "none"
    with_perm = _policy(data, {**limits_paths, **perm_paths}) if perm_paths else None
    perm_found = first_containment(events, with_perm) if with_perm is not None else None
    if change is None and perm_paths and search.earlier(perm_found):
        loud = _new_freezes(baseline, data, perm_paths, quiet)
        if loud:
            notes.append(f"the narrower permission would freeze baseline traffic too ({loud})")
        else:
            by = "permission"
            limits_paths = perm_paths
            notes.append(
                "no tighter limit contains the run earlier: the narrower "
                "permission is proposed instead"
            )
    proposed_text = set_values(policy_text, limits_paths).text if limits_paths else policy_text
    proposed = first_containment(events, parse_policy(proposed_text, source=source))
    if by == "none":
        notes.append("no policy change found that contains the run earlier")
    permission_text = (
        set_values(proposed_text, perm_paths).text
        if perm_paths and by != "permission"
        else proposed_text
    )
    return Proposal(
        run_id,
        tuple(events),
        policy_text,
        old,
        change,
        tuple(rejected),
        tuple(perms),
        proposed_text,
        proposed,
        by,
        permission_text,
        perm_found,
        tuple(dict.fromkeys(e.run_id for e in baseline)),
        len(baseline),
        tuple(notes),
    )


def _new_freezes(
    baseline: Sequence[ActionEvent],
    data: Mapping[str, Any],
    paths: Mapping[KeyPath, Value],
    quiet: frozenset[str],
) -> str:
    """The first freeze the changed policy issues over the baseline that the old one does not."""
    if not baseline:
        return ""
    policy = _policy(data, paths)
    if policy is None:
        return "invalid policy"
    extra = sorted(freezes_issued(baseline, policy) - quiet)
    return extra[0] if extra else ""
