"""sparse-topk for NumPy: the four operators plus Jacobian products mirroring `jax.vjp` / `jax.jvp`.

The mathematics lives in `topk_core`; see `topk_core.soft_topk_mask` and
`topk_core.soft_topk_mag`.  Floating array-likes (NumPy arrays, lists of
floats) are accepted and converted with `numpy.asarray`; integer and boolean
input (``[3, 1, 2]`` included) raises TypeError, so cast it explicitly, as
does `numpy.longdouble`.
Outputs are NumPy arrays of the input's floating dtype: float32 and float64
are computed natively, float16 and bfloat16 (``ml_dtypes.bfloat16``, the dtype
`numpy.asarray` gives for a JAX bfloat16 array; accepted without making
ml_dtypes a dependency) in float32 and cast back.

Jacobian products (`soft_topk_mask_vjp`, `soft_topk_mask_jvp` and the same
for the magnitude) come back shaped like `x` and in the dtype of `x`,
whatever the floating dtype of the cotangent or tangent: it is cast like
PyTorch's autograd casts a gradient to its input's dtype (`jax.vjp` and
`jax.jvp` refuse a dtype other than the primal's instead).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import topk_core
from topk_core._api import DEFAULT_P, DEFAULT_STRENGTH

__version__ = topk_core.__version__

__all__ = [
    "__version__",
    "hard_topk_mag",
    "hard_topk_mask",
    "soft_topk_mag",
    "soft_topk_mag_jvp",
    "soft_topk_mag_vjp",
    "soft_topk_mask",
    "soft_topk_mask_jvp",
    "soft_topk_mask_vjp",
]


def _as_array(name: str, x: Any) -> np.ndarray:
    # Dtype checks (floating only) happen in topk_core, with one message style.
    return np.asarray(x)


def _bfloat16() -> np.dtype | None:
    """ml_dtypes' bfloat16, or None where ml_dtypes is not loaded (no array can have that dtype then)."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return None if ml_dtypes is None else np.dtype(ml_dtypes.bfloat16)


def _computable(arr: np.ndarray) -> np.ndarray:
    """`arr` as the core takes it: bfloat16 (not an Array-API dtype) as float32, in which the core computes
    half precision anyway; every other dtype unchanged (the core checks it)."""
    bf16 = _bfloat16()
    return arr.astype(np.float32) if bf16 is not None and arr.dtype == bf16 else arr


def _apply(fn: Callable, x: Any, k: int, **kw: Any) -> np.ndarray:
    arr = _as_array("x", x)
    # The core returns the dtype it was given: a no-op cast but for bfloat16.
    return fn(_computable(arr), k, **kw).astype(arr.dtype, copy=False)


def soft_topk_mask(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> np.ndarray:
    """Sparse soft top-k mask along `axis` (see `topk_core.soft_topk_mask`).

    Parameters
    ----------
    x : array_like
        Real floating array of any shape (float16 and ``ml_dtypes.bfloat16``
        are computed in float32).
    k : int
        Number of entries to select, ``1 <= k <= x.shape[axis]``.
    regularization_strength : float, default 0.1
        ``l > 0``; smaller is closer to the hard mask, larger is smoother.
    p : float, default 4/3
        Exponent ``p > 1`` of the regularizer (4/3: C^1; 2: piecewise linear).
    axis : int, default -1
        Axis along which to select.
    method : {"auto", "pav", "threshold", "dykstra"}, default "auto"
        Solver: ``"pav"`` (exact, Numba, ``p <= 8``), ``"threshold"`` (exact, root
        finding), ``"dykstra"`` (approximate, ``p = 2`` only); ``"auto"`` is
        ``"pav"`` (``"threshold"`` for ``p > 8``, where PAV is not exact, and
        when Numba's JIT is disabled).
    max_iter, tol : int, float or None
        Iteration cap (int >= 1) and tolerance (float > 0) of ``"threshold"``
        and ``"dykstra"`` named explicitly; None is the method's default.
        Must be None for ``"pav"`` and ``"auto"``.  Stopped by `max_iter`
        before their tolerance is met, they warn
        `topk_core.ThresholdNotConverged` or `topk_core.DykstraNotConverged`.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as `x`; every row (along `axis`) has entries in
        ``[0, 1]`` summing to `k`.

    Raises
    ------
    TypeError
        `x` of an integer or boolean dtype; `k`, `axis` or `max_iter` not an
        int; `regularization_strength`, `p` or `tol` not a real number.
    ValueError
        0-d `x` or an empty `axis`; `k` outside ``[1, n]``; `axis` out of
        range; a strength, `p` or `tol` not finite or out of range
        (``l > 0``, ``p > 1``, ``tol > 0``); an unknown `method`;
        ``"dykstra"`` with ``p != 2``; ``"pav"`` with ``p > 8``; `max_iter` or `tol` with ``"pav"`` or
        ``"auto"``; for ``"threshold"`` and ``"dykstra"``, a strength below
        the smallest normal number of the input's dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.soft_topk_mask(np.array([3.0, 1.0, 0.9, -2.0]), k=2, p=2.0, regularization_strength=1.0)
    array([1.  , 0.55, 0.45, 0.  ])
    """
    return _apply(
        topk_core.soft_topk_mask, x, k, regularization_strength=regularization_strength, p=p, axis=axis,
        method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mag(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> np.ndarray:
    """Sparse soft top-k in magnitude along `axis` (see `topk_core.soft_topk_mag`).

    Parameters
    ----------
    x, k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask`; the `k` entries of largest ``|x|`` are kept.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as `x`: exact zeros outside a support, clear
        winners returned unchanged.

    Raises
    ------
    TypeError, ValueError
        As `soft_topk_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.soft_topk_mag(np.array([0.1, -4.0, 3.0, 0.2]), k=2)
    array([ 0., -4.,  3.,  0.])
    """
    return _apply(
        topk_core.soft_topk_mag, x, k, regularization_strength=regularization_strength, p=p, axis=axis,
        method=method, max_iter=max_iter, tol=tol,
    )


def hard_topk_mask(x: Any, k: int, *, axis: int = -1) -> np.ndarray:
    """Hard top-k mask, ties toward the lower index (see `topk_core.hard_topk_mask`).

    Parameters
    ----------
    x : array_like
        Real floating array of any shape (``ml_dtypes.bfloat16`` is selected
        in float32, exactly, and returned as bfloat16).
    k : int
        Number of entries to select, ``1 <= k <= x.shape[axis]``.
    axis : int, default -1
        Axis along which to select.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as `x`: 1 on the `k` largest entries of each row,
        0 elsewhere; rows containing NaN give NaN rows.

    Raises
    ------
    TypeError
        `x` of an integer or boolean dtype; `k` or `axis` not an int.
    ValueError
        0-d `x` or an empty `axis`; `k` outside ``[1, n]``; `axis` out of range.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.hard_topk_mask(np.array([1.0, 3.0, 3.0, 2.0]), k=2)
    array([0., 1., 1., 0.])
    """
    return _apply(topk_core.hard_topk_mask, x, k, axis=axis)


def hard_topk_mag(x: Any, k: int, *, axis: int = -1) -> np.ndarray:
    """Hard top-k in magnitude (see `topk_core.hard_topk_mag`).

    Parameters
    ----------
    x, k, axis
        As in `hard_topk_mask`; the `k` entries of largest ``|x|`` are kept.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as `x`: `x` on the kept entries, 0 elsewhere.

    Raises
    ------
    TypeError, ValueError
        As `hard_topk_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.hard_topk_mag(np.array([0.5, -3.0, 2.0, 1.0]), k=2)
    array([ 0., -3.,  2.,  0.])
    """
    return _apply(topk_core.hard_topk_mag, x, k, axis=axis)


def _tangent(t: np.ndarray, residuals: Any) -> np.ndarray:
    """A floating tangent or cotangent in the dtype the products compute in (the residuals': that of `x`,
    float32 for half precision), so that the core, which returns its tangent's dtype, loses no precision
    before the cast to the dtype of `x`; integer and boolean ones pass unchanged, for the core's TypeError."""
    t = _computable(t)
    return t.astype(residuals.gprime.dtype, copy=False) if np.issubdtype(t.dtype, np.floating) else t


def _vjp(forward: Callable, product: Callable, x: Any, k: int, axis: int, **kw: Any) -> tuple[np.ndarray, Callable]:
    arr = _as_array("x", x)
    y, residuals = forward(_computable(arr), k, axis=axis, **kw)

    def vjp_fn(cotangent: Any) -> np.ndarray:
        ct = _as_array("cotangent", cotangent)
        topk_core._validate.check_same_shape("cotangent", ct, arr.shape)
        return product(residuals, _tangent(ct, residuals), axis=axis).astype(arr.dtype, copy=False)

    return y.astype(arr.dtype, copy=False), vjp_fn


def _jvp(forward: Callable, product: Callable, x: Any, tangent: Any, k: int, axis: int, **kw: Any):
    arr = _as_array("x", x)
    t = _as_array("tangent", tangent)
    topk_core._validate.check_same_shape("tangent", t, arr.shape)
    y, residuals = forward(_computable(arr), k, axis=axis, **kw)
    y_dot = product(residuals, _tangent(t, residuals), axis=axis)
    return y.astype(arr.dtype, copy=False), y_dot.astype(arr.dtype, copy=False)


def soft_topk_mask_vjp(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, Callable[[Any], np.ndarray]]:
    """Return ``(soft_topk_mask(x, k, ...), vjp_fn)``; ``vjp_fn(u)`` is ``J^T u``, shaped like `x`.

    Parameters
    ----------
    x, k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask`.

    Returns
    -------
    y : numpy.ndarray
        ``soft_topk_mask(x, k, ...)``.
    vjp_fn : callable
        ``vjp_fn(cotangent)`` takes a real floating array_like of the shape of
        `x` (any floating dtype) and returns ``J^T cotangent`` shaped like `x`
        and in the dtype of `x` (computed in that of `x`, float32 for float16
        and bfloat16).  It raises ValueError for another shape and TypeError
        for an integer or boolean cotangent.

    Raises
    ------
    TypeError, ValueError
        As `soft_topk_mask`, before any computation.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, vjp_fn = tk.soft_topk_mask_vjp(np.array([3.0, 1.0, 0.9, -2.0]), k=2, p=2.0, regularization_strength=1.0)
    >>> vjp_fn(np.array([0.0, 1.0, 0.0, 0.0]))
    array([ 0. ,  0.5, -0.5,  0. ])
    """
    return _vjp(
        topk_core.soft_topk_mask_forward, topk_core.mask_vjp_from_residuals, x, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mask_jvp(
    x: Any, tangent: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(soft_topk_mask(x, k, ...), J @ tangent)``.

    Parameters
    ----------
    x : array_like
        As in `soft_topk_mask`.
    tangent : array_like
        Real floating array of the shape of `x` (any floating dtype): the
        direction ``dx``.
    k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask`.

    Returns
    -------
    y : numpy.ndarray
        ``soft_topk_mask(x, k, ...)``.
    y_dot : numpy.ndarray
        ``J @ tangent`` along `axis`, shaped like `x` and in the dtype of `x`
        whatever the tangent's floating dtype (computed in that of `x`,
        float32 for float16 and bfloat16).

    Raises
    ------
    ValueError
        `tangent` not of the shape of `x` (checked first, before any other
        argument); otherwise as `soft_topk_mask`.
    TypeError
        `tangent` of an integer or boolean dtype; otherwise as `soft_topk_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, y_dot = tk.soft_topk_mask_jvp(np.array([3.0, 1.0, 0.9, -2.0]), np.ones(4), k=2, p=2.0, regularization_strength=1.0)
    >>> y_dot
    array([0., 0., 0., 0.])
    """
    return _jvp(
        topk_core.soft_topk_mask_forward, topk_core.mask_jvp_from_residuals, x, tangent, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mag_vjp(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, Callable[[Any], np.ndarray]]:
    """Return ``(soft_topk_mag(x, k, ...), vjp_fn)``; ``vjp_fn(u)`` is ``J^T u``, shaped like `x`.

    Parameters
    ----------
    x, k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask_vjp`, as are the returned ``(y, vjp_fn)``,
        ``vjp_fn``'s cotangent and the errors, with `soft_topk_mag` for
        `soft_topk_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, vjp_fn = tk.soft_topk_mag_vjp(np.array([0.1, -4.0, 3.0, 0.2]), k=2)
    >>> vjp_fn(np.ones(4))
    array([0., 1., 1., 0.])
    """
    return _vjp(
        topk_core.soft_topk_mag_forward, topk_core.mag_vjp_from_residuals, x, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mag_jvp(
    x: Any, tangent: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(soft_topk_mag(x, k, ...), J @ tangent)``.

    Parameters
    ----------
    x, tangent, k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask_jvp`, as are the returned ``(y, y_dot)`` and the
        errors, with `soft_topk_mag` for `soft_topk_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, y_dot = tk.soft_topk_mag_jvp(np.array([0.1, -4.0, 3.0, 0.2]), np.ones(4), k=2)
    >>> y_dot
    array([0., 1., 1., 0.])
    """
    return _jvp(
        topk_core.soft_topk_mag_forward, topk_core.mag_jvp_from_residuals, x, tangent, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )
