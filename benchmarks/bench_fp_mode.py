"""What keeping subnormal numbers costs the JAX adapter's host calls (`topk_core._fpmode.subnormals_kept`).

XLA runs host callbacks on the CPU with subnormal numbers flushed to zero; the
adapter runs the core there in the IEEE mode, saving and restoring the
floating-point environment around every host call.  This script times that
switch alone, then the jitted forward and gradient of the soft mask on small
rows (where a host call's fixed costs show most) with the switch and without
it (`topk_jax._host_call.subnormals_kept` replaced by a null context),
interleaved in one process, best of the rounds.

    python benchmarks/bench_fp_mode.py            # a few small shapes
    python benchmarks/bench_fp_mode.py --quick    # one shape, few rounds (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import timeit
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from _report import interleaved_times

import topk_jax as tk
from topk_core._fpmode import subnormals_kept
from topk_jax import _host_call


def _calls_in_mode(context: Callable[[], object], fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """`calls` calls of `fn` with `context` as the adapter's mode switch (for `interleaved_times`)."""

    def run() -> None:
        _host_call.subnormals_kept = context
        for _ in range(calls):
            fn()

    return run


def main(argv: list[str] | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """Print the switch's cost and the side-by-side table; returns per shape the best times (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, few rounds")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    shapes = [(8, 16)] if args.quick else [(8, 16), (64, 64), (1024, 64)]
    rounds, calls = (2, 20) if args.quick else (args.rounds, 300)

    def switch() -> None:
        with subnormals_kept():
            pass

    print(f"subnormals_kept alone: {min(timeit.repeat(switch, number=10_000, repeat=5)) / 10_000 * 1e6:.2f} us")
    modes = {"kept": subnormals_kept, "caller's mode": contextlib.nullcontext}
    results = {}
    try:
        for shape in shapes:
            x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
            forward = jax.jit(lambda a: tk.soft_topk_mask(a, 2))
            gradient = jax.jit(jax.grad(lambda a: (tk.soft_topk_mask(a, 2) * a).sum()))
            timed = {
                f"{op} {mode}": _calls_in_mode(context, lambda f=fn, a=x: f(a).block_until_ready(), calls)
                for mode, context in modes.items() for op, fn in (("forward", forward), ("gradient", gradient))
            }
            results[shape] = {key: seconds / calls for key, seconds in interleaved_times(timed, rounds, min).items()}
    finally:
        _host_call.subnormals_kept = subnormals_kept
    print("| shape | op | kept (us) | caller's mode (us) | ratio |")
    print("|---|---|---|---|---|")
    for shape, best in results.items():
        for op in ("forward", "gradient"):
            kept, plain = best[f"{op} kept"], best[f"{op} caller's mode"]
            print(f"| {shape} | {op} | {kept * 1e6:.1f} | {plain * 1e6:.1f} | {kept / plain:.3f} |")
    return results


if __name__ == "__main__":
    main()
