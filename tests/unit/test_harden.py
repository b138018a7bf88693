"""Harden's search: replayed containment, the tighter limit, the declared job. No broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from backout.infra.declared_job import permissions
from backout.infra.harden import METRICS, first_containment, freezes_issued, propose
from backout.infra.policy_edit import with_values
from backout.processors.policy import parse_policy
from backout.schemas.errors import ConfigError
from backout.schemas.events import EventKind
from tests.harden_story import AGENT, POLICY, Builder, baseline, incident, index_of


def test_the_policy_in_force_contains_the_loop_when_it_crosses_tenants() -> None:
    events = incident()
    found = first_containment(events, parse_policy(POLICY))
    assert found is not None
    assert found.index == index_of(events, lambda e: e.tenant == "globex" and e.is_write)
    assert found.detector == "blast_radius"
    assert found.freezes == ("halt agent=billing-agent,environment=production",)


def test_the_baseline_is_quiet_under_the_policy_in_force() -> None:
    assert freezes_issued(baseline(), parse_policy(POLICY)) == frozenset()


def test_the_proposal_contains_earlier_with_the_loosest_limit_the_baseline_allows() -> None:
    events = incident()
    proposal = propose(events, POLICY, run_id="wf_1", baseline=baseline())
    assert proposal.old is not None and proposal.change is not None
    assert proposal.proposed_by == "limits"
    assert proposal.improves
    assert proposal.contained_by == proposal.change.contained.index < proposal.old.index
    # the change lives in the agent's own rule set, nowhere else
    assert list(proposal.change.paths()) == [
        ("agents", AGENT, *next(m.path for m in METRICS if m.name == proposal.change.metric))
    ]
    new = parse_policy(proposal.proposed_text)
    assert first_containment(events, new) == proposal.proposed
    assert freezes_issued(baseline(), new) == frozenset()
    # one step looser no longer contains the run earlier: the change is the smallest one
    step = -0.01 if proposal.change.metric == "min_confidence" else 1
    looser = with_values(
        yaml.safe_load(POLICY), {p: proposal.change.new + step for p in proposal.change.paths()}
    )
    relaxed = first_containment(events, parse_policy(yaml.safe_dump(looser)))
    assert relaxed is None or relaxed.index >= proposal.old.index


def test_the_proposed_text_keeps_the_policy_file_as_it_was_around_the_change() -> None:
    proposal = propose(incident(), POLICY, run_id="wf_1", baseline=baseline())
    assert proposal.proposed_text.startswith(POLICY.split("agents:")[0])
    assert "# one tenant per minute" in proposal.proposed_text


def test_a_candidate_that_freezes_the_baseline_is_rejected() -> None:
    events = incident()
    free = propose(events, POLICY, run_id="wf_1")
    assert free.change is not None
    assert "no baseline traffic" in " ".join(free.notes)
    # a busy but normal run that trips the unchecked winner; the search must pick another
    normal = baseline()
    b = Builder(normal[-1].occurred_at + timedelta(minutes=5))
    b.lifecycle("wf_busy", EventKind.RUN_STARTED)
    for i in range(12):
        b.add("wf_busy", "issue_refund", system="erp.refunds", obj=f"rf_b{i}", value=300.0)
        b.add("wf_busy", "set_status", obj=f"inv_b{i}")
        b.add("wf_busy", "send_email", system="mail", obj=f"c{i}")
    checked = propose(events, POLICY, run_id="wf_1", baseline=normal + b.events)
    assert free.change.metric in {c.metric for c, _ in checked.rejected}
    assert checked.change is None or checked.change.metric != free.change.metric
    if checked.change is not None:
        assert freezes_issued(normal + b.events, parse_policy(checked.proposed_text)) == frozenset()


def test_when_no_limit_can_contain_earlier_the_narrower_permission_is_proposed() -> None:
    # windowed findings only ever signal here; only allow-list violations freeze
    quiet = POLICY.replace(
        "    medium: [signal]\n    high: [read_only]\n    critical: [halt]",
        "    medium: [signal]\n    high: [signal]\n    critical: [signal]",
    )
    quiet = quiet.replace(
        "  blast_radius:\n    high: [halt]", "  blast_radius:\n    high: [signal]"
    )
    quiet = quiet.replace(
        "    critical: [halt, {action: read_only, scope: agent}]", "    critical: [signal]"
    )
    quiet = quiet.replace(
        "  failed_postcondition:\n    high: [read_only]\n    critical: [halt]\n", ""
    )
    events = incident()
    assert first_containment(events, parse_policy(quiet)) is None
    proposal = propose(events, quiet, run_id="wf_1", baseline=baseline())
    assert proposal.change is None
    assert proposal.proposed_by == "permission"
    assert proposal.proposed is not None and proposal.proposed.detector == "policy_violation"
    assert proposal.proposed.index == index_of(events, lambda e: e.tool == "set_status")
    assert "allow:" in proposal.proposed_text


def test_the_declared_job_comes_from_the_checkpoint_and_the_baseline() -> None:
    [perm] = permissions(incident(), parse_policy(POLICY), baseline())
    assert perm.used["tools"] == ("issue_refund", "send_email", "set_status")
    assert perm.declared["tools"] == ("issue_refund", "send_email")
    assert perm.excess == {
        "tools": ("set_status",),
        "systems": ("erp.invoices",),
        "tenants": ("globex",),
    }
    assert perm.allow() == {
        "tools": ["issue_refund", "send_email"],
        "systems": ["erp.refunds", "mail"],
        "tenants": ["acme"],
    }
    assert "run before its first checkpoint" in perm.source["tools"]
    assert "baseline runs" in perm.source["tools"]


def test_without_checkpoint_or_baseline_only_the_tenant_is_known() -> None:
    events = [e for e in incident() if e.kind is not EventKind.CHECKPOINT]
    [perm] = permissions(events, parse_policy(POLICY))
    assert perm.declared["tools"] is None and perm.declared["systems"] is None
    assert perm.declared["tenants"] == ("acme",)
    assert perm.allow() == {"tenants": ["acme"]}


def test_an_allow_list_in_the_policy_is_the_declared_job() -> None:
    policy = POLICY + "    allow: {tools: [issue_refund, set_status]}\n"
    [perm] = permissions(incident(), parse_policy(policy), baseline())
    assert perm.source["tools"] == "policy"
    assert perm.excess["tools"] == ("send_email",)
    assert "tools" not in perm.allow()  # already declared: nothing to suggest


def test_a_run_without_events_is_refused() -> None:
    with pytest.raises(ConfigError, match="no events"):
        propose([], POLICY, run_id="wf_x")
