"""Magnitude rows whose k-th place lies far below their largest key: the threshold method against PAV.

Rows of a few huge keys over small ones, the small ones anywhere from just below the huge ones to the
bottom of the dtype's range (`tests/_rows.py::rows_far_below_their_largest_key`).  For each dtype and
exponent p (strengths 1e-3, 1 and 1e3), the largest deviation of the threshold method's magnitude from
PAV's (NumPy, float64, on the same values), entry by entry relative to |x|: what docs/methods.md quotes
for `threshold._mag_deep_frames` and the Triton kernels.

    python benchmarks/deep_rows.py                      # the core's threshold method (NumPy)
    python benchmarks/deep_rows.py --no-deep-frames     # the same without re-framing (as before 2f068a0)
    python benchmarks/deep_rows.py --triton             # PyTorch's Triton kernels (the interpreter on a CPU)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from _report import parse_exponents, triton_mag_threshold

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _rows import rows_far_below_their_largest_key

STRENGTHS = (1e-3, 1.0, 1e3)


def deviations(p_values: list[float], rows: int, n: int, forward) -> dict[tuple[str, float], float]:
    """{(dtype name, p): the largest |threshold - PAV| / |x| over the strengths} for `forward(x, k, p, l)`."""
    import topk_numpy as tn

    out = {}
    for dtype in (np.float32, np.float64):
        for p in p_values:
            worst = 0.0
            for lam in STRENGTHS:
                rng = np.random.default_rng([int(dtype == np.float32), round(np.log10(lam)) + 3, round(100 * p)])
                x, k = rows_far_below_their_largest_key(rng, dtype, n, rows)
                want = tn.soft_topk_mag(x.astype(np.float64), k, p=p, regularization_strength=lam, method="pav")
                got = np.asarray(forward(x, k, p, lam), dtype=np.float64)
                scale = np.maximum(np.abs(x.astype(np.float64)), np.finfo(np.float64).tiny)
                worst = max(worst, float(np.max(np.abs(got - want) / scale)))
            out[dtype.__name__, p] = worst
    return out


def main(argv: list[str] | None = None) -> dict[tuple[str, float], float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="rows per dtype, p and strength")
    parser.add_argument("--n", type=int, default=12, help="entries per row")
    parser.add_argument("--p", default="1.25,4/3,1.5,2,3", help="exponents, comma separated (fractions allowed)")
    parser.add_argument("--no-deep-frames", action="store_true", help="switch `_mag_deep_frames` off")
    parser.add_argument("--triton", action="store_true", help="PyTorch's Triton kernels instead of NumPy")
    args = parser.parse_args(argv)
    p_values = parse_exponents(args.p)
    warnings.simplefilter("ignore")
    if args.no_deep_frames:
        from topk_core._agnostic import threshold

        threshold._DEEP_ROUNDS = 0
    if args.triton:
        forward = triton_mag_threshold()
    else:
        import topk_numpy as tn

        def forward(x, k, p, lam):
            return tn.soft_topk_mag(x, k, p=p, regularization_strength=lam, method="threshold")

    table = deviations(p_values, args.rows, args.n, forward)
    print("| dtype | p | max abs. deviation from PAV / abs(x) |")
    print("|---|---|---|")
    for (dtype, p), worst in table.items():
        print(f"| {dtype} | {p:.4g} | {worst:.2e} |")
    return table


if __name__ == "__main__":
    main()
