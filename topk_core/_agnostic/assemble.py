"""Outputs and residuals from the isotonic solution (spec sections 4 and 6).

Inputs are in sorted (working) order, (batch, n).  `lo` and `kk` (batch, 1)
describe the finite segment that the solver handled: the unit weights sit at
positions `lo <= i < lo + kk`.  Entries in singleton blocks take their exact
values (1 or 0 for the mask, `x` or 0 for the magnitude): a clear winner comes
back exactly, not up to round-off.

Infinite entries (rule documented in docs/policy.md):
* mask: `+inf` entries are selected first, `-inf` entries last; ties among them
  share evenly what is left of `k`;
* magnitude: entries with |x| = inf are always kept (returned as they are).
"""

from __future__ import annotations

from typing import Any

from .common import positions
from .regularizer import g, g_prime_on
from .residuals import MagResiduals, MaskResiduals, mag_residuals


def kth_key(s: Any, lo: Any, kk: Any, xp: Any) -> Any:
    """(batch, 1): the key at sorted position ``lo + kk - 1`` (the k-th largest finite key) of sorted rows `s`.

    Rows with ``kk = 0`` take the key before their finite segment (clipped to
    the row): callers use it where any value serves.
    """
    return xp.take_along_axis(s, xp.clip(lo + kk - 1, 0, s.shape[-1] - 1), axis=-1)


def assemble_mask(
    s: Any, v: Any, perm: Any, inv_perm: Any, block_start: Any, block_end: Any,
    lo: Any, kk: Any, lam: float, q: float, xp: Any, inf_counts: tuple[Any, Any, Any] | None = None,
    k: int = 0,
) -> tuple[Any, MaskResiduals]:
    """Return the sorted mask `y = g(s - v)` and the residuals of the mask operator.

    `inf_counts = (n_pos_inf, n_neg_inf, n_finite)`, each (batch, 1), is given
    only when some entry is infinite; `s` must then be finite (infinities
    replaced by 0) and `k` the requested k.
    """
    pos = positions(s.shape[-1], s, xp)
    pooled = block_end > block_start
    top = (pos >= lo) & (pos < lo + kk)
    r = xp.where(pooled, s - v, xp.zeros_like(s))
    free = pooled & (r > 0)
    r = xp.where(free, r, xp.zeros_like(r))
    ones = xp.ones_like(s)
    zeros = xp.zeros_like(s)
    y = xp.where(pooled, xp.clip(g(r, lam, q, xp), 0.0, 1.0), xp.where(top, ones, zeros))
    if inf_counts is not None:
        n_pos, n_neg, n_fin = (xp.astype(c, s.dtype) for c in inf_counts)
        share_pos = xp.minimum(ones, k / xp.where(n_pos > 0, n_pos, ones))
        share_neg = xp.clip(k - n_pos - n_fin, 0.0, None) / xp.where(n_neg > 0, n_neg, ones)
        y = xp.where(pos < lo, share_pos, y)
        y = xp.where(pos >= lo + n_fin, share_neg, y)
    gprime = g_prime_on(r, free, lam, q, xp)
    return y, MaskResiduals(perm, inv_perm, block_start, block_end, gprime)


def assemble_mag(
    s: Any, x_sorted: Any, v: Any, perm: Any, inv_perm: Any, block_start: Any, block_end: Any,
    lo: Any, kk: Any, lam: float, q: float, xp: Any, shift: Any = None,
) -> tuple[Any, MagResiduals]:
    """Return the sorted magnitude output `sign(x) (g(r) + r)`, `r = s - v`, and its residuals.

    `s = |x_sorted|` with infinite entries replaced by 0; positions `< lo`
    hold the infinite entries, which are kept unchanged.  With a `shift`
    (batch, 1), `v` is relative to it and ``r = (s - shift) - v``.
    """
    pos = positions(s.shape[-1], s, xp)
    pooled = block_end > block_start
    top = (pos >= lo) & (pos < lo + kk)
    kept = pos < lo
    r = xp.where(pooled, (s if shift is None else s - shift) - v, xp.zeros_like(s))
    free = pooled & (r > 0)
    r = xp.where(free, r, xp.zeros_like(r))
    signs = xp.sign(x_sorted)
    zeros = xp.zeros_like(s)
    # Fewer than kk non-zero keys: the row is returned unchanged, every entry with derivative 1
    # (a zero moved off 0 still leaves at most k non-zero entries).
    identity = (kk > 0) & (kth_key(s, lo, kk, xp) == 0)
    saturated = (top & ~pooled) | kept | (identity & (pos >= lo))
    # |out| = g(r) + r is below |x| = s on the free set, but the rounding of g (or an iterate short of
    # convergence) can take it above: capped at s.
    out = xp.where(free, signs * xp.minimum(g(r, lam, q, xp) + r, s), xp.where(saturated, x_sorted, zeros))
    gprime = g_prime_on(r, free, lam, q, xp)
    # Unit weights of a pooled block: the part of [lo, lo + kk) that it covers.
    covered = xp.minimum(block_end + 1, lo + kk) - xp.maximum(block_start, lo)
    offset = xp.where(pooled, xp.astype(xp.clip(covered, 0, None), s.dtype), zeros)
    return out, mag_residuals(perm, inv_perm, block_start, block_end, gprime, free, saturated, signs, offset, xp)
