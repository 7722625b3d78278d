"""PAV's routes on magnitude rows that span many orders: the short-row routes against the full-sort route.

Random rows of 3 to 40 entries whose magnitudes span up to 270 orders (the distribution of
`tests/_rows.py::rows_spanning_many_orders`), random k, strengths in [1e-3, 100], p = 4/3 and 2.  Each
row is solved alone and as rows 0 and 69 of 70 copies (the lane solver, its groups and hand-backs) and
next to a NaN row (the full-sort route); the script prints the largest difference from the full-sort
route as a multiple of the bound that docs/methods.md states for every route, ``1e-12 |y| + 64 eps |x|``
entry by entry, and the worst row when that multiple exceeds 1.

    python benchmarks/route_agreement.py                         # 120 s, seed 1
    python benchmarks/route_agreement.py --seconds 30 --seed 7
    python benchmarks/route_agreement.py --rows 2000            # a fixed number of rows instead

To measure another version of the core, run it from a checkout of that version (`git worktree add`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import topk_numpy as tk

EPS = np.finfo(np.float64).eps


def spanning_row(rng: np.random.Generator) -> np.ndarray:
    """Keys of one scale (0.5-2 times 10^c, c in [-150, 150]), each lowered by up to 120 orders, random signs."""
    n = int(rng.integers(3, 41))
    scale = 10.0 ** (rng.uniform(-150.0, 150.0) - rng.uniform(0.0, 120.0, n))
    return rng.uniform(0.5, 2.0, n) * scale * rng.choice([-1.0, 1.0], n)


def error_over_bound(x: np.ndarray, k: int, lam: float, p: float) -> float:
    """Largest ``|y - y_full| / (1e-12 |y_full| + 64 eps |x|)`` over the short-row routes of `x`."""
    keywords = {"regularization_strength": lam, "p": p}
    full = tk.soft_topk_mag(np.stack([x, np.full_like(x, np.nan)]), k, **keywords)[0]
    copies = tk.soft_topk_mag(np.tile(x, (70, 1)), k, **keywords)
    bound = 1e-12 * np.abs(full) + 64 * EPS * np.abs(x) + 1e-300
    routes = (tk.soft_topk_mag(x, k, **keywords), copies[0], copies[69])
    return max(float(np.max(np.abs(y - full) / bound)) for y in routes)


def main(argv: list[str] | None = None) -> float:
    """Run the comparison; returns the largest multiple of the bound."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--rows", type=int, default=None, help="stop after this many rows (not after --seconds)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    tk.soft_topk_mag(np.ones((70, 4)), 2)  # compile before the clock starts
    worst, worst_case, rows = 0.0, None, 0
    start = time.perf_counter()
    while rows < args.rows if args.rows is not None else time.perf_counter() - start < args.seconds:
        x = spanning_row(rng)
        k = int(rng.integers(1, x.size + 1))
        lam = float(rng.uniform(1e-3, 1e2))
        p = (4.0 / 3.0, 2.0)[int(rng.integers(2))]
        ratio = error_over_bound(x, k, lam, p)
        rows += 1
        if ratio > worst:
            worst, worst_case = ratio, (x.tolist(), k, lam, p)
    print(f"{rows} rows (seed {args.seed}): largest difference from the full-sort route {worst:.3g} times the bound")
    if worst > 1.0:
        x, k, lam, p = worst_case
        print(f"worst row: x = {x}, k = {k}, regularization_strength = {lam!r}, p = {p!r}")
    return worst


if __name__ == "__main__":
    main()
