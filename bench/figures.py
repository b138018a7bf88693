"""What every benchmark prints: a figure next to its target, and a closing tally."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from backout.infra.broker import start_embedded


@dataclass(frozen=True)
class Figure:
    """One measured figure and the target it is judged against."""

    name: str
    value: float
    unit: str
    target: str
    ok: bool
    note: str = ""

    @property
    def judged(self) -> bool:
        """Whether this figure has a target (``-`` or ``(info)`` mark context only)."""
        return self.target not in ("", "-", "(info)")


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
    judged = [f for f in figures if f.judged]
    missed = [f.name for f in judged if not f.ok]
    print(
        f"{len(judged) - len(missed)}/{len(judged)} targets met"
        + (f"; missed: {', '.join(missed)}" if missed else ""),
        flush=True,
    )


@contextmanager
def bench_broker(bootstrap: str | None) -> Iterator[str]:
    """The broker to measure against: ``bootstrap`` (BACKOUT_BOOTSTRAP) when given, else an
    embedded Tansu broker started here and stopped on exit. Yields its address."""
    if bootstrap:
        print(f"broker: {bootstrap} (BACKOUT_BOOTSTRAP)", flush=True)
        yield bootstrap
        return
    broker = start_embedded()
    print(f"broker: embedded Tansu on {broker.bootstrap}", flush=True)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def measure(parts: Iterable[Callable[[], Iterable[Figure]]], *, decimals: int = 1) -> list[Figure]:
    """Run each part, printing its figures as they come, then the tally; return them all."""
    figures: list[Figure] = []
    for part in parts:
        for figure in part():
            figures.append(figure)
            show(figure, decimals=decimals)
    tally(figures)
    return figures


def size_arguments(
    description: str | None,
    argv: list[str] | None,
    *,
    full: str | None = None,
    parts: Sequence[str] = (),
) -> argparse.Namespace:
    """Parse a benchmark's options: ``--quick`` (CI smoke sizes), ``--full`` when ``full``
    describes it, and ``--only PART`` when ``parts`` names them."""
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    if full:
        size.add_argument("--full", action="store_true", help=full)
    if parts:
        parser.add_argument("--only", choices=parts, help="run one part only")
    return parser.parse_args(argv)


def headline(what: str, sizes: str) -> None:
    """Print what is measured, at which sizes, on which Python, how many CPUs and the load."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{what} benchmark ({sizes}), Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {load}",
        flush=True,
    )
