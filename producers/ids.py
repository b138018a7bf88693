"""Identifiers: time-ordered event ids (ULID layout) and run ids."""

from __future__ import annotations

import base64
import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD)


def new_event_id(now_ns: int | None = None) -> str:
    """A 26-character, time-ordered, globally unique id (48-bit ms time + 80 random bits).

    Crockford base32 as in ULID, so ids sort by creation time as text.
    """
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    raw = (ms & 0xFFFF_FFFF_FFFF).to_bytes(6, "big") + os.urandom(10)
    # 128 bits -> 26 base32 characters: pad to 130 bits (two leading zero bits).
    return base64.b32encode(b"\x00\x00\x00\x00" + raw).decode()[6:32].translate(_TO_CROCKFORD)


def new_run_id() -> str:
    """A fresh run id: ``run_`` + an event id."""
    return "run_" + new_event_id().lower()
