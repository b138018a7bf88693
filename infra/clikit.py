"""Shared pieces of the CLI: settings loading, output as tables or JSON, time parsing."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import typer
from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.table import Table

from backout.infra.settings import Settings
from backout.schemas.errors import ConfigError

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 180)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def one_line(exc: ValidationError) -> str:
    """A pydantic validation error as one readable line."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "value"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid {where}: {first.get('msg', 'invalid')}{more}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (``BACKOUT_*``), with command-line overrides.

    Raises:
        ConfigError: a setting has a bad value (one readable line).
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"bad BACKOUT_* setting: {one_line(exc)}") from exc
    except SettingsError as exc:  # a value that does not even parse (e.g. BACKOUT_KAFKA not JSON)
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise ConfigError(f"bad BACKOUT_* setting: {exc}{cause}") from exc


def to_jsonable(value: Any) -> Any:
    """Models, dataclasses, datetimes and bytes as plain JSON values."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value
    return value


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout (one document, newline-terminated)."""
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_json_line(data: Any) -> None:
    """Write ``data`` as one compact JSON line (for streams)."""
    sys.stdout.write(json.dumps(to_jsonable(data), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table with the given header and rows (values shown with ``str``)."""
    out = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row))
    return out


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (``2026-11-23T04:00:00Z``), or a duration ago (``15m``, ``2h``, ``1d``).

    Raises:
        ConfigError: neither form.
    """
    text = text.strip()
    if text and text[-1] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return (now or datetime.now(UTC)) - timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"bad time {text!r}: use ISO-8601 (2026-11-23T04:00:00Z) or a duration like 15m"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
