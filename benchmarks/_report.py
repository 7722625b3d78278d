"""Shared helpers of the benchmark scripts: timing, the forward+VJP step, the machine line, writing into the docs,
the exponents timed, `ROWSxN` shape lists and the hard top-k baseline of PyTorch."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# The two exponents the benchmarks time: p = 4/3 (the library's default) and 2.
EXPONENTS = {"4/3": 4.0 / 3.0, "2": 2.0}


def table_parser(doc: str | None, repeats: int, tables: str = "table") -> argparse.ArgumentParser:
    """The arguments every table script takes: ``--quick`` (a smoke run), ``--repeats`` and ``--write PAGE``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--write", metavar="PAGE", help=f"also write the {tables} into this Markdown page")
    return parser


def table_size(args: argparse.Namespace, shapes: list, quick_shapes: list) -> tuple[list, int]:
    """(shapes, repeats) of a table script's run: its quick shapes and 2 repeats with ``--quick``."""
    return (quick_shapes, 2) if args.quick else (shapes, args.repeats)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """Comma-separated ``ROWSxN`` (numbers as 1e6 allowed), e.g. ``1x1e6,64x4096``, as (rows, n) pairs."""
    shapes = []
    for item in text.split(","):
        rows, n = (int(float(v)) for v in item.lower().split("x"))
        shapes.append((rows, n))
    return shapes


def parse_exponents(text: str) -> list[float]:
    """Comma-separated exponents, each a number or a fraction, e.g. ``4/3,2``."""
    exponents = []
    for item in text.split(","):
        numerator, _, denominator = item.partition("/")
        exponents.append(float(numerator) / float(denominator or 1))
    return exponents


def torch_hard_topk(x: object, k: int) -> object:
    """The hard top-k in value with x's shape: torch.topk's values scattered into a row of zeros."""
    import torch

    values, indices = torch.topk(x, k, dim=-1)
    return torch.zeros_like(x).scatter(-1, indices, values)


def triton_mag_threshold() -> Callable[[np.ndarray, int, float, float], np.ndarray]:
    """The magnitude's threshold method through PyTorch's Triton kernels for short rows, forced for every row
    they take (Triton's interpreter without a GPU), as ``forward(x, k, p, lam) -> y`` on NumPy rows."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when Triton is imported)
    import torch

    import topk_torch as tt
    from topk_torch import _triton_rows

    os.environ[_triton_rows.ENVIRONMENT_VARIABLE] = "always"
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def forward(x: np.ndarray, k: int, p: float, lam: float) -> np.ndarray:
        y = tt.soft_topk_mag(torch.from_numpy(x).to(device), k, p=p, regularization_strength=lam, method="threshold")
        return y.cpu().numpy()

    return forward


def _wall_times(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Wall times of `repeats` runs of `fn()`, after `warmup` runs that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int,
                      reduce: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """`reduce` (the median, or min) of the wall times of every callable after one warm-up call each; the
    rounds interleave the callables, so load drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up (compilation, allocator, caches)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: reduce(t) for name, t in times.items()}


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs, after `warmup` runs that are not timed."""
    return statistics.median(_wall_times(fn, repeats, warmup))


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Shortest wall time of `fn()` over `repeats` runs (after `warmup` untimed ones): for side-by-side
    comparisons of two kernels on a shared machine, whose slow phases hit one column or the other."""
    return min(_wall_times(fn, repeats, warmup))


def forward_vjp(with_res: Callable, vjp: Callable, x: object, k: int, u: object, kw: dict) -> object:
    """A forward with residuals (`with_res(x, k, **kw)`) and the VJP of `u` from them: what a training step pays."""
    return vjp(with_res(x, k, **kw)[1], u)


def machine() -> str:
    """One line describing the CPU, cores and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}{_vector_extension()}, {os.cpu_count()} cores, Linux, Python {platform.python_version()}"


def _vector_extension() -> str:
    """" with AVX-512" or " with AVX2" (the widest x86 vectors the kernels compile to), else ""."""
    from topk_core._pav.vector_width import host_features, host_has

    features = host_features()
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if host_has(flag, features):
            return f" with {name}"
    return ""


def write_section(path: str | Path, name: str, text: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path`."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page = path.read_text()
    if start not in page or end not in page:
        raise ValueError(f"{path} has no section markers {start} ... {end}")
    head, rest = page.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{tail}")


def random_rows(shapes: list[tuple[int, int]], header: list[str]) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray, int]]:
    """Print a table's `header`, then yield (shape, x, u, k) per shape: float32 normal rows `x`, a cotangent `u`
    and k = max(1, n/10), the same data in every script that uses it (seed 0)."""
    print("\n".join(header), flush=True)
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        u = rng.normal(size=shape).astype(np.float32)
        yield shape, x, u, max(1, shape[1] // 10)
