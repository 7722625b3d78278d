"""The benchmark suite: every method of every adapter, baselines and peers, side by side in one run.

For each framework (NumPy, PyTorch, JAX) and each shape (rows, n) it times the
soft operators of this library with every method (`pav`, `threshold`, and
`dykstra` for p = 2 on small rows), the framework's own sorting / hard top-k
baselines, SciPy's isotonic regression (the isotonic step of PAV) and the
public peers that install from the package registry without compiling:
`entmax.budget_bisect` (PyTorch), `difftopk` (PyTorch) and `ott-jax`'s
`soft_sort.topk_mask` (JAX). Times are medians of repeated runs after a
warm-up; the first call (compilation: Numba, `jax.jit`) is reported in its own
column. Peak memory is the resident-memory high-water mark added by one
forward+backward call, measured in a fresh subprocess per framework
(`torch.cuda.max_memory_allocated` on CUDA).

It then sweeps n from 10^2 to 10^7 (one row) and the batch at n = 64, writes
PNG plots, and estimates the largest n each implementation handles within the
memory budget from the measured peaks.

    python benchmarks/run.py                                     # everything, printed
    python benchmarks/run.py --quick --framework numpy           # smoke run (seconds)
    python benchmarks/run.py --write docs/benchmarks.md          # and the docs page + docs/figures/*.png
    python benchmarks/run.py --device cuda --framework torch     # on a GPU
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import json
import math
import os
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import EXPONENTS, machine, median_time, parse_shapes, torch_hard_topk, write_section  # noqa: E402

SHAPES = [(1, 10**6), (64, 4096), (16384, 64)]
# The GPU shapes of issue 5: many router rows, a square block, one long row (default with --device cuda).
GPU_SHAPES = [(2**20, 64), (4096, 4096), (1, 2**24)]
# Target of issue 5 on the GPU: forward+backward at most this many times the hard top-k's, at this shape.
GPU_TARGET, GPU_TARGET_SHAPE = 3.0, (2**20, 64)
QUICK_SHAPES = [(1, 4096), (64, 64)]
N_SWEEP = [10**j for j in range(2, 8)]
QUICK_N_SWEEP = [1000]
BATCH_SWEEP = [1, 16, 256, 4096, 65536]
QUICK_BATCH_SWEEP = [8]
STRENGTH = 0.1
OPERATORS = ["mask", "mag"]
# The methods of this library that are measured (`--methods`).
METHODS: tuple[str, ...] = ("pav", "threshold", "dykstra")
MEMORY_BUDGET = 24 * 2**30  # the 24 GB, or the machine's memory if smaller
DYKSTRA_MAX_N = 4096  # Dykstra needs O(L^2) iterations per pooled block of length L
COLUMNS = [
    "framework", "implementation", "kind", "computes", "shape", "first call (ms)", "forward (ms)",
    "fwd+bwd (ms)", "forward / sort", "peak memory (MB)",
]


@dataclass
class Entry:
    """One implementation: `forward(x, k)` and, if differentiable, `both(x, k, u)` (forward + backward)."""

    framework: str
    name: str
    kind: str  # "ours", "baseline" or "peer"
    computes: str
    operator: str  # "mask", "mag", or "" for a baseline that is not one of the operators
    forward: Callable[[object, int], object]
    both: Callable[[object, int, object], object] | None = None
    fits: Callable[[tuple[int, int]], bool] = field(default=lambda shape: True)
    sweep: bool = False  # part of the scaling sweeps
    repeats: int | None = None  # fewer repeats for a slow implementation


def _k(n: int) -> int:
    return max(1, n // 10)


def our_entries(framework: str, operators: list[str], make: Callable, suffix: str = "") -> list[Entry]:
    """This library's entries: every operator, exponent and method (Dykstra: p = 2, rows up to DYKSTRA_MAX_N).

    `make(op, p, method)` returns the entry's `(forward, both)`; names read
    ``topk_<framework> <op> p=<p> <method><suffix>``.
    """
    entries = []
    for op in operators:
        for pname, p in EXPONENTS.items():
            for method in METHODS:
                dykstra = method == "dykstra"
                if dykstra and p != 2.0:
                    continue
                forward, both = make(op, p, method)
                entries.append(Entry(
                    framework, f"topk_{framework} {op} p={pname} {method}{suffix}", "ours",
                    f"sparse soft top-k {op}" + (" (approximate)" if dykstra else " (exact)"), op, forward, both,
                    fits=(lambda shape: shape[1] <= DYKSTRA_MAX_N) if dykstra else (lambda shape: True),
                    sweep=op == "mask" and not dykstra and pname == "4/3",
                    repeats=1 if dykstra else None,
                ))
    return entries


# --------------------------------------------------------------------------- NumPy


def numpy_entries(operators: list[str], device: str) -> tuple[list[Entry], Callable, Callable]:
    from scipy.optimize import isotonic_regression

    import topk_numpy as tk

    entries = [
        Entry("numpy", "np.sort", "baseline", "full sort of each row", "", lambda x, k: np.sort(x, axis=-1),
              sweep=True),
        Entry("numpy", "np.argsort", "baseline", "sorting permutation of each row", "",
              lambda x, k: np.argsort(x, axis=-1)),
        Entry("numpy", "np.argpartition", "baseline", "hard top-k indices (unordered)", "",
              lambda x, k: np.argpartition(x, -k, axis=-1)[..., -k:]),
        Entry("numpy", "scipy isotonic_regression", "baseline",
              "isotonic step only (PAV on a presorted row, decreasing; one call per row)", "",
              _scipy_isotonic(isotonic_regression), fits=lambda shape: shape[0] <= 1024, sweep=True),
    ]
    def make(op: str, p: float, method: str) -> tuple[Callable, Callable]:
        kw = dict(p=p, regularization_strength=STRENGTH, method=method)
        return (partial(_call, getattr(tk, f"soft_topk_{op}"), kw),
                partial(_vjp_call, getattr(tk, f"soft_topk_{op}_vjp"), kw))

    entries += our_entries("numpy", operators, make)
    return entries, lambda a: a, lambda r: r


def _call(fn: Callable, kw: dict, x: object, k: int) -> object:
    return fn(x, k, **kw)


def _vjp_call(vjp: Callable, kw: dict, x: object, k: int, u: object) -> object:
    return vjp(x, k, **kw)[1](u)


def _scipy_isotonic(isotonic_regression: Callable) -> Callable:
    def run(x: np.ndarray, k: int) -> list:
        rows = -np.sort(-x, axis=-1)  # presorting is part of the setup, not of what is measured ...
        start = time.perf_counter()
        out = [isotonic_regression(row, increasing=False).x for row in rows]
        run.inner = time.perf_counter() - start  # ... so the timed call subtracts it (see `_timed`)
        return out

    run.inner = None
    return run


# --------------------------------------------------------------------------- PyTorch


def torch_entries(operators: list[str], device: str) -> tuple[list[Entry], Callable, Callable]:
    import torch
    from bench_torch import forward_backward

    import topk_torch as tk

    def both_of(forward: Callable) -> Callable:
        return lambda x, k, u: forward_backward(lambda t: forward(t, k), x, u)()

    entries = [
        Entry("torch", "torch.sort", "baseline", "full sort of each row", "",
              lambda x, k: torch.sort(x, dim=-1), sweep=True),
        Entry("torch", "torch.topk", "baseline", "hard top-k values and indices (fwd+bwd: the values "
              "scattered into a row of zeros, differentiated)", "",
              lambda x, k: torch.topk(x, k, dim=-1), both_of(torch_hard_topk), sweep=True),
    ]
    def make(op: str, p: float, method: str) -> tuple[Callable, Callable]:
        fwd = partial(_call, getattr(tk, f"soft_topk_{op}"), dict(p=p, regularization_strength=STRENGTH, method=method))
        return fwd, both_of(fwd)

    entries += our_entries("torch", operators, make)
    if "mask" in operators:
        try:
            from entmax import budget_bisect
        except ImportError:
            pass
        else:
            fwd = partial(_entmax_budget, budget_bisect)
            entries.append(Entry(
                "torch", "entmax.budget_bisect(x / l, budget=k)", "peer",
                "sparse; the same function as the p = 2 mask (Euclidean projection on the capped simplex), "
                "by 50 bisection steps", "mask", fwd, both_of(fwd), sweep=True))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import difftopk  # noqa: F401
        except ImportError:
            pass
        else:
            fwd = _difftopk_mask(device)
            entries.append(Entry(
                "torch", "difftopk bitonic (mask = row sums)", "peer",
                "dense relaxed top-k (n x k doubly-stochastic block of a bitonic sorting network, Cauchy "
                "relaxation, steepness 10); rows padded to a power of two", "mask", fwd, both_of(fwd),
                fits=lambda shape: shape[1] <= 256 and shape[0] * _pow2(shape[1]) ** 2 <= 2**20, sweep=True))
    dev = torch.device(device)

    def sync(r: object) -> object:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return r

    return entries, lambda a: torch.asarray(a, device=dev), sync


def _entmax_budget(budget_bisect: Callable, x: object, k: int) -> object:
    return budget_bisect(x / STRENGTH, budget=k)


def _pow2(n: int) -> int:
    return 1 << max(1, (n - 1).bit_length())


def _difftopk_mask(device: str) -> Callable:
    import torch
    from difftopk import DiffTopkNet

    nets: dict[tuple[int, int], object] = {}

    def run(x: torch.Tensor, k: int) -> torch.Tensor:
        n = x.shape[-1]
        m = _pow2(n)
        if (m, k) not in nets:  # building the sorting network is setup (cached like a module's weights)
            nets[m, k] = DiffTopkNet("bitonic", m, k, device=device)
        if m > n:  # pad with values below the row's minimum, so that they are never in the top k
            low = x.detach().min(dim=-1, keepdim=True).values - 1.0
            x = torch.cat([x, low.expand(*x.shape[:-1], m - n)], dim=-1)
        _, perm = nets[m, k](x)
        return perm.sum(-1)[..., :n]

    return run


# --------------------------------------------------------------------------- JAX


def jax_entries(operators: list[str], device: str) -> tuple[list[Entry], Callable, Callable]:
    import jax
    import jax.numpy as jnp

    import topk_jax as tk

    platform = "gpu" if device == "cuda" else "cpu"
    target = jax.devices(platform)[0]

    def jitted(fn: Callable) -> tuple[Callable, Callable]:
        """Jitted forward and forward+grad (value_and_grad of <fn(x), u>); jax.jit caches per (shape, k)."""
        cache: dict = {}

        def forward(x: object, k: int) -> object:
            if ("f", k) not in cache:
                cache["f", k] = jax.jit(partial(fn, k=k))
            return cache["f", k](x)

        def both(x: object, k: int, u: object) -> object:
            if ("b", k) not in cache:
                cache["b", k] = jax.jit(jax.value_and_grad(lambda x, u: jnp.vdot(fn(x, k=k), u)))
            return cache["b", k](x, u)

        return forward, both

    f, _ = jitted(lambda x, k: jnp.sort(x, axis=-1))
    entries = [Entry("jax", "jnp.sort (jit)", "baseline", "full sort of each row", "", f, sweep=True)]
    f, _ = jitted(lambda x, k: jax.lax.top_k(x, k))
    _, b = jitted(_jax_hard_topk)
    entries.append(Entry("jax", "jax.lax.top_k (jit)", "baseline", "hard top-k values and indices (fwd+bwd: the "
                         "values scattered into a row of zeros, differentiated)", "", f, b, sweep=True))
    entries += our_entries(
        "jax", operators, lambda op, p, method: jitted(partial(_jax_soft, getattr(tk, f"soft_topk_{op}"), p, method)),
        suffix=" (jit)",
    )
    if "mask" in operators:
        try:
            from ott.tools import soft_sort
        except ImportError:
            pass
        else:
            f, b = jitted(lambda x, k: soft_sort.topk_mask(x, k=k))
            entries.append(Entry(
                "jax", "ott-jax soft_sort.topk_mask (jit)", "peer",
                "dense soft top-k mask by entropic optimal transport (Sinkhorn, default epsilon); "
                "every entry non-zero", "mask", f, b, fits=lambda shape: shape[0] * shape[1] <= 2**20,
                sweep=True))

    def sync(r: object) -> object:
        return jax.block_until_ready(r)

    return entries, lambda a: jax.device_put(jnp.asarray(a), target), sync


def _jax_hard_topk(x: object, k: int) -> object:
    """The hard top-k in value with x's shape: jax.lax.top_k's values scattered into a row of zeros."""
    import jax
    import jax.numpy as jnp

    values, indices = jax.lax.top_k(x, k)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros_like(x).at[rows, indices].set(values)


def _jax_soft(soft: Callable, p: float, method: str, x: object, k: int) -> object:
    return soft(x, k, p=p, regularization_strength=STRENGTH, method=method)


BUILDERS = {"numpy": numpy_entries, "torch": torch_entries, "jax": jax_entries}


# --------------------------------------------------------------------------- measuring


def _timed(entry: Entry, fn: Callable[[], object]) -> float:
    """Wall time of one call; for SciPy's isotonic step, the time of the isotonic calls only."""
    start = time.perf_counter()
    fn()
    total = time.perf_counter() - start
    inner = getattr(entry.forward, "inner", None)
    return total if inner is None else inner


def measure(entry: Entry, x: object, u: object, k: int, sync: Callable, repeats: int,
            with_backward: bool = True) -> dict:
    """First call, median forward and median forward+backward times (seconds) of one entry on one input."""
    reps = entry.repeats or repeats
    fwd = lambda: sync(entry.forward(x, k))  # noqa: E731
    first = _timed(entry, fwd)
    if getattr(entry.forward, "inner", None) is not None:
        times = [_timed(entry, fwd) for _ in range(reps)]
        t_fwd = float(np.median(times))
    else:
        t_fwd = median_time(fwd, reps, warmup=0 if reps == 1 else 1)
    t_both = None
    if with_backward and entry.both is not None:
        both = lambda: sync(entry.both(x, k, u))  # noqa: E731
        t_both = median_time(both, reps, warmup=1)
    return {"first": first, "forward": t_fwd, "both": t_both}


def _data(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _rss(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field_name)


def memory_child(framework: str, operators: list[str], device: str, jobs: list[tuple[str, list[int]]]) -> None:
    """Run in a subprocess: print {name|shape: peak bytes} of one forward+backward call per (entry, shape)."""
    entries, convert, sync = BUILDERS[framework](operators, device)
    by_name = {e.name: e for e in entries}
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        trim = None
    cuda = device == "cuda" and framework == "torch"
    out = {}
    for name, shape in jobs:
        entry = by_name[name]
        shape = tuple(shape)
        xs, us = _data((1, 64))
        k = _k(shape[1])
        call = entry.both or (lambda x, k, u, f=entry.forward: f(x, k))
        sync(call(convert(xs), _k(64), convert(us)))  # compilation of the kernels, outside the measurement
        xa, ua = _data(shape)
        x, u = convert(xa), convert(ua)
        if cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            if trim is not None:
                trim(0)
            with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark
                fh.write("5")
            before = _rss("VmRSS:")
        try:
            result = sync(call(x, k, u))
        except Exception as err:
            out[f"{name}|{shape}"] = f"error: {type(err).__name__}"
            continue
        if cuda:
            import torch

            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = _rss("VmHWM:") - before
        out[f"{name}|{shape}"] = max(int(peak), 0)
        del result, x, u
    print("MEMORY " + json.dumps(out), flush=True)


def peak_memory(framework: str, operators: list[str], device: str, jobs: list[tuple[str, tuple[int, int]]],
                timeout: float) -> dict[str, object]:
    if not jobs:
        return {}
    spec = json.dumps([framework, operators, device, [[n, list(s)] for n, s in jobs]])
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import run; "
            f"run.memory_child(*__import__('json').loads({spec!r}))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    print(f"(memory subprocess for {framework} failed: {done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
    return {}


# --------------------------------------------------------------------------- the run


def _ms(t: float | None) -> str:
    return "" if t is None else f"{t * 1e3:.3g}" if t < 1e-3 else f"{t * 1e3:.1f}"


def _mb(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{v / 2**20:.1f}"


def run_framework(framework: str, args: argparse.Namespace) -> dict:
    entries, convert, sync = BUILDERS[framework](args.operators, args.device)
    if args.quick:  # a smoke run: one exponent, no Dykstra, no peer that takes seconds to build or compile
        entries = [e for e in entries if (e.kind != "ours" or ("p=4/3" in e.name and "dykstra" not in e.name))
                   and not e.name.startswith(("difftopk", "ott-jax"))]
    results: dict = {"entries": entries, "table": {}, "n_sweep": {}, "batch_sweep": {}, "memory": {}}
    sort_name = entries[0].name
    for shape in args.shapes:
        xa, ua = _data(shape)
        x, u = convert(xa), convert(ua)
        k = _k(shape[1])
        for entry in entries:
            if not entry.fits(shape):
                continue
            try:
                results["table"][entry.name, shape] = measure(entry, x, u, k, sync, args.repeats)
            except Exception as err:
                results["table"][entry.name, shape] = {"error": f"{type(err).__name__}: {err}"[:80]}
            r = results["table"][entry.name, shape]
            print(f"{framework:5} {shape!s:14} {entry.name:45} "
                  + (r.get("error") or f"first {_ms(r['first'])} ms, fwd {_ms(r['forward'])} ms, "
                     f"both {_ms(r['both'])} ms"), flush=True)
    for key, sweep, shapes in (("n_sweep", args.n_sweep, [(1, n) for n in args.n_sweep]),
                               ("batch_sweep", args.batch_sweep, [(b, 64) for b in args.batch_sweep])):
        del sweep
        for entry in (e for e in entries if e.sweep and not (args.quick and e.kind == "peer")):
            for shape in shapes:
                if not entry.fits(shape):
                    continue
                xa, _ = _data(shape)
                x = convert(xa)
                try:
                    r = measure(entry, x, None, _k(shape[1]), sync, args.sweep_repeats, with_backward=False)
                except Exception as err:
                    print(f"{framework} {entry.name} {shape}: {type(err).__name__}: {err}", file=sys.stderr)
                    break
                results[key][entry.name, shape] = r["forward"]
                if r["forward"] > args.time_cap:  # compilation (the first call) does not count
                    break  # the next size would take too long: stop this implementation's sweep
            print(f"{framework:5} {key} {entry.name}: " + ", ".join(
                f"{s}: {_ms(t)} ms" for (n, s), t in results[key].items() if n == entry.name), flush=True)
    if not args.no_memory:
        jobs = [(name, shape) for (name, shape), r in results["table"].items() if "error" not in r]
        jobs += [(name, shape) for (name, shape) in results["n_sweep"] if shape[1] >= 10**4 and
                 shape[1] <= args.memory_max_n and (name, shape) not in results["table"]]
        results["memory"] = peak_memory(framework, args.operators, args.device, jobs, timeout=args.memory_timeout)
    results["sort"] = sort_name
    return results


def largest_n(name: str, memory: dict, budget: int) -> tuple[str, str]:
    """Extrapolate the peak memory of one row to the budget: peak ~ c n^b fitted on the two largest rows."""
    points = []
    for key, v in memory.items():
        entry, shape = key.split("|")
        rows, n = ast.literal_eval(shape)
        if entry == name and rows == 1 and isinstance(v, int) and v > 4 * 2**20:
            points.append((n, v))
    points.sort()
    if not points:
        return "", "n/a (peaks too small to extrapolate)"
    n2, m2 = points[-1]
    b = 1.0
    if len(points) >= 2:
        n1, m1 = points[-2]
        b = max(1.0, math.log(m2 / m1) / math.log(n2 / n1))
    n_max = n2 * (budget / m2) ** (1.0 / b)
    return f"{n2:.0e} ({m2 / n2:.0f} B/elt)", f"~{n_max:.1e} (estimate, peak ~ n^{b:.2g})"


def report(all_results: dict, args: argparse.Namespace, figure_dir: Path | None, page_dir: Path | None) -> str:
    lines = [
        f"Machine: {machine()}; device `{args.device}`; {_versions(all_results)}.",
        f"float32 inputs, k = max(1, n/10), regularization_strength = {STRENGTH}. Times: medians of "
        f"{args.repeats} runs after one warm-up run (single-run entries: no warm-up), measured side by side in "
        "one process; *first call* is the very first call on that shape (Numba compilation in the process's "
        "first call, `jax.jit` tracing and compilation for each new shape). *fwd+bwd*: forward and one "
        "vector-Jacobian product. *forward / sort*: ratio to the framework's full sort of the same data "
        "in the same run. *Peak memory*: high-water mark of resident memory added by one forward+backward "
        "call, in a fresh subprocess per framework after compilation"
        + (" (`torch.cuda.max_memory_allocated` for torch)" if args.device == "cuda" else "")
        + "; `n/a` where not measured.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for framework, res in all_results.items():
        for shape in args.shapes:
            sort = res["table"].get((res["sort"], shape), {}).get("forward")
            for entry in res["entries"]:
                r = res["table"].get((entry.name, shape))
                if r is None:
                    continue
                mem = res["memory"].get(f"{entry.name}|{shape}") if res["memory"] else None
                if "error" in r:
                    cells = ["", r["error"], "", "", ""]
                else:
                    ratio = f"{r['forward'] / sort:.2f}" if sort else ""
                    cells = [_ms(r["first"]), _ms(r["forward"]), _ms(r["both"]), ratio, _mb(mem)]
                lines.append("| " + " | ".join([framework, f"`{entry.name}`", entry.kind, entry.computes,
                                                f"{shape}", *cells]) + " |")
    lines += _gpu_target(all_results, args)
    lines += ["", f"Time vs n (one row, forward, medians of {args.sweep_repeats}; a sweep stops after the "
              f"first size whose call exceeds {args.time_cap:g} s; times in ms):", ""]
    lines += _sweep_table(all_results, "n_sweep", args.n_sweep, 1)
    lines += ["", "Time vs batch at n = 64 (forward, ms):", ""]
    lines += _sweep_table(all_results, "batch_sweep", args.batch_sweep, 0)
    budget = min(MEMORY_BUDGET, _mem_total())
    lines += ["", f"Largest n of one row within {budget / 2**30:.0f} GiB, extrapolated from the peaks measured "
              f"(up to n = {args.memory_max_n:.0e}) with a power law through the two largest rows. These are "
              "**estimates**, not runs to the limit:", "",
              "| framework | implementation | largest n measured (bytes per element) | largest n within budget |",
              "|---|---|---|---|"]
    for framework, res in all_results.items():
        if not res["memory"]:
            continue
        for entry in res["entries"]:
            if entry.sweep:
                measured, estimate = largest_n(entry.name, res["memory"], budget)
                lines.append(f"| {framework} | `{entry.name}` | {measured} | {estimate} |")
    lines += ["", f"Generated by `{args.command}` ({args.elapsed_note})."]
    if figure_dir is not None and page_dir is not None:
        lines.append("")
        for path in plots(all_results, args, figure_dir):
            rel = os.path.relpath(path, page_dir)
            lines.append(f"![{path.stem}]({rel})")
            lines.append("")
    return "\n".join(lines)


def _gpu_target(all_results: dict, args: argparse.Namespace) -> list[str]:
    """On CUDA: forward+backward of this library's entries at GPU_TARGET_SHAPE as ratios to the hard top-k's."""
    if args.device != "cuda" or GPU_TARGET_SHAPE not in args.shapes:
        return []
    lines = ["", f"Target on the GPU: forward+backward at most {GPU_TARGET:g}x the hard top-k's at "
             f"{GPU_TARGET_SHAPE} (its values scattered into a row of zeros and differentiated):", ""]
    for res in all_results.values():
        hard = next((e.name for e in res["entries"] if e.kind == "baseline" and "top" in e.name), None)
        base = res["table"].get((hard, GPU_TARGET_SHAPE), {}).get("both")
        for entry in res["entries"]:
            r = res["table"].get((entry.name, GPU_TARGET_SHAPE), {})
            if entry.kind != "ours" or not base or not r.get("both"):
                continue
            ratio = r["both"] / base
            lines.append(f"* `{entry.name}`: {ratio:.2f}x `{hard}` ({'met' if ratio <= GPU_TARGET else 'missed'})")
    return lines


def _sweep_table(all_results: dict, key: str, sizes: list[int], axis: int) -> list[str]:
    head = "n" if axis == 1 else "batch"
    labels = [f"{head} = 1e{round(math.log10(s))}" if s >= 10**4 and 10 ** round(math.log10(s)) == s
              else f"{head} = {s}" for s in sizes]
    lines = ["| framework | implementation | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for framework, res in all_results.items():
        for entry in res["entries"]:
            if not entry.sweep:
                continue
            cells = []
            for s in sizes:
                shape = (1, s) if axis == 1 else (s, 64)
                t = res[key].get((entry.name, shape))
                cells.append("" if t is None else _ms(t))
            if any(cells):
                lines.append(f"| {framework} | `{entry.name}` | " + " | ".join(cells) + " |")
    return lines


def plots(all_results: dict, args: argparse.Namespace, figure_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, sizes, axis, label in (("n_sweep", args.n_sweep, 1, "n (one row)"),
                                    ("batch_sweep", args.batch_sweep, 0, "batch (rows of n = 64)")):
        frameworks = list(all_results)
        fig, axes = plt.subplots(1, len(frameworks), figsize=(5.2 * len(frameworks), 4.2), squeeze=False)
        for ax, framework in zip(axes[0], frameworks, strict=True):
            res = all_results[framework]
            for entry in res["entries"]:
                pts = [(s, res[key][entry.name, shape]) for s in sizes
                       if (entry.name, shape := ((1, s) if axis == 1 else (s, 64))) in res[key]]
                if pts:
                    style = "-" if entry.kind == "ours" else "--" if entry.kind == "baseline" else ":"
                    ax.loglog(*zip(*pts, strict=True), style, marker="o", ms=3, label=entry.name)
            s = np.array(sizes, dtype=float)
            ref = s * np.log2(np.maximum(s, 2)) if axis == 1 else s
            anchor = res[key].get((res["sort"], (1, sizes[-1]) if axis == 1 else (sizes[-1], 64)), 1.0)
            ax.loglog(s, ref / ref[-1] * anchor, color="0.7", lw=4, alpha=0.5,
                      label="n log n (reference)" if axis == 1 else "linear (reference)")
            ax.set_xlabel(label)
            ax.set_ylabel("forward time (s)")
            ax.set_title(f"{framework} ({args.device})")
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = figure_dir / f"bench_{'time_vs_n' if axis == 1 else 'time_vs_batch'}_{args.device}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _mem_total() -> int:
    try:
        return _meminfo("MemTotal:")
    except (OSError, RuntimeError):
        return MEMORY_BUDGET


def _meminfo(field_name: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field_name):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field_name)


def _versions(all_results: dict) -> str:
    out = [f"NumPy {np.__version__}"]
    if "torch" in all_results:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        out.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads, {name})")
    if "jax" in all_results:
        import jax

        out.append(f"jax {jax.__version__} ({jax.default_backend()})")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> None:
    global METHODS
    # Dykstra (p = 2, rows up to DYKSTRA_MAX_N) is timed at its default max_iter, converged or not.
    import topk_core

    warnings.simplefilter("ignore", topk_core.DykstraNotConverged)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", default="all",
                        help="numpy, torch, jax, a comma-separated list of them (run in that order), or all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help=f"comma-separated ROWSxN, e.g. 1x1e6,64x4096 (default: {SHAPES})")
    parser.add_argument("--operators", default="mask,mag", help="comma-separated subset of mask,mag")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of this library's methods (e.g. threshold: skips PAV's "
                             "host round trips and Numba's first compilation on a GPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes, short sweeps, 2 repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-n", type=float, default=1e7, help="largest n of the time-vs-n sweep")
    parser.add_argument("--time-cap", type=float, default=3.0, help="seconds per call that stop a sweep")
    parser.add_argument("--memory-max-n", type=float, default=1e6, help="largest n whose peak memory is measured")
    parser.add_argument("--memory-timeout", type=float, default=900)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--write", metavar="PAGE", help="write the section `bench_suite_<device>` of this page "
                        "(created if missing) and the PNG plots")
    parser.add_argument("--figures", metavar="DIR", help="where the PNG plots go (default: PAGE's dir/figures)")
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/run.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    args.operators = [op for op in args.operators.split(",") if op]
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods must be a non-empty subset of {','.join(METHODS)}")
    METHODS = methods
    if set(args.operators) - set(OPERATORS):
        parser.error(f"--operators must be a subset of {OPERATORS}")
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if args.device == "cuda" else SHAPES
    args.n_sweep = [n for n in (QUICK_N_SWEEP if args.quick else N_SWEEP) if n <= args.max_n]
    args.batch_sweep = QUICK_BATCH_SWEEP if args.quick else BATCH_SWEEP
    if args.quick:
        args.repeats = 2
        args.memory_max_n = min(args.memory_max_n, 1e4)
    args.sweep_repeats = 2 if args.quick else 3
    frameworks = ["numpy", "torch", "jax"] if args.framework == "all" else args.framework.split(",")
    if not frameworks or set(frameworks) - set(BUILDERS) or len(set(frameworks)) < len(frameworks):
        parser.error(f"--framework must be all or a list of distinct names among {sorted(BUILDERS)}")
    if args.device == "cuda" and "numpy" in frameworks:
        frameworks.remove("numpy")
        print("(--device cuda: NumPy runs on the host only and is left out)", file=sys.stderr)
    started = time.perf_counter()
    all_results: dict = {}
    for fw in frameworks:
        all_results[fw] = run_framework(fw, args)
        # Written after each framework, so that a run cut short (a GPU lease's time limit) keeps what it measured.
        args.elapsed_note = f"{(time.perf_counter() - started) / 60:.0f} minutes on this machine" + (
            "" if fw == frameworks[-1] else f"; a partial report, written after {fw}")
        text = publish(all_results, args)
    print(text)


def publish(all_results: dict, args: argparse.Namespace) -> str:
    """The report of the frameworks measured so far, written into `args.write`'s section if asked."""
    page_dir = figure_dir = None
    if args.write:
        page = Path(args.write)
        page_dir = page.parent
        figure_dir = Path(args.figures) if args.figures else page_dir / "figures"
    text = report(all_results, args, figure_dir, page_dir)
    if args.write:
        name = f"bench_suite_{args.device}"
        if not page.exists() or f"<!-- {name}:start -->" not in page.read_text():
            with page.open("a") as fh:
                fh.write(f"\n<!-- {name}:start -->\n<!-- {name}:end -->\n")
        write_section(page, name, text)
    return text


if __name__ == "__main__":
    main()
