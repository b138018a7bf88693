"""Detectors: each one, table-driven, on a simulated event-time clock."""

from __future__ import annotations

import itertools

import pytest

from backout.processors.findings import (
    LABEL_PARTIAL_FAILURE,
    LABEL_POSTCONDITION,
    LABEL_POSTCONDITION_DETAIL,
    LABEL_UNCERTAINTY,
    EventRef,
    ScopeState,
)
from backout.processors.rules import detect, event_findings
from backout.schemas.events import CallStatus, EventKind, Origin, Reversibility, Severity
from tests.detection_kit import Clock, detectors, fold, policy, refs

ALLOW = """
defaults:
  allow: {tools: [set_status, get_invoice], systems: [erp], tenants: [acme]}
"""


# --- per-event detectors --------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"tool": "delete_everything"}, "tool 'delete_everything' not allowed"),
        ({"system": "payroll"}, "system 'payroll' not allowed"),
        ({"tenant": "globex"}, "tenant 'globex' not allowed"),
    ],
)
def test_a_write_outside_the_allow_lists_is_a_policy_violation(
    fields: dict[str, str], problem: str
) -> None:
    findings, _ = fold(policy(ALLOW), [Clock().event(**fields)])
    assert [f.detector for f in findings] == ["policy_violation"]
    assert problem in findings[0].summary
    assert findings[0].severity is Severity.HIGH
    assert findings[0].subject == ("run", "run-1")


@pytest.mark.parametrize(
    "fields",
    [
        {"tool": "delete_everything", "reversibility": Reversibility.READ_ONLY},
        {"tool": "delete_everything", "status": CallStatus.BLOCKED},
        {},
    ],
)
def test_reads_blocked_calls_and_allowed_writes_are_no_violation(fields: dict[str, object]) -> None:
    findings, _ = fold(policy(ALLOW), [Clock().event(**fields)])
    assert findings == []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"labels": {LABEL_POSTCONDITION: "failed", LABEL_POSTCONDITION_DETAIL: "amount != 0"}},
            "verifier failed (amount != 0)",
        ),
        ({"status": CallStatus.UNKNOWN}, "status unknown"),
        ({"labels": {LABEL_PARTIAL_FAILURE: "3/10"}}, "partial failure (3/10)"),
    ],
)
def test_failed_postconditions(fields: dict[str, object], reason: str) -> None:
    findings, _ = fold(policy(), [Clock().event(**fields)])
    assert [f.detector for f in findings] == ["failed_postcondition"]
    assert reason in findings[0].summary


@pytest.mark.parametrize(
    "fields",
    [
        {"labels": {LABEL_POSTCONDITION: "passed"}},
        {"labels": {LABEL_PARTIAL_FAILURE: "0"}},
        {"labels": {LABEL_PARTIAL_FAILURE: "false"}},
        {"status": CallStatus.UNKNOWN, "reversibility": Reversibility.READ_ONLY},
        {"status": CallStatus.FAILED},
    ],
)
def test_no_postcondition_finding(fields: dict[str, object]) -> None:
    assert fold(policy(), [Clock().event(**fields)])[0] == []


@pytest.mark.parametrize(
    ("fields", "flags"),
    [
        ({"confidence": 0.2}, "low_confidence=0.2"),
        ({"labels": {LABEL_UNCERTAINTY: "decode_failure"}}, "decode_failure"),
        (
            {"labels": {LABEL_UNCERTAINTY: "schema_drift, decode_failure"}},
            "schema_drift,decode_failure",
        ),
        (
            {"labels": {LABEL_UNCERTAINTY: "low_confidence"}, "confidence": 0.9},
            "low_confidence=0.9",
        ),
        ({"labels": {LABEL_UNCERTAINTY: "hallucinated_id"}}, "hallucinated_id"),
    ],
)
def test_tool_uncertainty(fields: dict[str, object], flags: str) -> None:
    pol = policy("defaults: {limits: {min_confidence: 0.5}}")
    findings, _ = fold(pol, [Clock().read(**fields)])
    assert [f.detector for f in findings] == ["tool_uncertainty"]
    assert findings[0].details["flags"] == flags


def test_confidence_at_the_minimum_is_fine() -> None:
    pol = policy("defaults: {limits: {min_confidence: 0.5}}")
    assert fold(pol, [Clock().event(confidence=0.5)])[0] == []


def test_lifecycle_events_are_not_judged() -> None:
    clock = Clock()
    ev = clock.lifecycle(
        EventKind.CHECKPOINT, status=CallStatus.UNKNOWN, labels={LABEL_UNCERTAINTY: "schema_drift"}
    )
    limits = policy(ALLOW).limits_for(ev)
    assert event_findings(ev, EventRef(ev.event_id), limits) == []


# --- windowed detectors ---------------------------------------------------------------
RATE = "window: 60s\ndefaults: {limits: {run: {actions: 10}}}"


def test_rate_anomaly_fires_once_when_the_limit_is_crossed() -> None:
    clock = Clock(step=1.0)
    findings, _ = fold(policy(RATE), [clock.read() for _ in range(15)])
    assert detectors(findings) == [("rate_anomaly", "medium", "ev000011")]
    assert findings[0].details == {
        "metric": "actions",
        "observed": "11",
        "limit": "10",
        "window_s": "60",
    }
    assert len(findings[0].evidence) == 8


def test_rate_anomaly_escalates_at_the_high_and_critical_ratios() -> None:
    clock = Clock(step=0.1)
    findings, _ = fold(policy(RATE), [clock.read() for _ in range(60)])
    assert detectors(findings) == [
        ("rate_anomaly", "medium", "ev000011"),
        ("rate_anomaly", "high", "ev000020"),
        ("rate_anomaly", "critical", "ev000050"),
    ]


def test_calls_spread_over_more_than_a_window_do_not_add_up() -> None:
    clock = Clock(step=7.0)  # 9 calls per 60s window at most
    assert fold(policy(RATE), [clock.read() for _ in range(50)])[0] == []


def test_a_sustained_anomaly_fires_again_once_per_window() -> None:
    clock = Clock(step=0.5)  # 120 calls per minute, limit 10: high (ratio 2+) ... critical
    findings, _ = fold(policy(RATE), [clock.read() for _ in range(400)])
    critical = [f for f in findings if f.severity is Severity.CRITICAL]
    assert len(critical) == 3  # at ~25s, then quiet for 60s, twice more
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(critical)]
    assert all(g >= 60 for g in gaps)


def test_agent_rate_counts_calls_of_all_its_runs() -> None:
    clock = Clock(step=1.0)
    pol = policy("defaults: {limits: {agent: {actions: 5}}}")
    findings, _ = fold(pol, [clock.read(run_id=f"run-{i}") for i in range(6)])
    assert [(f.detector, f.subject) for f in findings] == [
        ("rate_anomaly", ("agent", "billing-bot"))
    ]


def test_retry_loop_is_the_nth_identical_call() -> None:
    clock = Clock(step=2.0)
    same = {"object_id": "inv_7", "requested_args": {"invoice_id": "inv_7", "amount": 10}}
    events = [clock.event(tool="refund", **same) for _ in range(3)]
    events.append(
        clock.event(
            tool="refund", object_id="inv_7", requested_args={"invoice_id": "inv_7", "amount": 11}
        )
    )
    events.append(clock.event(tool="refund", **same))
    pol = policy("defaults: {limits: {retry_loop: 4}}")
    findings, _ = fold(pol, events)
    assert detectors(findings) == [("retry_loop", "medium", events[-1].event_id)]
    assert {r.event_id for r in findings[0].evidence} == {
        e.event_id for e in events if e.requested_args["amount"] == 10
    }


def test_approved_args_are_what_counts_for_a_retry() -> None:
    clock = Clock()
    events = [
        clock.event(object_id="x", requested_args={"n": i}, approved_args={"n": 0})
        for i in range(3)
    ]
    assert [f.detector for f in fold(policy("defaults: {limits: {retry_loop: 3}}"), events)[0]] == [
        "retry_loop"
    ]


def test_retries_further_apart_than_the_window_are_no_loop() -> None:
    clock = Clock(step=40.0)
    events = [clock.event(object_id="x", requested_args={}) for _ in range(6)]
    assert fold(policy("window: 60s\ndefaults: {limits: {retry_loop: 3}}"), events)[0] == []


def test_read_only_calls_are_no_retry_loop() -> None:
    clock = Clock()
    events = [clock.read(object_id="x", requested_args={}) for _ in range(9)]
    assert fold(policy("defaults: {limits: {retry_loop: 3}}"), events)[0] == []


def test_distinct_records_written_per_run() -> None:
    clock = Clock()
    events = [clock.event(object_id=f"inv_{i % 6}") for i in range(30)]  # 6 records
    events.append(clock.event(object_id="inv_new"))
    pol = policy("defaults: {limits: {run: {records: 6}}}")
    findings, _ = fold(pol, events)
    assert detectors(findings) == [("mutation_volume", "medium", events[-1].event_id)]
    assert findings[0].details["metric"] == "records"


def test_reads_and_failed_writes_touch_no_records() -> None:
    clock = Clock()
    events = [clock.read(object_id=f"r{i}") for i in range(10)]
    events += [clock.event(object_id=f"f{i}", status=CallStatus.FAILED) for i in range(10)]
    assert fold(policy("defaults: {limits: {run: {records: 2}}}"), events)[0] == []


def test_value_moved_is_the_sum_of_absolute_values() -> None:
    clock = Clock()
    events = [clock.event(value=400.0), clock.event(value=-400.0), clock.event(value=300.0)]
    findings, _ = fold(policy("defaults: {limits: {run: {value: 1000}}}"), events)
    assert detectors(findings) == [("mutation_volume", "medium", events[-1].event_id)]
    assert findings[0].details["observed"] == "1100"


@pytest.mark.parametrize(
    ("metric", "field", "values"),
    [
        ("tenants", "tenant", ["acme", "globex"]),
        ("systems", "system", ["erp", "crm", "payroll"]),
    ],
)
def test_blast_radius(metric: str, field: str, values: list[str]) -> None:
    clock = Clock()
    events = [clock.event(**{field: v}) for v in values]
    limit = len(values) - 1
    findings, _ = fold(policy(f"defaults: {{limits: {{agent: {{{metric}: {limit}}}}}}}"), events)
    assert [(f.detector, f.subject[0], f.details["metric"]) for f in findings] == [
        ("blast_radius", "agent", metric)
    ]
    assert findings[0].severity is Severity.HIGH


def test_finding_ids_derive_from_what_fired() -> None:
    clock = Clock(step=1.0)
    events = [clock.read() for _ in range(12)]
    first, _ = fold(policy(RATE), events)
    again, _ = fold(policy(RATE), events)
    assert [f.finding_id for f in first] == [f.finding_id for f in again]
    assert first[0].finding_id.startswith("f_")


# --- state --------------------------------------------------------------------------------
def test_records_already_applied_are_skipped() -> None:
    clock = Clock()
    pol = policy("defaults: {limits: {retry_loop: 2}}")
    batch = refs([clock.event(object_id="x", requested_args={}) for _ in range(2)])
    limits_for = pol.resolver()
    first = detect(ScopeState(), {}, batch, limits_for)
    assert len(first.findings) == 1
    again = detect(first.agent, first.runs, batch, limits_for)
    assert again.skipped == 2
    assert again.findings == []


def test_detect_does_not_change_its_input_states() -> None:
    clock = Clock()
    pol = policy("defaults: {limits: {run: {records: 50, actions: 50}, retry_loop: 3}}")
    limits_for = pol.resolver()
    start = detect(ScopeState(), {}, refs([clock.event() for _ in range(5)]), limits_for)
    agent_bytes = start.agent.to_bytes()
    run_bytes = start.runs["run-1"].to_bytes()
    more = refs([clock.event(object_id="y") for _ in range(5)], partition=1)
    detect(start.agent, start.runs, more, limits_for)
    assert start.agent.to_bytes() == agent_bytes
    assert start.runs["run-1"].to_bytes() == run_bytes


def test_state_round_trips_through_bytes() -> None:
    clock = Clock()
    pol = policy("defaults: {limits: {run: {records: 50, value: 9}, retry_loop: 3}}")
    found = detect(
        ScopeState(), {}, refs([clock.event(value=1.0) for _ in range(20)]), pol.resolver()
    )
    for state in (found.agent, found.runs["run-1"]):
        assert ScopeState.from_bytes(state.to_bytes()).to_bytes() == state.to_bytes()
    assert ScopeState.from_bytes(None) == ScopeState()
    assert ScopeState.from_bytes(b'{"v": 99}') == ScopeState()


def test_idle_runs_expire_from_the_agent() -> None:
    clock = Clock(step=1.0)
    pol = policy("window: 10s")
    limits_for = pol.resolver()
    first = detect(ScopeState(), {}, refs([clock.event(run_id="old")]), limits_for)
    later = detect(
        first.agent,
        first.runs,
        refs([clock.event(run_id="new", advance=30.0)], partition=1),
        limits_for,
    )
    assert later.expired_runs == ["old"]
    assert list(later.agent.runs) == ["new"]


def test_a_window_change_resets_the_counts() -> None:
    clock = Clock()
    events = [clock.read() for _ in range(8)]
    short = policy("window: 10s\ndefaults: {limits: {run: {actions: 10}}}").resolver()
    state = detect(ScopeState(), {}, refs(events[:5]), short)
    longer = policy("window: 20s\ndefaults: {limits: {run: {actions: 5}}}").resolver()
    after = detect(state.agent, state.runs, refs(events[5:], partition=1), longer)
    assert after.findings == []  # 3 calls counted since the change, not 8


def test_rollback_writes_are_recorded_but_judged_by_no_detector() -> None:
    strict = """
window: 60s
defaults:
  allow: {tools: [set_status, get_invoice], systems: [erp], tenants: [acme]}
  limits: {run: {actions: 3, records: 2, tenants: 1}, agent: {actions: 3}, retry_loop: 2}
"""
    clock = Clock(step=1.0)
    undo = [
        clock.event(
            origin=Origin.ROLLBACK,
            run_id="rb-1",
            tenant=f"tenant-{n}",  # outside the allow list, and many of them
            object_id="inv_7",  # the same call again and again
            status=CallStatus.UNKNOWN,
        )
        for n in range(6)
    ]
    findings, commands = fold(policy(strict), undo)
    assert (findings, commands) == ([], [])
    # the agent's own calls after them are judged as usual, with nothing of the rollback
    # counted: its 4th call, not its 1st, crosses the agent's limit of 3
    own = [clock.read() for _ in range(4)]
    findings, _ = fold(policy(strict), [*undo, *own])
    assert detectors(findings) == [
        ("rate_anomaly", "medium", own[3].event_id),
        ("rate_anomaly", "medium", own[3].event_id),
    ]
    # and a rollback event already applied counts as skipped, like any other
    state = detect(ScopeState(), {}, refs(undo), policy(strict).limits_for)
    again = detect(state.agent, state.runs, refs(undo), policy(strict).limits_for)
    assert (again.findings, again.skipped) == ([], len(undo))
