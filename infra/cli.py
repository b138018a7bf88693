"""The ``backout`` command. Each area contributes its sub-commands through ``register``.

Every command exits 0 on success and 1 on a user error with one readable line; bad input
never prints a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click
import typer
from pydantic import ValidationError
from rich.console import Console

from backout.infra.clikit import one_line
from backout.schemas.errors import BackoutError

app = typer.Typer(
    name="backout",
    help="The recovery layer for AI agents: freeze, trace, contain, roll back, harden.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

# Modules that add commands to `app`; each defines `register(app: typer.Typer) -> None`.
COMMAND_MODULES: tuple[str, ...] = ("backout.infra.commands_core",)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backout`` console script; returns the exit code."""
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code or 0)
    except click.exceptions.Abort:
        _err.print("backout: aborted")
        return 1
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "backout"
        _err.print(f"{command}: {exc.format_message()}")
        return 1
    except click.ClickException as exc:
        _err.print(f"backout: {exc.format_message()}")
        return 1
    except BackoutError as exc:
        _err.print(f"backout: {exc}")
        return 1
    except ValidationError as exc:
        _err.print(f"backout: {one_line(exc)}")
        return 1
    except KeyboardInterrupt:
        _err.print("backout: interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
