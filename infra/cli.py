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


def _new_app() -> typer.Typer:
    app = typer.Typer(
        name="backout",
        help="The recovery layer for AI agents: freeze, trace, contain, roll back, harden.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )

    # A callback keeps `backout` a group even when only one command module is loaded;
    # otherwise typer would run that lone command without its name.
    @app.callback()
    def _root() -> None:
        pass

    return app


# Modules that add commands; each defines `register(app: typer.Typer) -> None`. The names
# they register are listed so a command imports only its own module: the CLI starts fast
# (Faust, SQLAlchemy and the Kafka clients are not loaded for commands that do not use them).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "backout.infra.commands_core": ("broker", "tail", "topics"),
    "backout.infra.demo": ("demo",),
    "backout.infra.commands_containment": (
        "freeze",
        "lift",
        "freezes",
        "approve",
        "deny",
        "control-audit",
        "keys",
    ),
    "backout.infra.commands_quarantine": ("release", "discard"),
    "backout.infra.commands_operators": ("trace", "replay", "blast-radius", "report", "up"),
    "backout.infra.commands_projection": ("project", "state"),
    "backout.infra.commands_rollback": ("rollback", "tasks"),
    "backout.infra.commands_harden": ("harden",),
    "backout.infra.commands_detection": ("processors", "detect"),
}


def create_app(command: str | None = None) -> typer.Typer:
    """The ``backout`` app: only the module that owns ``command``, or every module."""
    owners = [m for m, names in COMMAND_MODULES.items() if command in names]
    app = _new_app()
    for module in owners or COMMAND_MODULES:
        importlib.import_module(module).register(app)
    return app


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line, if the first word is one."""
    return argv[0] if argv and not argv[0].startswith("-") else None


# markup=False: messages quote user input, which may contain [brackets].
_err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def main(argv: Sequence[str] | None = None, *, app: typer.Typer | None = None) -> int:
    """Entry point of the ``backout`` console script; returns the exit code.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
        app: the app to run (default: the one ``create_app`` builds for the command).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app = app or create_app(_command_of(args))
        # With standalone_mode=False, click returns the code of `raise typer.Exit(n)`.
        code = app(
            args=args,
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
