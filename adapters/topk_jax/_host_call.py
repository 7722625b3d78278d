"""Calling a NumPy function of JAX arrays on the host: one helper for the solver and the Jacobian products.

On the CPU, where JAX has it (0.7 and later), `jax.experimental.buffer_callback`
hands the function XLA's buffers: a function that can write its results
into XLA's own output buffers does (the core's PAV kernels and products:
`topk_core._api.soft_forward_into`, `jacobian_product_into`), other results
are copied there; `jax.pure_callback`, which copies them out of the arrays the
function returns, took the jitted forward of the soft operators to 1.35-1.8x
its time (`benchmarks/bench_jax_products.py`, docs/jax.md).  Elsewhere (a GPU's
device memory, older JAX) `jax.pure_callback`.

Either way the function runs in the IEEE floating-point mode
(`topk_core._fpmode.subnormals_kept`): XLA calls it with subnormal numbers
flushed to zero, which the core's kernels then computed with, and which
Numba's worker threads, when started there, kept for every later call of
the process, NumPy's and PyTorch's included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from topk_core._api import shares_buffer
from topk_core._fpmode import subnormals_kept

try:  # JAX >= 0.7: host callbacks that write into XLA's output buffers
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older JAX: jax.pure_callback only
    _buffer_callback = None

__all__ = ["host_call"]

# Whether functions that can write into XLA's output buffers are handed them (read while tracing).  False
# copies every result instead, as the adapter did before: `benchmarks/bench_jax_products.py` times both
# (with the buffers written in place, the jitted forward took 0.79-0.93x and forward + VJP 0.75-0.88x the
# time from (4096, 64) on; an AMD EPYC, docs/jax.md).
WRITE_IN_PLACE = True


def host_call(fn: Callable[..., Any], result_spec: Any, *args: jax.Array, on_cpu: bool,
              vmap_method: str | None = None, writes_into: bool = False) -> Any:
    """``fn(*arrays)`` (NumPy arrays in, a pytree of arrays out, shaped as `result_spec`) from JAX code.

    `on_cpu`: the arguments live in host memory (the caller's rule for tracers), where the buffers are
    NumPy-viewable.  `writes_into`: `fn` takes a keyword ``into``, XLA's output buffers as NumPy arrays (a
    pytree shaped as `result_spec`), and may write its results there; what it returns in other memory is
    copied into them (``into`` is None under `jax.pure_callback`).
    """
    fn = _in_ieee_mode(fn)
    if _buffer_callback is not None and on_cpu:
        into = writes_into and WRITE_IN_PLACE
        return _buffer_callback(_writing_into(fn, into), result_spec, vmap_method=vmap_method)(*args)
    return jax.pure_callback(fn, result_spec, *args, vmap_method=vmap_method)


@functools.lru_cache(maxsize=1024)
def _in_ieee_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run with subnormal numbers kept (`subnormals_kept`); one object per `fn`, as `_writing_into`
    (which keys its own cache on it)."""

    def run(*arrays: Any, **keywords: Any) -> Any:
        with subnormals_kept():
            return fn(*arrays, **keywords)

    return run


@functools.lru_cache(maxsize=1024)
def _writing_into(fn: Callable[..., Any], writes_into: bool) -> Callable[..., None]:
    """`fn` as a `buffer_callback` function: its results in XLA's output buffers, leaf by leaf (absent
    residual fields are None on both sides), copied there unless `fn` wrote them in place.

    One object per `fn` (cached; the adapter's callbacks are cached per configuration): the callback is a
    parameter of the primitive that an eager call compiles, and a new object each call compiled it again
    (`benchmarks/first_call.py --framework jax`: an eager forward on (8192, 16) float32 rows took 20-21 ms,
    1.6-2 ms with one object)."""

    def write(ctx: Any, out: Any, *buffers: Any) -> None:
        del ctx  # the execution context serves GPU streams only
        targets = jax.tree.map(np.asarray, out)
        arrays = (np.asarray(b) for b in buffers)
        results = fn(*arrays, into=targets) if writes_into else fn(*arrays)
        for target, value in zip(jax.tree.leaves(targets), jax.tree.leaves(results), strict=True):
            if not shares_buffer(value, target):
                np.copyto(target, value, casting="no")

    return write
