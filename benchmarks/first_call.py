"""The first call of an operator in a new process: with an empty Numba cache, then with the cache it wrote.

On the CPU the kernels are compiled by Numba the first time a process meets a
signature (dtype and route), and cached on disk (docs/faq.md, "Why is the
first call so slow?"). This script runs one call of an operator in a new
process whose `NUMBA_CACHE_DIR` is an empty folder (the first call compiles
and writes the cache), then in a second new process with the same folder (the
first call loads it), and prints for each: the adapter's import, the first
call, and the best of the later calls. Each process compiles only the kernels
its call reaches: a first call at a batch large enough for the threads
compiles the parallel variants, a smaller one the serial ones.

    python benchmarks/first_call.py                                     # mag, p = 4/3, (8192, 16) float32
    python benchmarks/first_call.py --op mask --p 2 --shape 16384x64 --dtype float64
    python benchmarks/first_call.py --framework torch --vjp             # the forward and one backward pass
    python benchmarks/first_call.py --cache default                     # the package's own cache, as it is
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import parse_exponents, parse_shapes

ROOT = Path(__file__).resolve().parents[1]

# Run in the new process: arguments as JSON in argv[1], one JSON line of results on stdout.
CHILD = r"""
import importlib, json, sys, time
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
import numpy as np
module = importlib.import_module("topk_" + a["framework"])
imported = time.perf_counter() - t0
x = np.random.default_rng(0).normal(size=a["shape"]).astype(a["dtype"])
u = np.random.default_rng(1).normal(size=a["shape"]).astype(a["dtype"])
op = getattr(module, "soft_topk_" + a["op"])
if a["framework"] == "numpy":
    if a["vjp"]:
        vjp = getattr(module, "soft_topk_" + a["op"] + "_vjp")
        def call():
            return vjp(x, a["k"], p=a["p"])[1](u)
    else:
        def call():
            return op(x, a["k"], p=a["p"])
elif a["framework"] == "torch":
    import torch
    xt, ut = torch.from_numpy(x), torch.from_numpy(u)
    def call():
        if not a["vjp"]:
            return op(xt, a["k"], p=a["p"])
        leaf = xt.clone().requires_grad_(True)
        return torch.autograd.grad(op(leaf, a["k"], p=a["p"]), leaf, ut)[0]
else:
    import jax, jax.numpy as jnp
    xj, uj = jnp.asarray(x), jnp.asarray(u)
    def call():
        if not a["vjp"]:
            return op(xj, a["k"], p=a["p"]).block_until_ready()
        return jax.vjp(lambda v: op(v, a["k"], p=a["p"]), xj)[1](uj)[0].block_until_ready()
t0 = time.perf_counter()
call()
first = time.perf_counter() - t0
later = []
for _ in range(a["repeats"]):
    t0 = time.perf_counter()
    call()
    later.append(time.perf_counter() - t0)
print(json.dumps({"import": imported, "first": first, "later": min(later)}))
"""


def run_child(settings: dict, cache_dir: str | None) -> dict:
    """One new process: its results (seconds)."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "adapters"), env.get("PYTHONPATH", "")])
    env["PYTHONPATH"] = pythonpath.rstrip(os.pathsep)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=["numpy", "torch", "jax"], default="numpy")
    parser.add_argument("--op", choices=["mask", "mag"], default="mag")
    parser.add_argument("--p", default="4/3", help="the exponent, e.g. 4/3 or 2")
    parser.add_argument("--shape", default="8192x16", help="rows x entries, e.g. 8192x16")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--k", type=int, default=None, help="default: max(1, n // 10)")
    parser.add_argument("--vjp", action="store_true", help="time the forward and one VJP (backward) together")
    parser.add_argument("--repeats", type=int, default=5, help="later calls; the best is printed")
    parser.add_argument("--cache", default="empty",
                        help="'empty': a new empty NUMBA_CACHE_DIR (default); 'default': the package's own "
                             "cache as it is; else a folder to use")
    args = parser.parse_args(argv)
    (shape,), (p,) = parse_shapes(args.shape), parse_exponents(args.p)
    settings = {
        "framework": args.framework, "op": args.op, "p": p,
        "shape": shape, "dtype": args.dtype, "k": args.k or max(1, shape[-1] // 10), "vjp": args.vjp,
        "repeats": args.repeats,
    }
    what = f"soft_topk_{args.op}{' + VJP' if args.vjp else ''}, p = {args.p}"
    print(f"{args.framework} {what}, {args.shape} {args.dtype}, k = {settings['k']}, "
          f"{os.cpu_count()} CPUs (Numba threads: all)\n")
    print("| process | cache | import (s) | first call (s) | later calls (ms) |")
    print("|---|---|---|---|---|")
    # The cache each process meets: an empty folder then what the first wrote, or a folder as it is.
    states = {"empty": ("empty", "as written"), "default": ("the package's own",) * 2}.get(
        args.cache, ("given folder",) * 2)
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as empty:
        cache_dir = {"empty": empty, "default": None}.get(args.cache, args.cache)
        for label, state in zip(("first", "second"), states, strict=True):
            r = run_child(settings, cache_dir)
            print(f"| {label} | {state} | {r['import']:.2f} | {r['first']:.2f} | {r['later'] * 1e3:.3g} |")


if __name__ == "__main__":
    main()
