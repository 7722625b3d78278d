"""Two versions of the core side by side in one process: the way changes to the CPU kernels are measured.

On a shared machine, timings of separate processes drift by 10-25% between
slow and quiet phases that last minutes; two versions whose calls alternate
in one process see the same phases.  The script copies `topk_core` of a git
revision (A) and of the working tree or a second revision (B) into a scratch
directory as the packages `topk_core_a` and `topk_core_b` (the core imports
itself by relative imports only, so each copy is a package of its own with
its own Numba cache), then alternates forward and forward+VJP calls of one
operator and prints the best times as ratios to `np.sort` and B / A.

    python benchmarks/ab_versions.py f33692f                                  # A: that commit, B: working tree
    python benchmarks/ab_versions.py f33692f HEAD --op mask --p 2 --shape 262144x16 --rounds 21
    python benchmarks/ab_versions.py HEAD~1 --strength 1                      # larger strengths
    python benchmarks/ab_versions.py HEAD~1 --shape 8192x512 --k 8            # another k than max(2, n/8)
    python benchmarks/ab_versions.py HEAD~1 --method threshold                # another method than auto
    python benchmarks/ab_versions.py HEAD~1 --jax --op mask --shape 65536x64  # the jitted threshold method

With `--parts` the one-process run also times the two halves of forward+VJP apart: the forward with
residuals, and the VJP from residuals computed once (how the regression of the (262144, 16)
magnitude was split between the lane solver and the products; docs/methods.md).

    python benchmarks/ab_versions.py 7e378cd --parts --shape 262144x16

With `--fresh N` each version's forward+VJP is timed instead in N fresh processes of its own
(alternating A, B, and `np.sort`), which make no other allocation: what the memory allocator
does there (glibc's thresholds for handing memory back follow the blocks a process freed before)
one process alternating both versions cannot show.  Each line gives the best and median
time and the page faults per call.

    python benchmarks/ab_versions.py c9909d3~1 c9909d3 --fresh 3 --shape 262144x16

With `--jax` the calls are the core's threshold method in `jax.numpy` under `jax.jit`, its loop one
`jax.lax.while_loop` (what the JAX adapter runs on a GPU), and the VJP the Array-API product.

The first run of each version compiles its kernels (minutes); the copies are
kept in `--workdir` and refreshed only where files changed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import forward_vjp, parse_exponents, parse_shapes

ROOT = Path(__file__).resolve().parent.parent


def _copy_version(revision: str | None, dest: Path) -> None:
    """The `topk_core` of `revision` (None: the working tree) into `dest`, rewriting changed files only."""
    with tempfile.TemporaryDirectory() as tmp:
        if revision is None:
            source = ROOT / "topk_core"
        else:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "topk_core"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            source = Path(tmp) / "topk_core"
        wanted = {p.relative_to(source) for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        for rel in wanted:
            target = dest / rel
            data = (source / rel).read_bytes()
            if not target.exists() or target.read_bytes() != data:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        for path in list(dest.rglob("*.py")):
            if path.relative_to(dest) not in wanted:
                path.unlink()


def _entry_points(tc: object, op: str, p: float, lam: float, method: str) -> tuple[Callable, Callable, dict]:
    """The operator's forward with residuals, its VJP from residuals, and the keywords of every call."""
    kw = dict(p=p, regularization_strength=lam, method=method)
    return getattr(tc, f"soft_topk_{op}_forward"), getattr(tc, f"{op}_vjp_from_residuals"), kw


def _calls(tc: object, op: str, x: np.ndarray, u: np.ndarray, k: int, p: float, lam: float, method: str = "auto"
           ) -> tuple[Callable[[], object], Callable[[], object]]:
    with_res, vjp, kw = _entry_points(tc, op, p, lam, method)
    return partial(getattr(tc, f"soft_topk_{op}"), x, k, **kw), partial(forward_vjp, with_res, vjp, x, k, u, kw)


def _parts(tc: object, op: str, x: np.ndarray, u: np.ndarray, k: int, p: float, lam: float, method: str = "auto"
           ) -> tuple[Callable[[], object], Callable[[], object]]:
    """The forward with residuals, and the VJP of `u` from residuals computed once: forward+VJP's halves."""
    with_res, vjp, kw = _entry_points(tc, op, p, lam, method)
    residuals = with_res(x, k, **kw)[1]
    return partial(with_res, x, k, **kw), partial(vjp, residuals, u)


def _jax_calls(tc: object, op: str, x: np.ndarray, u: np.ndarray, k: int, p: float, lam: float, method: str = "auto"
               ) -> tuple[Callable[[], object], Callable[[], object]]:
    """The jitted threshold method's forward and forward+VJP (`method`: `_calls`' signature, unused)."""
    import jax
    import jax.numpy as jnp

    threshold = importlib.import_module(f"{tc.__name__}._agnostic.threshold")
    jacobians = importlib.import_module(f"{tc.__name__}._agnostic.jacobians")
    q = importlib.import_module(f"{tc.__name__}._agnostic.regularizer").conjugate_exponent(p)
    solver = getattr(threshold, f"threshold_{op}")
    vjp = jacobians.mask_jvp_rows if op == "mask" else jacobians.mag_vjp_rows

    # The JAX adapter's hook on accelerators (`topk_jax._soft._native_solve`), where the version takes it.
    hooks = {}
    if "order_statistics" in inspect.signature(solver).parameters:
        from topk_jax._soft import _order_statistics

        hooks["order_statistics"] = _order_statistics

    def solve(rows: jax.Array) -> tuple[jax.Array, object]:
        return solver(rows, k, lam, q, jnp, loop=jax.lax.while_loop, **hooks)

    forward = jax.jit(lambda rows: solve(rows)[0])
    with_vjp = jax.jit(lambda rows, cot: (lambda y, res: (y, vjp(res, cot, jnp)))(*solve(rows)))
    xj, uj = jnp.asarray(x), jnp.asarray(u)
    return (lambda: np.asarray(jax.block_until_ready(forward(xj))),
            lambda: jax.block_until_ready(with_vjp(xj, uj)))


def _k(args: argparse.Namespace, n: int) -> int:
    """The k of the calls: `--k`, or max(2, n/8) as in the benchmarks' tables."""
    return max(2, n // 8) if args.k is None else args.k


def _child(args: argparse.Namespace, batch: int, n: int, p: float) -> None:
    """One fresh process of `--fresh`: `--rounds` forward+VJP calls of one version (or `np.sort`), nothing else."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    u = rng.normal(size=(batch, n)).astype(np.float32)
    if args.child == "sort":
        fn: Callable[[], object] = partial(np.sort, x, axis=-1)
    else:
        sys.path.insert(0, args.workdir)
        tc = importlib.import_module(f"topk_core_{args.child.lower()}")
        fn = _calls(tc, args.op, x, u, _k(args, n), p, args.strength, args.method)[1]
    fn()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.rounds
    print(f"{min(times) * 1e3:.3f} {np.median(times) * 1e3:.3f} {faults:.0f}")


def _fresh(args: argparse.Namespace, n: int) -> None:
    """`--fresh`: each version (and np.sort) timed in fresh processes of its own, alternating (rows of `n`)."""
    runs: dict[str, list[tuple[float, float, float]]] = {"sort": [], "A": [], "B": []}
    k = _k(args, n)
    for r in range(args.fresh):
        for name in ("sort", "A", "B") if r % 2 == 0 else ("B", "A", "sort"):
            command = [sys.executable, __file__, "-", "--child", name, "--op", args.op, "--p", args.p, "--shape",
                       args.shape, "--strength", str(args.strength), "--rounds", str(args.rounds), "--workdir",
                       args.workdir, "--method", args.method, "--k", str(k)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-3:]
            runs[name].append(tuple(float(v) for v in line))
    sort = min(best for best, _, _ in runs["sort"])
    print(f"{args.op} p={args.p} {args.shape} l={args.strength} k={k}, forward+VJP in fresh processes "
          f"({args.fresh} each, {args.rounds} calls): np.sort {sort:.2f} ms")
    for name in ("A", "B"):
        for best, median, faults in runs[name]:
            print(f"  {name}  best {best / sort:.3f}x np.sort  median {median / sort:.3f}x  "
                  f"{faults:.0f} page faults per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a", help="git revision of version A")
    parser.add_argument("rev_b", nargs="?", default=None, help="git revision of version B (default: working tree)")
    parser.add_argument("--op", choices=["mask", "mag"], default="mag")
    parser.add_argument("--p", default="4/3", help="exponent: 4/3, 2, 1.5, ...")
    parser.add_argument("--shape", default="16384x64", help="rows x n")
    parser.add_argument("--strength", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=None, help="k (default: max(2, n/8), as the benchmarks')")
    parser.add_argument("--method", default="auto", help="the core's method (not with --jax: its threshold method)")
    parser.add_argument("--rounds", type=int, default=31, help="alternating calls of each version")
    parser.add_argument("--jax", action="store_true", help="the jitted threshold method in jax.numpy")
    parser.add_argument("--parts", action="store_true",
                        help="also time the forward with residuals and the VJP apart (not with --jax or --fresh)")
    parser.add_argument("--fresh", type=int, default=0, metavar="N",
                        help="time forward+VJP in N fresh processes per version instead (see above)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sparse_topk_ab"))
    args = parser.parse_args()
    (p,), ((batch, n),) = parse_exponents(args.p), parse_shapes(args.shape)
    if args.child:
        _child(args, batch, n, p)
        return
    if args.jax and args.method != "auto":
        parser.error("--method picks the NumPy calls' method; with --jax the calls are the threshold method's")
    if args.parts and (args.jax or args.fresh):
        parser.error("--parts times the NumPy calls in one process: not with --jax or --fresh")

    work = Path(args.workdir)
    _copy_version(args.rev_a, work / "topk_core_a")
    _copy_version(args.rev_b, work / "topk_core_b")
    sys.path.insert(0, str(work))
    if args.fresh:
        _fresh(args, n)
        return
    versions = {"A": importlib.import_module("topk_core_a"), "B": importlib.import_module("topk_core_b")}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    u = rng.normal(size=(batch, n)).astype(np.float32)
    k = _k(args, n)
    make = _jax_calls if args.jax else _calls
    calls = {name: make(tc, args.op, x, u, k, p, args.strength, args.method) for name, tc in versions.items()}
    kinds = ("forward", "fwd+VJP")
    if args.parts:
        kinds += ("fwd+res", "VJP")
        for name, tc in versions.items():
            calls[name] += _parts(tc, args.op, x, u, k, p, args.strength, args.method)
    deviation = np.abs(calls["A"][0]() - calls["B"][0]()).max()

    best: dict[tuple[str, str], float] = {}

    def timed(key: tuple[str, str], fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        best[key] = min(best.get(key, np.inf), time.perf_counter() - start)

    for fns in calls.values():
        for fn in fns:
            fn()  # compilation and warm-up
    for r in range(args.rounds):
        timed(("sort", ""), lambda: np.sort(x, axis=-1))
        for i, kind in enumerate(kinds):
            order = ("A", "B") if r % 2 else ("B", "A")
            for name in order:
                timed((name, kind), calls[name][i])
    sort = best["sort", ""]
    print(f"{args.op} p={args.p} {batch}x{n} l={args.strength} k={k}: np.sort {sort * 1e3:.2f} ms, "
          f"max |A - B| {deviation:.1e}")
    for kind in kinds:
        a, b = best["A", kind], best["B", kind]
        print(f"  {kind:8s} A {a / sort:.3f}x np.sort  B {b / sort:.3f}x np.sort  B / A {b / a:.3f}")


if __name__ == "__main__":
    main()
