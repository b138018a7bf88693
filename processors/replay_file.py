"""Replay of a recorded file on every core. [adapter: reads files, starts processes]

An agent's detectors see only that agent's events, so :func:`replay_file` deals a file's
agents to N workers by a stable hash of the agent id. Each worker walks the whole file,
skims the records of other agents (finding where each ends without decoding it, see
:mod:`~backout.processors.skim`), and decodes and folds only its own. The shares merge by
event index into exactly what one fold of the whole file gives, in the same order: same
input, same output, whatever the number of workers.

Small files, and files written with an older schema (resolved by fastavro), are replayed
in this process.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

from fastavro import block_reader
from fastavro.schema import to_parsing_canonical_form

from backout.processors.findings import EventRef
from backout.processors.policy import Policy
from backout.processors.replay import (
    FoldedShare,
    ReplayResult,
    _avsc,
    _read_from,
    fold_share,
    merge_shares,
    read_container,
    replay,
)
from backout.processors.skim import Skimmer, compile_skimmer
from backout.schemas import codec
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent

PARALLEL_MIN_BYTES = 8 << 20
"""Files smaller than this replay in this process (starting workers would cost more)."""

_CORRUPT = (ValueError, EOFError, IndexError, KeyError, TypeError)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def replay_file(
    path: str | Path,
    policy: Policy,
    *,
    workers: int | None = None,
    min_bytes: int | None = None,
) -> ReplayResult:
    """Replay an Avro container file of ActionEvents through ``policy`` on ``workers``
    processes (default: every core); the result equals ``replay(read_container(path))``.
    Files under ``min_bytes`` (default :data:`PARALLEL_MIN_BYTES`) replay in this process.

    Raises:
        ConfigError: the file cannot be read or is not a container of ActionEvents.
    """
    path = Path(path)
    count = default_workers() if workers is None else workers
    if count < 1:
        raise ConfigError(f"workers must be at least 1, not {count}")
    smallest = PARALLEL_MIN_BYTES if min_bytes is None else min_bytes
    if count == 1 or _size(path) < smallest or not _written_with_current_schema(path):
        return replay(read_container(path), policy)
    # fork is cheapest, and safe while this process runs one thread (a fork copies other
    # threads' locks in whatever state they are); otherwise start fresh interpreters
    single = threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if single else "spawn")
    with ProcessPoolExecutor(count - 1, mp_context=context) as pool:
        name = str(path)
        others = [pool.submit(fold_file_share, name, policy, k, count) for k in range(1, count)]
        shares = [fold_file_share(name, policy, 0, count)]
        shares += [future.result() for future in others]
    return merge_shares(shares)


def fold_file_share(path: str, policy: Policy, share: int, shares: int) -> FoldedShare:
    """Fold the events of the agents dealt to ``share`` (of ``shares``) in the file."""
    collecting = gc.isenabled()
    gc.disable()  # millions of objects that all live to the end: collections only cost
    try:
        return fold_share(_share_events(Path(path), share, shares), policy)
    except _CORRUPT as exc:
        raise ConfigError(f"{path!r} is not an Avro container of ActionEvents: {exc}") from exc
    finally:
        if collecting:
            gc.enable()


def _share_events(
    path: Path, share: int, shares: int
) -> Iterator[tuple[int, ActionEvent, EventRef]]:
    skim, read_from = _agent_skimmer(), _read_from()
    index = 0
    with open(path, "rb") as stream:
        for block in block_reader(stream):
            data = block.bytes_.getvalue()  # type: ignore[attr-defined]  # fastavro Block
            text, pos = data.decode("latin-1"), 0
            for _ in range(block.num_records):
                end, agent = skim(data, pos)
                if zlib.crc32(agent) % shares == share:
                    event, stop = read_from(data, text, pos)
                    if stop != end:
                        raise ValueError(f"record {index} ends at {stop}, skimmed {end}")
                    yield index, event, EventRef(event.event_id, None, None, index)
                pos = end
                index += 1


@cache
def _agent_skimmer() -> Skimmer:
    return compile_skimmer(json.loads(_avsc()), "agent_id")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from exc


def _written_with_current_schema(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            written = block_reader(stream).writer_schema
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    except _CORRUPT:
        return False  # the in-process reader reports what is wrong with it
    canonical = codec.current_schema(ActionEvent).canonical
    return isinstance(written, dict) and to_parsing_canonical_form(written) == canonical
