"""How the lane solver's time depends on the strength, with and without its rule for busy groups.

Larger strengths put more entries in the free set, further from the start of
the lane solver's iteration (PAV's first block), so rows need more passes.
After its first passes (`lanes.lane_passes`) a group with more than
`lanes.BUSY_LANES` rows still iterating goes on; without that rule, those
rows are solved again from the start by a second lane solve.  The table
prints, on the short-row shapes of the targets (float32, k = max(1, n/10)),
the NumPy operators' forward with the rule (as shipped) and without it, and
the forward+VJP with it, as ratios to `np.sort` of the same data measured
side by side (best of `--repeats` runs after a warm-up).

    python benchmarks/bench_strengths.py                          # the table
    python benchmarks/bench_strengths.py --write docs/methods.md  # and update the docs page
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import numpy as np

import topk_numpy as tk
from topk_core._pav import lanes, select

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import best_time, machine, random_rows, write_section

SHAPES = [(16384, 64), (262144, 16)]
STRENGTHS = [0.1, 1.0, 10.0]
EXPONENTS = {"2": 2.0, "4/3": 4.0 / 3.0}


def _without_busy_rule(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` with every group stopping after its first passes (the rule off)."""

    def run() -> object:
        saved = select.busy_lanes
        select.busy_lanes = lambda: lanes.LANES
        try:
            return fn()
        finally:
            select.busy_lanes = saved

    return run


def _calls(forward: Callable, vjp: Callable, x: np.ndarray, u: np.ndarray, k: int, kw: dict) -> tuple[Callable, Callable]:
    """The forward of `x` and the forward+VJP of `u` (what a training step pays), as calls without arguments."""
    return functools.partial(forward, x, k, **kw), lambda: vjp(x, k, **kw)[1](u)


def table(shapes: list[tuple[int, int]], repeats: int) -> list[str]:
    lines = [
        "| shape | operator | p | l | forward / np.sort | without the rule | fwd+VJP / np.sort |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, x, u, k in random_rows(shapes, lines):
        for op in ("mask", "mag"):
            forward, vjp = getattr(tk, f"soft_topk_{op}"), getattr(tk, f"soft_topk_{op}_vjp")
            for p_name, p in EXPONENTS.items():
                for lam in STRENGTHS:
                    fwd, fwd_vjp = _calls(forward, vjp, x, u, k, {"p": p, "regularization_strength": lam})
                    # np.sort before each column: the machine's slow phases last seconds.
                    cells = []
                    for fn in (fwd, _without_busy_rule(fwd), fwd_vjp):
                        t_sort = best_time(functools.partial(np.sort, x, axis=-1), repeats)
                        cells.append(f"{best_time(fn, repeats) / t_sort:.2f}")
                    lines.append(f"| {shape} | {op} | {p_name} | {lam:g} | {' | '.join(cells)} |")
                    print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write", metavar="PAGE", help="also write the table into this Markdown page")
    args = parser.parse_args()
    head = [
        f"Machine: {machine()}, NumPy {np.__version__}.",
        f"float32, k = max(1, n/10); best of {args.repeats} runs after a warm-up, each column next to "
        f"its own `np.sort`; *without the rule*: every group stops after its first passes "
        f"(`busy_lanes` = {lanes.LANES} instead of {lanes.BUSY_LANES}).",
        "",
    ]
    print("\n".join(head), flush=True)
    out = [*head, *table(SHAPES, args.repeats)]
    if args.write:
        write_section(args.write, "bench_strengths", "\n".join(out))


if __name__ == "__main__":
    main()
