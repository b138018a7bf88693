"""The freeze view: matching, modes, overlaps, invalid commands, deferred signatures."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backout.producers.control import FreezeView, fold
from backout.producers.freezes import ControlRecord, Verdict, malformed_reason, scope_key
from backout.producers.integrity import INTEGRITY_DETECTOR, integrity_signal, integrity_signal_id
from backout.producers.lineage import RunLineage
from backout.schemas.events import FreezeMode, Reversibility, Severity
from backout.schemas.signing import new_signing_key, sign
from tests.containment_helpers import T0, Commands, Log, call

NOW = T0 + timedelta(minutes=5)


@pytest.fixture
def ops() -> Commands:
    return Commands()


def view_of(ops: Commands, *commands: object, verify: bool = True) -> FreezeView:
    log = Log()
    view = FreezeView(ops.trusted)
    for command in commands:
        view.apply(log(command), verify=verify)  # type: ignore[arg-type]
    return view


@pytest.mark.parametrize(
    ("scope", "blocked"),
    [
        ({"agent": "billing-bot"}, True),
        ({"agent": "other-bot"}, False),
        ({"agent": "billing-bot", "tenant": "acme"}, True),
        ({"agent": "billing-bot", "tenant": "globex"}, False),
        ({"tool": "refund", "environment": "production"}, True),
        ({"identity": "svc-billing"}, True),
        ({"workflow": "wf", "tool": "refund", "tenant": "acme"}, True),
        ({"workflow": "other"}, False),
        ({"run": "run_1"}, True),
        ({"run": "run_0"}, False),
        ({"environment": "staging"}, False),
    ],
)
def test_scope_is_a_conjunction_over_the_call(
    ops: Commands, scope: dict[str, str], blocked: bool
) -> None:
    freeze = ops.freeze(**scope)
    found = view_of(ops, freeze).blocking(call(), NOW)
    assert (found is not None) is blocked
    if blocked:
        assert found is not None and found.command_id == freeze.command_id


def test_a_frozen_run_freezes_its_child_runs(ops: Commands) -> None:
    view = view_of(ops, ops.freeze(run="run_parent"))
    assert view.blocking(call(run="run_child", ancestors=("run_parent",)), NOW) is not None
    grandchild = call(run="run_gc", ancestors=("run_child", "run_parent"))
    assert view.blocking(grandchild, NOW) is not None
    assert view.blocking(call(run="run_sibling", ancestors=("run_other",)), NOW) is None


def test_read_only_mode_lets_read_only_tools_run(ops: Commands) -> None:
    view = view_of(ops, ops.freeze(FreezeMode.READ_ONLY, agent="billing-bot"))
    assert view.blocking(call(reversibility=Reversibility.READ_ONLY), NOW) is None
    for kind in (Reversibility.REVERSIBLE, Reversibility.COMPENSATABLE, Reversibility.IRREVERSIBLE):
        assert view.blocking(call(reversibility=kind), NOW) is not None


def test_halt_blocks_read_only_tools_too(ops: Commands) -> None:
    view = view_of(ops, ops.freeze(agent="billing-bot"))
    assert view.blocking(call(reversibility=Reversibility.READ_ONLY), NOW) is not None


def test_quarantine_identity_blocks_the_identity_whoever_calls(ops: Commands) -> None:
    view = view_of(
        ops, ops.freeze(FreezeMode.QUARANTINE_IDENTITY, identity="svc-billing", agent="x")
    )
    for scope in (
        call(agent="another-agent", tool="lookup", reversibility=Reversibility.READ_ONLY),
        call(agent="billing-bot", tenant="globex"),
    ):
        assert view.blocking(scope, NOW) is not None
    assert view.blocking(call(identity="svc-other"), NOW) is None


def test_lifting_one_of_overlapping_freezes_leaves_the_others(ops: Commands) -> None:
    first, second = ops.freeze(agent="billing-bot"), ops.freeze(tenant="acme")
    view = view_of(ops, first, second, ops.lift(first.command_id))
    found = view.blocking(call(), NOW)
    assert found is not None and found.command_id == second.command_id
    log = Log()
    log.at = log.at + timedelta(seconds=1)
    view.apply(log(ops.lift(second.command_id)))
    assert view.blocking(call(), NOW) is None
    assert view.active(NOW) == []


def test_global_stop_overrides_everything(ops: Commands) -> None:
    scoped = ops.freeze(FreezeMode.READ_ONLY, agent="billing-bot")
    stop = ops.stop_all()
    view = view_of(ops, scoped, stop)
    found = view.blocking(call(reversibility=Reversibility.READ_ONLY), NOW)
    assert found is not None and found.command_id == stop.command_id and found.is_global
    assert view.blocking(call(agent="x", identity="y", tenant=None, workflow=None), NOW)
    found = view.blocking(call(), NOW)
    assert found is not None and found.command_id == stop.command_id  # global ranks first
    view.apply(Log()(ops.lift(scoped.command_id)))
    assert view.blocking(call(agent="anyone"), NOW) is not None
    view.apply(Log()(ops.lift(stop.command_id)))
    assert view.blocking(call(), NOW) is None


def test_the_strictest_freeze_is_reported(ops: Commands) -> None:
    loose = ops.freeze(FreezeMode.READ_ONLY, agent="billing-bot")
    strict = ops.freeze(FreezeMode.HALT, tenant="acme")
    found = view_of(ops, loose, strict).blocking(call(), NOW)
    assert found is not None and found.command_id == strict.command_id


def test_freezes_expire_by_now(ops: Commands) -> None:
    freeze = ops.freeze(agent="billing-bot", expires_at=T0 + timedelta(hours=1))
    view = view_of(ops, freeze)
    assert view.blocking(call(), NOW) is not None
    later = T0 + timedelta(hours=1, seconds=1)
    assert view.blocking(call(), later) is None
    assert view.active(later) == []
    assert view.prune(later) == 1 and len(view) == 0


def test_lift_of_an_unknown_freeze_has_no_effect(ops: Commands) -> None:
    view = FreezeView(ops.trusted)
    outcome = view.apply(Log()(ops.lift("cmd_nope")))
    assert outcome.verdict is Verdict.NO_EFFECT and not outcome.invalid


# --- invalid commands -------------------------------------------------------------------
def _tampered(ops: Commands) -> object:
    good = ops.freeze(agent="billing-bot", reason="real")
    return good.model_copy(update={"reason": "edited after signing"})


def _intruder(ops: Commands) -> object:
    return sign(
        ops.freeze(agent="billing-bot").model_copy(update={"signature": None}), new_signing_key()
    )


def _wrong_key_claim(ops: Commands) -> object:
    intruder = new_signing_key()
    forged = sign(ops.freeze(agent="billing-bot"), intruder)
    return forged.model_copy(update={"key_id": ops.key.key_id})


@pytest.mark.parametrize(
    ("build", "verdict"),
    [
        (
            lambda o: o.freeze(agent="billing-bot").model_copy(update={"signature": None}),
            Verdict.UNSIGNED,
        ),
        (
            lambda o: o.freeze(agent="billing-bot").model_copy(update={"key_id": None}),
            Verdict.UNSIGNED,
        ),
        (_tampered, Verdict.FORGED),
        (_intruder, Verdict.FORGED),
        (_wrong_key_claim, Verdict.FORGED),
        (lambda o: o.freeze(agent="billing-bot", expires_at=T0), Verdict.EXPIRED),
        (lambda o: o.freeze(), Verdict.MALFORMED),
        (lambda o: o.freeze(planet="mars"), Verdict.MALFORMED),
        (lambda o: o.freeze(all="yes"), Verdict.MALFORMED),
        (lambda o: o.freeze(all="*", agent="x"), Verdict.MALFORMED),
        (lambda o: o.freeze(agent=""), Verdict.MALFORMED),
        (lambda o: o.freeze(FreezeMode.QUARANTINE_IDENTITY, agent="x"), Verdict.MALFORMED),
        (lambda o: o.lift(""), Verdict.MALFORMED),
        (lambda o: o.deny("").model_copy(), Verdict.MALFORMED),
    ],
)
def test_invalid_commands_change_nothing(ops: Commands, build: object, verdict: Verdict) -> None:
    command = build(ops)  # type: ignore[operator]
    for verify in (True, False):
        view = FreezeView(ops.trusted)
        outcome = view.apply(Log()(command), verify=verify)
        view.settle()
        late = view.drain_late()
        found = outcome if outcome.invalid else (late[0] if late else outcome)
        assert found.verdict is verdict and found.invalid, (verify, found)
        assert view.blocking(call(), NOW) is None
        assert view.active(NOW) == []


def test_undecodable_record_is_malformed(ops: Commands) -> None:
    outcome = FreezeView(ops.trusted).apply(Log()(None, error="garbage"))
    assert outcome.verdict is Verdict.MALFORMED and outcome.reason == "garbage"


def test_commands_too_old_when_appended_are_expired(ops: Commands) -> None:
    view = FreezeView(ops.trusted, max_age=timedelta(minutes=10))
    late = Log(at=T0 + timedelta(minutes=11))
    assert view.apply(late(ops.freeze(agent="billing-bot"))).verdict is Verdict.EXPIRED
    assert view.blocking(call(), NOW) is None


def test_a_replayed_freeze_does_not_come_back_after_its_lift(ops: Commands) -> None:
    freeze = ops.freeze(agent="billing-bot")
    log = Log()
    view = FreezeView(ops.trusted)
    view.apply(log(freeze))
    view.apply(log(ops.lift(freeze.command_id)))
    assert view.apply(log(freeze)).verdict is Verdict.REPLAYED
    assert view.blocking(call(), NOW) is None


def test_a_replayed_lift_with_a_new_freeze_id_does_nothing(ops: Commands) -> None:
    freeze = ops.freeze(agent="billing-bot")
    lift = ops.lift(freeze.command_id)
    view = view_of(ops, freeze, lift)
    assert view.apply(Log()(lift)).verdict is Verdict.REPLAYED


def test_a_forged_lift_does_not_lift(ops: Commands) -> None:
    freeze = ops.freeze(agent="billing-bot")
    forged = ops.lift(freeze.command_id).model_copy(update={"reason": "let me out"})
    for verify in (True, False):
        view = view_of(ops, freeze, forged, verify=verify)
        assert view.blocking(call(), NOW) is not None


def test_an_agent_key_that_is_not_trusted_cannot_lift(ops: Commands) -> None:
    freeze = ops.freeze(agent="billing-bot")
    rogue = Commands()  # a key the guards do not trust
    view = view_of(ops, freeze)
    outcome = view.apply(Log()(rogue.lift(freeze.command_id)))
    assert outcome.verdict is Verdict.FORGED
    assert view.blocking(call(), NOW) is not None


# --- decisions ------------------------------------------------------------------------------
def test_first_decision_wins_and_keeps_narrowed_args(ops: Commands) -> None:
    view = view_of(ops, ops.approve("apr_1", {"amount": 500}), ops.deny("apr_1"))
    decision = view.decision("apr_1")
    assert decision is not None and decision.approved
    assert decision.approved_args == {"amount": 500}
    assert view.decision("apr_2") is None


def test_a_forged_approval_is_ignored(ops: Commands) -> None:
    forged = ops.approve("apr_1").model_copy(update={"issuer": "the agent itself"})
    deny = ops.deny("apr_1")
    for verify in (True, False):
        view = view_of(ops, forged, deny, verify=verify)
        decision = view.decision("apr_1")
        assert decision is not None and not decision.approved


def test_deferred_decisions_resolve_before_live_ones(ops: Commands) -> None:
    log = Log()
    view = FreezeView(ops.trusted)
    view.apply(log(ops.deny("apr_1")), verify=False)
    assert view.apply(log(ops.approve("apr_1"))).verdict is Verdict.NO_EFFECT
    decision = view.decision("apr_1")
    assert decision is not None and not decision.approved


def test_approved_args_only_on_approve(ops: Commands) -> None:
    deny = ops.deny("apr_1").model_copy(update={"approved_args": {"a": 1}})
    assert malformed_reason(deny) == "deny with approved_args"


# --- deferred signatures --------------------------------------------------------------------
def test_deferred_forged_freeze_is_dropped_when_it_first_matches(ops: Commands) -> None:
    forged = ops.freeze(agent="billing-bot").model_copy(update={"reason": "tampered"})
    view = view_of(ops, forged, verify=False)
    assert view.unsettled == 1
    assert view.blocking(call(), NOW) is None
    late = view.drain_late()
    assert [o.verdict for o in late] == [Verdict.FORGED]
    assert view.unsettled == 0 and len(view) == 0


def test_deferred_lift_is_checked_before_the_freeze(ops: Commands) -> None:
    freeze = ops.freeze(agent="billing-bot")
    view = view_of(ops, freeze, ops.lift(freeze.command_id), verify=False)
    assert view.unsettled == 1
    assert view.blocking(call(), NOW) is None
    assert view.unsettled == 0 and view.drain_late() == []


def test_settle_in_steps(ops: Commands) -> None:
    freezes = [ops.freeze(agent=f"a{i}") for i in range(5)]
    view = view_of(ops, *freezes, verify=False)
    assert view.settle(limit=2) == 3
    assert view.settle() == 0
    assert len(view.active(NOW)) == 5


# --- signals, keys, lineage -------------------------------------------------------------------
def test_integrity_signal_is_deterministic(ops: Commands) -> None:
    record = ControlRecord("t.control", 0, 7, T0, _tampered(ops))  # type: ignore[arg-type]
    outcome = FreezeView(ops.trusted).apply(record)
    signal = integrity_signal(outcome, detected_at=NOW)
    assert signal.signal_id == integrity_signal_id(outcome) == integrity_signal(outcome).signal_id
    assert signal.detector == INTEGRITY_DETECTOR and signal.severity is Severity.CRITICAL
    assert signal.scope == {"agent": "billing-bot"}
    assert signal.evidence[0].topic == "t.control" and signal.evidence[0].offset == 7
    assert signal.details["verdict"] == "forged"
    other = ControlRecord("t.control", 0, 8, T0, _tampered(ops))  # type: ignore[arg-type]
    assert integrity_signal_id(FreezeView(ops.trusted).apply(other)) != signal.signal_id


def test_integrity_signal_for_undecodable_bytes(ops: Commands) -> None:
    outcome = FreezeView(ops.trusted).apply(Log()(None, error="not avro"))
    signal = integrity_signal(outcome)
    assert signal.scope == {} and "not avro" in signal.summary
    assert signal.severity is Severity.MEDIUM


def test_scope_key_is_sorted() -> None:
    assert scope_key({"tenant": "acme", "agent": "bot"}) == "agent=bot,tenant=acme"
    assert scope_key({"all": "*"}) == "all=*"


def test_run_lineage_walks_ancestors_and_cuts_cycles() -> None:
    lineage = RunLineage(max_runs=3)
    lineage.observe("c", "b")
    lineage.observe("b", "a")
    assert lineage.ancestors("c") == ("b", "a")
    lineage.observe("a", "c")  # a cycle from bad data
    assert lineage.ancestors("c") == ("b", "a")
    lineage.observe("d", "c")  # evicts the oldest link (c -> b)
    assert lineage.ancestors("d") == ("c",)
    assert lineage.ancestors("unknown") == ()


def test_fold_returns_each_outcome(ops: Commands) -> None:
    log = Log()
    freeze = ops.freeze(agent="billing-bot")
    view, outcomes = fold([log(freeze), log(freeze)], ops.trusted)
    assert [o.verdict for o in outcomes] == [Verdict.APPLIED, Verdict.REPLAYED]
    assert len(view) == 1
