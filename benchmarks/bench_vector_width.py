"""What 512-bit vectors bring the PAV method's CPU kernels on a CPU with AVX-512.

LLVM, which compiles the Numba kernels, prefers 256-bit vectors on most Intel
CPUs with AVX-512 (a guard against the frequency drops of older ones); the
kernels lift that preference for their own functions
(`topk_core._pav.vector_width`).  This script measures what that brings: it
times the forward and forward+VJP of both operators (`method="auto"`,
float32, k = max(2, n/8), l = 0.1) as ratios to `np.sort` of the same data,
in fresh processes, alternately as installed and with the AVX-512 features
taken out of the target (the environment variable `NUMBA_CPU_FEATURES`:
the host's features with every `avx512*` one disabled, so 256-bit vectors at
most), each configuration compiled once, untimed, before, and prints the best
ratio of each over the rounds.

    python benchmarks/bench_vector_width.py                         # the table
    python benchmarks/bench_vector_width.py --write docs/faq.md     # and update the FAQ

On a CPU without AVX-512 it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import best_time, forward_vjp, machine, write_section

SHAPES = [(16384, 64), (262144, 16), (64, 4096)]
STRENGTH = 0.1
EXPONENTS = (2.0, 4.0 / 3.0)



def child(repeats: int) -> dict[str, list[float]]:
    """Ratios to np.sort (forward, forward+VJP) of every shape, operator and p, in this process."""
    import topk_core as tc

    rng = np.random.default_rng(0)
    ratios = {}
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        u = rng.normal(size=shape).astype(np.float32)
        k = max(2, shape[1] // 8)
        t_sort = best_time(partial(np.sort, x, axis=-1), repeats)
        for op in ("mask", "mag"):
            forward = getattr(tc, f"soft_topk_{op}")
            with_res = getattr(tc, f"soft_topk_{op}_forward")
            vjp = getattr(tc, f"{op}_vjp_from_residuals")
            for p in EXPONENTS:
                kw = dict(p=p, regularization_strength=STRENGTH)
                t_fwd = best_time(partial(forward, x, k, **kw), repeats)
                t_both = best_time(partial(forward_vjp, with_res, vjp, x, k, u, kw), repeats)
                ratios[f"{shape}|{op}|{p:.3g}"] = [t_fwd / t_sort, t_both / t_sort]
    return ratios


def _run_child(env_features: str | None, repeats: int) -> dict[str, list[float]]:
    env = dict(os.environ)
    env.pop("NUMBA_CPU_FEATURES", None)
    if env_features is not None:
        env["NUMBA_CPU_FEATURES"] = env_features
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--write", metavar="PAGE", help="also write the table into this Markdown page")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    from topk_core._pav.vector_width import host_features, host_has  # in the parent only (children set Numba's target)

    features = host_features()
    if not host_has("avx512f", features):
        print(f"{machine()}: no AVX-512, nothing to compare.")
        return
    narrow = ",".join("-" + f[1:] if f.startswith("+avx512") else f for f in features)
    configs = {"default": None, "no AVX-512": narrow}
    for env_features in configs.values():  # compile (and cache) each configuration, untimed
        _run_child(env_features, 1)
    best: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
    for _ in range(args.rounds):
        for name, env_features in configs.items():
            for key, vals in _run_child(env_features, args.repeats).items():
                old = best[name].get(key, [np.inf, np.inf])
                best[name][key] = [min(a, b) for a, b in zip(old, vals, strict=True)]
    lines = [
        f"Machine: {machine()}, NumPy {np.__version__}; best of {args.rounds} fresh processes per configuration, "
        f"each the best of {args.repeats} runs.",
        "",
        "| shape | operator | p | forward / np.sort (as installed) | (no AVX-512) | fwd+VJP / np.sort "
        "(as installed) | (no AVX-512) | as installed / no AVX-512 (forward) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, (fwd, both) in best["default"].items():
        shape, op, p = key.split("|")
        fwd_n, both_n = best["no AVX-512"][key]
        lines.append(f"| {shape} | {op} | {p} | {fwd:.2f} | {fwd_n:.2f} | {both:.2f} | {both_n:.2f} | {fwd / fwd_n:.2f} |")
    print("\n".join(lines))
    if args.write:
        write_section(args.write, "bench_vector_width", "\n".join(lines))


if __name__ == "__main__":
    main()
