"""Calls from several Python threads at once, and from processes forked after a call: each gets the results
of a call made alone, and no process aborts, whatever Numba's threading layer.

Numba's `workqueue` layer, its fallback where neither OpenMP nor TBB is installed, aborts the process
when two threads launch parallel regions at once (`parallel.LAUNCH`); its OpenMP layer (GNU)
aborts a child forked after the parent ran a parallel region, when the child runs one
(`parallel.allowed`).  The subprocess tests force each layer.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from topk_core._pav import kernels, parallel

from ._concurrency import CASES, LONG_ROW, run_concurrently
from ._subprocess import run_python


def test_concurrent_calls_match_calls_alone():
    assert run_concurrently(CASES) == []


def test_concurrent_calls_on_long_rows_match_calls_alone():
    assert run_concurrently([(op, LONG_ROW, "float64", False) for op in ("mask", "mag")], rounds=2) == []


def _run_script(script: str, layer: str, *args: str) -> str:
    """The last line `script` prints in a new process with Numba's threading layer `layer` (tests/ on its path,
    `args` after it)."""
    output = run_python(script, str(Path(__file__).parent), *args, env={"NUMBA_THREADING_LAYER": layer}, timeout=900)
    return output.strip().splitlines()[-1]


_WORKQUEUE = """
import sys
sys.path.insert(0, sys.argv[1])
import numba
from _concurrency import CASES, run_concurrently
mismatches = run_concurrently(CASES)
print(numba.threading_layer(), mismatches)
"""


def test_concurrent_calls_survive_the_workqueue_layer():
    """The layer that aborts on concurrent parallel regions (before `parallel.LAUNCH`: "Numba workqueue
    threading layer is terminating: Concurrent access has been detected", exit status 134)."""
    assert _run_script(_WORKQUEUE, "workqueue") == "workqueue []"


def _require_openmp_layer() -> None:
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (the layer exists in this Numba build)
    except ImportError:
        pytest.skip("Numba's OpenMP threading layer is not available here")


_FORKED = """
import os, sys
sys.path.insert(0, sys.argv[1])
import numba
import numpy as np
from _concurrency import CASES, LONG_ROW, call, inputs
cases = CASES + [(op, LONG_ROW, "float64", False) for op in ("mask", "mag")]
expected = [call(op, *inputs(*case, 0)) for op, *case in cases]  # parallel regions in the parent
pid = os.fork()
if pid == 0:
    # Within rounding: the long row takes the row-per-thread route there (last bits of the mask differ).
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True) for (op, *case), outputs in zip(cases, expected)
               for a, b in zip(call(op, *inputs(*case, 0)), outputs))
    os._exit(0 if same else 3)
print(numba.threading_layer(), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_calls_in_a_process_forked_after_openmp_ran():
    """A child forked after the parent ran parallel regions on GNU OpenMP (multiprocessing's default start
    method on Linux) gets the parent's results; it ran a parallel region, before `parallel.allowed`,
    and was killed ("Terminating: fork() called from a process already using GNU OpenMP")."""
    _require_openmp_layer()
    assert _run_script(_FORKED, "omp") == "omp 0"


def test_parallel_variants_run_under_the_launch_lock(monkeypatch):
    # Each kernel pair takes the lock around its parallel variant only.
    held = []

    class Probe:
        def __enter__(self):
            held.append(threading.current_thread().name)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(parallel, "LAUNCH", Probe())
    small, large = np.zeros((2, 8)), np.zeros((2, kernels.PARALLEL_MIN_ENTRIES // 2))
    for flat in (small, large):
        kernels.all_finite(flat)
    assert len(held) == 1


_DATA_LOADER = """
import torch
import topk_torch
x = torch.randn(4096, 64)  # 2^18 entries: the parallel variants
expected = topk_torch.soft_topk_mag(x, 8)


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return (topk_torch.soft_topk_mag(x, 8) - expected).abs().max()


loader = torch.utils.data.DataLoader(Rows(), num_workers=2, batch_size=None, multiprocessing_context="fork")
print(max(float(d) for d in loader))
"""


def test_torch_data_loader_workers_forked_after_openmp_ran():
    """PyTorch's data-loader workers, forked after the parent ran a parallel region: before
    `parallel.allowed` they were killed ("DataLoader worker (pid(s) ...) exited unexpectedly")."""
    pytest.importorskip("torch")
    _require_openmp_layer()
    assert float(_run_script(_DATA_LOADER, "omp")) < 1e-6


_FORK_POLICY = """
import os, sys
import numpy as np
import topk_numpy
from topk_core._pav import parallel
if sys.argv[2] == "after":
    topk_numpy.soft_topk_mask(np.random.default_rng(0).normal(size=(2048, 64)), 8)  # a parallel region
pid = os.fork()
if pid == 0:
    os._exit(0 if parallel.allowed() else 3)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.parametrize(("layer", "fork", "child_threads"), [
    ("omp", "before", True),  # no parallel region before the fork: the child starts its own
    ("omp", "after", False),  # GNU OpenMP ran: the child runs the serial variants
    ("workqueue", "after", True),  # a fork-safe layer: the child keeps its threads
])
def test_forked_children_keep_their_threads_unless_openmp_ran(layer, fork, child_threads):
    if layer == "omp":
        _require_openmp_layer()
    assert _run_script(_FORK_POLICY, layer, fork) == ("0" if child_threads else "3")
