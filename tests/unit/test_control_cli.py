"""Containment CLI: argument checks and key files (nothing here reaches a broker)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backout.infra.cli import main
from backout.infra.commands_containment import parse_expiry
from backout.schemas.errors import ConfigError
from backout.schemas.signing import load_signing_key


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("BACKOUT_BOOTSTRAP", "BACKOUT_SIGNING_KEY_FILE", "BACKOUT_TRUSTED_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BACKOUT_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["freeze", "--reason", "x"], "give a scope"),
        (["freeze", "--agent", "bot"], "give a --reason"),
        (["freeze", "--all", "--agent", "bot", "--reason", "x"], "takes no other scope"),
        (
            ["freeze", "--agent", "bot", "--mode", "quarantine_identity", "--reason", "x"],
            "takes --identity and no other scope",
        ),
        (["freeze", "--agent", "bot", "--reason", "x", "--expires", "soon"], "bad expiry"),
        (["freeze", "--agent", "bot", "--reason", "x"], "no signing key"),
        (["lift"], "give freeze ids"),
        (["approve", "apr_1", "--args", "{oops"], "--args is not JSON"),
        (["approve", "apr_1", "--args", "[1, 2]"], "must be a JSON object"),
        (["discard"], "give --freeze ID"),
        (["discard", "--all"], "give a --reason"),
        (["freeze", "--agent", "bot", "--mode", "sideways", "--reason", "x"], "sideways"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(args, capsys)
    assert code == 1 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_keys_new_writes_a_private_key_only_its_owner_reads(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = env / "keys" / "oncall.key"
    code, out, _ = run(["keys", "new", "--out", str(path), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    key = load_signing_key(path)
    assert data["key_id"] == key.key_id and data["public_key"] == key.public_b64
    assert data["trusted_keys"] == {key.key_id: key.public_b64}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, _, err = run(["keys", "new", "--out", str(path)], capsys)
    assert code == 1 and "--force" in err
    code, out, _ = run(["keys", "new", "--out", str(path), "--force"], capsys)
    assert code == 0 and "BACKOUT_TRUSTED_KEYS" in out and "BACKOUT_SIGNING_KEY_FILE" in out


def test_every_command_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (
        ["keys", "new"],
        ["freeze"],
        ["lift"],
        ["freezes"],
        ["approve"],
        ["deny"],
        ["release"],
        ["discard"],
        ["control-audit"],
    ):
        code, out, _ = run([*command, "--help"], capsys)
        assert code == 0 and "Example: backout" in out, command


def test_parse_expiry() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_expiry("30m", now=now) == now + timedelta(minutes=30)
    assert parse_expiry("2h", now=now) == now + timedelta(hours=2)
    assert parse_expiry("2026-01-02T00:00:00Z", now=now) == now + timedelta(days=1)
    assert parse_expiry("2026-01-02T00:00:00", now=now) == now + timedelta(days=1)
    with pytest.raises(ConfigError, match="not in the future"):
        parse_expiry("2025-01-01T00:00:00Z", now=now)
    with pytest.raises(ConfigError, match="bad expiry"):
        parse_expiry("tomorrow", now=now)
