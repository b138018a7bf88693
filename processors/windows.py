"""Windowed detectors: rate, volume, blast radius and retry loops over a sliding window.
Pure.

A window is split into :data:`~backout.processors.findings.WINDOW_BUCKETS` buckets; the
oldest bucket is weighted by how much of it is still inside the window. A detector
fires once when a limit is crossed, again when the overshoot reaches the policy's
``high`` or ``critical`` ratio, and again once per window while it lasts.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from typing import cast

from backout.processors.findings import (
    RECENT_REFS,
    RETRY_FINGERPRINTS,
    RETRY_REFS,
    WINDOW_BUCKETS,
    Context,
    DetectorName,
    EventRef,
    Finding,
    Limits,
    ScopeLimits,
    ScopeState,
    SubjectKind,
    digest,
)
from backout.schemas.events import ActionEvent, CallStatus, Reversibility, Severity

_RANK = {s: i for i, s in enumerate(Severity)}
_READ_ONLY = Reversibility.READ_ONLY
_WRITTEN = frozenset({CallStatus.SUCCEEDED, CallStatus.UNKNOWN, CallStatus.PENDING})
_FIRED_KEEP = 32


def _json_encoder() -> Callable[[object], str]:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))``, for acyclic values,
    without building an encoder per call (4x faster on small maps; the same text)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    if make is None:  # no C accelerator: the pure encoder, built once
        return encoder.encode
    chunks = make(
        None,  # no circular check: event arguments are decoded trees
        encoder.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
    return lambda value: "".join(chunks(value, 0))


_canonical_json = _json_encoder()


class CallFacts:
    """What the windowed detectors read from one tool call, computed once."""

    __slots__ = (
        "event",
        "recent",
        "record",
        "ref",
        "ref_list",
        "system",
        "t",
        "tenant",
        "value",
        "write",
    )

    def __init__(self, event: ActionEvent, ref: EventRef, t: int) -> None:
        self.event = event
        self.ref = ref
        self.ref_list: list[object] = [ref.event_id, ref.topic, ref.partition, ref.offset]
        self.recent: list[object] = [*self.ref_list, t]
        """The entry for ``ScopeState.recent`` (shared by the agent's and the run's: never
        changed once built)."""
        self.t = t
        self.tenant = event.tenant
        # ActionEvent.is_write for a tool call, without the property's call
        self.write = event.reversibility is not _READ_ONLY and event.status in _WRITTEN
        target = event.target
        if target is None:
            self.system = self.record = None
        else:
            self.system = target.system
            record = f"{target.system}/{target.object_id}"
            self.record = digest(record) if len(record) > 40 else record
        value = event.value
        self.value = abs(value) if value is not None else 0.0


# --- windowed detectors -----------------------------------------------------------------
def observe(
    state: ScopeState,
    subject: tuple[SubjectKind, str],
    lim: ScopeLimits,
    facts: CallFacts,
    limits: Limits,
    out: list[Finding],
) -> None:
    """Count one tool call in ``state`` (a run's or an agent's) and add to ``out`` the
    rate, volume and blast-radius findings it triggers."""
    bucket_us = limits.bucket_us
    if state.bucket_us != bucket_us:  # the window changed: counts in old buckets are moot
        state.bucket_us, state.buckets, state.distinct, state.sums = bucket_us, {}, {}, None
        state.mine = set()
    t = facts.t
    if t > state.last_us:
        state.last_us = t
    recent = state.recent
    recent.append(facts.recent)
    if len(recent) > 2 * RECENT_REFS:
        del recent[:-RECENT_REFS]
    window = limits.window_us
    write = facts.write
    if lim.actions is not None or (write and lim.value is not None):
        moved = facts.value if write else 0.0
        calls, total = _bucket_add(state, t, moved, window, bucket_us)
        if lim.actions is not None and calls > lim.actions:
            _fire(
                state,
                "rate_anomaly",
                "actions",
                subject,
                calls,
                lim.actions,
                facts,
                limits,
                f"{calls:g} tool calls in {_secs(window)}",
                out,
            )
        if write and lim.value is not None and moved and total > lim.value:
            _fire(
                state,
                "mutation_volume",
                "value",
                subject,
                total,
                lim.value,
                facts,
                limits,
                f"value moved {total:g} in {_secs(window)}",
                out,
            )
    if not write:
        return
    for metric, detector, item, limit in (
        ("records", "mutation_volume", facts.record, lim.records),
        ("tenants", "blast_radius", facts.tenant, lim.tenants),
        ("systems", "blast_radius", facts.system, lim.systems),
    ):
        if limit is None or item is None:
            continue
        seen = state.distinct[metric] if metric in state.mine else _owned(state, metric)
        count = _distinct_add(seen, item, t, window, limit, limits.track_cap)
        if count > limit:
            _fire(
                state,
                cast(DetectorName, detector),
                metric,
                subject,
                count,
                limit,
                facts,
                limits,
                f"{count} distinct {metric} written in {_secs(window)}",
                out,
            )


def _owned(state: ScopeState, metric: str) -> dict[str, int]:
    """The state's item map for ``metric``, copied on its first change by this copy."""
    seen = state.distinct.get(metric)
    seen = state.distinct[metric] = dict(seen) if seen is not None else {}
    state.mine.add(metric)
    return seen


def retry(
    run: ScopeState,
    subject: tuple[SubjectKind, str],
    facts: CallFacts,
    limits: Limits,
    out: list[Finding],
) -> None:
    """Count one write by its call fingerprint (tool, target, arguments) and add a
    ``retry_loop`` finding to ``out`` from the ``retry_loop``-th identical call."""
    assert limits.retry_loop is not None
    event, t = facts.event, facts.t
    args = event.approved_args if event.approved_args is not None else event.requested_args
    target = facts.record or ""
    call = f"{event.tool}|{target}|" + _canonical_json(args)
    # 64 bits of two C checksums: stable across processes, far cheaper than a digest,
    # and a run tracks at most RETRY_FINGERPRINTS calls, so a collision is negligible
    data = call.encode()
    fp = f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"
    entry = run.retries.pop(fp, None)
    if entry is None or t - cast(int, entry[1]) >= limits.window_us:
        count, first = 1, t
        refs: list[object] = [facts.ref_list]
    else:
        count, first = cast(int, entry[0]) + 1, cast(int, entry[1])
        refs = [*cast(list[object], entry[2])[-(RETRY_REFS - 1) :], facts.ref_list]
    run.retries[fp] = [count, first, refs]
    if len(run.retries) > RETRY_FINGERPRINTS:
        del run.retries[next(iter(run.retries))]
    if count >= limits.retry_loop:
        _fire(
            run,
            "retry_loop",
            fp,
            subject,
            count,
            limits.retry_loop,
            facts,
            limits,
            f"{event.tool}({target}) called {count} times with the same arguments in "
            f"{_secs(limits.window_us)}",
            out,
            refs=refs,
            inclusive=True,
        )  # nested ref lists


def _fire(
    state: ScopeState,
    detector: DetectorName,
    metric: str,
    subject: tuple[SubjectKind, str],
    observed: float,
    limit: float,
    facts: CallFacts,
    limits: Limits,
    what: str,
    out: list[Finding],
    *,
    refs: list[object] | None = None,
    inclusive: bool = False,
) -> None:
    """Add a finding when ``observed`` reaches a new level, or the last one went quiet."""
    base = limits.severity[detector]
    ratio = observed / limit
    level = base
    if ratio >= limits.critical_at:
        level = Severity.CRITICAL
    elif ratio >= limits.high_at and _RANK[base] < _RANK[Severity.HIGH]:
        level = Severity.HIGH
    key = f"{detector}:{metric}"
    rank = _RANK[level]
    t = facts.t
    last = state.fired.get(key)
    if last is not None and last[0] >= rank and t < last[1]:
        return
    if len(state.fired) >= _FIRED_KEEP:
        for stale in [k for k, v in state.fired.items() if v[1] <= t]:
            del state.fired[stale]
    state.fired[key] = [rank, t + limits.window_us]
    event = facts.event
    if refs is None:  # the recent calls still inside the window
        refs = [r for r in state.recent[-RECENT_REFS:] if cast(int, r[4]) > t - limits.window_us]
    evidence = tuple(EventRef.from_list(cast(Sequence[object], r)[:4]) for r in refs)
    shown_metric = "calls" if detector == "retry_loop" else metric
    limit_text = f"{limit:g}" + ("" if inclusive else " max")
    out.append(
        Finding(
            "f_" + digest(detector, metric, subject[0], subject[1], level.value, event.event_id),
            detector,
            level,
            event.occurred_at,
            subject,
            Context.of(event),
            f"{subject[0]} {subject[1]}: {what} (limit {limit_text})",
            facts.ref,
            evidence,
            {
                "metric": shown_metric,
                "observed": f"{observed:g}",
                "limit": f"{limit:g}",
                "window_s": f"{limits.window_us / 1e6:g}",
            },
        )
    )


def _bucket_add(
    state: ScopeState, t: int, moved: float, window: int, width: int
) -> tuple[float, float]:
    """Count a call (moving ``moved``) at ``t``; weighted sums over ``(t - window, t]``.

    The sum over the buckets strictly inside the window, newest excluded, is cached on
    the state while events keep landing in the newest bucket (the common case).
    """
    buckets = state.buckets
    index = t // width
    sums = state.sums
    if sums is not None and sums[0] != index:
        sums = state.sums = None
    slot = buckets.get(index)
    if slot is None:
        slot = buckets[index] = [1.0, moved]
        if len(buckets) > WINDOW_BUCKETS + 1:
            horizon = (t - window) // width
            for i in [i for i in buckets if i < horizon]:
                del buckets[i]
    else:
        slot[0] += 1.0
        slot[1] += moved
    start = t - window
    first = start // width
    if sums is None or sums[1] != first:
        calls = total = 0.0
        for i, (c, v) in buckets.items():
            if first < i < index:
                calls += c
                total += v
        sums = state.sums = [index, first, calls, total]
    calls, total = sums[2] + slot[0], sums[3] + slot[1]
    oldest = buckets.get(first) if first < index else None
    if oldest is not None:
        weight = ((first + 1) * width - start) / width
        calls += oldest[0] * weight
        total += oldest[1] * weight
    return calls, total


def _distinct_add(
    seen: dict[str, int], item: str, t: int, window: int, limit: int, cap: int
) -> int:
    """Record ``item`` at ``t``; the distinct items seen in ``(t - window, t]`` when that
    may be over ``limit`` (a lower bound otherwise: stale items are only pruned then)."""
    seen.pop(item, None)
    seen[item] = t
    if len(seen) <= limit:
        return len(seen)
    start = t - window
    while True:
        oldest = next(iter(seen))
        if seen[oldest] > start:
            break
        del seen[oldest]
    while len(seen) > cap:
        del seen[next(iter(seen))]
    return len(seen)


def _secs(us: int) -> str:
    return f"{us / 1e6:g}s"
