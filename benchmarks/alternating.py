"""Timing variants of a step against each other in one process, alternating, and their table.

Alternating variant by variant, round after round, spreads this shared machine's drift over all of
them, so their ratios stay meaningful where absolute times move by several percent.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence


def add_alternation_arguments(parser: argparse.ArgumentParser, steps: int, steps_help: str = "steps per timing") -> None:
    """The options of every script that times variants this way: ``--steps`` per timing (default
    ``steps``), ``--rounds`` and ``--out`` (a JSON file for the timings)."""
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the timings as JSON here")


def time_alternating(run: Callable[[str, int], float], variants: Sequence[str], rounds: int,
                     steps: int) -> dict[str, list[float]]:
    """``run(variant, steps) -> seconds per step`` for every variant in turn, ``rounds`` times, after a
    warm-up of a fifth of the steps each. Returns ``{variant: [seconds per step, one per round]}``."""
    for variant in variants:
        run(variant, max(1, steps // 5))
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            seconds[variant].append(run(variant, steps))
    return seconds


def print_timings(seconds: dict[str, list[float]], base: str, label: str) -> None:
    """Min and median microseconds per step, and each variant's speed as a share of ``base``'s
    (``base``'s min time over its own), in a column headed ``label``."""
    width = max(30, *(len(name) + 2 for name in seconds))
    print(f"{'step':<{width}} {'min us':>8} {'median us':>10} {label:>10}")
    fastest_base = min(seconds[base])
    for name, values in seconds.items():
        values = sorted(values)
        print(f"{name:<{width}} {1e6 * values[0]:>8.0f} {1e6 * values[len(values) // 2]:>10.0f} "
              f"{fastest_base / values[0]:>9.0%}")
