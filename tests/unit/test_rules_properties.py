"""Properties of the detector fold: batching, serialisation and restarts change nothing."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from backout.processors.engine import Engine
from backout.processors.findings import ScopeState
from backout.processors.sampling import sampled
from backout.schemas.events import ActionEvent, CallStatus, Reversibility
from tests.detection_kit import Clock, fold, policy, refs

POLICY = policy("""
window: 20s
cooldown: 30s
defaults:
  limits:
    run: {actions: 6, records: 3, tenants: 1, systems: 1, value: 300}
    agent: {actions: 9, records: 5, tenants: 2, systems: 2, value: 500}
    retry_loop: 3
    min_confidence: 0.5
  allow: {tools: [t0, t1]}
responses:
  default: {medium: [read_only], high: [halt], critical: [halt, quarantine_identity]}
""")

calls = st.fixed_dictionaries(
    {
        "advance": st.sampled_from([0.0, 0.5, 1.0, 3.0, 12.0]),
        "run_id": st.sampled_from(["r0", "r1", "r2"]),
        "tool": st.sampled_from(["t0", "t1", "t2"]),
        "object_id": st.sampled_from([f"o{i}" for i in range(6)]),
        "tenant": st.sampled_from(["a", "b"]),
        "system": st.sampled_from(["erp", "crm"]),
        "status": st.sampled_from(
            [CallStatus.SUCCEEDED, CallStatus.SUCCEEDED, CallStatus.UNKNOWN, CallStatus.FAILED]
        ),
        "reversibility": st.sampled_from([Reversibility.REVERSIBLE, Reversibility.READ_ONLY]),
        "value": st.one_of(st.none(), st.floats(min_value=-200, max_value=200, allow_nan=False)),
        "confidence": st.one_of(st.none(), st.sampled_from([0.1, 0.9])),
        "requested_args": st.sampled_from([{}, {"n": 1}]),
    }
)


def _events(specs: list[dict[str, Any]]) -> list[ActionEvent]:
    clock = Clock()
    return [clock.event(**spec) for spec in specs]


def _ids(result: tuple[list[Any], list[Any]]) -> tuple[list[str], list[str]]:
    findings, commands = result
    return [f.finding_id for f in findings], [c.command_id for c, _ in commands]


@settings(max_examples=60, deadline=None)
@given(st.lists(calls, min_size=1, max_size=60), st.integers(min_value=1, max_value=7))
def test_batching_does_not_change_findings_or_commands(
    specs: list[dict[str, Any]], batch: int
) -> None:
    events = _events(specs)
    assert _ids(fold(POLICY, events)) == _ids(fold(POLICY, events, batch=batch))


@settings(max_examples=60, deadline=None)
@given(st.lists(calls, min_size=2, max_size=60), st.data())
def test_saving_and_loading_state_between_batches_changes_nothing(
    specs: list[dict[str, Any]], data: st.DataObject
) -> None:
    events = refs(_events(specs))
    cut = data.draw(st.integers(min_value=1, max_value=len(events) - 1))
    engine = Engine(POLICY)
    whole = engine.step(ScopeState(), {}, events)
    first = engine.step(ScopeState(), {}, events[:cut])
    agent = ScopeState.from_bytes(first.agent.to_bytes())
    runs = {k: ScopeState.from_bytes(v.to_bytes()) for k, v in first.runs.items()}
    second = engine.step(agent, runs, events[cut:])
    assert [f.finding_id for f in whole.findings] == [
        f.finding_id for f in first.findings + second.findings
    ]
    assert [c.command_id for c, _ in whole.commands] == [
        c.command_id for c, _ in first.commands + second.commands
    ]


@settings(max_examples=40, deadline=None)
@given(st.lists(calls, min_size=2, max_size=40), st.data())
def test_records_processed_again_after_a_restart_change_nothing(
    specs: list[dict[str, Any]], data: st.DataObject
) -> None:
    events = refs(_events(specs))
    cut = data.draw(st.integers(min_value=1, max_value=len(events)))
    back = data.draw(st.integers(min_value=0, max_value=cut))
    engine = Engine(POLICY)
    whole = engine.step(ScopeState(), {}, events)
    first = engine.step(ScopeState(), {}, events[:cut])
    # a restart resumes from an older committed offset: events[back:cut] come again
    again = engine.step(first.agent, first.runs, events[back:])
    assert again.skipped == cut - back
    assert [f.finding_id for f in whole.findings] == [
        f.finding_id for f in first.findings + again.findings
    ]


@given(st.text(min_size=1, max_size=20), st.floats(min_value=0, max_value=1))
def test_sampling_is_deterministic(event_id: str, share: float) -> None:
    assert sampled(event_id, share) == sampled(event_id, share)
    assert sampled(event_id, 1.0)
    assert not sampled(event_id, 0.0)


def test_sampling_takes_about_the_share() -> None:
    picked = sum(sampled(f"event-{i}", 0.1) for i in range(20_000))
    assert 1800 < picked < 2200
