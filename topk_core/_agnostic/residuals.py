"""What the forward pass keeps for the Jacobian products: arrays only, in (batch, n) layout.

Two layouts share these types:

* input order, one segment per row (PAV, threshold): `perm`, `inv_perm`,
  `block_start` and `block_end` are None.  The 0/1 weights make the free set a
  single isotonic block, so sums over it are row sums of arrays that are 0
  outside it; the solver decides membership from its integer block bounds.
* working order with blocks (the unfused PAV route, Dykstra): `perm` takes an
  input row to the sorted order and `inv_perm` takes it back; blocks are
  integer index ranges, never rediscovered by comparing floats in the
  Jacobian (spec section 6, pitfalls).
"""

from __future__ import annotations

from typing import Any, NamedTuple

# The code of an entry of `A` in `MagResiduals.codes` (any value but -1, 0 and 1 would do).
KEPT_CODE = 2


class MaskResiduals(NamedTuple):
    """Residuals of the soft top-k mask.

    Attributes
    ----------
    perm, inv_perm : (batch, n) int64 or None
        Sorting permutation and its inverse (None: input order).
    block_start, block_end : (batch, n) int64 or None
        First and last working-order index of the isotonic block of each entry
        (None: the row is one segment).
    gprime : (batch, n) float
        `g'(s - v)` on the free set `0 < y < 1`, exactly 0 elsewhere (NaN on NaN rows).
    """

    perm: Any
    inv_perm: Any
    block_start: Any
    block_end: Any
    gprime: Any


class MagResiduals(NamedTuple):
    """Residuals of the soft top-k in magnitude.

    Attributes
    ----------
    perm, inv_perm, block_start, block_end, gprime
        As in `MaskResiduals` (the sort is by magnitude).
    codes : (batch, n) int8
        The entry's set, one byte per entry: `sign(x)` (+1 or -1) on the free
        set, `KEPT_CODE` (2) on the set `A` of entries returned unchanged
        (identity derivative), 0 elsewhere.  With `gprime` this is all the
        products need: the derivative of the output's magnitude in the
        entry's own key is `1 + g'` where the code is not 0 (`g' = 0` on `A`).
    offset : (batch, n) or (batch, 1) float
        The number of unit weights of the entry's block not in `A` (the
        `k - |A|` term of the denominator `D` of spec section 6).
    """

    perm: Any
    inv_perm: Any
    block_start: Any
    block_end: Any
    gprime: Any
    codes: Any
    offset: Any


# Where `gprime` sits in both tuples (tests/test_jacobians.py checks it).
GPRIME_AT = 4


def with_gprime(residuals: Any, gprime: Any) -> Any:
    """`residuals` (`MaskResiduals` or `MagResiduals`) with another `gprime`: ``_replace`` spelled out by
    position, which torch 2.8's Dynamo traces inside `torch.compile` (it skips ``_replace`` and cannot
    iterate over ``_fields``)."""
    fields = list(residuals)
    fields[GPRIME_AT] = gprime
    return type(residuals)(*fields)


def mag_residuals(
    perm: Any, inv_perm: Any, block_start: Any, block_end: Any, gprime: Any, free: Any, saturated: Any,
    signs: Any, offset: Any, xp: Any,
) -> MagResiduals:
    """`MagResiduals` from g' (0 outside `free`), the free and saturated sets and `sign(x)`."""
    return MagResiduals(perm, inv_perm, block_start, block_end, gprime, mag_codes(free, saturated, signs, xp), offset)


def mag_codes(free: Any, saturated: Any, signs: Any, xp: Any) -> Any:
    """The int8 code of each entry's set: its sign on the free set, `KEPT_CODE` on the saturated set, else 0."""
    kept = xp.where(saturated, xp.full_like(signs, KEPT_CODE), xp.zeros_like(signs))
    return xp.astype(xp.where(free, signs, kept), xp.int8)
