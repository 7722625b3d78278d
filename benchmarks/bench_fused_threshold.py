"""Would fusing the threshold method's eager operations make it fast on a GPU? An experiment.

The first GPU run found the eager threshold method bound by kernel launches
(thousands of ATen operations per call, `op_count.py`). This script times,
side by side in one process, the core's threshold solve and its
vector-Jacobian product as the library runs them (eager PyTorch operations)
and the same two functions under `torch.compile` (which fuses the
elementwise work and row reductions of each stretch between two host
synchronisations into a few kernels), next to `torch.topk` and the issue's
target (forward+backward at most 3x the hard top-k's). It prints the first
call (compilation) apart, and the largest difference between the two
outputs and gradients. Nothing of this is wired into the library: the
numbers decide whether it should be.

    python benchmarks/bench_fused_threshold.py --device cuda                  # the GPU shapes
    python benchmarks/bench_fused_threshold.py --shapes 4096x64 --p 2         # a CPU try (inductor's C++)
    python benchmarks/bench_fused_threshold.py --shapes 8x16 --backend eager  # plumbing only (no compiler)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import EXPONENTS, median_time, parse_shapes, torch_hard_topk

import topk_core
from topk_core._agnostic import threshold
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_torch._namespace import xp as torch_xp

STRENGTH = 0.1
SOLVE = {"mask": threshold.threshold_mask, "mag": threshold.threshold_mag}
VJP = {"mask": topk_core.mask_vjp_from_residuals, "mag": topk_core.mag_vjp_from_residuals}


def step(solve, vjp, x: torch.Tensor, k: int, q: float, u: torch.Tensor) -> torch.Tensor:
    """Forward (with residuals) and the VJP of `u`: a training step's work."""
    _, res = solve(x, k, STRENGTH, q, torch_xp)
    return vjp(res, u, xp=torch_xp)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="1048576x64,4096x4096,1x16777216")
    parser.add_argument("--p", default="2,4/3", help=f"comma-separated exponents among {list(EXPONENTS)}")
    parser.add_argument("--operators", default="mask,mag")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend ('eager': Dynamo only)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    # Dynamo logs each graph break (the root finder's early exit reads a value on the host): expected here.
    torch._logging.set_logs(dynamo=logging.ERROR)
    # Dynamo warns that it traces through array_api_compat's lru_cache-wrapped type checks: harmless here.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    print("| operator | p | shape | torch.topk fwd+bwd (ms) | eager fwd+bwd (ms) | fused first call (s) "
          "| fused fwd+bwd (ms) | fused / topk | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, n in parse_shapes(args.shapes):
        gen = torch.Generator(device=args.device).manual_seed(0)
        x = torch.randn(batch, n, device=args.device, generator=gen)
        u = torch.randn(batch, n, device=args.device, generator=gen)
        k = max(1, n // 10)

        def hard(x=x, k=k, u=u):
            xr = x.detach().requires_grad_()
            torch_hard_topk(xr, k).mul(u).sum().backward()
            sync()

        topk_time = median_time(hard, args.repeats)
        for operator in args.operators.split(","):
            for p_text in args.p.split(","):
                q = conjugate_exponent(EXPONENTS[p_text])
                solve, vjp = SOLVE[operator], VJP[operator]

                def eager(solve=solve, vjp=vjp, q=q, x=x, k=k, u=u):
                    out = step(solve, vjp, x, k, q, u)
                    sync()
                    return out

                fused_step = torch.compile(step, dynamic=True, backend=args.backend)

                def fused(solve=solve, vjp=vjp, q=q, x=x, k=k, u=u, fused_step=fused_step):
                    out = fused_step(solve, vjp, x, k, q, u)
                    sync()
                    return out

                start = time.perf_counter()
                got = fused()
                first = time.perf_counter() - start
                diff = float((got - eager()).abs().max())
                eager_time = median_time(eager, args.repeats)
                fused_time = median_time(fused, args.repeats)
                row = {"operator": operator, "p": p_text, "shape": (batch, n), "topk": topk_time,
                       "eager": eager_time, "first": first, "fused": fused_time, "diff": diff}
                rows.append(row)
                print(f"| {operator} | {p_text} | {(batch, n)} | {topk_time * 1e3:.3g} | {eager_time * 1e3:.3g} "
                      f"| {first:.1f} | {fused_time * 1e3:.3g} | {fused_time / topk_time:.1f} | {diff:.2e} |",
                      flush=True)
                torch._dynamo.reset()
    return rows


if __name__ == "__main__":
    main()
