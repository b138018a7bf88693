"""The ``backout`` command. Each area contributes its sub-commands through ``register``.

Every command exits 0 on success and 1 on a user error with one readable line; bad input
never prints a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import typer
from pydantic import ValidationError
from rich.console import Console

from backout.infra.clikit import one_line
from backout.schemas.errors import BackoutError

try:  # typer >= 0.20 ships its own copy of click; older versions raise click's exceptions
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_exceptions  # type: ignore[no-redef]

app = typer.Typer(
    name="backout",
    help="The recovery layer for AI agents: freeze, trace, contain, roll back, harden.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

# Modules that add commands to `app`; each defines `register(app: typer.Typer) -> None`.
COMMAND_MODULES: tuple[str, ...] = (
    "backout.infra.commands_core",
    "backout.infra.demo",
    "backout.infra.commands_containment",
    "backout.infra.commands_operators",
    "backout.infra.commands_rollback",
    "backout.infra.commands_harden",
    "backout.infra.commands_detection",
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)

# markup=False: messages quote user input, which may contain [brackets].
_err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backout`` console script; returns the exit code."""
    try:
        # With standalone_mode=False, click returns the code of `raise typer.Exit(n)`.
        code = app(
            args=list(argv) if argv is not None else None,
            prog_name="backout",  # not argv[0]: `python -m ...` or a test runner
            standalone_mode=False,
        )
    except typer.Exit as done:
        return int(done.exit_code or 0)
    except typer.Abort:
        _err.print("backout: aborted")
        return 1
    except _click_exceptions.UsageError as exc:
        if isinstance(exc, getattr(_click_exceptions, "NoArgsIsHelpError", ())):
            _err.print(exc.format_message())  # a group called bare: its help, no prefix
            return 1
        command = exc.ctx.command_path if exc.ctx is not None else "backout"
        _err.print(f"{command}: {exc.format_message()}")
        return 1
    except _click_exceptions.ClickException as exc:
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
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
