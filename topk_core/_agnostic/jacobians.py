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
  0 elsewhere; the VJP is its transpose.
"""

from __future__ import annotations

from typing import Any

from .residuals import MagResiduals, MaskResiduals
from .segments import safe_divide, segment_sum


def _block_total(values: Any, res: Any, xp: Any) -> Any:
    """Sum over each entry's block; without block ids the row is one segment.

    The PAV and threshold methods store residuals in input order with no block
    ids: the weights are a 0/1 prefix, so a row has a single pooled block, the
    free set, and `gprime` is 0 outside it, which makes the row sum the block sum.
    """
    if res.block_start is None:
        return xp.sum(values, axis=-1, keepdims=True)
    return segment_sum(values, res.block_start, res.block_end, xp)


def _to_working(t: Any, perm: Any, xp: Any) -> Any:
    return t if perm is None else xp.take_along_axis(t, perm, axis=-1)


def _to_input(t: Any, inv_perm: Any, xp: Any) -> Any:
    return t if inv_perm is None else xp.take_along_axis(t, inv_perm, axis=-1)


def mask_jvp_rows(res: MaskResiduals, tangent: Any, xp: Any) -> Any:
    """`J dx` of the mask for (batch, n) tangents (also `J^T u`: J is symmetric)."""
    ds = _to_working(tangent, res.perm, xp)
    gp = res.gprime
    dgamma = safe_divide(_block_total(gp * ds, res, xp), _block_total(gp, res, xp), xp)
    # Exactly +0 outside the free set (0 * negative would print as -0).
    out = xp.where(gp != 0, gp * (ds - dgamma), xp.zeros_like(ds))
    return _to_input(out, res.inv_perm, xp)


def _mag_denominator(res: MagResiduals, xp: Any) -> Any:
    return _block_total(res.gprime, res, xp) + res.offset


def mag_jvp_rows(res: MagResiduals, tangent: Any, xp: Any) -> Any:
    """`J dx` of the magnitude operator for (batch, n) tangents."""
    dx = _to_working(tangent, res.perm, xp)
    ds = res.signs * dx
    dgamma = safe_divide(_block_total(res.gprime * ds, res, xp), _mag_denominator(res, xp), xp)
    free = res.scale != 0
    out = xp.where(res.saturated, dx, xp.where(free, res.signs * res.scale * (ds - dgamma), xp.zeros_like(ds)))
    return _to_input(out, res.inv_perm, xp)


def mag_vjp_rows(res: MagResiduals, cotangent: Any, xp: Any) -> Any:
    """`J^T u` of the magnitude operator for (batch, n) cotangents."""
    u = _to_working(cotangent, res.perm, xp)
    us = res.signs * u
    c = safe_divide(_block_total(res.scale * us, res, xp), _mag_denominator(res, xp), xp)
    free = res.scale != 0
    out = xp.where(res.saturated, u, xp.where(free, res.signs * (res.scale * us - res.gprime * c), xp.zeros_like(us)))
    return _to_input(out, res.inv_perm, xp)
