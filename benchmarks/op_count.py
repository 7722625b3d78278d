"""How many PyTorch operations and host synchronisations one call of an operator issues.

On a GPU an eager call costs at least one kernel launch per ATen operation
(about 5 us each) and a pipeline drain per host synchronisation, whatever the
size of the data: for small and medium calls these counts, not the bytes
moved, set the time. They do not depend on the device, so this script counts
them on the CPU (PyTorch's profiler, operations called from Python only, not
those nested inside another ATen operation), next to the number of root
evaluations of the threshold method, the iteration count of its root finder.

    python benchmarks/op_count.py                   # the default shapes, p = 4/3 and 2, both operators
    python benchmarks/op_count.py --shapes 64x64 --methods threshold,dykstra
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import topk_core
import topk_torch
from topk_core._agnostic import threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import EXPONENTS, parse_shapes

SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(top-level ATen operations, host synchronisations) of one call of `fn`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top), sum(e.name in SYNCS for e in top)


def count_evaluations(fn: Callable[[], object]) -> int:
    """Root evaluations of the threshold method in one call of `fn` (0 for other methods)."""
    calls = 0
    original = threshold._root

    def counting_root(evaluate: Callable, *args: object, **kwargs: object) -> object:
        def counted(*a: object) -> object:
            nonlocal calls
            calls += 1
            return evaluate(*a)

        return original(counted, *args, **kwargs)

    threshold._root = counting_root
    try:
        fn()
    finally:
        threshold._root = original
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="64x64,4096x64,65536x64")
    parser.add_argument("--methods", default="threshold")
    args = parser.parse_args()
    warnings.simplefilter("ignore", topk_core.DykstraNotConverged)
    torch.manual_seed(0)
    print("| operator | p | method | shape | ATen operations | host synchronisations | root evaluations |")
    print("|---|---|---|---|---|---|---|")
    for rows, n in parse_shapes(args.shapes):
        x = torch.randn(rows, n)
        k = max(1, n // 10)
        for operator in ("mask", "mag"):
            for p_name, p in EXPONENTS.items():
                for method in args.methods.split(","):
                    if method == "dykstra" and p != 2.0:
                        continue
                    call = partial(getattr(topk_torch, f"soft_topk_{operator}"), x, k, p=p, method=method)

                    call()  # compilation and caches out of the count
                    ops, syncs = count_ops(call)
                    evaluations = count_evaluations(call)
                    print(f"| {operator} | {p_name} | {method} | ({rows}, {n}) | {ops} | {syncs} | {evaluations} |")


if __name__ == "__main__":
    main()
