"""The declared job of an incident run, and the narrower permission it suggests. Pure.

Per agent of the run and per dimension (the tools, systems and tenants of its write
attempts, which is what a policy's ``allow`` lists judge), the *declared job* is:

1. the policy's allow-list for the agent (resolved for the run's first event) when it
   has one: the job was declared there, and writes outside it were already violations;
2. otherwise the union of what the agent wrote before the run's first checkpoint (the part
   of the run someone approved), what it wrote in the baseline (its normal runs), and, for
   tenants, the run's own tenant;
3. unknown when none of those exists (no suggestion is made for that dimension).

What the run wrote outside its declared job is the excess; the suggestion is
``agents.<agent>.allow.<dimension>`` set to the declared job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from backout.infra.policy_edit import Path as KeyPath
from backout.infra.policy_edit import Value
from backout.processors.policy import Policy
from backout.schemas.events import ActionEvent, CallStatus, EventKind, Reversibility

__all__ = ["DIMENSIONS", "Dimension", "Permission", "permissions"]

Dimension = Literal["tools", "systems", "tenants"]
DIMENSIONS: tuple[Dimension, ...] = ("tools", "systems", "tenants")


@dataclass(frozen=True)
class Permission:
    """What one agent's run wrote, what its declared job needed, and the excess."""

    agent: str
    used: Mapping[Dimension, tuple[str, ...]]
    declared: Mapping[Dimension, tuple[str, ...] | None]
    """None: the job is unknown in this dimension (no checkpoint, no baseline, no policy)."""
    source: Mapping[Dimension, str]
    excess: Mapping[Dimension, tuple[str, ...]]

    def allow(self) -> dict[Dimension, list[str]]:
        """The allow-lists to add: dimensions with an excess and a job the policy lacks."""
        return {
            d: sorted(found)
            for d in DIMENSIONS
            if self.excess[d]
            and (found := self.declared[d]) is not None
            and self.source[d] != "policy"
        }

    def paths(self) -> dict[KeyPath, Value]:
        """Where the allow-lists go in the policy file."""
        return {("agents", self.agent, "allow", d): v for d, v in self.allow().items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "agent": self.agent,
            "used": {d: list(v) for d, v in self.used.items()},
            "declared": {d: None if v is None else list(v) for d, v in self.declared.items()},
            "source": dict(self.source),
            "excess": {d: list(v) for d, v in self.excess.items()},
            "suggested_allow": {d: list(v) for d, v in self.allow().items()},
        }


def _attempts(events: Sequence[ActionEvent], agent: str) -> list[ActionEvent]:
    """Write attempts of ``agent`` (what allow-lists judge)."""
    return [
        e
        for e in events
        if e.agent_id == agent
        and e.kind is EventKind.TOOL_CALL
        and e.reversibility is not Reversibility.READ_ONLY
        and e.status is not CallStatus.BLOCKED
    ]


def _dimension(events: Sequence[ActionEvent], dim: Dimension) -> set[str]:
    if dim == "tools":
        return {e.tool for e in events}
    if dim == "systems":
        return {e.target.system for e in events if e.target is not None}
    return {e.tenant for e in events if e.tenant is not None}


def permissions(
    events: Sequence[ActionEvent], policy: Policy, baseline: Sequence[ActionEvent] = ()
) -> tuple[Permission, ...]:
    """Per agent of the run: what it wrote, its declared job, and the excess (module doc)."""
    root = events[0].run_id
    checkpoints = [
        e.occurred_at for e in events if e.kind is EventKind.CHECKPOINT and e.run_id == root
    ]
    cut = min(checkpoints) if checkpoints else None
    out = []
    for agent in dict.fromkeys(e.agent_id for e in events):
        mine = [e for e in events if e.agent_id == agent]
        attempts = _attempts(events, agent)
        limits = policy.limits_for(mine[0])
        before = [e for e in attempts if cut is not None and e.occurred_at < cut]
        normal = _attempts(baseline, agent)
        tenant = next((e.tenant for e in mine if e.run_id == root and e.tenant), None)
        used, declared, source, excess = {}, {}, {}, {}
        for dim in DIMENSIONS:
            used[dim] = tuple(sorted(_dimension(attempts, dim)))
            listed = {
                "tools": limits.allowed_tools,
                "systems": limits.allowed_systems,
                "tenants": limits.allowed_tenants,
            }[dim]
            job, why = _job(dim, listed, before, normal, tenant, cut is not None)
            declared[dim] = tuple(sorted(job)) if job is not None else None
            source[dim] = why
            excess[dim] = tuple(sorted(set(used[dim]) - set(job))) if job is not None else ()
        out.append(Permission(agent, used, declared, source, excess))
    return tuple(out)


def _job(
    dim: Dimension,
    listed: frozenset[str] | None,
    before: Sequence[ActionEvent],
    normal: Sequence[ActionEvent],
    tenant: str | None,
    has_checkpoint: bool,
) -> tuple[set[str] | None, str]:
    if listed is not None:
        return set(listed), "policy"
    job: set[str] = set()
    why = []
    if has_checkpoint:
        job |= _dimension(before, dim)
        why.append("run before its first checkpoint")
    if normal:
        job |= _dimension(normal, dim)
        why.append("baseline runs")
    if dim == "tenants" and tenant is not None:
        job.add(tenant)
        why.append("the run's own tenant")
    if not why:
        return None, "unknown"
    return job, ", ".join(why)
