"""The backward of `torch.compile`d soft operators on CPU tensors: the Numba product against the traced one.

Under `torch.compile` the backward is traced.  For the magnitude on the CPU the
adapter calls the core's Numba product there as one opaque custom operator
(`topk_torch._host_products`); the mask's product stays traced (Inductor
fuses it).  This script times, for both operators, the compiled backward as
shipped and with every product traced, and the eager backward (the Numba
product for both operators), side by side in one process (``torch.autograd.grad`` of a compiled
forward, the graph retained; medians of interleaved runs after a warm-up), with
the eager backward as the reference, and prints the largest difference of each
compiled gradient from the eager one.  Inductor's caches are off so that each
variant is compiled from its own trace.

    python benchmarks/bench_torch_compiled.py                           # full table
    python benchmarks/bench_torch_compiled.py --quick                   # small shapes, a smoke run
    python benchmarks/bench_torch_compiled.py --write docs/torch.md     # and update the docs page
    python benchmarks/bench_torch_compiled.py --quick --backend aot_eager  # traced, not compiled (seconds)
"""

from __future__ import annotations

import os

# Before torch is imported: each variant must be compiled from its own trace, not found in a cache.
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import torch
from _report import machine, table_parser, table_size, write_section
from bench_torch import median_times

import topk_torch as tk
from topk_torch import _products

SHAPES = [(262144, 16), (16384, 64), (64, 4096), (1, 10**6)]
QUICK_SHAPES = [(512, 16), (16, 256)]
STRENGTH = 0.1


def compiled_gradient(
    op: str, x: torch.Tensor, k: int, u: torch.Tensor, host: bool, backend: str
) -> tuple[object, torch.Tensor]:
    """(a call of the compiled backward, its gradient): with `host`, the magnitude's product through the opaque
    operator (as shipped); otherwise every product traced."""
    rule = _products._compiled_host_rows
    if not host:
        _products._compiled_host_rows = lambda *args: False
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda t: getattr(tk, f"soft_topk_{op}")(t, k, regularization_strength=STRENGTH),
                           fullgraph=True, backend=backend)
        xg = x.detach().requires_grad_()
        y = fn(xg)
        (grad,) = torch.autograd.grad(y, xg, u, retain_graph=True)  # traces and compiles the backward
    finally:
        _products._compiled_host_rows = rule
    return (lambda: torch.autograd.grad(y, xg, u, retain_graph=True)), grad


def main() -> None:
    parser = table_parser(__doc__, 15)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    args = parser.parse_args()
    # A retained graph's donated buffers cannot be reused by a second backward.
    torch._functorch.config.donated_buffer = False
    shapes, repeats = table_size(args, SHAPES, QUICK_SHAPES)
    lines: list[str] = []
    out = lines.append
    out(f"Machine: {machine()}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"backend {args.backend}.")
    out(f"float32, k = n/10, p = 4/3, l = {STRENGTH}: `torch.autograd.grad` of a compiled forward (graph "
        f"retained), medians of {repeats} interleaved runs after a warm-up. Eager: the backward of the eager "
        "operator (the core's Numba product); compiled: as shipped (the magnitude's product the Numba one, "
        "opaque; the mask's traced); product traced: every product traced by the compiler. The differences "
        "are the largest |compiled - eager| entries of the gradients.")
    out("")
    out("| shape | operator | eager (ms) | compiled (ms) | compiled, product traced (ms) "
        "| traced / compiled | diff compiled | diff traced |")
    out("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        u = torch.randn(shape, generator=gen)
        k = max(1, shape[1] // 10)
        for op in ("mask", "mag"):
            xe = x.detach().requires_grad_()
            ye = getattr(tk, f"soft_topk_{op}")(xe, k, regularization_strength=STRENGTH)
            (eager_grad,) = torch.autograd.grad(ye, xe, u, retain_graph=True)
            host_call, host_grad = compiled_gradient(op, x, k, u, True, args.backend)
            traced_call, traced_grad = compiled_gradient(op, x, k, u, False, args.backend)
            t = median_times({
                "eager": lambda ye=ye, xe=xe, u=u: torch.autograd.grad(ye, xe, u, retain_graph=True),
                "host": host_call,
                "traced": traced_call,
            }, repeats)
            diff_host = (host_grad - eager_grad).abs().max().item()
            diff_traced = (traced_grad - eager_grad).abs().max().item()
            out(f"| {shape} | {op} | {t['eager'] * 1e3:.2f} | {t['host'] * 1e3:.2f} | {t['traced'] * 1e3:.2f} "
                f"| {t['traced'] / t['host']:.2f} | {diff_host:.1e} | {diff_traced:.1e} |")
    print("\n".join(lines))
    if args.write:
        write_section(args.write, "bench_torch_compiled", "\n".join(lines))


if __name__ == "__main__":
    main()
