"""The PyTorch adapter's compiled threshold method against its eager one and PAV, side by side.

On a GPU the eager threshold method is bound by kernel launches (thousands
of ATen operations per call, `op_count.py`; a floor of about 20 ms per call
on an H200). The adapter therefore runs the core's root-finding loop and the
pure stages around it under `torch.compile` on CUDA tensors
(`topk_torch._fused`, environment variable ``SPARSE_TOPK_TORCH_COMPILE``).
This script times, in one process, forward+backward of the public operators
with method ``"threshold"`` compiled (``always``; and its forward alone) and
eager (``never``), method ``"pav"`` (on CUDA: a round trip to the host) and
`torch.topk` (its values scattered into zeros, differentiated), and, on a GPU,
the threshold method's Triton kernels for short rows (`topk_torch._triton_rows`,
``SPARSE_TOPK_TORCH_TRITON``; the other columns run with them off). It prints
the compiled method's first call (compilation) apart, its ratio to
`torch.topk` (the issue's GPU target: at most 3x at (2^20, 64)), the largest
difference between the compiled and eager outputs (*dy*), between their
gradients relative to the largest gradient entry (*dg*), and, where PAV ran,
the same relative difference between the eager threshold gradient and PAV's
(*dg pav*: float32 rounding at the edge of a support moves gradient entries
whichever solver computes them), and the Triton kernels' forward+backward, forward,
ratio to `torch.topk` and differences from the eager method (*dy triton*, *dg
triton*; n at most `topk_core._triton_rows.MAX_N`, CUDA only: nan elsewhere).

    python benchmarks/bench_fused_threshold.py --device cuda                  # the GPU shapes
    python benchmarks/bench_fused_threshold.py --shapes 4096x64 --p 2         # a CPU try (inductor's C++)
    python benchmarks/bench_fused_threshold.py --shapes 8x16 --backend eager  # plumbing only (no compiler)
    python benchmarks/bench_fused_threshold.py --shapes 4096x64 --breakdown   # where a forward's time goes
    python benchmarks/bench_fused_threshold.py --device cuda --unroll 1,4     # 1 or 4 iterations per call
    python benchmarks/bench_fused_threshold.py --device cuda --no-compiled    # Triton, eager, PAV, topk only
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import EXPONENTS, median_time, parse_shapes, torch_hard_topk

import topk_torch
from topk_torch import _fused, _triton_rows

STRENGTH = 0.1
COLUMNS = ("topk", "pav", "eager")  # the first columns, in ms
TRITON_COLUMNS = ("triton", "triton forward", "dy triton", "dg triton")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))


def breakdown(forward: Callable[[], object], sync: Callable[[], None]) -> dict[str, float]:
    """Where one compiled forward spends its time: each compiled function (its calls synchronised
    before and after, timed) and the rest (eager operations, the host reads that end the loops), in seconds."""
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    original = _fused._call

    def timed(compiled: Callable, fn: Callable, *args: object) -> object:
        sync()
        start = time.perf_counter()
        out = original(compiled, fn, *args)
        sync()
        spent[fn.__name__] += time.perf_counter() - start
        calls[fn.__name__] += 1
        return out

    _fused._call = timed
    try:
        sync()
        start = time.perf_counter()
        forward()
        total = time.perf_counter() - start
    finally:
        _fused._call = original
    return {"total": total, "rest": total - sum(spent.values()),
            **{f"{name} x{calls[name]}": t for name, t in sorted(spent.items())}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="1048576x64,4096x4096,1x16777216")
    parser.add_argument("--p", default="2,4/3", help=f"comma-separated exponents among {list(EXPONENTS)}")
    parser.add_argument("--operators", default="mask,mag")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend ('eager': Dynamo only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pav-below", type=float, default=float("inf"),
                        help="time PAV only on shapes of fewer entries (its first call compiles Numba's kernels)")
    parser.add_argument("--unroll", default="1",
                        help="comma-separated loop iterations per compiled call (topk_torch._fused.UNROLL) to time")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="time the compiled loop (--no-compiled: skip it and its minutes of compilation; "
                             "its columns print nan)")
    parser.add_argument("--breakdown", action="store_true",
                        help="after the table, where one compiled forward spends its time (loop bodies, stages, rest)")
    args = parser.parse_args(argv)
    torch._logging.set_logs(dynamo=logging.ERROR)
    # The script sets the compiled solvers' switches it times; the caller's come back afterwards.
    switches = (_fused.ENVIRONMENT_VARIABLE, _triton_rows.ENVIRONMENT_VARIABLE)
    saved = _fused.BACKEND, _fused.UNROLL, [os.environ.get(name) for name in switches]
    _fused.BACKEND = args.backend
    try:
        rows = _run(args)
    finally:
        _fused.BACKEND, _fused.UNROLL, modes = saved
        for name, mode in zip(switches, modes, strict=True):
            if mode is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = mode
    if args.breakdown and args.compiled:
        print("\nOne compiled forward, each compiled call synchronised (ms; xN: calls):\n")
        for row in rows:
            parts = ", ".join(f"{name} {t * 1e3:.3g}" for name, t in row["breakdown"].items())
            print(f"* {row['operator']} p={row['p']} {row['shape']} unroll {row['unroll']}: {parts}")
    return rows


def _run(args: argparse.Namespace) -> list[dict]:
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    unrolls = [int(v) for v in args.unroll.split(",")]
    cuda = args.device.startswith("cuda")
    print("| operator | p | shape | torch.topk (ms) | pav (ms) | threshold eager (ms) | unroll | compiled first call (s) "
          "| threshold compiled (ms) | of which forward (ms) | compiled / topk | dy | dg | dg pav "
          "| triton (ms) | of which forward (ms) | triton / topk | dy triton | dg triton |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
                fn = getattr(topk_torch, f"soft_topk_{operator}")

                def step(mode, method, fn=fn, p=EXPONENTS[p_text], x=x, k=k, u=u, backward=True, triton="never"):
                    os.environ[_fused.ENVIRONMENT_VARIABLE] = mode
                    os.environ[_triton_rows.ENVIRONMENT_VARIABLE] = triton
                    xr = x.detach().requires_grad_(backward)
                    y = fn(xr, k, regularization_strength=STRENGTH, p=p, method=method)
                    (grad,) = torch.autograd.grad(y, xr, u) if backward else (None,)
                    sync()
                    return y.detach(), grad

                # The reference calls are the timings' warm-up runs.
                want = step("never", "threshold")
                common = {"topk": topk_time, "pav": float("nan"), "dg pav": float("nan"),
                          "eager": median_time(lambda step=step: step("never", "threshold"), args.repeats, warmup=0)}
                if batch * n < args.pav_below:
                    common["dg pav"] = _relative(want[1], step("never", "pav")[1])
                    common["pav"] = median_time(lambda step=step: step("never", "pav"), args.repeats, warmup=0)
                common.update(dict.fromkeys(TRITON_COLUMNS, float("nan")))
                os.environ[_triton_rows.ENVIRONMENT_VARIABLE] = "auto"
                if cuda and _triton_rows.usable(x, k, None, None):
                    got = step("never", "threshold", triton="auto")
                    common["dy triton"] = float((got[0] - want[0]).abs().max())
                    common["dg triton"] = _relative(got[1], want[1])
                    common["triton"] = median_time(lambda step=step: step("never", "threshold", triton="auto"),
                                                   args.repeats)
                    common["triton forward"] = median_time(
                        lambda step=step: step("never", "threshold", backward=False, triton="auto"), args.repeats)
                for unroll in unrolls if args.compiled else [0]:
                    row = {"operator": operator, "p": p_text, "shape": (batch, n), "unroll": unroll, **common,
                           **dict.fromkeys(("first", "dy", "dg", "compiled", "forward"), float("nan"))}
                    rows.append(row)
                    if args.compiled:
                        _fused.UNROLL = unroll
                        start = time.perf_counter()
                        got = step("always", "threshold")
                        row["first"] = time.perf_counter() - start
                        row["dy"] = float((got[0] - want[0]).abs().max())
                        row["dg"] = _relative(got[1], want[1])
                        row["compiled"] = median_time(lambda step=step: step("always", "threshold"), args.repeats)
                        row["forward"] = median_time(lambda step=step: step("always", "threshold", backward=False),
                                                     args.repeats)
                    if args.breakdown and args.compiled:
                        row["breakdown"] = breakdown(
                            lambda step=step: step("always", "threshold", backward=False), sync)
                    ms = " | ".join(f"{row[c] * 1e3:.3g}" for c in COLUMNS)
                    diffs = " | ".join(f"{row[c]:.1e}" for c in ("dy", "dg", "dg pav"))
                    triton = (f"{row['triton'] * 1e3:.3g} | {row['triton forward'] * 1e3:.3g} "
                              f"| {row['triton'] / topk_time:.2f} | {row['dy triton']:.1e} | {row['dg triton']:.1e}")
                    print(f"| {operator} | {p_text} | {(batch, n)} | {ms} | {unroll} | {row['first']:.1f} "
                          f"| {row['compiled'] * 1e3:.3g} | {row['forward'] * 1e3:.3g} "
                          f"| {row['compiled'] / topk_time:.1f} | {diffs} | {triton} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
