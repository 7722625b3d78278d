"""sparse-topk for JAX: the four operators, differentiable and transformable.

The mathematics lives in `topk_core`; see `topk_core.soft_topk_mask` and
`topk_core.soft_topk_mag`.  Names, keywords, defaults and numbers are those of
`topk_numpy`.

* The soft operators are `jax.custom_jvp` functions: `jax.jit`, `jax.vmap`,
  `jax.grad`, `jax.vjp`, `jax.jvp`, `jax.jacfwd`, `jax.jacrev` and their
  nestings work.  Derivatives of every order are exact for every ``p`` (from
  the second on zero almost everywhere for ``p = 2``).
* The Python scalars (`k`, `regularization_strength`, `p`, `axis`, `method`,
  `max_iter`, `tol`) are static: they are validated when the function is
  called (or traced), with the same errors as `topk_numpy`.
* Methods ``"threshold"`` (exact, any p) and ``"dykstra"`` (approximate,
  p = 2) run natively in `jax.numpy` on the array's device, their loop as one
  `jax.lax.while_loop`.  Method ``"pav"`` runs the Numba PAV on the host CPU
  through a host callback, on the primal path only: on the CPU
  `jax.experimental.buffer_callback` where JAX has it, else (and on a GPU/TPU
  backend, with the rows copied to the host and back) `jax.pure_callback`
  (`topk_jax._host_call`).  ``"auto"`` picks ``"pav"`` for arrays on the CPU
  (``p <= 8``; above, where PAV is not exact, ``"threshold"``) and
  ``"threshold"`` on any other device.  The Jacobian products are the
  core's closed form (never through the iterations): on the CPU, for calls
  of at least 2^16 entries with residuals in input order and rows that no
  mesh shards, the core's Numba products on the host
  (`topk_jax._host_products`); elsewhere `jax.numpy`.
* Sharded inputs keep their sharding: the host solve runs once per device on
  the local rows (`jax.shard_map` over the input's explicit sharding, or over
  the automatic mesh axes), never on a gathered copy unless the rows cannot be
  split.  See ``docs/jax.md``.
* float32 and float64 (with ``jax_enable_x64``) natively; float16 and bfloat16
  are computed in float32 and returned in the input dtype.  Array-likes
  (NumPy arrays, lists) are converted with `jax.numpy.asarray`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import topk_core
from topk_core import _validate
from topk_core._agnostic.layout import from_rows, to_rows
from topk_core._api import DEFAULT_P, DEFAULT_STRENGTH, compute_dtype
from topk_jax import nn as nn  # topk_jax.nn: pruning, MoE router and layer, top-k loss
from topk_jax._hard import hard_topk_rows
from topk_jax._sharding import per_shard
from topk_jax._soft import Static, resolve_method, soft_topk_mag_rows, soft_topk_mask_rows

__version__ = topk_core.__version__

__all__ = [
    "__version__",
    "hard_topk_mag",
    "hard_topk_mask",
    "soft_topk_mag",
    "soft_topk_mask",
]


_SMALLEST_NORMAL = float(np.finfo(np.float64).smallest_normal)


def _as_array(x: Any) -> jax.Array:
    # Tracers and jax.Arrays pass through; dtype checks happen in _validate.
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _validated(x: jax.Array, k: Any, axis: Any) -> tuple[int, int]:
    _validate.check_float_dtype(x, jnp)
    ax = _validate.check_axis(axis, x.ndim)
    return _validate.check_k(k, x.shape[ax], ax), ax


def _soft_op(
    rows_fn: Any, x: Any, k: Any, regularization_strength: Any, p: Any, axis: Any, method: Any, max_iter: Any,
    tol: Any,
) -> jax.Array:
    x = _as_array(x)
    k, ax = _validated(x, k, axis)
    lam = _validate.check_strength(regularization_strength)
    if lam < _SMALLEST_NORMAL:
        # XLA flushes subnormal numbers to zero on the CPU, so the native methods would solve with a strength
        # of 0; one rule for every method ("pav" ran under that setting too until its host calls kept
        # subnormals, `topk_core._fpmode`, and failed inside the callback, an XLA runtime error).
        raise ValueError(
            f"`regularization_strength` must be at least {_SMALLEST_NORMAL:.3g} (float64's smallest normal "
            f"number) in topk_jax, where XLA flushes smaller ones to 0; got {lam:.3g}. Scale x and the strength "
            "up together (the mask is invariant under x -> c x, l -> c l)"
        )
    p = _validate.check_p(p)
    static = Static(k, lam, p, resolve_method(x, p, method, max_iter, tol), max_iter, tol)

    def local(x: jax.Array) -> jax.Array:
        rows, moved = to_rows(x.astype(compute_dtype(x, jnp)), ax, jnp)
        return from_rows(rows_fn(rows, static), moved, ax, jnp).astype(x.dtype)

    return per_shard(local, x, ax)


def soft_topk_mask(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> jax.Array:
    """Sparse soft top-k mask along `axis` (see `topk_core.soft_topk_mask`).

    Parameters
    ----------
    x : jax.Array or array-like
        Real floating array of any shape (float16/bfloat16 computed in float32).
    k : int
        Number of entries to select, ``1 <= k <= x.shape[axis]``.
    regularization_strength : float, default 0.1
        ``l > 0``; smaller is closer to the hard mask, larger is smoother.
    p : float, default 4/3
        Exponent ``p > 1`` of the regularizer (4/3: C^1; 2: piecewise linear).
    axis : int, default -1
        Axis along which to select.
    method : {"auto", "pav", "dykstra", "threshold"}, default "auto"
        Solver.  ``"pav"``: Numba PAV on the host through a host callback (exact, ``p <= 8``);
        ``"threshold"`` (exact) and ``"dykstra"`` (p = 2, approximate): native
        `jax.numpy` on the array's device; ``"auto"``: ``"pav"`` on the CPU
        (``p <= 8``), ``"threshold"`` on GPU/TPU and for ``p > 8``.
    max_iter, tol : int, float or None
        Controls of the iterative methods named explicitly (as in
        `topk_numpy`); must be None for ``"pav"`` and ``"auto"``.  The
        solvers run compiled (one ``jax.lax.while_loop``), which cannot read
        their arrays: unlike `topk_numpy`, no warning when `max_iter` stops
        them first.

    Returns
    -------
    jax.Array
        Same shape and dtype as `x`; every row lies in the capped simplex.

    Raises
    ------
    TypeError, ValueError
        As `topk_numpy.soft_topk_mask`, raised when called or traced.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import topk_jax as tk
    >>> x = jnp.array([3.0, 1.0, 0.9, -2.0])
    >>> tk.soft_topk_mask(x, k=2, p=2.0, regularization_strength=1.0)
    Array([1.  , 0.55, 0.45, 0.  ], dtype=float32)
    >>> jax.grad(lambda x: tk.soft_topk_mask(x, 2, p=2.0, regularization_strength=1.0)[1])(x)
    Array([ 0. ,  0.5, -0.5,  0. ], dtype=float32)
    """
    return _soft_op(soft_topk_mask_rows, x, k, regularization_strength, p, axis, method, max_iter, tol)


def soft_topk_mag(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> jax.Array:
    """Sparse soft top-k in magnitude along `axis` (see `topk_core.soft_topk_mag`).

    Parameters
    ----------
    x, k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask`.

    Returns
    -------
    jax.Array
        Same shape and dtype as `x`: exact zeros outside a support, clear
        winners returned unchanged.

    Raises
    ------
    TypeError, ValueError
        As in `soft_topk_mask`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import topk_jax as tk
    >>> x = jnp.array([0.1, -4.0, 3.0, 0.2])
    >>> tk.soft_topk_mag(x, k=2)
    Array([ 0., -4.,  3.,  0.], dtype=float32)
    >>> jax.grad(lambda x: tk.soft_topk_mag(x, k=2).sum())(x)
    Array([0., 1., 1., 0.], dtype=float32)
    """
    return _soft_op(soft_topk_mag_rows, x, k, regularization_strength, p, axis, method, max_iter, tol)


def _hard_op(x: Any, k: Any, axis: Any, magnitude: bool) -> jax.Array:
    x = _as_array(x)
    k, ax = _validated(x, k, axis)

    def local(x: jax.Array) -> jax.Array:
        rows, moved = to_rows(x, ax, jnp)
        return from_rows(hard_topk_rows(rows, k, magnitude), moved, ax, jnp)

    return per_shard(local, x, ax)


def hard_topk_mask(x: Any, k: int, *, axis: int = -1) -> jax.Array:
    """Hard top-k mask, ties toward the lower index (see `topk_core.hard_topk_mask`).

    Built on `jax.lax.top_k`; its derivative is zero.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import topk_jax as tk
    >>> tk.hard_topk_mask(jnp.array([1.0, 3.0, 3.0, 2.0]), k=2)
    Array([0., 1., 1., 0.], dtype=float32)
    """
    return _hard_op(x, k, axis, magnitude=False)


def hard_topk_mag(x: Any, k: int, *, axis: int = -1) -> jax.Array:
    """Hard top-k in magnitude (see `topk_core.hard_topk_mag`).

    Built on `jax.lax.top_k`; its derivative is the hard mask of ``|x|``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import topk_jax as tk
    >>> x = jnp.array([0.5, -3.0, 2.0, 1.0])
    >>> tk.hard_topk_mag(x, k=2)
    Array([ 0., -3.,  2.,  0.], dtype=float32)
    >>> jax.grad(lambda x: tk.hard_topk_mag(x, k=2).sum())(x)
    Array([0., 1., 1., 0.], dtype=float32)
    """
    return _hard_op(x, k, axis, magnitude=True)
