"""Calling a NumPy function of JAX arrays on the host: one helper for the solver and the Jacobian products.

On the CPU, where JAX has it (0.7 and later), `jax.experimental.buffer_callback`
hands the function XLA's buffers and the results are copied into XLA's own
output buffers; `jax.pure_callback`, which copies them out of the arrays the
function returns, took the jitted forward of the soft operators to 1.3-2x its
time (`benchmarks/bench_jax_products.py`, docs/jax.md).  Elsewhere (a GPU's
device memory, older JAX) `jax.pure_callback`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

try:  # JAX >= 0.7: host callbacks that write into XLA's output buffers
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older JAX: jax.pure_callback only
    _buffer_callback = None

__all__ = ["host_call"]


def host_call(fn: Callable[..., Any], result_spec: Any, *args: jax.Array, on_cpu: bool,
              vmap_method: str | None = None) -> Any:
    """``fn(*arrays)`` (NumPy arrays in, a pytree of arrays out, shaped as `result_spec`) from JAX code.

    `on_cpu`: the arguments live in host memory (the caller's rule for tracers), where the buffers are
    NumPy-viewable.
    """
    if _buffer_callback is not None and on_cpu:
        return _buffer_callback(_writing_into(fn), result_spec, vmap_method=vmap_method)(*args)
    return jax.pure_callback(fn, result_spec, *args, vmap_method=vmap_method)


def _writing_into(fn: Callable[..., Any]) -> Callable[..., None]:
    """`fn` as a `buffer_callback` function: its results copied into XLA's output buffers, leaf by leaf (absent
    residual fields are None on both sides)."""

    def write(ctx: Any, out: Any, *buffers: Any) -> None:
        del ctx  # the execution context serves GPU streams only
        results = fn(*(np.asarray(b) for b in buffers))
        for buffer, value in zip(jax.tree.leaves(out), jax.tree.leaves(results), strict=True):
            np.copyto(np.asarray(buffer), value, casting="no")

    return write
