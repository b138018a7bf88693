"""The policy file: validation with file/line/path errors, limit resolution, responses."""

from __future__ import annotations

from datetime import timedelta
from importlib import resources
from pathlib import Path

import pytest

from backout.processors.engine import Engine
from backout.processors.findings import Context, EventRef, Finding
from backout.processors.policy import load_policy, parse_policy
from backout.schemas.errors import ConfigError, PolicyError
from backout.schemas.events import ControlAction, FreezeMode, Severity
from tests.detection_kit import T0, Clock, fold, policy

POLICIES = Path(str(resources.files("backout.infra").joinpath("policies")))


@pytest.mark.parametrize("name", ["default.yaml", "strict.yaml"])
def test_the_example_policies_load(name: str) -> None:
    loaded = load_policy(POLICIES / name)
    assert loaded.name == name.removesuffix(".yaml")
    assert loaded.responses


# --- refused at load --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "line", "path", "says"),
    [
        (
            "version: 1\ndefaults:\n  limits:\n    run:\n      actoins: 5\n",
            5,
            "defaults.limits.run.actoins",
            "unknown key",
        ),
        (
            "agents:\n  bot:\n    limits:\n      retry_loop: 1\n",
            4,
            "agents.bot.limits.retry_loop",
            "greater than or equal to 2",
        ),
        (
            "tools:\n  t:\n    limits:\n      run: {value: -5}\n",
            4,
            "tools.t.limits.run.value",
            "greater than 0",
        ),
        (
            "responses:\n  rate_anomaly:\n    high: [halt, nuke]\n",
            3,
            "responses.rate_anomaly.high.1.action",
            "'global_stop'",
        ),
        (
            "responses:\n  rate_anomly:\n    high: [halt]\n",
            2,
            "responses.rate_anomly",
            "Input should be",
        ),
        (
            "responses:\n  default:\n    severe: [halt]\n",
            3,
            "responses.default.severe",
            "Input should be",
        ),
        (
            "responses:\n  default:\n    high: [{action: quarantine_identity, scope: run}]\n",
            3,
            "responses.default.high.0",
            "'scope' only applies",
        ),
        ("window: 10x\n", 1, "window", "bad duration '10x'"),
        ("escalation: {high: 3, critical: 2}\n", 1, "escalation", "critical must be above high"),
        ("version: 2\n", 1, "version", "Input should be 1"),
        ("defaults:\n  allow:\n    tools: set_status\n", 3, "defaults.allow.tools", "valid list"),
    ],
)
def test_a_bad_policy_is_refused_with_line_and_field_path(
    text: str, line: int, path: str, says: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.yaml")
    error = caught.value
    assert (error.file, error.line, error.path) == ("p.yaml", line, path)
    assert str(error).startswith(f"p.yaml:{line}: {path}: ")
    assert says in str(error)
    assert isinstance(error, ConfigError)


def test_every_problem_is_listed_and_the_message_counts_them() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy("nme: x\nwindow: -1x\ncooldown: soon\n", source="p.yaml")
    assert len(caught.value.problems) == 3
    assert str(caught.value).endswith("(and 2 more)")


def test_yaml_syntax_errors_name_the_line() -> None:
    with pytest.raises(PolicyError, match=r"^p.yaml:3: not valid YAML"):
        parse_policy("window: 60s\ndefaults:\n\tlimits: {}\n", source="p.yaml")


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(PolicyError, match=r"^p.yaml:3: defaults.limits: duplicate key"):
        parse_policy("defaults:\n  limits: {}\n  limits: {}\n", source="p.yaml")


def test_a_policy_is_a_mapping() -> None:
    with pytest.raises(PolicyError, match="a policy is a mapping"):
        parse_policy("- a\n- b\n", source="p.yaml")


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")


def test_an_empty_file_is_the_empty_policy() -> None:
    empty = parse_policy("", source="p.yaml")
    assert empty.window == timedelta(seconds=60)
    assert empty.responses == {}


# --- limits -----------------------------------------------------------------------------
LAYERED = """
defaults:
  limits: {run: {actions: 100, records: 50}, retry_loop: 5}
  allow: {systems: [erp, crm]}
tenants:
  acme: {limits: {run: {actions: 90}}}
workflows:
  close-books: {limits: {run: {actions: 80, records: 40}}}
agents:
  billing-bot: {limits: {run: {actions: 70}}, allow: {systems: [erp]}}
tools:
  refund: {limits: {run: {actions: 60}, retry_loop: 2}}
"""


@pytest.mark.parametrize(
    ("fields", "actions", "records", "retry", "systems"),
    [
        (
            {"tenant": "other", "workflow": None, "agent_id": "x", "tool": "t"},
            100,
            50,
            5,
            {"erp", "crm"},
        ),
        (
            {"tenant": "acme", "workflow": None, "agent_id": "x", "tool": "t"},
            90,
            50,
            5,
            {"erp", "crm"},
        ),
        (
            {"tenant": "acme", "workflow": "close-books", "agent_id": "x", "tool": "t"},
            80,
            40,
            5,
            {"erp", "crm"},
        ),
        (
            {"tenant": "acme", "workflow": "close-books", "agent_id": "billing-bot", "tool": "t"},
            70,
            40,
            5,
            {"erp"},
        ),
        (
            {
                "tenant": "acme",
                "workflow": "close-books",
                "agent_id": "billing-bot",
                "tool": "refund",
            },
            60,
            40,
            2,
            {"erp"},
        ),
    ],
)
def test_overrides_apply_field_by_field_most_specific_last(
    fields: dict[str, object], actions: int, records: int, retry: int, systems: set[str]
) -> None:
    layered = policy(LAYERED)
    limits = layered.limits_for(Clock().event(**fields))
    assert (limits.run.actions, limits.run.records, limits.retry_loop) == (actions, records, retry)
    assert limits.allowed_systems == systems
    assert limits.allowed_tools is None
    assert layered.resolver()(Clock().event(**fields)) == limits


def test_unset_limits_are_off() -> None:
    limits = policy().limits_for(Clock().event())
    assert limits.run.actions is None and limits.retry_loop is None
    assert limits.window_us == 60_000_000


# --- responses --------------------------------------------------------------------------
RESPONSES = """
freeze_ttl: 1h
responses:
  default: {medium: [signal], high: [read_only], critical: [halt, quarantine_identity]}
  blast_radius:
    high: [pause_tenant, {action: read_only, scope: agent}]
    critical: [global_stop, pause_workflow, halt, halt]
"""


def _finding(
    detector: str = "rate_anomaly",
    severity: Severity = Severity.HIGH,
    subject: tuple[str, str] = ("run", "run-1"),
    workflow: str | None = "wf",
) -> Finding:
    ctx = Context("run-1", "bot", "svc-bot", "acme", workflow, "production", "refund")
    return Finding(
        "f_abc",
        detector,
        severity,
        T0,
        subject,
        ctx,  # type: ignore[arg-type]
        "too much",
        EventRef("ev1"),
        (EventRef("ev1"),),
    )


@pytest.mark.parametrize(
    ("detector", "severity", "expected"),
    [
        ("rate_anomaly", Severity.LOW, []),
        ("rate_anomaly", Severity.MEDIUM, []),
        ("rate_anomaly", Severity.HIGH, [({"run": "run-1"}, FreezeMode.READ_ONLY)]),
        (
            "rate_anomaly",
            Severity.CRITICAL,
            [
                ({"run": "run-1"}, FreezeMode.HALT),
                ({"identity": "svc-bot"}, FreezeMode.QUARANTINE_IDENTITY),
            ],
        ),
        ("blast_radius", Severity.MEDIUM, []),
        (
            "blast_radius",
            Severity.HIGH,
            [
                ({"tenant": "acme", "environment": "production"}, FreezeMode.HALT),
                ({"agent": "bot", "environment": "production"}, FreezeMode.READ_ONLY),
            ],
        ),
        (
            "blast_radius",
            Severity.CRITICAL,
            [
                ({"all": "*"}, FreezeMode.HALT),
                ({"workflow": "wf", "environment": "production"}, FreezeMode.HALT),
                ({"run": "run-1"}, FreezeMode.HALT),
            ],
        ),
    ],
)
def test_graduated_responses(
    detector: str, severity: Severity, expected: list[tuple[dict[str, str], FreezeMode]]
) -> None:
    commands = policy(RESPONSES).commands_for(_finding(detector, severity))
    assert [(c.scope, c.mode) for c in commands] == expected
    for command in commands:
        assert command.action is ControlAction.FREEZE
        assert command.cause == "f_abc"
        assert command.issued_at == T0
        assert command.expires_at == T0 + timedelta(hours=1)
        assert command.signature is None


def test_the_default_scope_is_the_subject_of_the_finding() -> None:
    commands = policy(RESPONSES).commands_for(_finding(subject=("agent", "bot")))
    assert [c.scope for c in commands] == [{"agent": "bot", "environment": "production"}]


def test_a_scope_the_action_does_not_have_is_skipped() -> None:
    commands = policy(RESPONSES).commands_for(
        _finding("blast_radius", Severity.CRITICAL, workflow=None)
    )
    assert [c.scope for c in commands] == [{"all": "*"}, {"run": "run-1"}]


def test_command_ids_are_deterministic_and_distinct() -> None:
    first = policy(RESPONSES).commands_for(_finding("blast_radius", Severity.CRITICAL))
    again = policy(RESPONSES).commands_for(_finding("blast_radius", Severity.CRITICAL))
    assert [c.command_id for c in first] == [c.command_id for c in again]
    assert len({c.command_id for c in first}) == len(first)


def test_a_repeat_in_cooldown_issues_no_second_freeze_but_escalation_does() -> None:
    pol = policy("""
cooldown: 5m
defaults: {limits: {run: {actions: 5}}}
responses: {default: {medium: [read_only], high: [halt]}}
""")
    clock = Clock(step=1.0)
    burst = [clock.read() for _ in range(12)]
    later = [clock.read(advance=70.0)] + [clock.read() for _ in range(11)]
    findings, commands = fold(pol, burst + later)
    assert [f.severity for f in findings] == [Severity.MEDIUM, Severity.HIGH] * 2
    # escalation issued the halt; the same anomaly a minute later only signals again
    assert [c.mode for c, _ in commands] == [FreezeMode.READ_ONLY, FreezeMode.HALT]
    assert [f.trigger.event_id for _, f in commands] == [burst[5].event_id, burst[9].event_id]


def test_the_engine_issues_what_the_policy_says() -> None:
    pol = policy(
        "defaults: {allow: {tenants: [acme]}}\n"
        "responses: {policy_violation: {high: [halt, quarantine_identity]}}"
    )
    findings, commands = fold(pol, [Clock().event(tenant="evil")])
    assert [f.detector for f in findings] == ["policy_violation"]
    assert [(c.scope, f.finding_id) for c, f in commands] == [
        ({"run": "run-1"}, findings[0].finding_id),
        ({"identity": "svc-billing"}, findings[0].finding_id),
    ]
    assert Engine(pol).policy is pol
