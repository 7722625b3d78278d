"""The PAV method on host memory: sort, Numba isotonic solve, assemble (spec section 4).

Inputs are NumPy (batch, n) rows in float32 or float64; this is the CPU fast
path behind the public functions.  Sorting uses `argsort` + `take_along_axis`;
the kernel also inverts the permutation (a scatter, which the Array API lacks).
Calls that need no Jacobian take the fused kernel `topk_rows_forward`, which
writes the outputs straight to input order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat.numpy as xp
import numpy as np

from ._agnostic.assemble import assemble_mag, assemble_mask
from ._agnostic.residuals import MagResiduals, MaskResiduals
from ._pav import pav_rows, topk_rows_forward


class _SortedRows(NamedTuple):
    x: Any  # the input rows, NaN rows zeroed
    keys: Any  # what the rows are sorted by (x or |x|), infinite entries zeroed
    perm: Any  # descending sorting permutation
    lo: Any  # (batch, 1): the finite segment [lo, hi) of the sorted row and its unit weights kk
    hi: Any
    kk: Any
    inf_counts: Any  # (n_pos, n_neg, n_finite) when some entry is infinite, else None
    nan_rows: Any  # (batch, 1) bool, or None when no row has NaN


def _prepare(x: Any, k: int, is_mag: bool) -> _SortedRows:
    batch, n = x.shape
    nan_rows = xp.any(xp.isnan(x), axis=-1, keepdims=True)
    if xp.any(nan_rows):
        x = xp.where(nan_rows, xp.zeros_like(x), x)
    else:
        nan_rows = None
    keys = xp.abs(x) if is_mag else x
    perm = np.ascontiguousarray(xp.argsort(-keys, axis=-1, stable=False))
    full = np.full((batch, 1), n, dtype=np.int64)
    lo, hi, kk, inf_counts = np.zeros_like(full), full, np.full_like(full, k), None
    finite = xp.isfinite(keys)
    if not xp.all(finite):
        # Infinite entries sit at the ends of the sorted row, outside [lo, hi).
        n_pos = xp.sum(xp.astype(keys == xp.inf, xp.int64), axis=-1, keepdims=True)
        n_neg = xp.sum(xp.astype(keys == -xp.inf, xp.int64), axis=-1, keepdims=True)
        n_fin = n - n_pos - n_neg
        lo, hi, kk = n_pos, n - n_neg, xp.clip(k - n_pos, 0, n_fin)
        inf_counts = (n_pos, n_neg, n_fin)
        keys = xp.where(finite, keys, xp.zeros_like(keys))
    return _SortedRows(x, np.ascontiguousarray(keys), perm, lo, hi, kk, inf_counts, nan_rows)


def _poison(residuals: Any, nan_rows: Any) -> Any:
    # A NaN row gets NaN derivatives, confined to that row.
    fields = residuals._asdict()
    fields["gprime"] = xp.where(nan_rows, xp.nan, residuals.gprime)
    if isinstance(residuals, MagResiduals):
        fields["scale"] = xp.where(nan_rows, xp.nan, residuals.scale)
        fields["saturated"] = residuals.saturated & ~nan_rows
    return type(residuals)(**fields)


def _solve(x: Any, k: int, lam: float, q: float, is_mag: bool, with_residuals: bool) -> tuple[Any, Any]:
    rows = _prepare(x, k, is_mag)
    if with_residuals:
        v, bstart, bend, inv = pav_rows(
            rows.keys, rows.perm, rows.lo[:, 0], rows.hi[:, 0], rows.kk[:, 0], lam, q, is_mag
        )
        s = xp.take_along_axis(rows.keys, rows.perm, axis=-1)
        if is_mag:
            x_sorted = xp.take_along_axis(rows.x, rows.perm, axis=-1)
            y, res = assemble_mag(s, x_sorted, v, rows.perm, inv, bstart, bend, rows.lo, rows.kk, lam, q, xp)
        else:
            y, res = assemble_mask(
                s, v, rows.perm, inv, bstart, bend, rows.lo, rows.kk, lam, q, xp, rows.inf_counts, k
            )
        y = xp.take_along_axis(y, inv, axis=-1)
    else:
        y = np.empty_like(rows.x)
        topk_rows_forward(
            rows.keys, rows.perm, rows.x, rows.lo[:, 0], rows.hi[:, 0], rows.kk[:, 0], k, lam, q, is_mag, y
        )
        res = None
    if rows.nan_rows is not None:
        y = xp.where(rows.nan_rows, xp.nan, y)
        res = None if res is None else _poison(res, rows.nan_rows)
    return y, res


def pav_mask(x: Any, k: int, lam: float, q: float, with_residuals: bool = True) -> tuple[Any, MaskResiduals | None]:
    """Soft top-k mask of NumPy rows `x` (batch, n) and its residuals (None if not asked for)."""
    return _solve(x, k, lam, q, False, with_residuals)


def pav_mag(x: Any, k: int, lam: float, q: float, with_residuals: bool = True) -> tuple[Any, MagResiduals | None]:
    """Soft top-k in magnitude of NumPy rows `x` (batch, n) and its residuals (None if not asked for)."""
    return _solve(x, k, lam, q, True, with_residuals)
