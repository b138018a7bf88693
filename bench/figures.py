"""What every benchmark prints: a figure next to its target, and a closing tally."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure and the target it is judged against."""

    name: str
    value: float
    unit: str
    target: str
    ok: bool
    note: str = ""


def show(figure: Figure, *, decimals: int = 1) -> None:
    """Print one figure as a row: name, value, unit, target, verdict, note."""
    verdict = "ok" if figure.ok else "MISSED"
    print(
        f"  {figure.name:<46} {figure.value:>12,.{decimals}f} {figure.unit:<9} "
        f"target {figure.target:<13} {verdict:<6} {figure.note}",
        flush=True,
    )


def tally(figures: Sequence[Figure]) -> None:
    """Print how many targets were met, naming the missed ones."""
    missed = [f.name for f in figures if not f.ok]
    print(
        f"{len(figures) - len(missed)}/{len(figures)} targets met"
        + (f"; missed: {', '.join(missed)}" if missed else ""),
        flush=True,
    )
