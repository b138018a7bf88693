"""Finding targets and compensating tools for a rollback run outside the agent's process.

``--targets module:attr`` names an iterable (or mapping) of Target objects defined in
code; ``--targets FILE.toml`` declares SQL tables::

    [[targets]]
    system = "erp"                   # the system name in events
    url = "sqlite:///erp.db"         # any SQLAlchemy URL
    table = "invoices"
    key = "id"                       # primary key column (default "id")
    version = "version"              # optional integer version column
    fields = ["status", "amount"]    # optional: the columns images hold (default: all)

``--compensators module:attr`` names a Journal (its declared tools), a mapping of name to
callable, or an iterable of ``@journal.tool`` functions.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError

from backout.producers.targets import SqlTableTarget, Target
from backout.rollback.executor import targets_by_system
from backout.schemas.errors import ConfigError

__all__ = ["load_compensators", "load_targets", "targets_from_toml"]

_KEYS = {"system", "url", "table", "key", "version", "fields"}


def load_targets(spec: str) -> dict[str, Target]:
    """Targets by system name from ``module:attr`` or a ``.toml`` file.

    Raises:
        ConfigError: the module, attribute or file cannot be used (one readable line).
    """
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        return targets_from_toml(path)
    found = _import(spec, "--targets")
    if callable(found) and not isinstance(found, Target):
        found = found()
    if isinstance(found, Target):
        found = [found]
    if not isinstance(found, Mapping | Iterable):
        raise ConfigError(
            f"--targets {spec}: expected an iterable of Target objects, got {type(found).__name__}"
        )
    targets = targets_by_system(found)
    if not targets:
        raise ConfigError(f"--targets {spec}: no targets in it")
    return targets


def targets_from_toml(path: Path) -> dict[str, Target]:
    """SqlTableTargets declared in a TOML file (see the module docstring).

    Raises:
        ConfigError: the file is missing, not TOML, or declares a table badly.
    """
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read targets file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"targets file {str(path)!r} is not valid TOML: {exc}") from exc
    entries = data.get("targets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"targets file {str(path)!r} declares no [[targets]]")
    engines: dict[str, Engine] = {}
    out: list[Target] = []
    for number, entry in enumerate(entries, 1):
        out.append(_sql_target(entry, f"{path}: target #{number}", engines))
    return targets_by_system(out)


def _sql_target(entry: object, where: str, engines: dict[str, Engine]) -> SqlTableTarget:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table of settings")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})"
        )
    for required in ("system", "url", "table"):
        if not isinstance(entry.get(required), str) or not entry[required]:
            raise ConfigError(f"{where}: {required!r} is required (a string)")
    fields = entry.get("fields")
    if fields is not None and not (
        isinstance(fields, list) and all(isinstance(f, str) for f in fields)
    ):
        raise ConfigError(f"{where}: 'fields' must be a list of column names")
    for optional in ("key", "version"):
        if optional in entry and not isinstance(entry[optional], str):
            raise ConfigError(f"{where}: {optional!r} must be a string")
    url = entry["url"]
    engine = engines.get(url)
    if engine is None:
        try:
            engine = engines[url] = create_engine(url)
        except (ArgumentError, ImportError, ValueError) as exc:
            raise ConfigError(f"{where}: bad database url {url!r}: {exc}") from exc
    return SqlTableTarget(
        engine,
        entry["table"],
        key=entry.get("key", "id"),
        version=entry.get("version"),
        system=entry["system"],
        fields=fields,
    )


def load_compensators(spec: str) -> dict[str, Callable[..., Any]]:
    """Compensating tools by name from ``module:attr``.

    Raises:
        ConfigError: the attribute is not a Journal, a mapping or an iterable of tools.
    """
    found = _import(spec, "--compensators")
    tools = getattr(found, "tools", None)
    if isinstance(tools, Mapping):  # a Journal: its declared tools
        return {str(name): spec_ for name, spec_ in tools.items()}
    if isinstance(found, Mapping):
        bad = [k for k, v in found.items() if not callable(v) and not hasattr(v, "fn")]
        if bad:
            raise ConfigError(f"--compensators {spec}: {bad[0]!r} is not callable")
        return {str(k): v for k, v in found.items()}
    if isinstance(found, Iterable):
        out: dict[str, Callable[..., Any]] = {}
        for item in found:
            declared = getattr(item, "__backout_tool__", None)
            name = declared.name if declared is not None else getattr(item, "__name__", None)
            if not callable(item) or not name:
                raise ConfigError(f"--compensators {spec}: {item!r} is not a named callable")
            out[name] = item
        return out
    raise ConfigError(
        f"--compensators {spec}: expected a Journal, a mapping of name to "
        f"callable, or an iterable of tools; got {type(found).__name__}"
    )


def _import(spec: str, option: str) -> object:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{option} {spec!r}: use module:attribute or a .toml file")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{option} {spec}: cannot import {module_name!r}: {exc}") from exc
    found: object = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigError(f"{option} {spec}: {module_name!r} has no {attr!r}") from None
    return found
