"""Run lineage: downstream consumers see only each event's parent run. Pure."""

from __future__ import annotations


class RunLineage:
    """Parent links of the runs seen so far (bounded), to find every ancestor of a run.

    Args:
        max_runs: how many runs to remember; the oldest are forgotten first.
    """

    _MAX_DEPTH = 64

    def __init__(self, max_runs: int = 200_000) -> None:
        self._parents: dict[str, str] = {}
        self._max = max_runs

    def observe(self, run: str, parent: str | None) -> None:
        """Remember that ``run`` is a child of ``parent``."""
        if parent is None or parent == run or self._parents.get(run) == parent:
            return
        self._parents[run] = parent
        if len(self._parents) > self._max:
            del self._parents[next(iter(self._parents))]

    def ancestors(self, run: str) -> tuple[str, ...]:
        """Parent, grandparent, ... of ``run`` as far as known (cycles are cut)."""
        out: list[str] = []
        current = self._parents.get(run)
        while current is not None and current not in out and current != run:
            out.append(current)
            if len(out) >= self._MAX_DEPTH:
                break
            current = self._parents.get(current)
        return tuple(out)

