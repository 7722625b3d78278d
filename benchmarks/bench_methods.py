"""Benchmark of the core's methods (PAV, threshold, Dykstra) on the CPU, measured side by side with np.sort.

Prints Markdown tables:

1. NumPy arrays: forward and forward+VJP times of both soft operators
   (float32, k = max(2, n/8)) for every method, as ratios to `np.sort` of the
   same data in the same run (best of repeated runs, warm-up excluded: this
   shared machine has slow phases of seconds, which medians do not filter),
   with the largest deviation from PAV's output.  PAV is timed right after
   np.sort, before the other methods, whose large temporaries change the
   allocator's state (and the cost of fresh memory) for what runs after.
2. The rule of method="auto" on other CPU backends: forward times of PAV and
   threshold on torch (CPU) tensors and JAX (CPU) arrays.
3. PyTorch, p = 2 mask, forward+backward: `topk_torch.soft_topk_mask` against
   `entmax.budget_bisect(x / l, budget=k)`, which computes the same function.

    python benchmarks/bench_methods.py                          # full tables (a few minutes)
    python benchmarks/bench_methods.py --quick                  # small shapes, a smoke run
    python benchmarks/bench_methods.py --write docs/methods.md  # and update the docs page
    python benchmarks/bench_methods.py --write docs/methods.md --section bench_methods_avx2  # on a CPU without AVX-512
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np

import topk_core as tc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import best_time, forward_vjp, machine, table_parser, table_size, write_section

SHAPES = [(1, 10**6), (64, 4096), (16384, 64), (262144, 16)]
QUICK_SHAPES = [(1, 10**4), (16, 256), (256, 64), (1024, 16)]
STRENGTH = 0.1
METHODS = [("pav", 4.0 / 3.0), ("threshold", 4.0 / 3.0), ("pav", 2.0), ("threshold", 2.0), ("dykstra", 2.0)]


def _k(shape: tuple[int, int]) -> int:
    return max(2, shape[1] // 8)



def _forward_backward(fn: Callable, x: object, u: object) -> object:
    xg = x.detach().requires_grad_()
    fn(xg).backward(u)
    return xg.grad


def _method_row(x: np.ndarray, u: np.ndarray, k: int, op: str, method: str, p: float, repeats: int,
                dykstra_repeats: int) -> tuple[float, float, float]:
    """(forward time, forward+VJP time, largest deviation from PAV) of one operator and method."""
    forward = getattr(tc, f"soft_topk_{op}")
    with_res = getattr(tc, f"soft_topk_{op}_forward")
    vjp = getattr(tc, f"{op}_vjp_from_residuals")
    reps, warm = (dykstra_repeats, 0) if method == "dykstra" else (repeats, 1)
    kw = dict(p=p, regularization_strength=STRENGTH, method=method)
    t_fwd = best_time(partial(forward, x, k, **kw), reps, warmup=warm)
    t_both = best_time(partial(forward_vjp, with_res, vjp, x, k, u, kw), reps, warmup=warm)
    dev = np.abs(forward(x, k, **kw).astype(np.float64) - forward(x, k, p=p, method="pav")).max()
    return t_fwd, t_both, dev


def numpy_table(shapes: list[tuple[int, int]], repeats: int, dykstra_repeats: int) -> list[str]:
    lines = [
        "| shape | operator | p | method | forward (ms) | forward / np.sort | fwd+VJP (ms) | fwd+VJP / np.sort "
        "| max abs dev. from PAV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        u = rng.normal(size=shape).astype(np.float32)
        k = _k(shape)
        t_sort = best_time(lambda x=x: np.sort(x, axis=-1), repeats)
        # PAV first, next to np.sort: the other methods' large temporaries change the state of
        # the process's allocator, and with it the cost of fresh memory (docs/faq.md).
        rows = {}
        for method in ("pav", "threshold", "dykstra"):
            for op in ("mask", "mag"):
                for m, p in METHODS:
                    if m == method:
                        rows[op, m, p] = _method_row(x, u, k, op, m, p, repeats, dykstra_repeats)
        for op in ("mask", "mag"):
            for method, p in METHODS:
                t_fwd, t_both, dev = rows[op, method, p]
                line = (
                    f"| {shape} | {op} | {p:.3g} | {method} | {t_fwd * 1e3:.1f} | {t_fwd / t_sort:.2f} "
                    f"| {t_both * 1e3:.1f} | {t_both / t_sort:.2f} | {dev:.1e} |"
                )
                lines.append(line)
                print(line, flush=True)
        lines.append(f"| {shape} | np.sort | | | {t_sort * 1e3:.1f} | 1 | | | |")
        print(lines[-1], flush=True)
    return lines


def auto_table(shapes: list[tuple[int, int]], repeats: int) -> list[str]:
    lines = [
        "| backend | shape | PAV forward (ms) | threshold forward (ms) | threshold / PAV |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    backends: list[tuple[str, Callable[[np.ndarray], object]]] = []
    try:
        import torch

        backends.append((f"torch {torch.__version__} (CPU)", lambda a: torch.asarray(a)))
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp

        backends.append((f"jax {jax.__version__} (CPU)", lambda a: jnp.asarray(a)))
    except ImportError:
        pass
    rng = np.random.default_rng(1)
    for name, convert in backends:
        for shape in shapes:
            x = convert(rng.normal(size=shape).astype(np.float32))
            k = _k(shape)
            times = {
                method: best_time(partial(tc.soft_topk_mask, x, k, method=method), repeats)
                for method in ("pav", "threshold")
            }
            line = (
                f"| {name} | {shape} | {times['pav'] * 1e3:.1f} | {times['threshold'] * 1e3:.1f} "
                f"| {times['threshold'] / times['pav']:.1f} |"
            )
            lines.append(line)
            print(line, flush=True)
    return lines


def _budget(budget_bisect: Callable, a: object, k: int) -> object:
    return budget_bisect(a / STRENGTH, budget=k)


def entmax_table(shapes: list[tuple[int, int]], repeats: int) -> list[str]:
    try:
        import torch
        from entmax import budget_bisect

        import topk_torch
    except ImportError as err:
        return [f"(skipped: {err})"]
    lines = [
        "| shape | budget_bisect (ms) | topk_torch auto (ms) | auto / budget_bisect "
        "| topk_torch threshold (ms) | threshold / budget_bisect |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(2)
    for shape in shapes:
        x = torch.asarray(rng.normal(size=shape).astype(np.float32))
        u = torch.asarray(rng.normal(size=shape).astype(np.float32))
        k = _k(shape)

        entmax_fn = partial(_budget, budget_bisect, k=k)
        auto_fn = partial(topk_torch.soft_topk_mask, k=k, p=2.0, regularization_strength=STRENGTH)
        thr_fn = partial(topk_torch.soft_topk_mask, k=k, p=2.0, regularization_strength=STRENGTH, method="threshold")
        t_ent = best_time(partial(_forward_backward, entmax_fn, x, u), repeats)
        t_auto = best_time(partial(_forward_backward, auto_fn, x, u), repeats)
        t_thr = best_time(partial(_forward_backward, thr_fn, x, u), repeats)
        line = (
            f"| {shape} | {t_ent * 1e3:.1f} | {t_auto * 1e3:.1f} | {t_auto / t_ent:.2f} | {t_thr * 1e3:.1f} "
            f"| {t_thr / t_ent:.2f} |"
        )
        lines.append(line)
        print(line, flush=True)
    return lines


def main() -> None:
    parser = table_parser(__doc__, 11, "tables")
    parser.add_argument("--dykstra-repeats", type=int, default=1, help="Dykstra runs (no warm-up; it is slow)")
    parser.add_argument("--section", default="bench_methods",
                        help="the page's section to write (its markers); another for another CPU's tables")
    args = parser.parse_args()
    # Dykstra stops at its default max_iter on the long rows; the table's last column says how far from PAV.
    warnings.simplefilter("ignore", tc.DykstraNotConverged)
    shapes, repeats = table_size(args, SHAPES, QUICK_SHAPES)
    head = [
        f"Machine: {machine()}, NumPy {np.__version__}.",
        f"float32, k = max(2, n/8), l = {STRENGTH}; best of {repeats} runs after a warm-up "
        f"(Dykstra: {args.dykstra_repeats} run, default max_iter and tol); ratios to `np.sort` of the same data "
        "in the same run.",
        "",
    ]
    print("\n".join(head), flush=True)
    out = [*head, *numpy_table(shapes, repeats, args.dykstra_repeats), ""]
    out += ["Forward times of the p = 4/3 mask on other CPU backends (what `method=\"auto\"` chooses between):", ""]
    out += [*auto_table(shapes, repeats), ""]
    out += ["PyTorch (CPU), p = 2 mask, forward + backward, against `entmax.budget_bisect(x / l, budget=k)`:", ""]
    out += entmax_table(shapes, repeats)
    if args.write:
        write_section(args.write, args.section, "\n".join(out))


if __name__ == "__main__":
    main()
