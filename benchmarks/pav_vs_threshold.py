"""A fuzz of PAV against the threshold method, the two exact methods: the largest deviation per operator and p.

The PAV entries of docs/methods.md ("Solved after commit b606d97") come from here.  Rows of nine
kinds (the six of `tests/_rows.rows_of_kind`; magnitudes spanning 1e+-20 around 1e-100..1e100;
half-integer ties scaled by 1e-307..1e-10; tiny spanning rows with a third of their entries tied),
n = 9, 64 and 1024, l in {0.01, 0.1, 1, 10, 100}, float64; the magnitude's deviation relative to
the row's largest |x|.  PAV runs through its kernel (`topk_core._pav_path`), so that p above 8, where
`method="pav"` is refused, can be fuzzed too.  With ``--vjp``: the two methods' VJPs instead (the threshold
method's public residuals, PAV's from its kernel), relative to the larger of the two per row; rows at a kink (half-integer ties
whose exact threshold meets a key or a saturation point) and rows whose Jacobian overflows (ties of
tiny keys) differ by O(1) there legitimately, the other kinds should not.  The last column counts
the batches (one per kind, n, l) on which the threshold method warned `ThresholdNotConverged`
(its results are still compared; docs/methods.md, step 2 of the threshold method):

    python benchmarks/pav_vs_threshold.py --seed 11
    python benchmarks/pav_vs_threshold.py --p 5,10 --kinds normal
    python benchmarks/pav_vs_threshold.py --vjp --p 1.25,1.5,2,3,4 --kinds normal,spread,dominant,span
    python benchmarks/pav_vs_threshold.py --p 20,50,100 --seed 12
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _rows import rows_of_kind, spanning_row

import topk_core
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._pav_path import pav_mag, pav_mask

KINDS = ("normal", "ties", "spread", "dominant", "offset", "uniform", "span", "tinyties", "tinyspan")
SHAPES = ((9, 3, 400), (64, 8, 200), (1024, 32, 20))  # (n, k, rows)
STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


def fuzz_rows(rng: np.random.Generator, kind: str, batch: int, n: int) -> np.ndarray:
    if kind == "span":
        return np.stack([spanning_row(int(rng.integers(1 << 30)), 20, n, centre=rng.uniform(-100, 100))
                         for _ in range(batch)])
    if kind == "tinyspan":
        x = np.stack([spanning_row(int(rng.integers(1 << 30)), 5, n, centre=rng.uniform(-305, -200))
                      for _ in range(batch)])
        x[:, : n // 3] = x[:, :1]
        return x
    if kind == "tinyties":
        return np.round(rng.normal(size=(batch, n)) * 2) / 2 * 10.0 ** rng.uniform(-307, -10, size=(batch, 1))
    return rows_of_kind(rng, batch, n, kind, np.float64)


def _output_deviation(op: str, x: np.ndarray, k: int, p: float, lam: float, rng: np.random.Generator) -> float:
    """The largest deviation of PAV's kernel from the threshold method (the magnitude's relative to the row's
    largest |x|)."""
    kernel = pav_mask if op == "mask" else pav_mag
    with np.errstate(all="ignore"):
        pav = kernel(x, k, lam, conjugate_exponent(p), with_residuals=False)[0]
    exact = getattr(topk_core, f"soft_topk_{op}")(x, k, p=p, regularization_strength=lam, method="threshold")
    scale = 1.0 if op == "mask" else np.abs(x).max(axis=-1, keepdims=True)
    return float((np.abs(pav - exact) / scale).max())


def _vjp_deviation(op: str, x: np.ndarray, k: int, p: float, lam: float, rng: np.random.Generator) -> float:
    """The largest deviation of the threshold method's VJP from PAV's, relative to the larger per row
    (rows where either is not finite are left out)."""
    u = rng.normal(size=x.shape)
    kernel = pav_mask if op == "mask" else pav_mag
    forward = getattr(topk_core, f"soft_topk_{op}_forward")
    vjp = getattr(topk_core, f"{op}_vjp_from_residuals")
    with np.errstate(all="ignore"):
        residuals = (kernel(x, k, lam, conjugate_exponent(p), with_residuals=True)[1],
                     forward(x, k, p=p, regularization_strength=lam, method="threshold")[1])
        products = [vjp(r, u) for r in residuals]
        finite = np.isfinite(products[0]).all(axis=-1) & np.isfinite(products[1]).all(axis=-1)
        scale = np.maximum(np.abs(products[0]).max(axis=-1), np.abs(products[1]).max(axis=-1))
        dev = np.abs(products[0] - products[1]).max(axis=-1) / np.where(scale > 0, scale, 1.0)
    return float(np.where(finite, dev, 0.0).max())


def main(argv: list[str] | None = None) -> dict[tuple[str, float], tuple[float, int, str, float, int]]:
    """Run the fuzz (`argv`: the command line's arguments) and print its table; returns the worst case per
    (operator, p): (deviation, n, kind of rows, l, batches on which the threshold method warned)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p", default="2.5,3,3.5,3.9,4", help="comma-separated exponents")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds of rows")
    parser.add_argument("--vjp", action="store_true", help="compare the VJPs (of a random cotangent)")
    args = parser.parse_args(argv)
    ps = [float(v) for v in args.p.split(",")]
    deviation = _vjp_deviation if args.vjp else _output_deviation
    rng = np.random.default_rng(args.seed)
    worst: dict[tuple[str, float], tuple[float, int, str, float]] = {}
    warned: dict[tuple[str, float], int] = {}
    for n, k, batch in SHAPES:
        for kind in args.kinds.split(","):
            x = fuzz_rows(rng, kind, batch, n)
            for p in ps:
                for lam in STRENGTHS:
                    for op in ("mask", "mag"):
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always", topk_core.ThresholdNotConverged)
                            dev = deviation(op, x, k, p, lam, rng)
                        stopped = any(issubclass(w.category, topk_core.ThresholdNotConverged) for w in caught)
                        warned[(op, p)] = warned.get((op, p), 0) + int(stopped)
                        if dev >= worst.get((op, p), (-1.0,))[0]:
                            worst[(op, p)] = (dev, n, kind, lam)
    print("| operator | p | largest deviation | n | rows | l | threshold warned |")
    print("|---|---|---|---|---|---|---|")
    for (op, p), (dev, n, kind, lam) in sorted(worst.items()):
        print(f"| {op} | {p:g} | {dev:.2g} | {n} | {kind} | {lam:g} | {warned[(op, p)]} |")
    return {key: (*value, warned[key]) for key, value in worst.items()}


if __name__ == "__main__":
    main()
