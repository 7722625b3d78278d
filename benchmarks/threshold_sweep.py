"""Sweeps of the threshold method across data: its loop's iterations, and its outputs against PAV.

The figures of docs/methods.md on changes to the threshold method's root finder come from here.
Run it on the working tree, and with ``--core`` on a checkout of an earlier commit (``git worktree
add /tmp/old COMMIT``, a4c77a4 or later), whose ``topk_core`` is then imported instead, to
compare versions:

    python benchmarks/threshold_sweep.py iterations --save /tmp/new.json
    python benchmarks/threshold_sweep.py iterations --core /tmp/old --against /tmp/new.json
    python benchmarks/threshold_sweep.py accuracy
    python benchmarks/threshold_sweep.py accuracy --core /tmp/old

``iterations``: the first root finder's loop iterations (what a jitted or compiled solve runs: until
the slowest row has converged; counted by `threshold_iterations.loop_iterations`) on 504 cases: seven kinds of rows (normal, uniform, exponential,
Cauchy, lognormal with sigma 3, ties, normal times 10), three shapes ((4096, 64), (1024, 256),
(64, 4096) with k = 6, 8, 100), both operators, p in {4/3, 2, 3}, l in {0.1, 1}, float32 and
float64; the total, and with ``--against`` (a file saved by ``--save``) the geometric mean and the
worst of the per-case ratios (this run over the saved one).  ``--loops every`` counts every loop of
each solve (the first, and those that solve rows again next to a key, for p > 2 every row), what a
compiled solve runs in all.

``accuracy``: the largest deviation of the threshold method's outputs from PAV's (float64) per
operator, p and dtype, over 900 rows (300 each of n = 16, 64, 257) of zeros, ties, infinities,
Cauchy and lognormal keys and scales 1e-5 to 1e13, with l in {0.1, 1}; the magnitude's relative to
|x|.  Warnings are errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import numpy as np

SHAPES = ((4096, 64, 6), (1024, 256, 8), (64, 4096, 100))
EXPONENTS = (4.0 / 3.0, 2.0, 3.0)
STRENGTHS = (0.1, 1.0)
KINDS = ("normal", "uniform", "exp", "cauchy", "lognormal3", "ties", "logits*10")


def _rows(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "uniform":
        return rng.uniform(-1, 1, shape)
    if kind == "exp":
        return rng.exponential(1, shape)
    if kind == "cauchy":
        return rng.standard_cauchy(shape)
    if kind == "lognormal3":
        return rng.lognormal(0, 3, shape)
    if kind == "ties":
        return np.round(rng.standard_normal(shape) * 3) / 3
    return rng.standard_normal(shape) * 10


def _p_name(p: float) -> str:
    return "4/3" if abs(p - 4.0 / 3.0) < 1e-12 else f"{p:g}"


def iterations(args: argparse.Namespace) -> dict[str, int]:
    from threshold_iterations import SOLVERS, every_loop_iterations, loop_iterations  # after --core: its solvers

    rng = np.random.default_rng(0)
    cases: dict[str, int] = {}
    by_solve: dict[str, int] = {}  # totals per operator and p
    for kind in KINDS:
        for dtype in ("float32", "float64"):
            for rows, n, k in SHAPES[: args.shapes]:
                x = _rows(kind, rng, (rows, n)).astype(dtype)
                for op in SOLVERS:
                    for p in EXPONENTS:
                        for lam in STRENGTHS:
                            key = f"{kind} {dtype} ({rows}, {n}) k={k} {op} p={_p_name(p)} l={lam:g}"
                            if args.loops == "every":
                                cases[key] = sum(every_loop_iterations(op, x, k, lam, p))
                            else:
                                cases[key] = loop_iterations(op, x, k, lam, p)[0]
                            solve = f"{op} p={_p_name(p)}"
                            by_solve[solve] = by_solve.get(solve, 0) + cases[key]
            print(f"{kind} {dtype}: {sum(v for c, v in cases.items() if c.startswith(f'{kind} {dtype} '))} iterations",
                  flush=True)
    print("per operator and p: " + ", ".join(f"{solve} {count}" for solve, count in by_solve.items()))
    print(f"total: {sum(cases.values())} iterations over {len(cases)} cases")
    if args.against:
        with open(args.against) as f:
            other = json.load(f)
        shared = [c for c in cases if c in other]
        ratios = sorted(((cases[c] / other[c], c) for c in shared), reverse=True)
        geomean = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
        print(f"against {args.against}: {sum(cases[c] for c in shared)} / {sum(other[c] for c in shared)} iterations, "
              f"geometric mean of the ratios {geomean:.3f}, cases above 1.2x: {sum(r > 1.2 for r, _ in ratios)}")
        for r, c in ratios[:4]:
            print(f"  {r:.2f}x  {cases[c]} vs {other[c]}  {c}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(cases, f, indent=0)
    return cases


def _stress_rows(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    out = []
    for i in range(count):
        kind = i % 7
        scale = 10.0 ** rng.uniform(-5, 13)
        x = rng.standard_normal(n) * scale
        if kind == 1:
            x[rng.random(n) < 0.3] = 0.0
        if kind == 2:
            x = np.round(x / scale * 2) * scale / 2
        if kind == 3:
            x = rng.standard_cauchy(n) * scale
        if kind == 4:
            x = rng.lognormal(0, 3, n) * rng.choice([-1, 1], n)
        if kind == 5:
            x[rng.integers(n)] = np.inf if rng.random() < 0.5 else -np.inf
        if kind == 6:
            x = rng.uniform(-1, 1, n)
        out.append(x)
    return np.array(out)


def accuracy(args: argparse.Namespace) -> dict[tuple[str, str, str], float]:
    import topk_numpy as tn

    rng = np.random.default_rng(123)
    worst: dict[tuple[str, str, str], float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _accuracy_rows(tn, rng, args.rows, worst)
    print("| operator | p | dtype | largest deviation from PAV |")
    print("|---|---|---|---|")
    for (op, p, dtype), value in sorted(worst.items()):
        print(f"| {op} | {p} | {dtype} | {value:.2e} |")
    return worst


def _accuracy_rows(tn, rng: np.random.Generator, count: int, worst: dict) -> None:
    for n, k in ((16, 3), (64, 6), (257, 20)):
        x = _stress_rows(rng, count, n)
        for op, fn in (("mask", tn.soft_topk_mask), ("mag", tn.soft_topk_mag)):
            for p in (1.25, 4.0 / 3.0, 2.0, 3.0):
                for lam in STRENGTHS:
                    ref = fn(x, k, p=p, regularization_strength=lam, method="pav")
                    for dtype in (np.float32, np.float64):
                        y = fn(x.astype(dtype), k, p=p, regularization_strength=lam, method="threshold")
                        with np.errstate(all="ignore"):
                            dev = np.abs(y.astype(np.float64) - ref)
                            if op == "mag":
                                dev = dev / np.maximum(np.abs(x), 1e-300)
                            dev = np.where(np.isfinite(x), dev, 0.0)
                        key = (op, "5/4" if p == 1.25 else _p_name(p), np.dtype(dtype).name)
                        worst[key] = max(worst.get(key, 0.0), float(np.nanmax(dev)))


def main(argv: list[str] | None = None) -> object:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", choices=("iterations", "accuracy"))
    parser.add_argument("--core", help="a checkout whose topk_core (and adapters) to import instead of the installed one")
    parser.add_argument("--save", help="iterations: save the per-case counts to this JSON file")
    parser.add_argument("--against", help="iterations: compare with counts saved by --save")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="iterations: the first this many shapes")
    parser.add_argument("--loops", choices=("first", "every"), default="first",
                        help="iterations: count the first root finder's loop, or every loop of the solve")
    parser.add_argument("--rows", type=int, default=300, help="accuracy: rows per length")
    args = parser.parse_args(argv)
    if args.core:
        sys.path[:0] = [args.core, f"{args.core}/adapters"]
    import topk_core

    print(f"topk_core from {topk_core.__file__}")
    return iterations(args) if args.sweep == "iterations" else accuracy(args)


if __name__ == "__main__":
    main()
