"""Benchmark of the JAX operators against jnp.argsort, measured side by side.

Prints a Markdown table: jitted forward and forward+grad times of both soft
operators (float32, k = n/10, p = 4/3 and 2) as ratios to a jitted
`jnp.argsort` of the same data in the same run (medians of repeated runs,
warm-up and compilation excluded).  Forward+grad is
``jax.value_and_grad(lambda x: jnp.vdot(op(x), u))``: one host PAV call that
also returns the residuals, then the closed-form VJP in `jax.numpy`.

    python benchmarks/bench_jax.py             # full table
    python benchmarks/bench_jax.py --quick     # small shapes, a smoke run
    python benchmarks/bench_jax.py --method threshold   # another method than "auto"
    python benchmarks/bench_jax.py --write docs/jax.md   # and update the docs page
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import topk_jax as tk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as report

SHAPES = [(1, 10**6), (64, 4096), (16384, 64)]
QUICK_SHAPES = [(1, 10**4), (16, 256), (256, 64)]
EXPONENTS = [4.0 / 3.0, 2.0]
STRENGTH = 0.1


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """`_report.median_time` of `fn()` blocked until ready (the warm-up run compiles)."""
    return report.median_time(lambda: jax.block_until_ready(fn()), repeats)


def machine() -> str:
    return f"{report.machine()}, jax {jax.__version__} on {jax.default_backend()}"


def main() -> None:
    parser = report.table_parser(__doc__, 7)
    parser.add_argument("--method", default="auto", choices=["auto", "pav", "threshold", "dykstra"],
                        help="the operators' method (auto: pav on the CPU, threshold on a GPU or TPU)")
    args = parser.parse_args()
    shapes, repeats = report.table_size(args, SHAPES, QUICK_SHAPES)

    lines = [f"Machine: {machine()}."]
    method = "" if args.method == "auto" else f'method="{args.method}", '
    lines.append(f"float32, k = n/10, l = {STRENGTH}, {method}jitted, medians of {repeats} runs after a warm-up; "
                 "ratios to `jax.jit(jnp.argsort)(x)` (axis -1) of the same data in the same run.\n")
    lines.append("| shape | operator | p | argsort (ms) | forward (ms) | forward / argsort | fwd+grad (ms) "
                 "| fwd+grad / argsort |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)
    rng = np.random.default_rng(0)
    argsort = jax.jit(lambda x: jnp.argsort(x, axis=-1))
    for shape in shapes:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        u = jnp.asarray(rng.normal(size=shape), jnp.float32)
        k = max(1, shape[1] // 10)
        t_sort = median_time(lambda x=x: argsort(x), repeats)
        for op in ("mask", "mag"):
            soft = getattr(tk, f"soft_topk_{op}")
            for p in EXPONENTS:
                def fn(x, soft=soft, k=k, p=p):
                    return soft(x, k, p=p, regularization_strength=STRENGTH, method=args.method)

                forward = jax.jit(fn)
                both = jax.jit(jax.value_and_grad(lambda x, u, fn=fn: jnp.vdot(fn(x), u)))
                t_fwd = median_time(lambda forward=forward, x=x: forward(x), repeats)
                t_both = median_time(lambda both=both, x=x, u=u: both(x, u), repeats)
                lines.append(f"| {shape} | {op} | {p:.3g} | {t_sort * 1e3:.2f} | {t_fwd * 1e3:.2f} "
                             f"| {t_fwd / t_sort:.2f} | {t_both * 1e3:.2f} | {t_both / t_sort:.2f} |")
                print(lines[-1])
    if args.write:
        report.write_section(args.write, "bench_jax", "\n".join(lines))


if __name__ == "__main__":
    main()
