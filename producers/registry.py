"""Tool declarations: reversibility, target, compensation, approval rule. Pure.

A declaration is checked when it is made, so a mistake surfaces at import time and not
at 4 a.m.: a mutating tool without a way to find its target record, an unknown
reversibility class, a reversible tool without a restorable target, or a compensation
whose argument builder does not fit the tool's parameters all raise ``ConfigError``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Required, TypedDict, Unpack

from pydantic import JsonValue

from backout.producers.targets import Target
from backout.schemas.errors import ConfigError
from backout.schemas.events import JsonMap, Reversibility

ArgsFn = Callable[..., Any]


@dataclass(frozen=True)
class Compensate:
    """How a compensatable tool is undone.

    Args:
        tool: the name of the compensating tool (itself declared with ``journal.tool``).
        args: builds the compensating tool's arguments; it is called with the original
            call's arguments as keywords plus ``result=`` (the original call's return value).
        window: how long after the call the compensation is allowed.
    """

    tool: str
    args: ArgsFn
    window: timedelta = timedelta(days=30)


@dataclass(frozen=True)
class ToolSpec:
    """Everything backout knows about one tool."""

    name: str
    fn: Callable[..., Any]
    reversibility: Reversibility
    target: Target | None
    system: str | None
    object_id: ArgsFn | None
    compensation: Compensate | None
    value: ArgsFn | None
    idempotency_key: ArgsFn | None
    requires_approval: ArgsFn | None
    is_async: bool
    parameters: tuple[str, ...] = field(default=())

    @property
    def mutating(self) -> bool:
        """True unless the tool is read-only."""
        return self.reversibility is not Reversibility.READ_ONLY

    @functools.cached_property
    def _signature(self) -> tuple[inspect.Signature, str | None]:
        # Computed once: inspect.signature costs more than the rest of a journaled call.
        signature = inspect.signature(self.fn)
        var_keyword = next(
            (
                name
                for name, param in signature.parameters.items()
                if param.kind is inspect.Parameter.VAR_KEYWORD
            ),
            None,
        )
        return signature, var_keyword

    @functools.cached_property
    def _simple_parameters(self) -> tuple[tuple[str, ...], dict[str, Any]] | None:
        """Names and defaults when every parameter is plain positional-or-keyword."""
        params = inspect.signature(self.fn).parameters.values()
        if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            return None
        return (tuple(p.name for p in params),
                {p.name: p.default for p in params if p.default is not inspect.Parameter.empty})

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name (defaults applied).

        Raises:
            TypeError: the arguments do not fit the tool's signature (as a direct call would).
        """
        simple = self._simple_parameters
        if simple is not None and len(args) <= len(simple[0]):
            names, defaults = simple
            out = dict(zip(names, args, strict=False))
            for name, value in kwargs.items():
                if name in out or name not in names:
                    break  # a duplicate or unknown argument: let inspect raise its TypeError
                out[name] = value
            else:
                if len(out) == len(names):
                    return out
                missing = [n for n in names if n not in out]
                if all(n in defaults for n in missing):
                    return {**out, **{n: defaults[n] for n in missing}}
        signature, var_keyword = self._signature
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = dict(bound.arguments)
        if var_keyword is not None and var_keyword in out:
            out.update(out.pop(var_keyword))
        return out


def _accepts(fn: Callable[..., Any], names: list[str]) -> bool:
    """True when ``fn(**{n: ... for n in names})`` binds."""
    try:
        inspect.signature(fn).bind(**dict.fromkeys(names))
    except TypeError:
        return False
    return True


def _parse_reversibility(value: Reversibility | str) -> Reversibility:
    try:
        return Reversibility(value)
    except ValueError:
        known = ", ".join(r.value for r in Reversibility)
        raise ConfigError(f"unknown reversibility class {value!r} (one of: {known})") from None


class ToolOptions(TypedDict, total=False):
    """How a tool is declared: the keyword arguments of ``journal.tool(...)`` and ``declare``."""

    reversibility: Required[Reversibility | str]
    """reversible, compensatable, irreversible or read_only."""
    target: Target | None
    """The Target holding the record the tool changes (before/after images)."""
    system: str | None
    """The system name when there is no Target (irreversible tools)."""
    object_id: ArgsFn | None
    """Finds the target record id from the call's arguments."""
    compensation: Compensate | None
    """For compensatable tools, the compensating tool and its window."""
    value: ArgsFn | None
    """The value moved by a call (money, units), from its arguments."""
    idempotency_key: ArgsFn | None
    """A caller-defined key from the arguments (default: run + step)."""
    requires_approval: ArgsFn | None
    """A predicate over the arguments; when true the call waits for an operator's decision."""
    name: str | None
    """The tool name in events (default: the function name)."""


def check_options(what: str, options: Mapping[str, object]) -> None:
    """Refuse unknown or missing options as Python refuses bad keyword arguments.

    Raises:
        TypeError: an option ``ToolOptions`` does not name, or no ``reversibility``.
    """
    unknown = sorted(set(options) - set(ToolOptions.__annotations__))
    if unknown:
        raise TypeError(f"{what}() got an unexpected keyword argument {unknown[0]!r}")
    if "reversibility" not in options:
        raise TypeError(f"{what}() missing 1 required keyword-only argument: 'reversibility'")


def declare(fn: Callable[..., Any], **options: Unpack[ToolOptions]) -> ToolSpec:
    """Validate a tool declaration and return its spec.

    Args:
        fn: the tool function (sync or async).
        **options: see ``ToolOptions``.

    Raises:
        ConfigError: the declaration cannot be journaled or undone as declared.
        TypeError: an unknown option, or no ``reversibility``.
    """
    check_options("declare", options)
    reversibility = options["reversibility"]
    target, system = options.get("target"), options.get("system")
    object_id, compensation = options.get("object_id"), options.get("compensation")
    value, idempotency_key = options.get("value"), options.get("idempotency_key")
    requires_approval, name = options.get("requires_approval"), options.get("name")
    kind = _parse_reversibility(reversibility)
    tool_name = name or fn.__name__
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    names = [p.name for p in params]
    if kind is not Reversibility.READ_ONLY and object_id is None:
        raise ConfigError(
            f"tool {tool_name!r} is {kind.value} but declares no object_id: backout cannot tell "
            "which record it changes (pass object_id=lambda <args>: <record id>)"
        )
    if kind is not Reversibility.READ_ONLY and target is None and system is None:
        raise ConfigError(f"tool {tool_name!r} is {kind.value} but names no target or system")
    if kind is Reversibility.REVERSIBLE and not isinstance(target, Target):
        raise ConfigError(
            f"tool {tool_name!r} is reversible but its target {target!r} cannot restore fields "
            "(pass a Target such as SqlTableTarget, or declare it compensatable)"
        )
    if kind is Reversibility.COMPENSATABLE and compensation is None:
        raise ConfigError(f"tool {tool_name!r} is compensatable but declares no compensation")
    if compensation is not None:
        if kind is not Reversibility.COMPENSATABLE:
            raise ConfigError(f"tool {tool_name!r} declares a compensation but is {kind.value}")
        if not _accepts(compensation.args, [*names, "result"]):
            raise ConfigError(
                f"compensation args for {tool_name!r} must accept the tool's parameters "
                f"({', '.join(names) or 'none'}) and result= as keywords"
            )
        if compensation.window <= timedelta(0):
            raise ConfigError(f"compensation window of {tool_name!r} must be positive")
    for label, extractor in (
        ("object_id", object_id),
        ("value", value),
        ("idempotency_key", idempotency_key),
        ("requires_approval", requires_approval),
    ):
        if extractor is not None and not _accepts(extractor, names):
            raise ConfigError(
                f"{label} of tool {tool_name!r} must accept the tool's parameters "
                f"({', '.join(names) or 'none'}) as keywords (add **_ to ignore some)"
            )
    return ToolSpec(
        name=tool_name,
        fn=fn,
        reversibility=kind,
        target=target,
        system=target.system if target is not None else system,
        object_id=object_id,
        compensation=compensation,
        value=value,
        idempotency_key=idempotency_key,
        requires_approval=requires_approval,
        is_async=inspect.iscoroutinefunction(fn),
        parameters=tuple(names),
    )


def to_json_value(value: Any) -> JsonValue:
    """A tool argument or result as a JSON value (models, dataclasses, tuples, sets, ...)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json_value(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return to_json_value(dump(mode="json"))
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_json_value(getattr(value, k)) for k in value.__dataclass_fields__}
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return repr(value)


_PLAIN = frozenset({str, int, float, bool, type(None)})


def json_args(args: Mapping[str, Any]) -> JsonMap:
    """A call's arguments as a JSON map."""
    plain = _PLAIN
    return {k: v if type(v) in plain else to_json_value(v) for k, v in args.items()}
