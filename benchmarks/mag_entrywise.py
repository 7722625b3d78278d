"""PAV against the threshold method on the magnitude, entry by entry, on short rows spanning many orders.

Rows of 3 to 9 entries: keys of one scale (0.5-2 times 10^c, c uniform in [-150, 150]), each lowered by
up to 120 orders, random signs (as `tests/_rows.rows_spanning_many_orders`); per batch of 64 rows one k,
one p from {5/4, 4/3, 3/2, 2, 3} and one strength 10^u, u uniform in [-2, 2].  A row where the two
methods differ by more than the bound of docs/methods.md (1e-12 of the entry plus 64 ulps of its input)
is solved by the threshold form in 600-digit arithmetic (`tests/_oracles.py`), and each method's
largest error there is reported in units of that bound.  The figures of docs/methods.md ("Solved after
commit 34ed5bf") come from here:

    python benchmarks/mag_entrywise.py --batches 3000 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _oracles import mp_threshold_mag_parts

import topk_numpy as tk

P_VALUES = (1.25, 4.0 / 3.0, 1.5, 2.0, 3.0)
BATCH = 64
ORACLE_DIGITS = 600  # rows whose free z underflow need 500 (docs/methods.md)


def spanning_rows(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    centre = rng.uniform(-150.0, 150.0, size=(batch, 1))
    lowered = rng.uniform(0.0, 120.0, size=(batch, n))
    signs = rng.choice([-1.0, 1.0], size=(batch, n))
    return rng.uniform(0.5, 2.0, size=(batch, n)) * 10.0 ** (centre - lowered) * signs


def errors_in_bounds(y: np.ndarray, reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row: the largest |y - reference| in units of 1e-12 |reference| + 64 eps |x| (0 where both are 0)."""
    bound = 1e-12 * np.abs(reference) + 64.0 * np.finfo(np.float64).eps * np.abs(x)
    diff = np.abs(y - reference)
    return np.where(diff > 0, diff / np.where(bound > 0, bound, 1.0), 0.0).max(axis=-1)


def main(argv: list[str] | None = None) -> dict[str, tuple[int, float]]:
    """Run the fuzz; returns per method (rows beyond the bound against the oracle, largest error in bounds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="batches of 64 rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    beyond = {"pav": 0, "threshold": 0}
    largest = {"pav": 0.0, "threshold": 0.0}
    disagreeing, widest = 0, 0.0
    for _ in range(args.batches):
        n = int(rng.integers(3, 10))
        k = int(rng.integers(1, n))
        p = float(rng.choice(P_VALUES))
        lam = float(10.0 ** rng.uniform(-2.0, 2.0))
        x = spanning_rows(rng, BATCH, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (ThresholdNotConverged: its results are still compared)
            outputs = {m: np.asarray(tk.soft_topk_mag(x, k, p=p, regularization_strength=lam, method=m))
                       for m in beyond}
        apart = errors_in_bounds(outputs["pav"], outputs["threshold"], x)
        widest = max(widest, float(apart.max()))
        for i in np.flatnonzero(apart > 1.0):
            disagreeing += 1
            exact = np.array(mp_threshold_mag_parts(x[i], k, lam, p, ORACLE_DIGITS)[0], dtype=np.float64)
            for method, y in outputs.items():
                error = float(errors_in_bounds(y[i], exact, x[i]))
                largest[method] = max(largest[method], error)
                if error > 1.0:
                    beyond[method] += 1
                    print(f"{method}: {error:.3g} bounds off, p = {p:g}, k = {k}, l = {lam!r}, x = {x[i].tolist()!r}")
    print(f"{args.batches * BATCH} rows, {disagreeing} where the methods differ beyond the bound; "
          f"their largest difference: {widest:.3g} bounds")
    print("| method | rows beyond the bound (oracle) | largest error there (bounds) |")
    print("|---|---|---|")
    for method in beyond:
        print(f"| {method} | {beyond[method]} | {largest[method]:.3g} |")
    return {m: (beyond[m], largest[m]) for m in beyond}


if __name__ == "__main__":
    main()
