"""Numba CPU fast path of the closed-form Jacobian products (spec section 6).

The definitions are `topk_core._agnostic.jacobians`; this module evaluates
the same expressions for NumPy residuals in input order (the layout of the
PAV and threshold methods: one pooled block per row, the free set), one row
per iteration and one pass over the row for its two sums, another for the
output.  Written with Array-API operations, a product makes about six
temporary (batch, n) arrays; here it writes only its output, which matters
most for many short rows, where the fresh memory of those temporaries costs
more than the arithmetic.  Sums accumulate in float64.  The tests check these
kernels against the Array-API products.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .._agnostic.residuals import KEPT_CODE
from .kernels import _compiled_pair
from .vector_width import prefer_wide_vectors


@nb.njit(cache=True, inline="always")
def _safe_ratio(num, den):
    # `segments.safe_divide`: 0 where the denominator is not positive (also NaN).
    return num / den if den > 0.0 else 0.0


@nb.njit(cache=True, inline="always")
def _sigma_scale(code, gp):
    # `jacobians._scale_and_sigma` for one entry (a product, not a select: NaN g' stays NaN).
    return (0.0 if code == KEPT_CODE else float(code)), (1.0 + gp) * (1.0 if code != 0 else 0.0)


def _mask_rows(gprime, t, out):
    """`out = g' (t - dgamma)`, `dgamma = sum g' t / sum g'` per row (the mask's JVP = VJP)."""
    for r in nb.prange(t.shape[0]):
        prefer_wide_vectors()
        num = 0.0
        den = 0.0
        for j in range(t.shape[1]):
            gp = float(gprime[r, j])
            num += gp * float(t[r, j])
            den += gp
        dgamma = _safe_ratio(num, den)
        for j in range(t.shape[1]):
            out[r, j] = float(gprime[r, j]) * (float(t[r, j]) - dgamma) + 0.0


def _mag_rows(gprime, codes, offset, t, transpose, out):
    """The magnitude's JVP (``transpose=False``) or VJP of (batch, n) tangents `t`.

    JVP: ``scale t - sigma scale dgamma``, ``dgamma = sum sigma g' t / D``;
    VJP: ``scale t - sigma g' c``, ``c = sum sigma scale t / D``;
    ``D = sum g' + offset``, ``scale`` and ``sigma`` read off the set codes
    (`jacobians._scale_and_sigma`).
    """
    for r in nb.prange(t.shape[0]):
        prefer_wide_vectors()
        num = 0.0
        den = float(offset[r, 0])
        for j in range(t.shape[1]):
            gp = float(gprime[r, j])
            sigma, sc = _sigma_scale(codes[r, j], gp)
            weight = sc if transpose else gp
            num += sigma * weight * float(t[r, j])
            den += gp
        ratio = _safe_ratio(num, den)
        for j in range(t.shape[1]):
            gp = float(gprime[r, j])
            sigma, sc = _sigma_scale(codes[r, j], gp)
            weight = gp if transpose else sc
            out[r, j] = sc * float(t[r, j]) - sigma * weight * ratio + 0.0


# Reassociated row sums: the compiler vectorizes them (only their last bits change).
_mask_rows = _compiled_pair(_mask_rows, fastmath={"reassoc"})
_mag_rows = _compiled_pair(_mag_rows, fastmath={"reassoc"})


def mask_product_rows(res, t: np.ndarray) -> np.ndarray:
    """The mask's JVP (= VJP) of NumPy (batch, n) rows `t` with input-order residuals."""
    out = np.empty(t.shape, dtype=res.gprime.dtype)
    _mask_rows(np.ascontiguousarray(res.gprime), np.ascontiguousarray(t), out)
    return out


def mag_product_rows(res, t: np.ndarray, transpose: bool) -> np.ndarray:
    """The magnitude's JVP (or VJP, `transpose`) of NumPy (batch, n) rows `t` with input-order residuals."""
    out = np.empty(t.shape, dtype=res.gprime.dtype)
    offset = np.broadcast_to(res.offset, (t.shape[0], 1))
    arrays = (res.gprime, res.codes, offset, t)
    _mag_rows(*(np.ascontiguousarray(a) for a in arrays), transpose, out)
    return out
