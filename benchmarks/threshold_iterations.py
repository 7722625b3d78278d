"""Iterations of the threshold method's structured loop: what a jitted or compiled solve runs.

Under `jax.jit` (and the PyTorch adapter's compiled loop) the root finder is one
structured loop over the whole batch, which runs until its slowest row has
converged: its cost is that row's iteration count times a pass over the batch.
This script runs the core's threshold method in NumPy with such a loop (fixed
shapes, no compaction of converged rows) and prints, per operator and
exponent, the loop's iterations and the median and 99th percentile of the
iterations at which the rows converged, and the iterations of every loop of
the solve (the first, then those that solve rows again next to a key: for
p > 2 every row).  Counts, not times: the same on any machine.

    python benchmarks/threshold_iterations.py                          # 4096 and 262144 rows of 64
    python benchmarks/threshold_iterations.py --shapes 1048576x64 --dtype float64
    python benchmarks/threshold_iterations.py --shapes 65536x64 --k 6 --p 3   # the loops of p > 2
    python benchmarks/threshold_iterations.py --shapes 65536x64 --k 6 --order-statistics  # the adapters' start
"""

from __future__ import annotations

import argparse

import array_api_compat.numpy as np_xp
import numpy as np
from _report import parse_exponents, parse_shapes

from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._agnostic.threshold import counting_loop, threshold_mag, threshold_mask
from topk_core._api import _numpy_order_statistics

SOLVERS = {"mask": threshold_mask, "mag": threshold_mag}


def _loop_runs(op: str, x: np.ndarray, k: int, lam: float, p: float, order_statistics: bool = False
               ) -> list[tuple[int, np.ndarray]]:
    """For each structured loop of a solve in turn (the first root finder's, then the recentring ones):
    its iterations and the iteration at which each row converged."""
    runs: list[tuple[int, np.ndarray]] = []
    hooks = {"order_statistics": _numpy_order_statistics} if order_statistics else {}
    # NumPy's Array-API namespace (the core's own for NumPy arrays; NumPy 2.0 itself lacks parts of it).
    SOLVERS[op](x, k, lam, conjugate_exponent(p), np_xp, loop=counting_loop(runs), **hooks)
    return runs


def loop_iterations(op: str, x: np.ndarray, k: int, lam: float, p: float) -> tuple[int, np.ndarray]:
    """(iterations of the first root finder's loop, the iteration at which each row converged)."""
    return _loop_runs(op, x, k, lam, p)[0]


def every_loop_iterations(op: str, x: np.ndarray, k: int, lam: float, p: float) -> list[int]:
    """The iterations of every structured loop of the solve, in turn: a compiled solve runs them all (for
    p > 2 every row is solved again next to the key nearest to its threshold)."""
    return [count for count, _ in _loop_runs(op, x, k, lam, p)]


def row_arguments(doc: str, shapes: str, k: int, argv: list[str] | None, order_statistics: bool = False
                  ) -> argparse.Namespace:
    """The options of the iteration counters (this script, `triton_iterations.py`): rows, k, l, exponents."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=shapes, help="comma-separated ROWSxN")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--k", type=int, default=k, help="0: max(1, n / 10)")
    parser.add_argument("--strength", type=float, default=0.1)
    parser.add_argument("--p", default="4/3,2", help="comma-separated exponents")
    if order_statistics:
        parser.add_argument("--order-statistics", action="store_true",
                            help="start from the order statistics, as the adapters do (np.partition here)")
    args = parser.parse_args(argv)
    args.exponents = parse_exponents(args.p)
    return args


def normal_rows(args: argparse.Namespace):
    """``((batch, n), rows, k)`` for each of ``args.shapes``: normal rows of ``args.dtype``, seed 0."""
    for batch, n in parse_shapes(args.shapes):
        yield (batch, n), np.random.default_rng(0).normal(size=(batch, n)).astype(args.dtype), args.k or max(1, n // 10)


def p_name(p: float) -> str:
    return "4/3" if abs(p - 4 / 3) < 1e-12 else f"{p:g}"


def main(argv: list[str] | None = None) -> list[tuple]:
    args = row_arguments(__doc__, "4096x64,262144x64", 0, argv, order_statistics=True)
    exponents = args.exponents
    print(f"normal rows, seed 0, {args.dtype}, l = {args.strength}")
    print("| operator | p | shape | k | loop iterations | rows' median | rows' 99th percentile | every loop |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for (batch, n), x, k in normal_rows(args):
        for op in SOLVERS:
            for p in exponents:
                runs = _loop_runs(op, x, k, args.strength, p, args.order_statistics)
                count, converged = runs[0]
                median, tail = np.percentile(converged, [50, 99])
                name = p_name(p)
                every = [c for c, _ in runs]
                rows.append((op, name, (batch, n), k, count, median, tail, every))
                print(f"| {op} | {name} | ({batch}, {n}) | {k} | {count} | {median:g} | {tail:g} | "
                      f"{' + '.join(map(str, every))} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
