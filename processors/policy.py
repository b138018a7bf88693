"""The containment policy: limits for the detectors and graduated responses. Pure: no I/O
beyond reading the policy file in :func:`load_policy`.

A policy is a YAML file (``infra/policies/*.yaml``)::

    version: 1
    window: 60s                  # the sliding window of every windowed detector
    defaults:                    # limits and allow-lists for everyone ...
      limits: {run: {actions: 600, records: 200}, retry_loop: 5, min_confidence: 0.4}
      allow: {systems: [erp, crm]}
    tenants:   {acme: {...}}     # ... overridden per tenant,
    workflows: {close: {...}}    # per workflow,
    agents:    {billing-bot: {...}}  # per agent,
    tools:     {delete_invoice: {limits: {retry_loop: 2}}}  # and per tool (most specific)
    responses:                   # finding -> severity -> graduated responses
      default: {high: [read_only], critical: [halt]}
      policy_violation: {high: [halt, quarantine_identity]}

Overrides apply field by field, most specific last: defaults, then the event's tenant,
workflow, agent and tool. A limit that is not set anywhere is off. For a finding the
responses of the highest severity at or below the finding's severity apply (the
detector's own table when it has one, else ``default``); responses are ``signal``
(nothing but the signal), ``read_only``, ``halt`` (both on the finding's subject unless
``scope:`` names run, agent, identity, workflow or tenant), ``quarantine_identity``,
``pause_workflow``, ``pause_tenant`` and ``global_stop``.

Unknown keys and bad values are refused at load with the file, line and field path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from backout.processors.findings import (
    DEFAULT_SEVERITY,
    DetectorName,
    Finding,
    Limits,
    ScopeLimits,
    digest,
)
from backout.processors.rules import LimitsFor
from backout.schemas.errors import PolicyError
from backout.schemas.events import ActionEvent, ControlAction, ControlCommand, FreezeMode, Severity

_STRICT = ConfigDict(extra="forbid", frozen=True)
_RESOLVER_CACHE = 100_000
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def _duration(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 90s, 5m, 1h")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f"bad duration {value!r}: use a number of seconds or 250ms, 90s, 5m, 1h, 1d"
            )
        return timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    return value


Duration: TypeAlias = Annotated[timedelta, BeforeValidator(_duration)]
ResponseAction: TypeAlias = Literal[
    "signal",
    "read_only",
    "halt",
    "quarantine_identity",
    "pause_workflow",
    "pause_tenant",
    "global_stop",
]
ScopeOn: TypeAlias = Literal["run", "agent", "identity", "workflow", "tenant"]


class ScopeLimitsSpec(BaseModel):
    """Windowed limits of one subject (a run, or an agent across its runs)."""

    model_config = _STRICT
    actions: int | None = Field(default=None, gt=0)
    """Tool calls in the window."""
    records: int | None = Field(default=None, gt=0)
    """Distinct records written in the window."""
    tenants: int | None = Field(default=None, gt=0)
    """Distinct tenants written in the window."""
    systems: int | None = Field(default=None, gt=0)
    """Distinct target systems written in the window."""
    value: float | None = Field(default=None, gt=0)
    """Sum of ``|value|`` written in the window."""


class LimitsSpec(BaseModel):
    """The limits block of a rule set."""

    model_config = _STRICT
    run: ScopeLimitsSpec = ScopeLimitsSpec()
    agent: ScopeLimitsSpec = ScopeLimitsSpec()
    retry_loop: int | None = Field(default=None, ge=2)
    """The Nth identical call (tool, target, arguments) in the window is a retry loop."""
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    """Calls reporting a lower ``confidence`` are tool uncertainty."""


class AllowSpec(BaseModel):
    """What writes may touch; a list that is not set allows anything."""

    model_config = _STRICT
    tools: list[str] | None = None
    systems: list[str] | None = None
    tenants: list[str] | None = None


class RuleSet(BaseModel):
    """Limits and allow-lists for everyone, or for one tenant, workflow, agent or tool."""

    model_config = _STRICT
    limits: LimitsSpec = LimitsSpec()
    allow: AllowSpec = AllowSpec()


def _response(value: object) -> object:
    return {"action": value} if isinstance(value, str) else value


class Response(BaseModel):
    """One response to a finding: a freeze of some scope, or just the signal."""

    model_config = _STRICT
    action: ResponseAction
    scope: ScopeOn | None = None
    """For ``read_only`` and ``halt``: what to freeze (default: the finding's subject)."""

    @model_validator(mode="after")
    def _scope_only_for_scoped(self) -> Response:
        if self.scope is not None and self.action not in ("read_only", "halt"):
            raise ValueError(f"'scope' only applies to read_only and halt, not {self.action}")
        return self


ResponseList: TypeAlias = list[Annotated[Response, BeforeValidator(_response)]]


class Escalation(BaseModel):
    """Overshoot ratios (observed / limit) at which windowed findings escalate."""

    model_config = _STRICT
    high: float = Field(default=2.0, gt=1)
    critical: float = Field(default=5.0, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> Escalation:
        if self.critical <= self.high:
            raise ValueError("critical must be above high")
        return self


class SupervisorSpec(BaseModel):
    """Supervisor sampling: a share of succeeded writes re-checked on the live target."""

    model_config = _STRICT
    share: float = Field(default=0.0, ge=0, le=1)
    recheck_after: Duration = timedelta(seconds=30)
    max_pending: int = Field(default=10_000, gt=0)
    """Sampled writes waiting for their re-check; more are dropped (and counted)."""


class Policy(BaseModel):
    """A validated policy. Build with :func:`load_policy` or :func:`parse_policy`."""

    model_config = _STRICT
    version: Literal[1] = 1
    name: str = "policy"
    window: Duration = timedelta(seconds=60)
    cooldown: Duration = timedelta(minutes=5)
    """A response with the same scope and mode is not issued again within this time."""
    freeze_ttl: Duration | None = None
    """When set, freezes expire this long after the finding (``expires_at``)."""
    issuer: str = "backout-processors"
    escalation: Escalation = Escalation()
    severity: dict[DetectorName, Severity] = Field(default_factory=dict)
    """Base severity per detector (see ``rules.DEFAULT_SEVERITY``)."""
    defaults: RuleSet = RuleSet()
    tenants: dict[str, RuleSet] = Field(default_factory=dict)
    workflows: dict[str, RuleSet] = Field(default_factory=dict)
    agents: dict[str, RuleSet] = Field(default_factory=dict)
    tools: dict[str, RuleSet] = Field(default_factory=dict)
    responses: dict[DetectorName | Literal["default"], dict[Severity, ResponseList]] = Field(
        default_factory=dict
    )
    supervisor: SupervisorSpec = SupervisorSpec()

    @model_validator(mode="after")
    def _window_positive(self) -> Policy:
        if self.window <= timedelta(0):
            raise ValueError("window must be positive")
        return self

    # --- limits -------------------------------------------------------------------------
    def limits_for(self, event: ActionEvent) -> Limits:
        """The limits that apply to ``event`` (not cached: see :meth:`resolver`)."""
        return self._resolve(event.agent_id, event.workflow, event.tenant, event.tool)

    def resolver(self) -> LimitsFor:
        """A fast ``limits_for``, cached per (agent, workflow, tenant, tool)."""
        cache: dict[tuple[str, str | None, str | None, str], Limits] = {}
        resolve = self._resolve

        def limits_for(event: ActionEvent) -> Limits:
            key = (event.agent_id, event.workflow, event.tenant, event.tool)
            found = cache.get(key)
            if found is None:
                if len(cache) >= _RESOLVER_CACHE:
                    cache.clear()
                found = cache[key] = resolve(*key)
            return found

        return limits_for

    def _resolve(self, agent: str, workflow: str | None, tenant: str | None, tool: str) -> Limits:
        merged = _explicit(self.defaults)
        for table, name in (
            (self.tenants, tenant),
            (self.workflows, workflow),
            (self.agents, agent),
            (self.tools, tool),
        ):
            rules = table.get(name) if name is not None else None
            if rules is not None:
                merged.update(_explicit(rules))

        def scope(kind: str) -> ScopeLimits:
            return ScopeLimits(
                **{
                    m: merged.get(f"limits.{kind}.{m}")
                    for m in ("actions", "records", "tenants", "systems", "value")
                }
            )

        def allowed(what: str) -> frozenset[str] | None:
            names = merged.get(f"allow.{what}")
            return frozenset(names) if isinstance(names, list) else None

        return Limits(
            window_us=_us(self.window),
            run=scope("run"),
            agent=scope("agent"),
            retry_loop=merged.get("limits.retry_loop"),
            min_confidence=merged.get("limits.min_confidence"),
            allowed_tools=allowed("tools"),
            allowed_systems=allowed("systems"),
            allowed_tenants=allowed("tenants"),
            high_at=self.escalation.high,
            critical_at=self.escalation.critical,
            severity={str(k): v for k, v in {**DEFAULT_SEVERITY, **self.severity}.items()},
            track_cap=self._track_cap(),
        )

    def _track_cap(self) -> int:
        largest = 1.0
        for rules in (
            self.defaults,
            *self.tenants.values(),
            *self.workflows.values(),
            *self.agents.values(),
            *self.tools.values(),
        ):
            for spec in (rules.limits.run, rules.limits.agent):
                for limit in (spec.records, spec.tenants, spec.systems):
                    largest = max(largest, float(limit or 0))
        return max(16, math.ceil(largest * self.escalation.critical) + 1)

    # --- responses ----------------------------------------------------------------------
    def responses_for(self, detector: DetectorName, severity: Severity) -> list[Response]:
        """The responses to a finding: the highest level at or below its severity."""
        table = self.responses.get(detector, self.responses.get("default", {}))
        order = list(Severity)
        for level in reversed(order[: order.index(severity) + 1]):
            if level in table:
                return list(table[level])
        return []

    def commands_for(self, finding: Finding) -> list[ControlCommand]:
        """The unsigned freezes ``finding`` calls for; ids derive from the finding."""
        out: list[ControlCommand] = []
        seen: set[tuple[tuple[tuple[str, str], ...], FreezeMode]] = set()
        for response in self.responses_for(finding.detector, finding.severity):
            planned = _scope_of(response, finding)
            if planned is None:
                continue
            scope, mode = planned
            key = (tuple(sorted(scope.items())), mode)
            if key in seen:
                continue
            seen.add(key)
            out.append(
                ControlCommand(
                    command_id="cmd_" + digest(finding.finding_id, mode.value, *key[0]),
                    issued_at=finding.at,
                    action=ControlAction.FREEZE,
                    scope=scope,
                    mode=mode,
                    expires_at=finding.at + self.freeze_ttl if self.freeze_ttl else None,
                    reason=f"{finding.detector} ({finding.severity.value}): {finding.summary}",
                    issuer=self.issuer,
                    cause=finding.finding_id,
                )
            )
        return out


def cooldown_key(command: ControlCommand) -> str:
    """What a repeat of a response shares with the original: its scope and mode."""
    return digest(command.mode.value, *sorted(command.scope.items()))


def _scope_of(response: Response, finding: Finding) -> tuple[dict[str, str], FreezeMode] | None:
    ctx = finding.context
    action = response.action
    if action == "signal":
        return None
    if action == "global_stop":
        return {"all": "*"}, FreezeMode.HALT
    if action == "quarantine_identity":
        return {"identity": ctx.identity}, FreezeMode.QUARANTINE_IDENTITY
    if action in ("pause_workflow", "pause_tenant"):
        on: ScopeOn = "workflow" if action == "pause_workflow" else "tenant"
        mode = FreezeMode.HALT
    else:
        on = response.scope or finding.subject[0]
        mode = FreezeMode.READ_ONLY if action == "read_only" else FreezeMode.HALT
    value = {
        "run": ctx.run,
        "agent": ctx.agent,
        "identity": ctx.identity,
        "workflow": ctx.workflow,
        "tenant": ctx.tenant,
    }[on]
    if not value:
        return None
    scope: dict[str, str] = {on: value}
    if on in ("agent", "workflow", "tenant"):
        scope["environment"] = ctx.environment
    return scope, mode


def _explicit(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The fields set in the file, flattened to dotted paths."""
    out: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_explicit(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _us(value: timedelta) -> int:
    return value // timedelta(microseconds=1)


# --- loading ----------------------------------------------------------------------------
def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file.

    Raises:
        PolicyError: unreadable, not YAML, or not a valid policy; the message names the
            file, the line and the field path.
    """
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc.strerror}", file=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text", file=str(path)) from exc
    return parse_policy(text, source=str(path))


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Validate a policy given as YAML text (``source`` names it in errors)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(
            f"{source}:{line}: not valid YAML: {exc.problem or exc}", file=source, line=line
        ) from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}", file=source) from exc
    if root is not None:
        _refuse_duplicate_keys(root, source, ())
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(
            f"{source}:1: a policy is a mapping of keys to values", file=source, line=1
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(source, root, err) for err in exc.errors()]
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PolicyError(
            first[0] + more,
            file=source,
            line=first[1],
            path=first[2],
            problems=[p[0] for p in problems],
        ) from None


def _problem(
    source: str, root: yaml.Node | None, err: Mapping[str, Any]
) -> tuple[str, int | None, str]:
    loc = tuple(p for p in err.get("loc", ()) if not _is_validator_tag(p))
    path = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(root, loc)
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        message = "unknown key"
    elif "input" in err and err.get("type") not in ("missing", "model_type", "dict_type"):
        message = f"{message} (got {err['input']!r})"
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {path}: {message}", line, path


def _is_validator_tag(part: object) -> bool:
    # pydantic puts the branch of a union or a validator's function in the location
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _line_of(root: yaml.Node | None, loc: tuple[object, ...]) -> int | None:
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == str(part):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _refuse_duplicate_keys(node: yaml.Node, source: str, path: tuple[str, ...]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                where = ".".join((*path, name))
                line = key.start_mark.line + 1
                raise PolicyError(
                    f"{source}:{line}: {where}: duplicate key", file=source, line=line, path=where
                )
            seen.add(name)
            _refuse_duplicate_keys(value, source, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, (*path, str(index)))
