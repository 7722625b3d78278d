"""Where the lane solver pays: its time against the selection kernel's, by row length (p = 2).

Both kernels get the same order statistics and write the same outputs (and,
in the second column pair, the Jacobian residuals); the table prints their
times on about 4 million float32 entries (k = max(2, n/8), l = 0.1) and the
ratio lanes / selection, measured side by side.  `lanes.LANE_MAX_N` is set from it.

    python benchmarks/bench_lanes.py                          # the table
    python benchmarks/bench_lanes.py --write docs/methods.md  # and update the docs page
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from topk_core._pav import lanes, select
from topk_core._pav.kernels import fused_outputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine, median_time, write_section

LENGTHS = [8, 16, 32, 64, 128]
ENTRIES = 1 << 22
STRENGTH = 0.1


def _kernels(x: np.ndarray, k: int, is_mag: bool, with_residuals: bool) -> tuple:
    keys = np.abs(x) if is_mag else x
    bounds = select._row_bounds(keys, k)
    arrays = fused_outputs(x, is_mag, with_residuals)
    unresolved = np.empty(x.shape[0], np.bool_)

    def selection() -> None:
        select._select_rows(keys, x, k, STRENGTH, 2.0, is_mag, *arrays, 8, bounds, 0)

    def lane() -> None:
        lanes.lane_rows(keys, x, k, STRENGTH, is_mag, bounds, *arrays, unresolved, 8, lanes.MAX_PASSES)

    return selection, lane


def table(repeats: int) -> list[str]:
    lines = [
        "| n | operator | selection fwd (ms) | lanes fwd (ms) | lanes / selection "
        "| selection fwd+res. (ms) | lanes fwd+res. (ms) | lanes / selection |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    for n in LENGTHS:
        x = rng.normal(size=(ENTRIES // n, n)).astype(np.float32)
        k = max(2, n // 8)
        for op in ("mask", "mag"):
            cells = []
            for with_residuals in (False, True):
                selection, lane = _kernels(x, k, op == "mag", with_residuals)
                t_sel = median_time(selection, repeats)
                t_lane = median_time(lane, repeats)
                cells.append(f"{t_sel * 1e3:.2f} | {t_lane * 1e3:.2f} | {t_lane / t_sel:.2f}")
            lines.append(f"| {n} | {op} | {cells[0]} | {cells[1]} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write", metavar="PAGE", help="also write the table into this Markdown page")
    args = parser.parse_args()
    head = [
        f"Machine: {machine()}, NumPy {np.__version__}.",
        f"float32, {ENTRIES} entries, k = max(2, n/8), l = {STRENGTH}, p = 2; medians of {args.repeats} runs "
        "after a warm-up; both kernels given the same order statistics.",
        "",
    ]
    print("\n".join(head), flush=True)
    out = [*head, *table(args.repeats)]
    if args.write:
        write_section(args.write, "bench_lanes", "\n".join(out))


if __name__ == "__main__":
    main()
