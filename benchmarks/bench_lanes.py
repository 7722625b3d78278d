"""Where the lane solver pays: its time against the selection kernel's, by row length (p = 2 and 4/3).

Both columns run the selection-first forward (`select.topk_rows_select`) on
the same rows, once with the lane solver switched on for that length (rows it
hands back included) and once with it switched off (the selection kernel,
with its own order statistics); the table prints their times on about 4
million float32 entries (k = max(2, n/8), l = 0.1) and the ratio lanes /
selection, measured side by side.  `lanes.LANE_MAX_N` and `CUBIC_LANE_MAX_N` are set from it, and
`select.SMALL_K_LANE_MAX_N` (longer rows with a small k) from its `--k` runs on longer rows.

    python benchmarks/bench_lanes.py                          # the table
    python benchmarks/bench_lanes.py --write docs/methods.md  # and update the docs page
    python benchmarks/bench_lanes.py --strength 10            # another strength (no docs table)
    python benchmarks/bench_lanes.py --k 4                    # a fixed k (no docs table)
    python benchmarks/bench_lanes.py --k 8 --lengths 512,1024,2048,4096  # other row lengths (no docs table)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import numpy as np

from topk_core._pav import lanes, select
from topk_core._pav.kernels import fused_outputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import best_time, machine, write_section

LENGTHS = [8, 16, 24, 32, 48, 64, 80, 96, 128, 192, 256, 384, 512]
ENTRIES = 1 << 22
STRENGTH = 0.1
EXPONENTS = {"2": 2.0, "4/3": 4.0}  # p: its conjugate exponent q


def _forward(x: np.ndarray, k: int, q: float, is_mag: bool, with_residuals: bool, lanes_on: bool,
             strength: float = STRENGTH) -> Callable:
    keys = np.ascontiguousarray(np.abs(x) if is_mag else x)
    arrays = fused_outputs(x, is_mag, with_residuals)

    def run() -> None:
        saved = lanes.LANE_MAX_N, lanes.CUBIC_LANE_MAX_N, select.SMALL_K_LANE_MAX_N
        lanes.LANE_MAX_N = lanes.CUBIC_LANE_MAX_N = select.SMALL_K_LANE_MAX_N = x.shape[1] if lanes_on else 0
        try:
            select.topk_rows_select(keys, x, k, strength, q, is_mag, *arrays)
        finally:
            lanes.LANE_MAX_N, lanes.CUBIC_LANE_MAX_N, select.SMALL_K_LANE_MAX_N = saved

    return run


def table(repeats: int, fixed_k: int = 0, strength: float = STRENGTH, lengths: list[int] = LENGTHS) -> list[str]:
    lines = [
        "| p | n | operator | selection fwd (ms) | lanes fwd (ms) | lanes / selection "
        "| selection fwd+res. (ms) | lanes fwd+res. (ms) | lanes / selection |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    for p_name, q in EXPONENTS.items():
        for n in lengths:
            x = rng.normal(size=(ENTRIES // n, n)).astype(np.float32)
            k = min(fixed_k, n - 1) if fixed_k else max(2, n // 8)
            for op in ("mask", "mag"):
                cells = []
                for with_residuals in (False, True):
                    t_sel = best_time(_forward(x, k, q, op == "mag", with_residuals, False, strength), repeats)
                    t_lane = best_time(_forward(x, k, q, op == "mag", with_residuals, True, strength), repeats)
                    cells.append(f"{t_sel * 1e3:.2f} | {t_lane * 1e3:.2f} | {t_lane / t_sel:.2f}")
                lines.append(f"| {p_name} | {n} | {op} | {cells[0]} | {cells[1]} |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--strength", type=float, default=STRENGTH,
                        help="regularization strength l (the docs' table: the default)")
    parser.add_argument("--k", type=int, default=0, help="this k (at most n - 1) instead of max(2, n/8)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help="comma-separated row lengths (the docs' table: the default)")
    parser.add_argument("--write", metavar="PAGE", help="also write the table into this Markdown page")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.write and (args.k or args.strength != STRENGTH or lengths != LENGTHS):
        parser.error("--write takes the docs' table only: no --k, --strength or --lengths")
    head = [
        f"Machine: {machine()}, NumPy {np.__version__}.",
        f"float32, {ENTRIES} entries, k = {args.k or 'max(2, n/8)'}, l = {args.strength}; best of {args.repeats} runs "
        "after a warm-up (this machine's slow phases would otherwise hit one column or the other); "
        "the whole selection-first forward with the lanes on (rows handed back included) and off.",
        "",
    ]
    print("\n".join(head), flush=True)
    out = [*head, *table(args.repeats, args.k, args.strength, lengths)]
    if args.write:
        write_section(args.write, "bench_lanes", "\n".join(out))


if __name__ == "__main__":
    main()
