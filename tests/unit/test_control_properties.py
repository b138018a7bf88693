"""Properties of the freeze view: deferring signatures never changes an answer."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backout.producers.control import FreezeView
from backout.schemas.events import ControlCommand, FreezeMode, Reversibility
from backout.schemas.signing import new_signing_key, sign
from tests.containment_helpers import T0, Commands, Log, call

NOW = T0 + timedelta(minutes=5)
OPS = Commands()
ROGUE = new_signing_key()
AGENTS = ("a1", "a2")
TENANTS = ("t1", "t2")
REQUESTS = ("apr_1", "apr_2")
CALLS = [
    call(agent=a, tenant=t, identity=i, run=r, ancestors=anc, reversibility=rev)
    for a in AGENTS
    for t in TENANTS
    for i in ("id1", "id2")
    for r, anc in (("r1", ()), ("r2", ("r1",)))
    for rev in (Reversibility.READ_ONLY, Reversibility.REVERSIBLE)
]

SCOPES = [
    {"agent": "a1"},
    {"agent": "a2", "tenant": "t1"},
    {"tenant": "t2"},
    {"identity": "id1"},
    {"run": "r1"},
    {"run": "r2", "agent": "a1"},
    {"all": "*"},
    {"agent": "a3"},
]

step = st.tuples(
    st.sampled_from(["freeze", "freeze", "lift", "lift", "approve", "deny", "replay"]),
    st.sampled_from(["ok", "ok", "unsigned", "tampered", "rogue", "expired"]),
    st.integers(0, 50),
    st.sampled_from(list(FreezeMode)),
    st.sampled_from(SCOPES),
)


def _build(steps: list[tuple[str, str, int, FreezeMode, dict[str, str]]]) -> list[ControlCommand]:
    made: list[ControlCommand] = []
    freezes: list[str] = []
    for action, variant, pick, mode, scope in steps:
        if action == "replay":
            if made:
                made.append(made[pick % len(made)])
            continue
        if action == "freeze":
            expires = T0 + timedelta(minutes=pick % 10) if pick % 3 == 0 else None
            if mode is FreezeMode.QUARANTINE_IDENTITY and "identity" not in scope:
                scope = {**scope, "identity": "id2"}  # most quarantines are well formed
            command = OPS.freeze(mode, expires_at=expires, **scope)
            freezes.append(command.command_id)
        elif action == "lift":
            command = OPS.lift(freezes[-1 - pick % len(freezes)] if freezes else "cmd_none")
        elif action == "approve":
            command = OPS.approve(REQUESTS[pick % 2], {"amount": pick})
        else:
            command = OPS.deny(REQUESTS[pick % 2])
        if variant == "unsigned":
            command = command.model_copy(update={"signature": None})
        elif variant == "tampered":
            command = command.model_copy(update={"reason": "tampered"})
        elif variant == "rogue":
            command = sign(command.model_copy(update={"signature": None}), ROGUE)
        elif variant == "expired":
            command = command.model_copy(update={"expires_at": T0})
            command = sign(command, OPS.key)
        made.append(command)
    return made


def _answers(view: FreezeView) -> tuple[object, ...]:
    blocks = tuple((found.command_id if (found := view.blocking(c, NOW)) else None) for c in CALLS)
    decisions = tuple(
        (d.command_id, d.approved) if (d := view.decision(r)) else None for r in REQUESTS
    )
    active = tuple(f.command_id for f in view.active(NOW))
    return blocks, decisions, active


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=30), st.integers(0, 30))
def test_deferred_signatures_give_the_same_answers(
    steps: list[tuple[str, str, int, FreezeMode, dict[str, str]]], split: int
) -> None:
    """A view rebuilt with deferred signatures (then tailing with eager ones) answers every
    question exactly as a view that verified each command when it was applied."""
    commands = _build(steps)
    log_a, log_b = Log(), Log()
    eager, deferred = FreezeView(OPS.trusted), FreezeView(OPS.trusted)
    for i, command in enumerate(commands):
        eager.apply(log_a(command), verify=True)
        deferred.apply(log_b(command), verify=i >= split)
    assert _answers(deferred) == _answers(eager)


@settings(max_examples=60, deadline=None)
@given(st.lists(step, max_size=25))
def test_invalid_commands_never_change_the_answers(
    steps: list[tuple[str, str, int, FreezeMode, dict[str, str]]],
) -> None:
    """Dropping every record the view refuses leaves the same view."""
    commands = _build(steps)
    log = Log()
    full = FreezeView(OPS.trusted)
    kept: list[ControlCommand] = []
    for command in commands:
        if not full.apply(log(command)).invalid:
            kept.append(command)
    clean = FreezeView(OPS.trusted)
    log = Log()
    for command in kept:
        clean.apply(log(command))
    assert _answers(clean) == _answers(full)
