"""Identifiers: time-ordered event ids (ULID layout) and run ids."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_event_id(now_ns: int | None = None) -> str:
    """A 26-character, time-ordered, globally unique id (48-bit ms time + 80 random bits)."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_run_id() -> str:
    """A fresh run id: ``run_`` + an event id."""
    return "run_" + new_event_id().lower()
