"""Delegation layer: validate, move the axis last, pick a solver, restore the layout.

The public functions accept any Array-API array.  The exact PAV method runs
on host memory through Numba: arrays of other libraries are viewed as NumPy
arrays (a copy for device arrays is the adapter's job, never implicit here)
and results are converted back to the input's library and device.  The
threshold and Dykstra methods are pure Array API: they run in the input's own
namespace and on its device, and so do their residuals.

``method="auto"`` (`auto_method`): PAV for host arrays (NumPy, and torch or
JAX arrays on the CPU), where it is the fastest exact method at every
benchmarked shape; the exact threshold method everywhere else (GPU/TPU
devices, and namespaces whose arrays the host path cannot read, such as
array_api_strict).  The rule and its measurements: docs/methods.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate
from ._agnostic import jacobians
from ._agnostic.dykstra import dykstra_mag, dykstra_mask
from ._agnostic.hard import hard_topk_mask_rows
from ._agnostic.layout import from_rows, to_rows
from ._agnostic.regularizer import conjugate_exponent
from ._agnostic.residuals import MagResiduals, MaskResiduals
from ._agnostic.threshold import threshold_mag, threshold_mask
from ._compat import array_namespace, device, is_numpy_namespace, namespace_of
from ._pav import products
from ._pav_path import pav_mag, pav_mask
from ._types import ArrayT

DEFAULT_STRENGTH = 0.1
DEFAULT_P = 4.0 / 3.0


def compute_dtype(x: Any, xp: Any) -> Any:
    """float32 for half-precision inputs (float16, bfloat16), else the input dtype."""
    if x.dtype in (xp.float32, xp.float64):
        return x.dtype
    return xp.float32


def _host(a: Any) -> np.ndarray:
    try:
        return np.asarray(a)
    except (TypeError, RuntimeError, ValueError) as err:
        raise TypeError(
            "method='pav' runs on host (CPU) memory and could not read this array as NumPy "
            f"({type(err).__name__}: {err}). Use the framework adapters (topk_torch, topk_jax), which "
            "copy device arrays to the host explicitly and register gradients."
        ) from err


def _back(a: Any, xp: Any, like: Any) -> Any:
    return None if a is None else xp.asarray(a, device=device(like))


def _validated(x: Any, k: Any, axis: Any, xp: Any) -> tuple[Any, int, int]:
    xp = namespace_of(x, xp)
    _validate.check_float_dtype(x, xp)
    ax = _validate.check_axis(axis, x.ndim)
    return xp, _validate.check_k(k, x.shape[ax], ax), ax


def auto_method(x: Any, xp: Any = None) -> str:
    """The method that ``method="auto"`` picks for `x`: "pav" on host arrays, else "threshold".

    Host arrays are NumPy arrays and torch or JAX arrays on the CPU: the
    Numba PAV reads them without a copy and is the fastest exact method there
    at every benchmarked shape.  Everything else (CUDA/ROCm/TPU devices,
    array_api_strict, other libraries) gets the exact threshold method, which
    runs in the array's namespace on its device.  See docs/methods.md.
    """
    xp = namespace_of(x, xp)
    if is_numpy_namespace(xp):
        return "pav"
    try:
        dev = device(x)
    except Exception:  # traced or exotic arrays without a readable device
        return "threshold"
    # torch.device has `.type`, JAX devices have `.platform`; other libraries have neither.
    on_cpu = getattr(dev, "type", None) == "cpu" or getattr(dev, "platform", None) == "cpu"
    name = getattr(xp, "__name__", "")
    if on_cpu and ("torch" in name or name.startswith("jax")):
        return "pav"
    return "threshold"


def resolve_method(
    x: Any, p: float, method: Any = "auto", max_iter: Any = None, tol: Any = None, xp: Any = None
) -> str:
    """Validate `method` and its controls for `x` and return the solver that will run.

    For adapters that route solvers themselves: "pav", "threshold" or "dykstra".
    """
    return _validate.check_method(method, p, max_iter, tol, auto=auto_method(x, xp))


_AGNOSTIC = {
    ("threshold", "mask"): threshold_mask,
    ("threshold", "mag"): threshold_mag,
    ("dykstra", "mask"): dykstra_mask,
    ("dykstra", "mag"): dykstra_mag,
}


def _numpy_order_statistics(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-th and (k+1)-th largest entries of each row, (batch, 1) each (1 <= k < n): one partition."""
    n = keys.shape[-1]
    part = np.partition(keys, (n - k - 1, n - k), axis=-1)
    return part[:, n - k:n - k + 1], part[:, n - k - 1:n - k]


def _soft_forward(
    kind: str,
    x: Any, k: Any, regularization_strength: Any, p: Any, axis: Any, method: Any, max_iter: Any, tol: Any, xp: Any,
    with_residuals: bool = True, into: Any = None,
) -> tuple[Any, Any]:
    xp, k, ax = _validated(x, k, axis, xp)
    lam = _validate.check_strength(regularization_strength)
    p = _validate.check_p(p)
    q = conjugate_exponent(p)
    name = _validate.check_method(method, p, max_iter, tol, auto=auto_method(x, xp))
    work = xp.astype(x, compute_dtype(x, xp), copy=False)
    rows, moved = to_rows(work, ax, xp)
    if name == "pav":
        solver = pav_mask if kind == "mask" else pav_mag
        native = is_numpy_namespace(xp)
        rows_np = rows if native else _host(rows)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            y_rows, residuals = solver(
                np.asarray(rows_np), k, lam, q, with_residuals, into=_pav_targets(into) if native else None
            )
        if not native:
            y_rows = _back(y_rows, xp, x)
            if residuals is not None:
                residuals = type(residuals)(*(_back(a, xp, x) for a in residuals))
    else:
        # Pure Array API, in the input's namespace and on its device (residuals too); NumPy rows give the
        # threshold method their order statistics by a partition (`threshold.OrderStatistics`).
        numpy_rows = name == "threshold" and isinstance(rows, np.ndarray)
        hooks = {"order_statistics": _numpy_order_statistics} if numpy_rows else {}
        # The solvers meet inf and 0 on purpose (a slope that overflows next to a tie of tiny keys falls
        # back to bisection): NumPy-backed arrays would warn about it, as the PAV path's would.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            y_rows, residuals = _AGNOSTIC[(name, kind)](rows, k, lam, q, xp, max_iter=max_iter, tol=tol, **hooks)
        if not with_residuals:
            residuals = None
    y = from_rows(y_rows, moved, ax, xp)
    return xp.astype(y, x.dtype, copy=False), residuals


def _pav_targets(into: Any) -> tuple[Any, Any, Any, Any] | None:
    """`soft_forward_into`'s ``(y, residuals)`` as the PAV path's ``(y, gprime, codes, offset)``."""
    if into is None:
        return None
    y, res = into
    return (y, *(getattr(res, name, None) for name in ("gprime", "codes", "offset")))


def soft_forward_into(
    kind: str, x: Any, k: int, into: tuple[Any, Any], *, regularization_strength: float = DEFAULT_STRENGTH,
    p: float = DEFAULT_P, axis: int = -1, method: str = "auto", max_iter: int | None = None,
    tol: float | None = None, with_residuals: bool = True,
) -> tuple[Any, Any]:
    """`soft_topk_{kind}_forward` (`kind`: "mask" or "mag") of NumPy `x`, for adapters' host callbacks.

    `into` is ``(y, residuals)``: NumPy arrays shaped like the results (`residuals` a `MaskResiduals` /
    `MagResiduals` of arrays or None fields, or None) that the PAV method's kernels write instead of
    fresh arrays where its route allows (all-finite rows: the fused kernels).  The results ``(y,
    residuals)`` (residuals None without `with_residuals`) are returned either way: the caller copies
    those that are not its buffers (`shares_buffer`).  Other methods ignore `into`.
    """
    return _soft_forward(
        kind, x, k, regularization_strength, p, axis, method, max_iter, tol, None, with_residuals, into
    )


def shares_buffer(result: Any, buffer: Any) -> bool:
    """Whether NumPy array `result` is `buffer`'s memory in `buffer`'s shape (nothing to copy)."""
    result = np.asarray(result)
    return (
        result.shape == buffer.shape and result.dtype == buffer.dtype and result.flags.c_contiguous
        and result.__array_interface__["data"][0] == buffer.__array_interface__["data"][0]
    )


def soft_topk_mask_forward(
    x: ArrayT, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None, xp: Any = None,
) -> tuple[ArrayT, MaskResiduals]:
    """Soft top-k mask and the residuals of its Jacobian (see `soft_topk_mask`)."""
    return _soft_forward("mask", x, k, regularization_strength, p, axis, method, max_iter, tol, xp)


def soft_topk_mag_forward(
    x: ArrayT, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None, xp: Any = None,
) -> tuple[ArrayT, MagResiduals]:
    """Soft top-k in magnitude and the residuals of its Jacobian (see `soft_topk_mag`)."""
    return _soft_forward("mag", x, k, regularization_strength, p, axis, method, max_iter, tol, xp)


def soft_topk_mask(
    x: ArrayT, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None, xp: Any = None,
) -> ArrayT:
    r"""Sparse soft top-k mask along `axis`.

    Solves ``argmax_{y in C} <x, y> - (l/p) sum |y_i|^p`` for every row, where
    ``C = {y in [0, 1]^n : sum(y) = k}`` and ``l = regularization_strength``.
    Entries are exactly 0 outside a support and exactly 1 for clear winners.

    Parameters
    ----------
    x : array
        Real floating array of any shape (float16/bfloat16 computed in float32).
    k : int
        Number of entries to select, ``1 <= k <= x.shape[axis]``.
    regularization_strength : float, default 0.1
        ``l > 0``; smaller is closer to the hard mask, larger is smoother.
    p : float, default 4/3
        Exponent ``p > 1`` of the regularizer; 4/3 gives a C^1 operator, 2 a
        piecewise-linear one (the Euclidean projection of ``x / l`` onto ``C``).
    axis : int, default -1
        Axis along which to select.
    method : {"auto", "pav", "threshold", "dykstra"}, default "auto"
        Solver.  ``"pav"``: exact, Numba PAV on the host CPU, ``p <= 8``.  ``"threshold"``:
        exact, sort-free root finding on one scalar per row, pure Array API
        (runs in the input's namespace and on its device).  ``"dykstra"``:
        approximate, p = 2 only, pure Array API.  ``"auto"``: PAV for host
        arrays (NumPy, torch/JAX on the CPU) with ``p <= 8``, threshold
        elsewhere (for larger p PAV is not exact: docs/methods.md).
    max_iter, tol : int, float or None
        Controls of the iterative methods named explicitly (``"threshold"``:
        iteration cap, default 100, and tolerance on ``|sum(y) - k| / k``,
        default 8 ulps; ``"dykstra"``: iteration cap, default 1000, and
        tolerance on the change of its iterate per iteration, in units of
        ``l`` for the mask and ``l min(1, c / (1 + l))`` for the magnitude,
        ``c`` the row's k-th largest ``|x|``, default 1e-7); must be None
        for ``"pav"`` and ``"auto"``.  Stopped by `max_iter` first, on
        arrays that can be read (not under ``jax.jit``), they warn
        `ThresholdNotConverged` and `DykstraNotConverged`.
    xp : namespace, optional
        Array-API namespace of `x`'s library (inferred when omitted; that of
        another library is a TypeError).

    Returns
    -------
    array
        Same shape, dtype, library and device as `x`; every row lies in ``C``.

    Raises
    ------
    TypeError
        Non-floating `x`, non-integer `k`, non-real parameters, an `xp` of
        another library than `x`'s.
    ValueError
        Out-of-range `k`, `axis`, `regularization_strength`, `p`, `method`,
        `max_iter`, `tol`; ``method="dykstra"`` with ``p != 2``; ``"pav"`` with ``p > 8``; for
        ``"threshold"`` and ``"dykstra"``, which compute in the input's dtype,
        a strength below its smallest normal number (float32: about 1.2e-38).

    Notes
    -----
    Rows containing NaN give NaN rows; ``+inf`` entries are selected first and
    ``-inf`` entries last (ties among them share evenly).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import soft_topk_mask
    >>> soft_topk_mask(np.array([-5.0, -2.0, 3.0, 1.0]), k=2, regularization_strength=1e-2)
    array([0., 0., 1., 1.])
    >>> soft_topk_mask(np.array([0.0, 0.0, -5.0, 5.0]), k=2)
    array([0.5, 0.5, 0. , 1. ])
    """
    # Forward only: the fused kernel skips the residuals of the Jacobian.
    return _soft_forward(
        "mask", x, k, regularization_strength, p, axis, method, max_iter, tol, xp, with_residuals=False
    )[0]


def soft_topk_mag(
    x: ArrayT, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None, xp: Any = None,
) -> ArrayT:
    r"""Sparse soft top-k in magnitude along `axis`.

    Keeps (softly) the k entries of largest ``|x|``: the gradient of the
    regularized ``f(x) = 1/2 max_{y in C} <y, x * x>`` (spec section 3).
    Entries outside a support are exactly 0; clear winners come back as
    exactly ``x_i``.

    Parameters
    ----------
    x, k, regularization_strength, p, axis, method, max_iter, tol, xp
        As in `soft_topk_mask`.

    Returns
    -------
    array
        Same shape, dtype, library and device as `x`.

    Raises
    ------
    TypeError, ValueError
        As in `soft_topk_mask`.

    Notes
    -----
    Rows containing NaN give NaN rows; entries with ``|x| = inf`` are always
    kept. When at most `k` entries of a row are non-zero the row is returned
    unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import soft_topk_mag
    >>> soft_topk_mag(np.array([0.1, -4.0, 3.0, 0.2]), k=2)
    array([ 0., -4.,  3.,  0.])
    """
    # Forward only: the fused kernel skips the residuals of the Jacobian.
    return _soft_forward(
        "mag", x, k, regularization_strength, p, axis, method, max_iter, tol, xp, with_residuals=False
    )[0]


def _same_library(tangent: Any, gprime: Any, name: str) -> None:
    """TypeError unless `tangent` and the residuals are arrays of one library (a torch cotangent of NumPy
    residuals failed inside torch's `Tensor.to` with a message about its arguments)."""
    try:
        array_namespace(tangent, gprime)
    except TypeError:
        raise TypeError(
            f"`{name}` is a {type(tangent).__module__}.{type(tangent).__name__}, but the residuals hold "
            f"{type(gprime).__module__}.{type(gprime).__name__} arrays: pass a {name} of the library of the "
            "`x` they were computed from"
        ) from None


def _jacobian_product(kind: str, transpose: bool, residuals: Any, tangent: Any, axis: int, xp: Any,
                      out: Any = None) -> Any:
    name = "cotangent" if transpose else "tangent"
    if xp is None:
        _same_library(tangent, residuals.gprime, name)
    xp = namespace_of(tangent, xp)
    _validate.check_float_dtype(tangent, xp, name)
    ax = _validate.check_axis(axis, tangent.ndim)
    work = xp.astype(tangent, residuals.gprime.dtype, copy=False)
    rows, moved = to_rows(work, ax, xp)
    if tuple(rows.shape) != tuple(residuals.gprime.shape):
        raise ValueError(
            f"the tangent/cotangent has {tuple(rows.shape)} rows x entries along axis {axis}, but the "
            f"residuals were computed for {tuple(residuals.gprime.shape)}: pass an array shaped like `x`"
        )
    if (residuals.perm is None and isinstance(residuals.gprime, np.ndarray) and isinstance(rows, np.ndarray)
            and _validate.numba_jit_enabled()):
        # CPU fast path: the same formulas in Numba, without temporary arrays.  (isinstance,
        # not the cached namespace test, which torch.compile refuses to trace.)
        if kind == "mask":
            out_rows = products.mask_product_rows(residuals, rows, out)
        else:
            out_rows = products.mag_product_rows(residuals, rows, transpose, out)
    elif kind == "mask":  # J is symmetric: one function for both directions
        out_rows = jacobians.mask_jvp_rows(residuals, rows, xp)
    else:
        out_rows = (jacobians.mag_vjp_rows if transpose else jacobians.mag_jvp_rows)(residuals, rows, xp)
    out = from_rows(out_rows, moved, ax, xp)
    return xp.astype(out, tangent.dtype, copy=False)


def jacobian_product_into(kind: str, transpose: bool, residuals: Any, tangent: Any, out: Any) -> Any:
    """``J tangent`` of operator `kind` ("mask" or "mag"), ``J^T tangent`` with `transpose`, for adapters'
    host callbacks: input-order NumPy residuals and tangent write the product into NumPy array `out`
    where it fits (compare with `shares_buffer`); axis -1."""
    return _jacobian_product(kind, transpose, residuals, tangent, -1, None, out)


def mask_jvp_from_residuals(residuals: MaskResiduals, tangent: ArrayT, *, axis: int = -1, xp: Any = None) -> ArrayT:
    """Jacobian-vector product of the soft mask (also its VJP: the Jacobian is symmetric).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import mask_jvp_from_residuals, soft_topk_mask_forward
    >>> y, res = soft_topk_mask_forward(np.array([3.0, 1.0, 1.0, -2.0]), 1, p=2.0)
    >>> mask_jvp_from_residuals(res, np.array([0.3, -1.0, 0.7, 0.2])) == 0  # tied saturated entries
    array([ True,  True,  True,  True])
    """
    return _jacobian_product("mask", False, residuals, tangent, axis, xp)


def mask_vjp_from_residuals(residuals: MaskResiduals, cotangent: ArrayT, *, axis: int = -1, xp: Any = None) -> ArrayT:
    """Vector-Jacobian product of the soft mask (equal to the JVP: the Jacobian is symmetric)."""
    return _jacobian_product("mask", True, residuals, cotangent, axis, xp)


def mag_jvp_from_residuals(residuals: MagResiduals, tangent: ArrayT, *, axis: int = -1, xp: Any = None) -> ArrayT:
    """Jacobian-vector product of the soft top-k in magnitude."""
    return _jacobian_product("mag", False, residuals, tangent, axis, xp)


def mag_vjp_from_residuals(residuals: MagResiduals, cotangent: ArrayT, *, axis: int = -1, xp: Any = None) -> ArrayT:
    """Vector-Jacobian product of the soft top-k in magnitude."""
    return _jacobian_product("mag", True, residuals, cotangent, axis, xp)


def _hard(x: Any, k: Any, axis: Any, xp: Any, magnitude: bool) -> Any:
    xp, k, ax = _validated(x, k, axis, xp)
    rows, moved = to_rows(x, ax, xp)
    nan_rows = xp.any(xp.isnan(rows), axis=-1, keepdims=True)
    clean = xp.where(nan_rows, xp.zeros_like(rows), rows)
    keep = hard_topk_mask_rows(xp.abs(clean) if magnitude else clean, k, xp)
    zeros = xp.zeros_like(rows)
    out = xp.where(keep, clean, zeros) if magnitude else xp.where(keep, xp.ones_like(rows), zeros)
    out = xp.where(nan_rows, xp.full_like(rows, xp.nan), out)
    return from_rows(out, moved, ax, xp)


def hard_topk_mask(x: ArrayT, k: int, *, axis: int = -1, xp: Any = None) -> ArrayT:
    """Hard top-k mask: 1 on the k largest entries along `axis`, 0 elsewhere.

    Ties are broken toward the lower index; NaN rows give NaN rows.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import hard_topk_mask
    >>> hard_topk_mask(np.array([1.0, 3.0, 3.0, 2.0]), k=2)
    array([0., 1., 1., 0.])
    """
    return _hard(x, k, axis, xp, magnitude=False)


def hard_topk_mag(x: ArrayT, k: int, *, axis: int = -1, xp: Any = None) -> ArrayT:
    """Hard top-k in magnitude: `x` on its k entries of largest `|x|`, 0 elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import hard_topk_mag
    >>> hard_topk_mag(np.array([0.5, -3.0, 2.0, 1.0]), k=2)
    array([ 0., -3.,  2.,  0.])
    """
    return _hard(x, k, axis, xp, magnitude=True)
