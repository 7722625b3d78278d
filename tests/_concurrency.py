"""The workload of `test_threads.py`, importable by the subprocesses it starts: operator calls on arrays that
reach the kernels' parallel variants, run alone and from several threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import topk_numpy

# Shapes of the parallel variants (at least `kernels.PARALLEL_MIN_ENTRIES` entries): many short rows
# (the lane solver), rows with a NaN row among them (the sorting route), and one long row split
# across the threads (`select._select_long_rows`).
SHORT_ROWS = (2048, 64)
LONG_ROW = (1, 1 << 17)


def inputs(shape: tuple[int, int], dtype: str, nan_row: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype)
    if nan_row:
        x[shape[0] // 2, 3] = np.nan
    return x, rng.normal(size=shape).astype(dtype)


def call(op: str, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The forward of `op` and the VJP of `u`: every parallel kernel of its route."""
    y, vjp_fn = getattr(topk_numpy, f"soft_topk_{op}_vjp")(x, max(1, x.shape[-1] // 8))
    return y, vjp_fn(u)


def run_concurrently(cases: list[tuple[str, tuple[int, int], str, bool]], threads: int = 4, rounds: int = 3) -> list:
    """Every case once alone, then `rounds` times each from `threads` threads at once (each call on inputs
    of its own seed, so that outputs handed to the wrong caller would show); returns the mismatches."""
    tasks = [(op, shape, dtype, nan_row, seed) for op, shape, dtype, nan_row in cases for seed in range(threads)]
    expected = {task: call(task[0], *inputs(*task[1:])) for task in tasks}

    def run(task):
        got = call(task[0], *inputs(*task[1:]))
        return [task for a, b in zip(got, expected[task], strict=True) if not np.array_equal(a, b, equal_nan=True)]

    with ThreadPoolExecutor(threads) as pool:
        return [bad for _ in range(rounds) for found in pool.map(run, tasks) for bad in found]


CASES = [(op, SHORT_ROWS, dtype, nan_row) for op in ("mask", "mag") for dtype in ("float32", "float64")
         for nan_row in (False, True)]
