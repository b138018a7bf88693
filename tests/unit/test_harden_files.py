"""Harden's outputs: the Avro events file, the policy text edits, and the generated test,
which must fail on the old policy and pass on the proposed one (run with pytest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest
import yaml

from backout.infra.harden import propose
from backout.infra.harden_files import read_events, write_events, write_outputs
from backout.infra.harden_template import POLICY_ENV
from backout.infra.policy_edit import set_values, unified_diff
from backout.schemas.errors import ConfigError
from tests.harden_story import POLICY, baseline, incident

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_events_round_trip_through_a_standard_avro_container(tmp_path: Path) -> None:
    events = incident()
    path = tmp_path / "run.avro"
    write_events(path, events, metadata={"backout.run": "wf_1"})
    assert read_events(path) == events
    with path.open("rb") as src:
        reader = fastavro.reader(src)
        assert reader.writer_schema["name"] == "backout.v1.ActionEvent"
        assert reader.metadata["backout.run"] == "wf_1"
        assert sum(1 for _ in reader) == len(events)


@pytest.mark.parametrize("content", [b"", b"not avro at all"])
def test_a_foreign_file_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.avro"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not an Avro file of ActionEvents"):
        read_events(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_events(tmp_path / "missing.avro")


def test_edits_keep_comments_and_touch_only_the_changed_lines() -> None:
    text = "version: 1\n# limits\ndefaults:\n  limits:\n    run:\n      actions: 600  # calls\n"
    edited = set_values(
        text,
        {
            ("defaults", "limits", "run", "actions"): 40,
            ("agents", "bot", "limits", "retry_loop"): 3,
            ("defaults", "limits", "agent", "tenants"): 2,
        },
    )
    assert not edited.rewritten
    assert edited.text == (
        "version: 1\n# limits\ndefaults:\n  limits:\n    run:\n      actions: 40  # calls\n"
        "    agent:\n      tenants: 2\n"
        "agents:\n  bot:\n    limits:\n      retry_loop: 3\n"
    )
    diff = unified_diff(text, edited.text, name="p.yaml")
    assert "-      actions: 600  # calls" in diff and "+      actions: 40  # calls" in diff


def test_flow_mappings_and_null_sections_are_edited_in_place() -> None:
    text = "agents:\n  bot:\n    limits:\n      run: {value: 2000}  # money\ntools:\n"
    edited = set_values(
        text,
        {
            ("agents", "bot", "limits", "run", "records"): 7,
            ("tools", "refund", "limits", "retry_loop"): 2,
        },
    )
    assert not edited.rewritten
    assert "      run: {value: 2000, records: 7}  # money\n" in edited.text
    assert yaml.safe_load(edited.text)["tools"] == {"refund": {"limits": {"retry_loop": 2}}}


def test_an_unusual_layout_falls_back_to_a_full_dump() -> None:
    text = "agents: {bot: {limits: {retry_loop: 9}}}\nextra: [1, 2]\n"
    edited = set_values(text, {("agents", "bot", "limits", "retry_loop"): 3})
    assert yaml.safe_load(edited.text)["agents"]["bot"]["limits"]["retry_loop"] == 3
    with pytest.raises(ConfigError, match="not a mapping"):
        set_values("extra: [1, 2]\n", {("extra", "x"): 1})


def _pytest(test: Path, policy: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, POLICY_ENV: str(policy)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=test.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_generated_test_fails_on_the_old_policy_and_passes_on_the_proposed(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, "utf-8")
    proposal = propose(incident(), POLICY, run_id="wf_1", baseline=baseline())
    out = tmp_path / "hardening"
    result = write_outputs(proposal, out, policy_path=policy, generated_at=NOW)
    test = result.files["test"]
    assert test.name == "test_harden_wf_1.py"
    summary = json.loads(result.files["summary"].read_text())
    assert summary["test_asserts_containment_by_event"] == proposal.contained_by
    assert summary["contained_before"]["event"] == proposal.old.index  # type: ignore[union-attr]
    assert result.files["policy_diff"].read_text().startswith("--- a/policy.yaml")

    old = _pytest(test, policy)
    assert old.returncode == 1, old.stdout + old.stderr
    assert f"first freezes run wf_1 at event {proposal.old.index}" in old.stdout  # type: ignore[union-attr]
    assert "1 failed, 1 passed" in old.stdout

    new = _pytest(test, result.files["proposed_policy"])
    assert new.returncode == 0, new.stdout + new.stderr
    assert "2 passed" in new.stdout

    # applying policy.diff to the policy in force makes it pass without the override
    policy.write_text(proposal.proposed_text, "utf-8")
    env_free = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=test.parent,
        env={k: v for k, v in os.environ.items() if k != POLICY_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert env_free.returncode == 0, env_free.stdout + env_free.stderr
