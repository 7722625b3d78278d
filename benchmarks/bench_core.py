"""Benchmark of the NumPy operators (PAV method) against np.argsort, measured side by side.

Prints a Markdown table: forward and forward+VJP times of both soft operators
(float32, k = n/10) as ratios to `np.argsort` of the same data in the same run
(medians of repeated runs, warm-up excluded), and the peak extra memory of one
forward+VJP call relative to the input size (measured in a fresh subprocess
with the kernel already compiled).

    python benchmarks/bench_core.py                                  # full table
    python benchmarks/bench_core.py --write docs/benchmarks.md       # and update the docs page
    python benchmarks/bench_core.py --quick                          # small shapes, a smoke run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import topk_numpy as tk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine, median_time, random_rows, table_parser, table_size, write_section

SHAPES = [(1, 10**6), (64, 4096), (16384, 64)]
QUICK_SHAPES = [(1, 10**4), (16, 256), (256, 64)]
EXPONENTS = [4.0 / 3.0, 2.0]


def _peak_memory_child(shape: tuple[int, int], op: str, p: float) -> None:
    """Run in a subprocess: print the peak resident memory added by one forward+VJP call."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    u = rng.normal(size=shape).astype(np.float32)
    k = max(1, shape[1] // 10)
    vjp = getattr(tk, f"soft_topk_{op}_vjp")
    # Compiled (or loaded from the cache: megabytes of code and LLVM state) outside the measurement,
    # the threaded variants and the long-row route too, on a part of the input that takes them.
    rows = min(shape[0], max(shape[0] // 8, -(-(1 << 17) // shape[1])))
    cols = shape[1] if shape[0] > 1 else shape[1] // 4
    vjp(x[:rows, :cols], k, p=p)[1](u[:rows, :cols])

    def status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark
        fh.write("5")
    before = status("VmRSS:")
    y, vjp_fn = vjp(x, k, p=p)
    g = vjp_fn(u)
    peak = status("VmHWM:") - before
    print(json.dumps({"peak": peak, "input": x.nbytes, "check": float(g.sum() + y.sum())}))


def peak_memory_ratio(shape: tuple[int, int], op: str, p: float) -> float | None:
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import bench_core; bench_core._peak_memory_child({shape!r}, {op!r}, {p!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["peak"] / out["input"]


def main() -> None:
    parser = table_parser(__doc__, 7)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    shapes, repeats = table_size(args, SHAPES, QUICK_SHAPES)

    lines = [
        f"Machine: {machine()}, NumPy {np.__version__}.",
        f"float32, k = n/10, medians of {repeats} runs after a warm-up; ratios to `np.argsort` of the same data "
        "in the same run. Peak memory: resident memory added by one forward+VJP call, over the input's size.",
        "",
        "| shape | operator | p | argsort (ms) | forward (ms) | forward / argsort | fwd+VJP (ms) "
        "| fwd+VJP / argsort | peak memory / input |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, x, u, k in random_rows(shapes, lines):
        t_sort = median_time(lambda x=x: np.argsort(x, axis=-1), repeats)
        for op in ("mask", "mag"):
            fwd = getattr(tk, f"soft_topk_{op}")
            vjp = getattr(tk, f"soft_topk_{op}_vjp")
            for p in EXPONENTS:
                t_fwd = median_time(lambda fwd=fwd, x=x, k=k, p=p: fwd(x, k, p=p), repeats)
                t_both = median_time(lambda vjp=vjp, x=x, k=k, p=p, u=u: vjp(x, k, p=p)[1](u), repeats)
                mem = None if args.no_memory else peak_memory_ratio(shape, op, p)
                mem_text = "n/a" if mem is None else f"{mem:.1f}x"
                line = (
                    f"| {shape} | {op} | {p:.3g} | {t_sort * 1e3:.2f} | {t_fwd * 1e3:.2f} | {t_fwd / t_sort:.2f} "
                    f"| {t_both * 1e3:.2f} | {t_both / t_sort:.2f} | {mem_text} |"
                )
                lines.append(line)
                print(line, flush=True)
    if args.write:
        write_section(args.write, "bench_core", "\n".join(lines))


if __name__ == "__main__":
    main()
