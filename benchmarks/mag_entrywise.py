"""PAV against the threshold method on the magnitude, entry by entry, on short rows spanning many orders.

Rows of 3 to 9 entries: keys of one scale (0.5-2 times 10^c, c uniform in [-150, 150]), each lowered by
up to 120 orders, random signs (`tests/_rows.rows_lowered_from_one_scale`); per batch of 64 rows one k,
one p from {5/4, 4/3, 3/2, 2, 3} and one strength 10^u, u uniform in [-2, 2] (``--strength-orders``).  A row where the two
methods differ by more than the bound of docs/methods.md (1e-12 of the entry plus 64 ulps of its input)
is solved by the threshold form in 600-digit arithmetic (`tests/_oracles.py`), and each method's
largest error there is reported in units of that bound.  The figures of docs/methods.md ("Solved after
commit 34ed5bf") come from here:

    python benchmarks/mag_entrywise.py --batches 3000 --seed 1
    python benchmarks/mag_entrywise.py --batches 1500 --seed 7 --strength-orders 10
    python benchmarks/mag_entrywise.py --batches 150 --seed 2 --triton --no-oracle
    python benchmarks/mag_entrywise.py --batches 100 --seed 3 --n 300,1024 --rows 4 --p 4/3,2 --strength-orders 4

With ``--triton`` the threshold method is PyTorch's Triton kernels for short rows (Triton's interpreter
without a GPU: about 1.5 s a batch; ``TRITON_INTERPRET=0`` on a GPU), whose documented precision is
relative to the row's largest output: the last line reports the difference in those terms too.
``--no-oracle`` only counts the rows apart (the oracle takes about a second a row).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _oracles import mp_threshold_mag_parts
from _report import parse_exponents, triton_mag_threshold
from _rows import rows_lowered_from_one_scale

import topk_numpy as tk

BATCH = 64
ORACLE_DIGITS = 600  # rows whose free z underflow need 500 (docs/methods.md)


def errors_in_bounds(y: np.ndarray, reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row: the largest |y - reference| in units of 1e-12 |reference| + 64 eps |x| (0 where both are 0)."""
    bound = 1e-12 * np.abs(reference) + 64.0 * np.finfo(np.float64).eps * np.abs(x)
    diff = np.abs(y - reference)
    return np.where(diff > 0, diff / np.where(bound > 0, bound, 1.0), 0.0).max(axis=-1)


def main(argv: list[str] | None = None) -> dict[str, tuple[int, float]]:
    """Run the fuzz; returns per method (rows beyond the bound against the oracle, largest error in bounds),
    nothing with ``--no-oracle``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="batches of 64 rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--triton", action="store_true", help="the threshold method through PyTorch's Triton kernels")
    parser.add_argument("--no-oracle", action="store_true", help="count the rows apart, without the oracle")
    parser.add_argument("--strength-orders", type=float, default=2.0,
                        help="strengths 10^u, u uniform in [-S, S] (default 2)")
    parser.add_argument("--n", default="3,9", help="row lengths: MIN,MAX (default 3,9)")
    parser.add_argument("--rows", type=int, default=BATCH, help=f"rows per batch (default {BATCH})")
    parser.add_argument("--p", default="5/4,4/3,3/2,2,3", help="comma-separated exponents (fractions allowed)")
    args = parser.parse_args(argv)
    methods: dict[str, Callable[..., np.ndarray]] = {
        "pav": lambda x, k, p, lam: tk.soft_topk_mag(x, k, p=p, regularization_strength=lam, method="pav"),
        "threshold": triton_mag_threshold() if args.triton else (
            lambda x, k, p, lam: tk.soft_topk_mag(x, k, p=p, regularization_strength=lam, method="threshold")),
    }
    rng = np.random.default_rng(args.seed)
    n_min, n_max = (int(v) for v in args.n.split(","))
    p_values = parse_exponents(args.p)
    beyond = {"pav": 0, "threshold": 0}
    largest = {"pav": 0.0, "threshold": 0.0}
    disagreeing, widest, widest_of_largest = 0, 0.0, 0.0
    for _ in range(args.batches):
        n = int(rng.integers(n_min, n_max + 1))
        k = int(rng.integers(1, n))
        p = float(rng.choice(p_values))
        lam = float(10.0 ** rng.uniform(-args.strength_orders, args.strength_orders))
        x = rows_lowered_from_one_scale(rng, args.rows, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (ThresholdNotConverged: its results are still compared)
            outputs = {m: np.asarray(forward(x, k, p, lam)) for m, forward in methods.items()}
        apart = errors_in_bounds(outputs["pav"], outputs["threshold"], x)
        widest = max(widest, float(apart.max()))
        of_largest = np.abs(outputs["pav"] - outputs["threshold"]).max(axis=-1) / np.abs(x).max(axis=-1)
        widest_of_largest = max(widest_of_largest, float(of_largest.max()))
        for i in np.flatnonzero(apart > 1.0):
            disagreeing += 1
            if args.no_oracle:
                continue
            exact = np.array(mp_threshold_mag_parts(x[i], k, lam, p, ORACLE_DIGITS)[0], dtype=np.float64)
            for method, y in outputs.items():
                error = float(errors_in_bounds(y[i], exact, x[i]))
                largest[method] = max(largest[method], error)
                if error > 1.0:
                    beyond[method] += 1
                    print(f"{method}: {error:.3g} bounds off, p = {p:g}, k = {k}, l = {lam!r}, x = {x[i].tolist()!r}")
    print(f"{args.batches * args.rows} rows, {disagreeing} where the methods differ beyond the bound; "
          f"their largest difference: {widest:.3g} bounds, {widest_of_largest:.3g} of the row's largest |x|")
    if args.no_oracle:
        return {}
    print("| method | rows beyond the bound (oracle) | largest error there (bounds) |")
    print("|---|---|---|")
    for method in beyond:
        print(f"| {method} | {beyond[method]} | {largest[method]:.3g} |")
    return {m: (beyond[m], largest[m]) for m in beyond}


if __name__ == "__main__":
    main()
