"""When the kernels' parallel variants may run: one at a time in a process, and not after an unsafe fork.

Numba runs a parallel variant (`parallel=True`, its `prange` loops) on its
threading layer, and two of its layers break in ways that users meet:

* `workqueue`, the one Numba falls back to where neither OpenMP nor TBB is
  installed (slim container images without libgomp, macOS without an OpenMP
  runtime), aborts the whole process when two threads launch parallel regions
  at once ("Concurrent access has been detected").  Data loaders, JAX's host
  callbacks of several devices and users' thread pools call the operators from
  several threads: every parallel variant runs under `LAUNCH`.  A parallel
  region already runs on every thread of Numba's pool, so waiting for it
  costs the other callers little.
* GNU OpenMP (`omp`, the usual layer on Linux) is not fork-safe: Numba kills a
  child forked from a parent that has run a parallel region on it as soon as
  the child runs one ("Terminating: fork() called from a process already using
  GNU OpenMP, this is unsafe"), and a `multiprocessing` pool then waits forever
  for the task it lost.  Forking is multiprocessing's default start method on
  Linux (pools, PyTorch's data-loader workers): such a child runs the serial
  variants (`allowed`), its parallelism being the pool's processes.  Numba's
  other layers are fork-safe, and a parent that ran no parallel region leaves
  the child free to start its own threads.

`tests/test_threads.py` runs both cases under the layer each needs.
"""

from __future__ import annotations

import os
import threading

import numba as nb

# Held while a parallel variant runs.  Reentrant, so that code holding it may launch under it again.
LAUNCH = threading.RLock()
_allowed = True


def allowed() -> bool:
    """Whether the parallel variants may run in this process (not in a child forked after OpenMP ran)."""
    return _allowed


def _after_fork_in_child() -> None:
    global _allowed
    try:
        layer = nb.threading_layer()
    except ValueError:  # no parallel region ran before the fork
        return
    if layer == "omp":
        _allowed = False


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
