"""Numba CPU fast path of the closed-form Jacobian products (spec section 6).

The definitions are `topk_core._agnostic.jacobians`; this module evaluates
the same expressions for NumPy residuals in input order (the layout of the
PAV and threshold methods: one pooled block per row, the free set), one row
per iteration and one pass over the row for its two sums, another for the
output.  Written with Array-API operations, a product makes about six
temporary (batch, n) arrays; here it writes only its output, which matters
most for many short rows, where the fresh memory of those temporaries costs
more than the arithmetic.  Sums accumulate in float64; the entries are
computed in the residuals' dtype (float64 for float32 rows took about
1.5x the time: half as many entries per vector).  The tests check these
kernels against the Array-API products.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .._agnostic.residuals import KEPT_CODE
from .kernels import _compiled_pair, writable_or_empty
from .vector_width import prefer_wide_vectors


@nb.njit(cache=True, inline="always")
def _safe_ratio(num, den):
    # `segments.safe_divide`: 0 where the denominator is not positive (also NaN).
    return num / den if den > 0.0 else 0.0


@nb.njit(cache=True, inline="always")
def _sigma_scale(c, gp, one, kept):
    """`jacobians._scale_and_sigma` for one entry whose code has the value `c` (-1 or 1 on F, `kept` =
    `KEPT_CODE` = 2 on A, else 0), all in the dtype of `one`.

    Arithmetic, no compare: ``sigma = c (kept - |c|)`` and ``scale = (g' + 1) min(|c|, 1)``
    (the tests against the Array-API products would catch another `KEPT_CODE`), so that a NaN
    g' stays NaN off the support too (``g' 0``), as in the Array-API product.  Measured against
    selects on the codes (float32, (16384, 64), one thread, AMD EPYC with AVX2): the VJP took
    0.86x its time, the JVP 0.87x (the selects compiled to three byte compares, widenings and
    blends per entry).
    """
    size = abs(c)
    return c * (kept - size), (gp + one) * min(size, one)


def _mask_rows(gprime, t, out):
    """`out = g' (t - dgamma)`, `dgamma = sum g' t / sum g'` per row (the mask's JVP = VJP); the dominant
    entry of a row, if any, by `jacobians.dominant_mask_entry`'s form."""
    zero = out.dtype.type(0)
    for r in nb.prange(t.shape[0]):
        prefer_wide_vectors()
        num = 0.0
        den = 0.0
        squares = zero  # in the residuals' dtype: only compared with a margin of 2^-10
        for j in range(t.shape[1]):
            gp = gprime[r, j]
            num += float(gp * t[r, j])
            den += float(gp)
            squares += gp * gp
        dgamma = out.dtype.type(_safe_ratio(num, den))
        for j in range(t.shape[1]):
            out[r, j] = gprime[r, j] * (t[r, j] - dgamma) + zero
        m = _dominant_index(gprime[r], squares, den)
        if m >= 0:
            tm = float(t[r, m])
            rest = 0.0  # sum over j != m of g'_j (t_m - t_j): entry m's own term is exactly 0
            for j in range(t.shape[1]):
                rest += float(gprime[r, j]) * (tm - float(t[r, j]))
            out[r, m] = out.dtype.type(float(gprime[r, m]) * (rest / den)) + zero


def _mag_rows_kernel(length, direction):
    """The kernel of the magnitude's JVP or VJP of (batch, n) tangents `t`, for rows of any length (`length` 0)
    or of `length` entries, and for either product (`direction` 0: the argument `transpose` says which)
    or the VJP (1) or JVP (-1) alone; the two are constants in the compiled loops.

    JVP: ``scale t - sigma scale dgamma``, ``dgamma = sum sigma g' t / D``;
    VJP: ``scale t - sigma g' c``, ``c = sum sigma scale t / D``;
    ``D = sum g' + offset``, ``scale`` and ``sigma`` read off the set codes
    (`jacobians._scale_and_sigma`); the dominant entry of a row, if any, by
    `jacobians.dominant_mag_entry`'s form.

    Rows of SHORT_ROW entries have a kernel of their own: the loop over a row of unknown
    length is vectorized 32 entries at a time (float32: 8 per vector, the width of the
    sums' float64 lanes, 4 vectors per step), so a row of 16 ran the loop's remainder,
    4 entries at a time, where a row of constant length is vectorized whole.  The
    constants are the function's closure, not arguments of an inlined helper: a helper
    called per row with the arrays took and dropped a reference to each per row (atomic
    operations: 57 ns per row of 8 instead of 11, one thread).
    """

    def kernel(gprime, codes, offset, t, transpose, out):
        one = out.dtype.type(1)
        zero = out.dtype.type(0)
        kept = out.dtype.type(KEPT_CODE)  # in the products' dtype: an int64 times a float32 is a float64
        n = t.shape[1] if length == 0 else length
        vjp = transpose if direction == 0 else direction > 0
        for r in nb.prange(t.shape[0]):
            prefer_wide_vectors()
            num = 0.0
            # float64 from the start: Numba's float() keeps a float32 value float32, and the sum with it.
            den = np.float64(offset[r, 0])
            squares = zero  # in the residuals' dtype: only compared with a margin of 2^-10
            for j in range(n):
                gp = gprime[r, j]
                sigma, sc = _sigma_scale(out.dtype.type(codes[r, j]), gp, one, kept)
                weight = sc if vjp else gp
                num += float(sigma * weight * t[r, j])
                den += float(gp)
                squares += gp * gp
            ratio = out.dtype.type(_safe_ratio(num, den))
            for j in range(n):
                gp = gprime[r, j]
                sigma, sc = _sigma_scale(out.dtype.type(codes[r, j]), gp, one, kept)
                weight = gp if vjp else sc
                out[r, j] = sc * t[r, j] - sigma * weight * ratio + zero
            m = _dominant_index(gprime[r], squares, den)
            if m >= 0:
                # `+ zero` as above: +0.0 where the product is 0 at an entry of negative x.
                out[r, m] = out.dtype.type(_dominant_mag(gprime[r], codes[r], float(offset[r, 0]), t[r], m, den,
                                                         vjp)) + zero

    # Names of their own: Numba's cache files are named after the function.
    kernel.__name__ = kernel.__qualname__ = "_mag_rows" + (f"_{length}_{direction}" if length else "")
    return kernel


# Rows of this many entries take the kernels of constant length.  Measured (float32, (262144, 16), p = 4/3,
# two threads, Xeon with AVX-512; `ab_versions.py --parts`): the VJP took 0.84-0.90x its time (the kernel
# alone 0.75x).  Not for the mask, nor for rows of 8, nor for a body smaller than the magnitude's (without
# its dominance test): the compiler unrolls a small loop of constant length whole before its vectorizer
# sees it, and the unrolled row compiled to scalar sums (the mask's VJP took 1.7-3x its time, the
# magnitude's kernel on rows of 8 2.4-2.5x).  Rows of 32 gained 0.9-0.95x, within what code layout
# moves.  `benchmarks/ab_versions.py --parts` shows whether a change to the kernel keeps its loops
# vectorized.
SHORT_ROW = 16


# Rows whose largest g' is more than 1 - 2^-10 of their total are taken apart at that entry (the Array-API
# products: more than half).  The test is a sum of squares, which the row's first pass vectorizes (a
# running maximum did not: the magnitude's forward+VJP at p = 4/3 took 1.6x its time); below the share,
# the products as written are within 2^11 ulps of g'_m |t| / (total - g'_m) of the true ones.  The squares
# are summed in the residuals' dtype (in float64 the row's conversions cost short rows a few percent): an
# overflow only sends the row to the exact test, and rows whose g' all lie below about 1e-19 (float32;
# 1e-154 in float64), whose squares underflow, keep the products as written.
_DOMINANT_SHARE = 1.0 - 2.0**-10


@nb.njit(cache=True, inline="always")
def _dominant_index(gprime, squares, total):
    """The index of the row's dominant entry (see `_DOMINANT_SHARE`), or -1: ``sum g'^2 <= max g' total``, so
    a sum of squares above ``share^2 total^2`` has an entry above ``share^2 total``."""
    if not squares > _DOMINANT_SHARE * _DOMINANT_SHARE * total * total:
        return -1
    return _largest_above_half(gprime, total)


@nb.njit(cache=True)
def _largest_above_half(gprime, total):
    best = 0
    for j in range(gprime.shape[0]):
        if float(gprime[j]) > float(gprime[best]):
            best = j
    return best if 2.0 * float(gprime[best]) > total else -1


@nb.njit(cache=True)
def _dominant_mag(gprime, codes, offset, t, m, den, transpose):
    """The magnitude's product at the row's dominant entry `m` (``2 g'_m > D``), in float64, by
    `jacobians.dominant_mag_entry`'s form."""
    sigma_m = float(codes[m])
    scale_m = float(gprime[m]) + 1.0
    w_m = sigma_m * float(t[m])
    rest = 0.0
    g_rest = offset
    for j in range(t.shape[0]):
        c = float(codes[j])
        sigma = c if abs(c) == 1.0 else 0.0
        gp = float(gprime[j]) if j != m else 0.0
        if transpose:
            # Sum over j != m of sigma_j scale_j t_j, and of g'_j (with the offset: D - g'_m without cancelling).
            rest += sigma * (gp + 1.0) * float(t[j]) if j != m else 0.0
            g_rest += gp
        else:
            # Sum over j != m of g'_j (w_m - w_j).
            rest += gp * (w_m - sigma * float(t[j]))
    if transpose:
        return sigma_m * (scale_m * w_m * g_rest - float(gprime[m]) * rest) / den
    return sigma_m * scale_m * (w_m * offset + rest) / den


# Reassociated row sums: the compiler vectorizes them (only their last bits change).
_mask_rows = _compiled_pair(_mask_rows, fastmath={"reassoc"}, inputs=(0, 1))
_mag_rows, _short_mag_vjp_rows, _short_mag_jvp_rows = (
    _compiled_pair(_mag_rows_kernel(length, direction), fastmath={"reassoc"}, inputs=(0, 1, 2, 3))
    for length, direction in ((0, 0), (SHORT_ROW, 1), (SHORT_ROW, -1))
)


def mask_product_rows(res, t: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The mask's JVP (= VJP) of NumPy (batch, n) rows `t` with input-order residuals.

    `out`: an array the caller owns (a host callback's output buffer), written where it has the
    product's shape and dtype (`kernels.fused_outputs`' rule); the result is returned either way.
    """
    out = writable_or_empty(out, t.shape, res.gprime.dtype)
    _mask_rows(np.ascontiguousarray(res.gprime), np.ascontiguousarray(t), out)
    return out


def mag_product_rows(res, t: np.ndarray, transpose: bool, out: np.ndarray | None = None) -> np.ndarray:
    """The magnitude's JVP (or VJP, `transpose`) of NumPy (batch, n) rows `t` with input-order residuals
    (`out`: see `mask_product_rows`)."""
    out = writable_or_empty(out, t.shape, res.gprime.dtype)
    offset = np.broadcast_to(res.offset, (t.shape[0], 1))
    arrays = (res.gprime, res.codes, offset, t)
    kernel = _mag_rows
    if t.shape[1] == SHORT_ROW:
        kernel = _short_mag_vjp_rows if transpose else _short_mag_jvp_rows
    kernel(*(np.ascontiguousarray(a) for a in arrays), transpose, out)
    return out
