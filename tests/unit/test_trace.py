"""build_trace: a run and its child runs reconstructed from journaled events. No broker."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backout.infra.incident_html import render_incident_html
from backout.infra.trace import MAX_NESTING, Trace, build_trace, field_diffs, render_text
from backout.infra.trace_model import TraceStep
from backout.schemas.errors import ConfigError
from backout.schemas.events import (
    ActionEvent,
    CallStatus,
    EventKind,
    RecordImage,
    Reversibility,
)
from tests.operators_story import FREEZE_ID, SIGNAL_ID, Story, build_story

T0 = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    return build_story(tmp_path_factory.mktemp("story"))


def trace_of(story: Story, run: str = "wf_1") -> Trace:
    mine = [e for e in story.events if e.run_id in ("wf_1", "wf_1_child")]
    others = [e for e in story.events if e not in mine]
    return build_trace(run, mine, related=others, commands=story.commands, signals=story.signals)


def test_steps_nest_and_child_runs_hang_under_their_step(story: Story) -> None:
    root = trace_of(story).root
    assert root.run_id == "wf_1" and root.status == "succeeded" and root.tenant == "acme"
    assert [s.tool for s in root.steps] == [
        "lookup",
        "set_status",
        "batch",
        "email",
        "refund",
        "set_status",
    ]
    batch = root.steps[2]
    (inner,) = batch.children
    assert inner.tool == "set_status" and inner.parent_step_id == batch.step_id
    (child,) = inner.child_runs  # started while the nested call was the last step
    assert child.run_id == "wf_1_child" and child.parent_run_id == "wf_1"
    assert child.tenant == "globex" and child.identity == "svc-billing"
    assert [(s.tool, s.change) for s in child.steps] == [
        ("create", "created"),
        ("delete", "deleted"),
    ]


def test_step_facts(story: Story) -> None:
    root = trace_of(story).root
    lookup, write = root.steps[0], root.steps[1]
    assert lookup.reversibility is Reversibility.READ_ONLY and lookup.change is None
    assert write.identity == "svc-billing" and write.target == "erp/inv1"
    assert write.requested_args == {"invoice_id": "inv1", "status": "void"}
    assert [d.describe() for d in write.diffs] == ["status: 'open' -> 'void'"]
    assert (write.version_before, write.version_after) == (1, 2)
    assert write.compensation == "restore_fields"
    refund = root.steps[4]
    assert refund.reversibility is Reversibility.COMPENSATABLE and refund.value == 250
    assert refund.compensation is not None and refund.compensation.startswith(
        "compensating_tool via reverse_refund until "
    )


def test_blocked_call_names_its_freeze(story: Story) -> None:
    trace = trace_of(story)
    blocked = trace.root.steps[-1]
    assert blocked.status is CallStatus.BLOCKED and blocked.blocked_by is not None
    assert blocked.blocked_by.command_id == FREEZE_ID and blocked.blocked_by.found
    assert blocked.blocked_by.scope == {"run": "wf_1"} and blocked.blocked_by.mode == "halt"
    assert blocked.blocked_by.cause == SIGNAL_ID
    assert [f.command_id for f in trace.freezes] == [FREEZE_ID]


def test_blocked_by_an_unknown_or_failed_closed_freeze(story: Story) -> None:
    mine = [e for e in story.events if e.run_id in ("wf_1", "wf_1_child")]
    trace = build_trace("wf_1", mine)  # no control records given
    blocked = trace.root.steps[-1].blocked_by
    assert blocked is not None and not blocked.found
    assert "not on the control topic" in blocked.describe()
    stale = [
        e.model_copy(update={"blocked_by": ""}) if e.status is CallStatus.BLOCKED else e
        for e in mine
    ]
    info = build_trace("wf_1", stale).root.steps[-1].blocked_by
    assert info is not None and "failed closed" in info.describe()


def test_rollback_marks_what_it_undid(story: Story) -> None:
    trace = trace_of(story)
    inner = trace.root.steps[2].children[0]
    child = inner.child_runs[0]
    assert inner.undone_by and inner.rollback == "applied"
    assert child.steps[0].undone_by == (story.ids["inverse_inv9"],)
    assert child.steps[1].rollback == "conflict" and not child.steps[1].undone_by
    assert trace.root.steps[3].rollback == "manual"
    assert trace.summary.undone == 2


def test_summary(story: Story) -> None:
    s = trace_of(story).summary
    assert (s.runs, s.steps, s.writes, s.blocked, s.failed, s.in_doubt) == (2, 9, 6, 1, 0, 0)
    assert s.records == (
        "erp/inv1",
        "erp/inv2",
        "erp/inv3",
        "erp/inv9",
        "mail/cfo@acme.test",
        "payments/inv2",
    )
    assert s.tenants == ("acme", "globex")


def test_the_child_run_alone(story: Story) -> None:
    child = build_trace("wf_1_child", story.events).root
    assert child.run_id == "wf_1_child" and len(child.steps) == 2 and not child.child_runs


def test_event_order_does_not_matter(story: Story) -> None:
    mine = [e for e in story.events if e.run_id in ("wf_1", "wf_1_child")]
    shuffled = list(mine)
    random.Random(7).shuffle(shuffled)
    assert build_trace("wf_1", shuffled).to_dict() == build_trace("wf_1", mine).to_dict()


def test_unknown_run(story: Story) -> None:
    with pytest.raises(ConfigError, match="unknown run 'ghost'"):
        build_trace("ghost", story.events)


def test_root_known_only_through_its_children(story: Story) -> None:
    children = [
        e.model_copy(update={"parent_run_id": "lost_root"})
        for e in story.events
        if e.run_id == "wf_1_child"
    ]
    root = build_trace("lost_root", children).root
    assert root.run_id == "lost_root" and root.error and "only its child runs" in root.error
    assert [r.run_id for r in root.child_runs] == ["wf_1_child"]


def test_text_and_json_and_html(story: Story) -> None:
    trace = trace_of(story)
    text = render_text(trace)
    assert text.startswith("run wf_1 (agent billing-agent, identity svc-billing, tenant acme")
    assert "│  └─ " in text and "blocked by freeze cmd_freeze_1 (run=wf_1, halt)" in text
    assert "rollback: conflict" in text
    data = json.loads(json.dumps(trace.to_dict()))
    assert data["run"]["steps"][2]["children"][0]["child_runs"][0]["run_id"] == "wf_1_child"
    html = render_incident_html(trace, generated_at=T0)
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")
    assert "refund repeated on inv2" in html and "cmd_freeze_1" in html


def test_html_escapes_agent_supplied_text(story: Story) -> None:
    mine = [e for e in story.events if e.run_id == "wf_1"]
    evil = [
        e.model_copy(update={"requested_args": {"note": "<script>alert(1)</script>"}})
        if e.tool == "lookup"
        else e
        for e in mine
    ]
    html = render_incident_html(build_trace("wf_1", evil), generated_at=T0)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html


# --- field diffs -------------------------------------------------------------------------------
def img(exists: bool = True, **fields: Any) -> RecordImage:
    return RecordImage(exists=exists, fields=fields, version=None)


@pytest.mark.parametrize(
    ("before", "after", "change", "diffs"),
    [
        (img(s="open", a=1), img(s="void", a=1), "updated", ["s: 'open' -> 'void'"]),
        (img(s="open"), img(s="open"), "unchanged", []),
        (img(False), img(s="new"), "created", ["s: (absent) -> 'new'"]),
        (img(s="x"), img(False), "deleted", ["s: 'x' -> (absent)"]),
        (img(a=1), img(a=1, b=2), "updated", ["b: (absent) -> 2"]),
        (img(a=1), img(a=True), "updated", ["a: 1 -> True"]),
        (None, img(a=1), "written", ["a: ? -> 1"]),
        (img(a=1), None, None, []),
        (img(False), img(False), "unchanged", []),
    ],
)
def test_field_diffs(
    before: RecordImage | None, after: RecordImage | None, change: str | None, diffs: list[str]
) -> None:
    got_change, got = field_diffs(before, after)
    assert got_change == change and [d.describe() for d in got] == diffs


# --- big and pathological runs ------------------------------------------------------------------
def call(
    n: int, *, run: str = "big", parent_step: str | None = None, parent_run: str | None = None
) -> ActionEvent:
    return ActionEvent(
        event_id=f"e{run}{n:06d}",
        occurred_at=T0 + timedelta(microseconds=n * 10),
        run_id=run,
        parent_run_id=parent_run,
        agent_id="a",
        identity="i",
        step_id=f"{run}:{n}",
        parent_step_id=parent_step,
        tool="set",
        reversibility=Reversibility.REVERSIBLE,
        before=img(v=n),
        after=img(v=n + 1),
        idempotency_key=f"{run}:{n}",
        status=CallStatus.SUCCEEDED,
    )


def test_ten_thousand_steps() -> None:
    events = [call(n) for n in range(10_000)]
    trace = build_trace("big", events)
    assert len(trace.root.steps) == 10_000 and trace.summary.writes == 10_000
    assert render_text(trace).count("\n") > 20_000


def test_deep_nesting_is_capped_and_still_serialisable() -> None:
    events = [call(0)] + [call(n, parent_step=f"big:{n - 1}") for n in range(1, 2_000)]
    trace = build_trace("big", events)
    depth, step = 0, trace.root.steps[0]
    while step.children:
        depth += 1
        step = step.children[0]
    assert depth == MAX_NESTING
    assert len(trace.steps()) == 2_000
    json.dumps(trace.to_dict())
    render_text(trace)


def test_deep_child_runs_are_capped() -> None:
    events = [ActionEvent(**{**call(0, run="r0").model_dump(), "kind": EventKind.RUN_STARTED})]
    events += [call(n, run=f"r{n}", parent_run=f"r{n - 1}") for n in range(1, 300)]
    trace = build_trace("r0", events)
    assert trace.summary.runs == 300
    json.dumps(trace.to_dict())


def test_broken_step_links_do_not_loop() -> None:
    a = call(1, parent_step="big:2")
    b = call(2, parent_step="big:1")  # each names the other as its parent
    trace = build_trace("big", [a, b])
    assert [s.step_id for s in trace.root.steps] == ["big:1"]
    assert [c.step_id for c in trace.root.steps[0].children] == ["big:2"]


def test_story_is_built_in_tmp(tmp_path: Path) -> None:
    assert build_story(tmp_path, run_id="wf_2", child_run="wf_2_c").run_events("wf_2")


def test_requested_versus_approved_arguments(story: Story) -> None:
    mine = [e for e in story.events if e.run_id == "wf_1"]
    refund = story.ids["refund"]
    narrowed = [
        e.model_copy(update={"approved_args": {"invoice_id": "inv2", "amount": 100}})
        if e.event_id == refund
        else e
        for e in mine
    ]
    trace = build_trace("wf_1", narrowed)
    step = next(s for s in trace.root.steps if s.event_id == refund)
    assert step.requested_args == {"invoice_id": "inv2", "amount": 250}
    assert step.args_narrowed == ("amount",)
    assert "approved args differ: invoice_id='inv2', amount=100" in render_text(trace)
    assert step.to_dict()["args_narrowed"] == ["amount"]


def test_html_timeline_escapes_every_value_from_the_log(story: Story) -> None:
    mine = [e for e in story.events if e.run_id == "wf_1"]
    evil = [
        e.model_copy(
            update={
                "requested_args": {"note": "<b>asked</b>"},
                "approved_args": {"note": "<i>granted</i>"},
                "compensates": 'ev"><script>x</script>',
                "tool": "<u>lookup</u>",
            }
        )
        if e.tool == "lookup"
        else e
        for e in mine
    ]
    html = render_incident_html(build_trace("wf_1", evil), generated_at=T0)
    assert "<b>" not in html and "<i>" not in html and "<u>" not in html
    assert "<script>" not in html
    assert "approved: note=&#34;&lt;i&gt;granted&lt;/i&gt;&#34;" in html
    assert 'href="#e-ev&#34;&gt;&lt;script&gt;x&lt;/script&gt;"' in html
    assert "<strong>&lt;u&gt;lookup&lt;/u&gt;</strong>" in html
    # one anchored row per step of the whole tree (child steps and child runs included)
    trace = build_trace("wf_1", evil)
    steps, pending = 0, [trace.root]
    while pending:
        node = pending.pop()
        if isinstance(node, TraceStep):
            steps += 1
            pending += [*node.children, *node.child_runs]
        else:
            pending += [*node.steps, *node.child_runs]
    assert steps > len(trace.root.steps)
    assert html.count('<tr id="e-') == steps
