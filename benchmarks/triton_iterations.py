"""Iterations of the threshold method's Triton kernels (`topk_core._triton_rows`): what a GPU call runs.

Each program of a kernel solves a few rows in registers and loops until its
slowest row has converged, so the cost of a call follows the rows'
iterations and, per program, their maximum.  The kernels report each row's
iterations in their status array; this script runs them on normal rows (in
Triton's interpreter on CPU tensors where there is no GPU: counts, not
times, the same on any machine) and prints, per operator and exponent, the
rows' median, 99th percentile and maximum, and the mean over programs of
their slowest row.

    python benchmarks/triton_iterations.py                        # 16384 rows of 64, k = 6 (router rows)
    python benchmarks/triton_iterations.py --shapes 4096x256 --k 0 --p 3
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at their import

from topk_core._agnostic.regularizer import conjugate_exponent  # noqa: E402
from topk_torch import _triton_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from threshold_iterations import normal_rows, p_name, row_arguments  # noqa: E402


def row_iterations(op: str, x: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    """Each row's root-finder iterations in the kernel of `op` (-1: handed back to the Array-API method)."""
    status, *_ = _triton_rows._launch(op, torch.from_numpy(x).to(DEVICE), k, lam, conjugate_exponent(p), False)
    return status.cpu().numpy().astype(np.int64)


def main(argv: list[str] | None = None) -> list[tuple]:
    args = row_arguments(__doc__, "16384x64", 6, argv)
    print(f"normal rows, seed 0, {args.dtype}, l = {args.strength}, device {DEVICE}")
    print("| operator | p | shape | k | rows' median | rows' 99th percentile | rows' maximum | handed back "
          "| programs' slowest row (mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (batch, n), x, k in normal_rows(args):
        per_program = _triton_rows.kernels().block_shape(n)[1]
        for op in ("mask", "mag"):
            for p in args.exponents:
                its = row_iterations(op, x, k, args.strength, p)
                solved = its[its >= 0]
                median, tail = np.percentile(solved, [50, 99])
                padded = np.pad(solved, (0, -len(solved) % per_program))
                slowest = padded.reshape(-1, per_program).max(axis=1).mean()
                row = (op, p_name(p), (batch, n), k, median, tail, solved.max(), int((its < 0).sum()), slowest)
                rows.append(row)
                print("| {} | {} | {} | {} | {:g} | {:g} | {} | {} | {:.1f} |".format(*row), flush=True)
    return rows


if __name__ == "__main__":
    main()
