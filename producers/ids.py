"""Identifiers: time-ordered event ids (ULID layout) and run ids."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two Crockford base32 characters.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_last_prefix: tuple[int, str] = (-1, "")
"""The last millisecond and its 10 characters: ids made in the same ms share them."""


def _time_prefix(ms: int) -> str:
    global _last_prefix
    last_ms, prefix = _last_prefix
    if ms != last_ms:
        t, p = ms & 0xFFFF_FFFF_FFFF, _PAIRS
        prefix = (p[t >> 40] + p[t >> 30 & 1023] + p[t >> 20 & 1023] + p[t >> 10 & 1023]
                  + p[t & 1023])
        _last_prefix = (ms, prefix)  # one assignment: safe to share between threads
    return prefix


def new_event_id(now_ns: int | None = None) -> str:
    """A 26-character, time-ordered, globally unique id (48-bit ms time + 80 random bits).

    Crockford base32 as in ULID, so ids sort by creation time as text: 10 characters of
    time (50 bits, the two leading ones zero), then 16 of randomness.
    """
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    r, p = int.from_bytes(os.urandom(10), "big"), _PAIRS
    return (_time_prefix(ms) + p[r >> 70] + p[r >> 60 & 1023] + p[r >> 50 & 1023]
            + p[r >> 40 & 1023] + p[r >> 30 & 1023] + p[r >> 20 & 1023] + p[r >> 10 & 1023]
            + p[r & 1023])


def new_run_id() -> str:
    """A fresh run id: ``run_`` + an event id."""
    return "run_" + new_event_id().lower()
