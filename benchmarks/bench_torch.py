"""Benchmark of the PyTorch operators (PAV custom op) against torch.argsort, measured side by side.

Prints a Markdown table: forward and forward+backward times of both soft
operators (float32, k = n/10, p = 4/3 and 2) as ratios to `torch.argsort` of
the same data in the same run (medians of repeated runs, warm-up excluded),
then the p = 2 mask against `entmax.budget_bisect(x / l, budget=k)`, which
computes the same function (the Euclidean projection of x / l onto the capped
simplex) by bisection, and the fixed cost of small calls (router-sized
batches) against `torch.topk` with its backward.

    python benchmarks/bench_torch.py                          # full tables
    python benchmarks/bench_torch.py --quick                  # small shapes, a smoke run
    python benchmarks/bench_torch.py --threads 1              # torch intra-op threads (default: torch's)
    python benchmarks/bench_torch.py --write docs/torch.md    # and update the docs page
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _report import interleaved_times, machine, table_parser, table_size, torch_hard_topk, write_section

import topk_torch as tk

SHAPES = [(1, 10**6), (64, 4096), (16384, 64)]
QUICK_SHAPES = [(1, 10**4), (16, 256), (256, 64)]
# Router-sized calls, where the fixed cost of a call (validation, the autograd function, conversions) dominates.
SMALL_SHAPES = [(64, 16), (1024, 8), (4096, 64)]
SMALL_K = 2
SMALL_CALLS = 50
EXPONENTS = [4.0 / 3.0, 2.0]
STRENGTH = 0.1


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of every callable; rounds interleave them, so load drift hits all alike."""
    return interleaved_times(fns, repeats)


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, u: torch.Tensor) -> Callable:
    def run() -> torch.Tensor:
        xg = x.detach().requires_grad_()
        fn(xg).backward(u)
        return xg.grad

    return run


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    """`fn` run `calls` times in a row: a sample long enough to time small calls (divide by `calls`)."""

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def small_calls(out: Callable[[str], None], shapes: list[tuple[int, int]], repeats: int) -> None:
    """The table of small calls: microseconds per call of both soft operators (p = 4/3) and of torch.topk."""
    out("")
    out(f"Small calls (k = {SMALL_K}, p = 4/3, l = {STRENGTH}): microseconds per call, medians of {repeats} "
        f"interleaved samples of {SMALL_CALLS} calls each; `torch.topk`'s values scattered into a row of zeros "
        "(the hard top-k in value), with its backward.")
    out("")
    out("| shape | torch.topk fwd+bwd (us) | mask fwd (us) | mask fwd+bwd (us) | mag fwd (us) | mag fwd+bwd (us) |")
    out("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        u = torch.randn(shape, generator=gen)
        fns: dict[str, Callable[[], object]] = {
            "topk": per_call(forward_backward(lambda t: torch_hard_topk(t, SMALL_K), x, u), SMALL_CALLS)}
        for op in ("mask", "mag"):
            soft = getattr(tk, f"soft_topk_{op}")
            fn = lambda t, soft=soft: soft(t, SMALL_K, regularization_strength=STRENGTH)  # noqa: E731
            fns[f"{op} fwd"] = per_call(lambda fn=fn, x=x: fn(x), SMALL_CALLS)
            fns[f"{op} both"] = per_call(forward_backward(fn, x, u), SMALL_CALLS)
        t = {name: v / SMALL_CALLS * 1e6 for name, v in median_times(fns, repeats).items()}
        out(f"| {shape} | {t['topk']:.0f} | {t['mask fwd']:.0f} | {t['mask both']:.0f} | {t['mag fwd']:.0f} "
            f"| {t['mag both']:.0f} |")


def main() -> None:
    parser = table_parser(__doc__, 9, "tables")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes, repeats = table_size(args, SHAPES, QUICK_SHAPES)
    lines: list[str] = []
    out = lines.append

    out(f"Machine: {machine()}, torch {torch.__version__} with {torch.get_num_threads()} threads.")
    out(f"float32, k = n/10, l = {STRENGTH}, medians of {repeats} interleaved runs after a warm-up; "
        "ratios to `torch.argsort(x, dim=-1)` of the same data in the same run.")
    out("")
    out("| shape | operator | p | argsort (ms) | forward (ms) | forward / argsort | fwd+bwd (ms) "
        "| fwd+bwd / argsort |")
    out("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    data = {}
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        u = torch.randn(shape, generator=gen)
        k = max(1, shape[1] // 10)
        data[shape] = (x, u, k)
        fns: dict[str, Callable[[], object]] = {"argsort": lambda x=x: torch.argsort(x, dim=-1)}
        for op in ("mask", "mag"):
            soft = getattr(tk, f"soft_topk_{op}")
            for p in EXPONENTS:
                fn = lambda x, soft=soft, k=k, p=p: soft(x, k, p=p, regularization_strength=STRENGTH)  # noqa: E731
                fns[f"{op} {p} fwd"] = lambda fn=fn, x=x: fn(x)
                fns[f"{op} {p} both"] = forward_backward(fn, x, u)
        t = median_times(fns, repeats)
        for op in ("mask", "mag"):
            for p in EXPONENTS:
                t_sort, t_fwd, t_both = t["argsort"], t[f"{op} {p} fwd"], t[f"{op} {p} both"]
                out(f"| {shape} | {op} | {p:.3g} | {t_sort * 1e3:.2f} | {t_fwd * 1e3:.2f} | {t_fwd / t_sort:.2f} "
                    f"| {t_both * 1e3:.2f} | {t_both / t_sort:.2f} |")

    try:
        import entmax
    except ImportError:
        out("")
        out("entmax is not installed: no comparison with `entmax.budget_bisect`.")
    else:
        out("")
        out(f"The p = 2 mask against `entmax.budget_bisect(x / l, budget=k)` (its default n_iter=50), l = {STRENGTH}, "
            "same data; ratio = topk_torch / entmax (below 1: topk_torch is faster).")
        out("")
        out("| shape | max abs diff | entmax fwd (ms) | topk_torch fwd (ms) | fwd ratio | entmax fwd+bwd (ms) "
            "| topk_torch fwd+bwd (ms) | fwd+bwd ratio |")
        out("|---|---|---|---|---|---|---|---|")
        for shape, (x, u, k) in data.items():
            ours = lambda x, k=k: tk.soft_topk_mask(x, k, p=2.0, regularization_strength=STRENGTH)  # noqa: E731
            theirs = lambda x, k=k: entmax.budget_bisect(x / STRENGTH, budget=k)  # noqa: E731
            diff = (ours(x) - theirs(x)).abs().max().item()
            t = median_times({
                "ours": lambda ours=ours, x=x: ours(x),
                "theirs": lambda theirs=theirs, x=x: theirs(x),
                "ours both": forward_backward(ours, x, u),
                "theirs both": forward_backward(theirs, x, u),
            }, repeats)
            out(f"| {shape} | {diff:.1e} | {t['theirs'] * 1e3:.2f} | {t['ours'] * 1e3:.2f} "
                f"| {t['ours'] / t['theirs']:.2f} | {t['theirs both'] * 1e3:.2f} | {t['ours both'] * 1e3:.2f} "
                f"| {t['ours both'] / t['theirs both']:.2f} |")

    small_calls(out, SMALL_SHAPES[:1] if args.quick else SMALL_SHAPES, repeats)
    print("\n".join(lines))
    if args.write:
        write_section(args.write, "bench_torch", "\n".join(lines))


if __name__ == "__main__":
    main()
