"""The PAV method on host memory: sort, Numba isotonic solve, assemble (spec section 4).

Inputs are NumPy (batch, n) rows in float32 or float64; this is the CPU fast
path behind the public functions.  Sorting uses `argsort` + `take_along_axis`;
the kernel also inverts the permutation (a scatter, which the Array API lacks).
"""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from ._agnostic.assemble import assemble_mag, assemble_mask
from ._agnostic.residuals import MagResiduals, MaskResiduals
from ._pav import pav_rows


def _nan_rows(x: Any) -> tuple[Any, Any]:
    nan_rows = xp.any(xp.isnan(x), axis=-1, keepdims=True)
    if xp.any(nan_rows):
        return xp.where(nan_rows, xp.zeros_like(x), x), nan_rows
    return x, None


def _sorted(keys: Any) -> tuple[Any, Any]:
    perm = xp.argsort(-keys, axis=-1, stable=False)
    return np.ascontiguousarray(xp.take_along_axis(keys, perm, axis=-1)), np.ascontiguousarray(perm)


def _fill(batch: int, value: int) -> Any:
    return np.full((batch, 1), value, dtype=np.int64)


def _poison(residuals: Any, nan_rows: Any) -> Any:
    # A NaN row gets NaN derivatives, confined to that row.
    fields = residuals._asdict()
    fields["gprime"] = xp.where(nan_rows, xp.nan, residuals.gprime)
    if isinstance(residuals, MagResiduals):
        fields["scale"] = xp.where(nan_rows, xp.nan, residuals.scale)
        fields["saturated"] = residuals.saturated & ~nan_rows
    return type(residuals)(**fields)


def pav_mask(x: Any, k: int, lam: float, q: float) -> tuple[Any, MaskResiduals]:
    """Soft top-k mask of NumPy rows `x` (batch, n) and its residuals."""
    batch, n = x.shape
    x, nan_rows = _nan_rows(x)
    s, perm = _sorted(x)
    inf_counts = None
    if not np.isfinite(s).all():
        n_pos = xp.sum(xp.astype(s == xp.inf, xp.int64), axis=-1, keepdims=True)
        n_neg = xp.sum(xp.astype(s == -xp.inf, xp.int64), axis=-1, keepdims=True)
        n_fin = n - n_pos - n_neg
        lo, hi, kk = n_pos, n - n_neg, xp.clip(k - n_pos, 0, n_fin)
        inf_counts = (n_pos, n_neg, n_fin)
        s = np.ascontiguousarray(xp.where(xp.isfinite(s), s, xp.zeros_like(s)))
    else:
        lo, hi, kk = _fill(batch, 0), _fill(batch, n), _fill(batch, k)
    v, bstart, bend, inv = pav_rows(s, perm, lo[:, 0], hi[:, 0], kk[:, 0], lam, q, False)
    y, res = assemble_mask(s, v, perm, inv, bstart, bend, lo, kk, lam, q, xp, inf_counts, k)
    y = xp.take_along_axis(y, inv, axis=-1)
    if nan_rows is not None:
        y = xp.where(nan_rows, xp.nan, y)
        res = _poison(res, nan_rows)
    return y, res


def pav_mag(x: Any, k: int, lam: float, q: float) -> tuple[Any, MagResiduals]:
    """Soft top-k in magnitude of NumPy rows `x` (batch, n) and its residuals."""
    batch, n = x.shape
    x, nan_rows = _nan_rows(x)
    s, perm = _sorted(xp.abs(x))
    if not np.isfinite(s).all():
        n_inf = xp.sum(xp.astype(s == xp.inf, xp.int64), axis=-1, keepdims=True)
        lo, kk = n_inf, xp.clip(k - n_inf, 0, n - n_inf)
        s = np.ascontiguousarray(xp.where(xp.isfinite(s), s, xp.zeros_like(s)))
    else:
        lo, kk = _fill(batch, 0), _fill(batch, k)
    v, bstart, bend, inv = pav_rows(s, perm, lo[:, 0], _fill(batch, n)[:, 0], kk[:, 0], lam, q, True)
    x_sorted = xp.take_along_axis(x, perm, axis=-1)
    out, res = assemble_mag(s, x_sorted, v, perm, inv, bstart, bend, lo, kk, lam, q, xp)
    out = xp.take_along_axis(out, inv, axis=-1)
    if nan_rows is not None:
        out = xp.where(nan_rows, xp.nan, out)
        res = _poison(res, nan_rows)
    return out, res
