"""The core commands fail with one readable line (exit 1, no traceback) on bad input,
and each command's --help shows an example. No broker is involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backout.infra.cli import main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No BACKOUT_* settings and an empty working directory (no broker state file)."""
    for name in list(os.environ):
        if name.startswith("BACKOUT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_failing(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, assert exit 1 with exactly one readable line on stderr; return it."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 1, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err and "Error:" not in err.split(":", 1)[0]
    assert lines[0].startswith("backout"), lines[0]
    assert out == ""
    return lines[0]


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    line = run_failing(capsys, "nope")
    assert "No such command 'nope'" in line


def test_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    line = run_failing(capsys, "tail", "--bogus")
    assert line.startswith("backout tail:") and "--bogus" in line


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["tail", "--last", "abc"], "--last"),
        (["broker", "--port", "x"], "--port"),
        (["tail", "--topic"], "--topic"),
    ],
)
def test_bad_option_value(capsys: pytest.CaptureFixture[str], argv: list[str], option: str) -> None:
    line = run_failing(capsys, *argv)
    assert option in line


def test_tail_unknown_topic(capsys: pytest.CaptureFixture[str]) -> None:
    line = run_failing(capsys, "tail", "--topic", "nope")
    assert line == ("backout: unknown topic 'nope': actions, control, signals, quarantine or dlq")


def test_messages_quoting_brackets_are_not_read_as_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = run_failing(capsys, "tail", "--topic", "[/nope][bold]x")
    assert "'[/nope][bold]x'" in line


def test_tail_since_garbage(capsys: pytest.CaptureFixture[str]) -> None:
    line = run_failing(capsys, "tail", "--since", "garbage")
    assert "bad time 'garbage'" in line and "15m" in line


@pytest.mark.parametrize("last", ["0", "-3"])
def test_tail_last_must_be_positive(capsys: pytest.CaptureFixture[str], last: str) -> None:
    line = run_failing(capsys, "tail", "--last", last)
    assert line == "backout: --last must be at least 1"


@pytest.mark.parametrize(
    "argv",
    [["tail"], ["tail", "--json"], ["tail", "--since", "15m"], ["topics", "ensure"]],
)
def test_no_broker_configured(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    line = run_failing(capsys, *argv)
    assert "no broker" in line and "BACKOUT_BOOTSTRAP" in line and "backout broker" in line


def test_a_stale_broker_state_file_is_no_broker(
    capsys: pytest.CaptureFixture[str], clean_env: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(done.stdout)
    state = clean_env / ".backout"
    state.mkdir()
    (state / "broker.json").write_text(json.dumps({"bootstrap": "127.0.0.1:1", "pid": dead_pid}))
    line = run_failing(capsys, "tail")
    assert "no broker" in line


@pytest.mark.parametrize(
    ("variable", "value", "mentions"),
    [
        ("BACKOUT_ACTIONS_PARTITIONS", "zero", "actions_partitions"),
        ("BACKOUT_ACTIONS_PARTITIONS", "0", "actions_partitions"),
        ("BACKOUT_DELIVERY", "sometimes", "delivery"),
        ("BACKOUT_PUBLISH_TIMEOUT_S", "-1", "publish_timeout_s"),
        ("BACKOUT_KAFKA", "not json", "kafka"),
        ("BACKOUT_KAFKA", '{"bootstrap.servers": "x:1"}', "bootstrap.servers"),
    ],
)
@pytest.mark.parametrize("argv", [["tail"], ["topics", "ensure"], ["broker"]])
def test_bad_backout_env_value(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    mentions: str,
    argv: list[str],
) -> None:
    monkeypatch.setenv(variable, value)
    line = run_failing(capsys, *argv)
    assert line.startswith("backout: bad BACKOUT_* setting:")
    assert mentions in line


def test_a_bare_group_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics"]) == 1
    _, err = capsys.readouterr()
    assert "Usage:" in err and "ensure" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["broker", "--help"], ["tail", "--help"], ["topics", "ensure", "--help"]],
)
def test_help_shows_an_example(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "Usage: backout " in out
    assert "Example: backout " in out or "Example: BACKOUT_BOOTSTRAP" in out


def test_top_level_help_lists_the_core_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out, _ = capsys.readouterr()
    for command in ("broker", "tail", "topics"):
        assert command in out


def test_the_console_script_exits_1_without_traceback(clean_env: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    done = subprocess.run(
        [sys.executable, "-m", "backout.infra.cli", "tail", "--since", "yesterday-ish"],
        capture_output=True,
        text=True,
        env=env,
        cwd=clean_env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "backout: bad time 'yesterday-ish': use ISO-8601 (2026-11-23T04:00:00Z) or a duration "
        "like 15m"
    ]


def test_a_command_exit_code_reaches_the_shell() -> None:
    """``raise typer.Exit(n)`` inside a command is the process's exit code."""
    import typer

    from backout.infra import cli

    probe = typer.Typer()

    @probe.command()
    def fail() -> None:
        raise typer.Exit(3)

    @probe.command()
    def ok() -> None:
        return None

    assert cli.main(["fail"], app=probe) == 3
    assert cli.main(["ok"], app=probe) == 0


def test_every_command_module_registers_what_it_declares() -> None:
    """The command table that keeps the CLI fast matches what each module registers."""
    from backout.infra import cli

    registered = {}
    for module, names in cli.COMMAND_MODULES.items():
        app = cli._new_app()
        __import__(module, fromlist=["register"]).register(app)
        got = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
        got |= {g.name for g in app.registered_groups}
        assert got == set(names), module
        registered.update(dict.fromkeys(names, module))
    assert len(registered) == sum(len(n) for n in cli.COMMAND_MODULES.values())


def test_a_command_is_named_even_when_only_its_module_is_loaded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`backout tail X` keeps `tail` as the command name under lazy loading."""
    from backout.infra import cli

    app = cli.create_app("tail")
    assert cli.main(["tail", "--topic", "nope"], app=app) == 1
    assert "unknown topic 'nope'" in capsys.readouterr().err
