"""The core's iterative solvers with their elementwise work compiled by `torch.compile`.

The threshold and Dykstra methods of the core repeat one loop body (a few
dozen elementwise operations and row reductions) until every row has
converged, and the threshold method wraps its loops in pure stages (the
frame and bracket before, the polish and the outputs after: hundreds of
operations).  Eager PyTorch runs each operation as its own kernel: on a GPU a
call costs thousands of launches, a floor of about 20 ms whatever the size,
and one pass over the data per operation (docs/benchmarks.md).  The core
accepts the loop as ``loop(cond, body, state)``, with the semantics of
``jax.lax.while_loop``, and a ``stage(fn)`` hook for its pure stages;
`compiled_loop` is that loop with `body` and `cond` (a reduction of the
state to one boolean) compiled together, so that one iteration is a few
fused kernels and one host read of that boolean, which ends the loop, as the
eager solver does, once every row has converged; `compiled_stage` compiles
a stage once per function.

When they are used (`use_compiled`, `solver_hooks`) is set by the environment variable
``SPARSE_TOPK_TORCH_COMPILE``: ``auto`` (the default: CUDA tensors only),
``always`` (any device; the CPU has its own fast path, PAV, so this is for
tests and measurements) or ``never``.  The first call compiles (seconds per
operator, p and dtype; `dynamic=True`, so other batch sizes, `k` and
strengths reuse the graphs); a compiler that fails (no working Triton or C++
toolchain) makes the solvers eager again for the rest of the process, with a
warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _support

ENVIRONMENT_VARIABLE = "SPARSE_TOPK_TORCH_COMPILE"
MODES = ("auto", "always", "never")
# torch.compile's backend; the tests set "eager" (Dynamo's tracing without a compiler).
BACKEND = "inductor"
# Loop iterations per compiled call (each guarded by the loop's test, so the result is the
# loop's): fewer host synchronisations and calls for more work per call. 1 until a GPU
# measurement (benchmarks/bench_fused_threshold.py --unroll) says otherwise.
UNROLL = 1
# Every solver shares one loop body per method, specialized on each (operator, p, dtype):
# more graphs than Dynamo's default limit of 8 per function before it falls back to eager.
RECOMPILE_LIMIT = 64

_failures: list[str] = []
# Dynamo's settings while a solver runs: the limit above (`cache_size_limit` before torch 2.6), and
# Python floats (the strength) as graph inputs, not constants: an annealed strength must not
# compile a graph per value (the default of recent versions, set where the setting exists).
_CONFIG = {"recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit":
           RECOMPILE_LIMIT}
if hasattr(torch._dynamo.config, "specialize_float"):
    _CONFIG["specialize_float"] = False


def compile_mode() -> str:
    """The mode that ``SPARSE_TOPK_TORCH_COMPILE`` sets (``"auto"`` when unset)."""
    mode = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {MODES}, got {mode!r}")
    return mode


def use_compiled(x: torch.Tensor) -> bool:
    """Whether the solvers run compiled (their loops and stages) for rows `x` (see the module's docstring)."""
    mode = compile_mode()
    if not _support.COMPILES:  # an older torch: the loops run eagerly (`topk_torch._support`)
        return False
    return not _failures and (mode == "always" or (mode == "auto" and x.device.type == "cuda"))


def _distinct(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """The state with aliased tensors copied: an alias in the first call would compile a second graph."""
    seen: set[int] = set()
    out = []
    for t in state:
        if isinstance(t, torch.Tensor) and id(t) in seen:
            t = t.clone()
        seen.add(id(t))
        out.append(t)
    return tuple(out)


def _eager_after_failure(err: Exception) -> None:
    _failures.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        f"sparse-topk: torch.compile failed on a solver ({_failures[-1][:200]}); the solvers run eagerly "
        f"for the rest of this process (set {ENVIRONMENT_VARIABLE}=never to skip it)",
        RuntimeWarning, stacklevel=3,
    )


def _call(compiled: Callable[..., Any], fn: Callable[..., Any], *args: Any) -> Any:
    """`compiled(*args)`, or `fn(*args)` once a compiler has failed (`fn` is pure: a retry is safe)."""
    if _failures:
        return fn(*args)
    try:
        with torch._dynamo.config.patch(**_CONFIG):
            return compiled(*args)
    except torch.OutOfMemoryError:  # the data's fault, not the compiler's: compile again next time
        raise
    except Exception as err:  # a compiler that cannot run here: stay correct, eagerly
        _eager_after_failure(err)
        return fn(*args)


def _unrolled(cond: Callable[[Any], Any], body: Callable[[Any], Any], times: int) -> Callable[[Any], Any]:
    """`times` iterations of the loop, each applied only where the loop's test still holds."""
    if times == 1:
        return body

    def iterations(state: Any) -> Any:
        for _ in range(times):
            go = cond(state)
            state = tuple(torch.where(go, new, old) for new, old in zip(body(state), state, strict=True))
        return state

    return iterations


def _tested(cond: Callable[[Any], Any], work: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`work` that also returns the loop's test of its result, computed in the same compiled call
    (eagerly, the test is a few more kernels and operations per iteration)."""

    def step(state: Any) -> tuple[Any, Any]:
        state = work(state)
        return state, cond(state)

    return step


def compiled_loop(cond: Callable[[Any], Any], body: Callable[[Any], Any], state: Any, unroll: bool = True) -> Any:
    """``while cond(state): state = body(state)``, with `body` compiled; the semantics of ``lax.while_loop``.

    `unroll`: `UNROLL` iterations per compiled call (False: one, see `solver_hooks`).
    """
    # `body` is a new closure on every solve: compiled per call (Dynamo's cache, keyed on its code,
    # finds the graph again), never kept.
    work = _tested(cond, _unrolled(cond, body, UNROLL if unroll else 1))
    step = torch.compile(work, dynamic=True, backend=BACKEND)
    state = _distinct(state)
    go = cond(state)
    while bool(go):
        state, go = _call(step, work, state)
    return state


_stages: dict[tuple[Callable[..., Any], Any], Callable[..., Any]] = {}


def compiled_stage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a pure stage of a solver: arrays and scalars in, arrays out) compiled once per backend."""
    key = (fn, BACKEND)
    if key not in _stages:
        _stages[key] = torch.compile(fn, dynamic=True, backend=BACKEND)
    compiled = _stages[key]
    return lambda *args: _call(compiled, fn, *args)


def order_statistics(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The threshold method's start (`topk_core._agnostic.threshold.OrderStatistics`): the k-th and
    (k+1)-th largest keys of each row, (batch, 1) each, by `torch.topk`."""
    top = torch.topk(keys, k + 1, dim=-1).values
    # Contiguous: views whose strides follow k would have the compiled stage that takes them traced
    # again for each k.
    return top[..., k - 1:k].contiguous(), top[..., k:k + 1].contiguous()


def solver_hooks(x: torch.Tensor, method: str) -> dict[str, Callable[..., Any]]:
    """The keywords to hand the core's solver `method` for rows `x`: for the threshold method its
    order statistics (`order_statistics`), and where compiled code runs (`use_compiled`) its
    compiled `loop` (and the threshold method's compiled `stage`s)."""
    if not use_compiled(x):
        return {"order_statistics": order_statistics} if method == "threshold" else {}
    if method == "threshold":
        return {"loop": compiled_loop, "stage": compiled_stage, "order_statistics": order_statistics}
    # Dykstra: no stages; its body unrolled twice took Dynamo 27 s to trace on the CPU (2 s once).
    return {"loop": functools.partial(compiled_loop, unroll=False)}
