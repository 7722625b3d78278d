"""The PAV method on host memory: sort, Numba isotonic solve, assemble (spec section 4).

Inputs are NumPy (batch, n) rows in float32 or float64; this is the CPU fast
path behind the public functions.  Sorting uses `argsort` + `take_along_axis`;
the kernel also inverts the permutation (a scatter, which the Array API lacks).
The fused kernels write outputs (and, when asked, the Jacobian residuals)
straight to input order: `topk_rows_select` for arrays whose keys are all
finite (a selection and a sort of the few candidate entries per row, no full
sort), `topk_rows_forward` after a full sort otherwise (rows with NaN or inf).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat.numpy as xp
import numpy as np

from ._agnostic.assemble import assemble_mag, assemble_mask
from ._agnostic.common import poison
from ._agnostic.residuals import MagResiduals, MaskResiduals
from ._pav import pav_rows, topk_rows_forward, topk_rows_select
from ._pav.kernels import all_finite, fused_outputs, read_only, row_keys
from ._pav.select import lane_route, lanes_check_finite


class _SortedRows(NamedTuple):
    x: Any  # the input rows, NaN rows zeroed
    keys: Any  # what the rows are sorted by (x or |x|), infinite entries zeroed; None: |x|, which
    # the selection kernel's lane route takes from x (`select.lane_route`)
    perm: Any  # descending sorting permutation (None: all keys finite, the selection kernel needs none)
    lo: Any  # (batch, 1): the finite segment [lo, hi) of the sorted row and its unit weights kk (None with perm)
    hi: Any
    kk: Any
    inf_counts: Any  # (n_pos, n_neg, n_finite) when some entry is infinite, else None
    nan_rows: Any  # (batch, 1) bool, or None when no row has NaN


def _prepare(x: Any, k: int, lam: float, q: float, is_mag: bool, sort_finite: bool, lanes_check: bool = True
             ) -> _SortedRows:
    rows = _prepare_rows(x, k, lam, q, is_mag, sort_finite, lanes_check)
    return rows._replace(x=read_only(rows.x), keys=read_only(rows.keys))


def _prepare_rows(x: Any, k: int, lam: float, q: float, is_mag: bool, sort_finite: bool, lanes_check: bool
                  ) -> _SortedRows:
    batch, n = x.shape
    x = read_only(np.ascontiguousarray(x))
    if lanes_check and not sort_finite and lanes_check_finite(batch, n, k, q, lam):
        # The lane solver checks that every entry is finite as it loads the rows (a pass over x
        # fewer: the forwards at (262144, 16) took 0.91-0.96x their time); `_solve` comes back
        # with lanes_check=False where one is not.
        return _SortedRows(x, None if is_mag else x, None, None, None, None, None, None)
    if is_mag and not sort_finite and lane_route(batch, n, k, q, lam) and all_finite(x):
        # The lanes read |x| from x: no array of keys (fresh memory the size of x, a millisecond
        # per 4M entries).
        return _SortedRows(x, None, None, None, None, None, None, None)
    # One pass decides the common, all-finite case (and writes the magnitude's keys).
    keys, finite_keys = row_keys(x) if is_mag else (x, all_finite(x))
    inf_counts, nan_rows = None, None
    if finite_keys and not sort_finite:
        # The selection-first kernel needs no permutation and no segment bounds (three (batch, 1)
        # arrays whose fresh memory costs about a millisecond for 2^18 rows).
        return _SortedRows(x, keys, None, None, None, None, None, None)
    full = np.full((batch, 1), n, dtype=np.int64)
    lo, hi, kk = np.zeros_like(full), full, np.full_like(full, k)
    if not finite_keys:
        finite = xp.isfinite(keys)
        nan_rows = xp.any(xp.isnan(keys), axis=-1, keepdims=True)
        if xp.any(nan_rows):
            x = xp.where(nan_rows, xp.zeros_like(x), x)
            keys = xp.where(nan_rows, xp.zeros_like(keys), keys)
            finite = finite | nan_rows
        else:
            nan_rows = None
        # Infinite entries sit at the ends of the sorted row, outside [lo, hi).
        n_pos = xp.sum(xp.astype(keys == xp.inf, xp.int64), axis=-1, keepdims=True)
        n_neg = xp.sum(xp.astype(keys == -xp.inf, xp.int64), axis=-1, keepdims=True)
        n_fin = n - n_pos - n_neg
        lo, hi, kk = n_pos, n - n_neg, xp.clip(k - n_pos, 0, n_fin)
        inf_counts = (n_pos, n_neg, n_fin)
        perm = xp.argsort(-keys, axis=-1, stable=False)
        keys = xp.where(finite, keys, xp.zeros_like(keys))
    else:
        perm = xp.argsort(-keys, axis=-1, stable=False)
    # Sorting the negated keys gives a C-contiguous descending permutation, which the
    # kernels index much faster than a reversed view. The order of tied entries is
    # irrelevant: the soft operators treat ties symmetrically.
    return _SortedRows(x, np.ascontiguousarray(keys), perm, lo, hi, kk, inf_counts, nan_rows)


def _fused_forward(rows: _SortedRows, k: int, lam: float, q: float, is_mag: bool, y: Any, gprime: Any, codes: Any,
                   offset: Any) -> bool:
    """The fused kernel for `rows` (see `_prepare`); False where the lane solver found a non-finite entry."""
    if rows.perm is None:
        return topk_rows_select(rows.keys, rows.x, k, lam, q, is_mag, y, gprime, codes, offset)
    lo, hi, kk = rows.lo[:, 0], rows.hi[:, 0], rows.kk[:, 0]
    topk_rows_forward(rows.keys, rows.perm, rows.x, lo, hi, kk, k, lam, q, is_mag, y, gprime, codes, offset)
    return True


def _fused_residuals(is_mag: bool, with_residuals: bool, gprime: Any, codes: Any, offset: Any) -> Any:
    """The residuals of the fused kernels' arrays (`fused_outputs`), in input order; None if not asked for."""
    if not with_residuals:
        return None
    if is_mag:
        return MagResiduals(None, None, None, None, gprime, codes, offset[:, None])
    return MaskResiduals(None, None, None, None, gprime)


def _solve(x: Any, k: int, lam: float, q: float, is_mag: bool, with_residuals: bool, fused: bool,
           into: Any = None) -> tuple[Any, Any]:
    if fused and x.shape[0] == 0:
        # No rows: no kernel to run, nor to compile (24 s for `lane_rows` alone on an empty cache).  The
        # adapters read the residuals' layout off such a call.
        y, gprime, codes, offset = fused_outputs(x, is_mag, with_residuals, into)
        return y, _fused_residuals(is_mag, with_residuals, gprime, codes, offset)
    rows = _prepare(x, k, lam, q, is_mag, sort_finite=not fused)
    if fused:
        y, gprime, codes, offset = fused_outputs(rows.x, is_mag, with_residuals, into)
        if not _fused_forward(rows, k, lam, q, is_mag, y, gprime, codes, offset):
            # The lane solver met a non-finite entry (no pass had checked the rows before it): the
            # rows go the way that handles those, and the kernels write every output again.
            rows = _prepare(x, k, lam, q, is_mag, sort_finite=False, lanes_check=False)
            y, gprime, codes, offset = fused_outputs(rows.x, is_mag, with_residuals, into)
            if not _fused_forward(rows, k, lam, q, is_mag, y, gprime, codes, offset):
                raise AssertionError("rows checked as finite were found not to be")
        res = _fused_residuals(is_mag, with_residuals, gprime, codes, offset)
    else:
        # Isotonic solution + Array-API assembly: residuals in sorted order with block ids.
        perm = rows.perm
        v, bstart, bend, inv = pav_rows(rows.keys, perm, rows.lo[:, 0], rows.hi[:, 0], rows.kk[:, 0], lam, q, is_mag)
        s = xp.take_along_axis(rows.keys, perm, axis=-1)
        if is_mag:
            x_sorted = xp.take_along_axis(rows.x, perm, axis=-1)
            y, res = assemble_mag(s, x_sorted, v, perm, inv, bstart, bend, rows.lo, rows.kk, lam, q, xp)
        else:
            y, res = assemble_mask(s, v, perm, inv, bstart, bend, rows.lo, rows.kk, lam, q, xp, rows.inf_counts, k)
        y = xp.take_along_axis(y, inv, axis=-1)
    if rows.nan_rows is not None:
        y = xp.where(rows.nan_rows, xp.nan, y)
        res = None if res is None else poison(res, rows.nan_rows, xp)
    return y, res


def pav_mask(
    x: Any, k: int, lam: float, q: float, with_residuals: bool = True, fused: bool = True, into: Any = None
) -> tuple[Any, MaskResiduals | None]:
    """Soft top-k mask of NumPy rows `x` (batch, n) and its residuals (None if not asked for).

    `fused=False` takes the unfused route (isotonic solution with block ids,
    then the Array-API assembly); the tests use it to check the fused kernel.
    It assembles the outputs from absolute block values, so ``s - v`` keeps
    only ``eps |x| / |s - v|`` of its digits: a reference for keys of the order
    of the strength only (ties of 1e24 with ``l = 1``, ``p = 4/3`` came back
    2.4x the input); the fused kernels hold every value relative to a key.

    `into`: arrays ``(y, gprime, codes, offset)`` (None entries allowed) that
    the fused kernels write instead of fresh ones where shapes and dtypes
    match (`kernels.fused_outputs`); the caller compares what comes back
    with them (rows with NaN, for one, come back in new arrays).
    """
    return _solve(x, k, lam, q, False, with_residuals, fused, into)


def pav_mag(
    x: Any, k: int, lam: float, q: float, with_residuals: bool = True, fused: bool = True, into: Any = None
) -> tuple[Any, MagResiduals | None]:
    """Soft top-k in magnitude of NumPy rows `x` (batch, n) and its residuals (see `pav_mask`)."""
    return _solve(x, k, lam, q, True, with_residuals, fused, into)
