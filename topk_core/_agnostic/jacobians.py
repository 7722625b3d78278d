"""Closed-form Jacobian products of the soft operators (spec section 6).

Written once against the Array API and evaluated by every adapter with its
own namespace (numpy, jax.numpy, torch): each function is linear in the
tangent, uses only gathers, elementwise operations and segment sums over the
solver's integer blocks, and never forms an n x n matrix.

Per isotonic block `B` with value `gamma`:

* mask: `dgamma = sum_B g' ds / sum_B g'`, `dy = g' (ds - dgamma)`; the
  Jacobian is symmetric, so the VJP is the same map.
* magnitude, with `ds = sign(x) dx`: `D = sum_B g' + W_B` (`W_B` the unit
  weights of `B` outside the saturated set `A`), `dgamma = sum_B g' ds / D`,
  `do = sign(x) (1 + g')(ds - dgamma)` on the free set, `do = dx` on `A`,
  0 elsewhere; the VJP is its transpose.  With `scale` (`1 + g'` on the free
  set, 1 on `A`, 0 elsewhere) and `sigma` (`sign(x)` on the free set, 0
  elsewhere) both cases are one expression:
  `do = scale dx - sigma scale dgamma`, `dgamma = sum_B sigma g' dx / D`.
  Both are read off the residuals' set codes: `scale = (1 + g') [code != 0]`
  (`g' = 0` on `A`), `sigma = code` on the free set.

`topk_core._pav.products` evaluates the same formulas in Numba for NumPy
residuals in input order (the CPU fast path, checked against these).
"""

from __future__ import annotations

from typing import Any

from .._compat import is_plain_numpy
from .regularizer import curvature_ratio
from .residuals import KEPT_CODE, MagResiduals, MaskResiduals
from .segments import safe_divide, segment_sum


def _row_total(values: Any, xp: Any) -> Any:
    """Row sums; for NumPy as a matrix-vector product with ones: one BLAS pass, much faster
    than its reduction over a short last axis (e.g. rows of 16 router logits).

    Elsewhere a plain sum: accelerators may run a float32 product in reduced precision, which
    rounds every term to 10 or 8 bits (TF32 on NVIDIA GPUs, JAX's default there and PyTorch's
    after ``torch.set_float32_matmul_precision("high")``; bfloat16 passes on TPUs).
    """
    if values.shape[0] == 0 or not is_plain_numpy(xp):
        return xp.sum(values, axis=-1, keepdims=True)
    # Ones with the dtype and device of `values`, without asking for its device (which
    # torch.compile cannot trace) and without a transpose (which torch.func.vmap cannot batch).
    return xp.expand_dims(xp.matmul(values, xp.ones_like(values[0, :])), axis=-1)


def _block_total(values: Any, res: Any, xp: Any) -> Any:
    """Sum over each entry's block; without block ids the row is one segment.

    The PAV and threshold methods store residuals in input order with no block
    ids: the weights are a 0/1 prefix, so a row has a single pooled block, the
    free set, and `gprime` is 0 outside it, which makes the row sum the block sum.
    """
    if res.block_start is None:
        return _row_total(values, xp)
    return segment_sum(values, res.block_start, res.block_end, xp)


def _to_working(t: Any, perm: Any, xp: Any) -> Any:
    return t if perm is None else xp.take_along_axis(t, perm, axis=-1)


def _to_input(t: Any, inv_perm: Any, xp: Any) -> Any:
    return t if inv_perm is None else xp.take_along_axis(t, inv_perm, axis=-1)


# Entries outside the free set have g' = 0 (and, for the magnitude, scale = 0 outside the
# free set and A, and sigma = 0 outside the free set), so the products below vanish there
# without a select; `+ 0.0` turns the -0.0 of `0 * negative` into +0.0.


def _dominant_entry(gp: Any, total: Any, xp: Any) -> tuple[Any, Any]:
    """(where, g'_m): the entry m of each row whose g' exceeds half the row's `total` (``sum g'``, the
    magnitude's ``D``), where one does (at most one can), and its g'.

    Such an entry's product is a difference of two terms each about ``g'_m`` times the tangent, whose
    true value is about ``(total - g'_m)`` times it: evaluated as written, its error is about eps g'_m
    |t|, relative ``eps g'_m / (total - g'_m)`` (p = 8, normal rows of 64: products up to 9.3e-6 off,
    where g' rounded alone left 1e-14).  `dominant_mask_entry` and `dominant_mag_entry` take it apart
    so that the g'_m terms cancel exactly.  Row-form residuals only (one segment per row; with block
    ids, Dykstra's at p = 2, g' is 1 / l on every free entry and no entry dominates but a lone one).
    """
    gm = xp.max(gp, axis=-1, keepdims=True)
    return (gp == gm) & (2.0 * gm > total), gm


def _at(values: Any, where: Any, xp: Any) -> Any:
    """The row's value of `values` at its entry `where` (0 in rows without one)."""
    return xp.sum(xp.where(where, values, xp.zeros_like(values)), axis=-1, keepdims=True)


def mask_jvp_rows(res: MaskResiduals, tangent: Any, xp: Any) -> Any:
    """`J dx` of the mask for (batch, n) tangents (also `J^T u`: J is symmetric)."""
    ds = _to_working(tangent, res.perm, xp)
    gp = res.gprime
    total = _block_total(gp, res, xp)
    dgamma = safe_divide(_block_total(gp * ds, res, xp), total, xp)
    out = gp * (ds - dgamma)
    if res.block_start is None:
        out = xp.where(*dominant_mask_entry(gp, ds, total, xp), out)
    return _to_input(out + 0.0, res.inv_perm, xp)


def dominant_mask_entry(gp: Any, ds: Any, total: Any, xp: Any) -> tuple[Any, Any]:
    """(where, value) of the mask's product at its dominant entry m (`_dominant_entry`):
    ``g'_m sum_{j != m} g'_j (ds_m - ds_j) / sum g'``."""
    where, gm = _dominant_entry(gp, total, xp)
    dm = _at(ds, where, xp)
    # Term m left out rather than computed as 0: the transpose of this map (reverse mode of frameworks that
    # differentiate it, JAX's and torch's autograd) would otherwise add g'_m terms into m that cancel.
    return where, gm * safe_divide(_row_total(_without(gp, where, xp) * (dm - ds), xp), total, xp)


def _without(values: Any, where: Any, xp: Any) -> Any:
    """`values` with 0 at the entry `where`."""
    return xp.where(where, xp.zeros_like(values), values)


def _mag_denominator(res: MagResiduals, xp: Any) -> Any:
    return _block_total(res.gprime, res, xp) + res.offset


def _scale_and_sigma(res: MagResiduals, xp: Any) -> tuple[Any, Any]:
    """(`scale`, `sigma`) of the module docstring from the set codes.  `scale` multiplies by the
    indicator, never selects, so that the NaN g' of a NaN row stays NaN on every entry."""
    dt = res.gprime.dtype
    codes = res.codes
    scale = (1.0 + res.gprime) * xp.astype(codes != 0, dt)
    sigma = xp.astype(xp.where(codes == KEPT_CODE, xp.zeros_like(codes), codes), dt)
    return scale, sigma


def dominant_mag_entry(res: MagResiduals, scale: Any, sigma: Any, t: Any, denominator: Any, transpose: bool,
                       xp: Any) -> tuple[Any, Any]:
    """(where, value) of the magnitude's JVP (or VJP, `transpose`) at its dominant entry m (`_dominant_entry`),
    with ``w = sigma t`` and the sums over j != m:

    * JVP: ``sigma_m scale_m (w_m offset + sum_j g'_j (w_m - w_j)) / D``;
    * VJP: ``sigma_m (scale_m w_m (offset + sum_j g'_j) - g'_m sum_j scale_j w_j) / D``.
    """
    gp = res.gprime
    where, gm = _dominant_entry(gp, denominator, xp)
    sigma_m, scale_m = _at(sigma, where, xp), _at(scale, where, xp)
    w = sigma * t
    w_m = _at(w, where, xp)
    if transpose:
        g_rest = _row_total(_without(gp, where, xp), xp) + res.offset
        rest = _row_total(_without(scale * w, where, xp), xp)
        value = sigma_m * (scale_m * w_m * g_rest - gm * rest)
    else:
        # (Term m left out, as in `dominant_mask_entry`, for the transpose's sake.)
        value = sigma_m * scale_m * (w_m * res.offset + _row_total(_without(gp, where, xp) * (w_m - w), xp))
    return where, safe_divide(value, denominator, xp)


def mag_jvp_rows(res: MagResiduals, tangent: Any, xp: Any) -> Any:
    """`J dx` of the magnitude operator for (batch, n) tangents."""
    dx = _to_working(tangent, res.perm, xp)
    scale, sigma = _scale_and_sigma(res, xp)
    denominator = _mag_denominator(res, xp)
    dgamma = safe_divide(_block_total((sigma * res.gprime) * dx, res, xp), denominator, xp)
    out = scale * dx - (sigma * scale) * dgamma
    if res.block_start is None:
        out = xp.where(*dominant_mag_entry(res, scale, sigma, dx, denominator, False, xp), out)
    return _to_input(out + 0.0, res.inv_perm, xp)


def mag_vjp_rows(res: MagResiduals, cotangent: Any, xp: Any) -> Any:
    """`J^T u` of the magnitude operator for (batch, n) cotangents."""
    u = _to_working(cotangent, res.perm, xp)
    scale, sigma = _scale_and_sigma(res, xp)
    denominator = _mag_denominator(res, xp)
    scaled = scale * u
    c = safe_divide(_block_total(sigma * scaled, res, xp), denominator, xp)
    out = scaled - (sigma * res.gprime) * c
    if res.block_start is None:
        out = xp.where(*dominant_mag_entry(res, scale, sigma, u, denominator, True, xp), out)
    return _to_input(out + 0.0, res.inv_perm, xp)



# Second order.  The products above read g' as a constant; a second derivative also needs g'
# differentiated in x.  On the free set (the only entries where g' is not 0) g' is a function of the
# entry's own output, so ``dg' = rate * dy`` entry by entry, with `dy` the first-order product (`J dx`) and
# ``h = g'' / g'`` (`regularizer.curvature_ratio`):
#
# * mask: ``y = g(u)``, ``dy = g' du``, so ``dg' = g'' du = h dy``;
# * magnitude: ``o = sign(x) (g(r) + r)``, ``do = sign(x) (1 + g') dr``, so
#   ``dg' = g'' dr = h g' / (1 + g') sign(x) do``.
#
# For p = 2 (q = 2) h = 0: both operators are piecewise linear.


def gprime_rate(kind: str, res: Any, lam: float, q: float, xp: Any) -> Any:
    """`rate` with ``dg' = rate * dy`` (working order of `res`; 0 outside the free set)."""
    gp = res.gprime
    free = gp > 0  # (False on NaN rows: their products are NaN already)
    rate = curvature_ratio(xp.where(free, gp, xp.ones_like(gp)), lam, q, xp)
    if kind == "mag":  # on the free set the code is sign(x)
        rate = rate * gp / (1.0 + gp) * xp.astype(res.codes, gp.dtype)
    # 0 where it overflows the dtype (g' near its largest value, p > 2: its derivatives are beyond the dtype
    # too), so that no inf * 0 = NaN reaches a product whose tangent is 0 (torch's linearized route adds the
    # rate's term to values and first derivatives that way).
    return xp.where(free & xp.isfinite(rate), rate, xp.zeros_like(gp))


def gprime_jvp_rows(kind: str, res: Any, y_dot: Any, lam: float, q: float, xp: Any) -> Any:
    """The tangent of `res.gprime` (working order) from the operator's output tangent `y_dot` (input order)."""
    return gprime_rate(kind, res, lam, q, xp) * _to_working(y_dot, res.perm, xp)


def gprime_vjp_rows(kind: str, res: Any, gprime_cotangent: Any, lam: float, q: float, xp: Any) -> Any:
    """The transpose of `gprime_jvp_rows`: a cotangent of `res.gprime` as one of the output (input order)."""
    return _to_input(gprime_rate(kind, res, lam, q, xp) * gprime_cotangent, res.inv_perm, xp)
