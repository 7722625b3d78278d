"""Numba PAV for the two isotonic problems of the top-k operators (spec section 4).

Both problems have 0/1 weights `w` that form a prefix of length `k` in the
sorted order.  Unconstrained, the first `k` entries take their saturated value
(`s - l` for the mask, the fixed point of `g(s - u) = u` for the magnitude)
and the others take `s`; each of these two runs is already non-increasing, so
the only adjacent violator can sit at the boundary `k - 1 | k`.  PAV therefore
grows a single pooled block around that boundary, absorbing the left neighbour
while it is not saturated at the block value and the right neighbour while it
lies above the block value.  Every entry is absorbed at most once: O(n) per row
after the sort.

Block values:

* ``q == 2`` and ``q == 4`` (p = 2 and p = 4/3): closed form from running
  central moments of the block (count, mean, M2, M3) that merge in O(1);
  a cubic for q = 4 solved by a cancellation-free Cardano formula.
* any other ``q``: the pooled block equation is monotone in its value, so the
  block is found by safeguarded Newton/bisection on it, starting from the
  bracket that the two boundary entries give (derived from the block equation,
  see spec section 6); each evaluation binary-searches the saturated and zero
  runs and sums only over the entries in between.

Everything is accumulated in float64; outputs have the dtype of the input.
"""

from __future__ import annotations

import math
import types

import numba as nb
import numpy as np

from .._agnostic.residuals import KEPT_CODE
from . import parallel as _parallel
from ._scalar import (
    depressed_cubic_root,
    g_and_prime,
    g_plain,
    g_prime_from_g,
    g_scalar,
    mag_fixed_point,
    mag_lower_bracket,
    ratio_is_tiny,
)
from .vector_width import prefer_wide_vectors

_EPS = np.finfo(np.float64).eps


@nb.njit(cache=True, inline="always", error_model="numpy")
def _target(gamma: float, is_mag: bool, shift: float) -> float:
    # Right-hand side of the block equation per unit weight: 1 (mask) or the value itself (mag),
    # whose keys are taken relative to `shift` (see `_row_frame`).
    return gamma + shift if is_mag else 1.0


@nb.njit(cache=True, inline="always", error_model="numpy")
def _saturated(si: float, gamma: float, lam: float, q: float, is_mag: bool, shift: float) -> bool:
    # An entry with weight 1 stays in its own block iff it is saturated at gamma.  The plain power
    # (`g_scalar` cost p = 3 a tenth of its time here): the mask's target 1 needs u / l >= 1, and a
    # magnitude entry whose u / l underflows is not saturated unless its value lies below 2^(-960 (q - 1)).
    return g_plain(si - gamma, lam, q) >= _target(gamma, is_mag, shift)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _key(keys, order, i, frame):
    # The i-th key in the row's order, in the row's frame (see `_row_frame`).
    return (float(keys[order[i]]) - frame[0]) * frame[1]


# Values (a magnitude row's k-th key, the mask's strength) whose binary exponent lies outside
# this range are brought near 1 by a power of two (see `_row_frame`).
_EXPONENT_RANGE = 100
_UNIT_LOW = 2.0 ** (-_EXPONENT_RANGE - 1)
_UNIT_HIGH = 2.0 ** _EXPONENT_RANGE
# A magnitude row's frame keeps its strength l c^(2-p) within this binary exponent (see `_row_frame`).
_STRENGTH_EXPONENT_MAX = 1000
_STRENGTH_LOW = 2.0 ** -_STRENGTH_EXPONENT_MAX


@nb.njit(cache=True, inline="always", error_model="numpy")
def _in_unit_range(value):
    """Whether the binary exponent of a finite `value` lies within +-_EXPONENT_RANGE (0 does): compares
    only, so that loops over lanes vectorize (math.frexp's exponent e has 2^(e-1) <= |value| < 2^e)."""
    magnitude = abs(value)
    return (magnitude == 0.0) | ((magnitude >= _UNIT_LOW) & (magnitude < _UNIT_HIGH))


@nb.njit(cache=True, inline="always", error_model="numpy")
def far_below(value, ref):
    """Whether a magnitude's absolute threshold `value` lies so far below the key `ref` it is held
    relative to (below half of it) that it is solved in absolute terms instead: relative to `ref` it
    is known to eps ref only, too coarse to tell the entries near it apart.  The rule of both
    `_pooled_block` and the lane solver (`lanes._absolute_frame`)."""
    return value < 0.5 * ref


@nb.njit(cache=True, inline="always", error_model="numpy")
def _strength_scale(mult, q):
    """``mult^(2 - p)`` for a power of two `mult`: the magnitude's strength in a frame scaled by it, the
    exponent ``2/3`` of the default ``p = 4/3`` (q = 4) split into whole numbers and thirds, as
    `regularizer.strength_scale` does for the threshold method (the float of 2/3, in frames scaled by
    2^400..2^830, k-th keys of 1e-120..1e-250, put 4.3 times the documented bound into free outputs near
    the threshold)."""
    m = math.frexp(mult)[1] - 1
    if q == 4.0:
        whole = math.floor(2.0 * m / 3.0)
        return math.ldexp(math.pow(2.0, (2.0 * m - 3.0 * whole) / 3.0), int(whole))
    return math.pow(mult, (q - 2.0) / (q - 1.0))


@nb.njit(cache=True, inline="always", error_model="numpy")
def _unit_scale(value, limit=1000):
    """1.0, or the power of two that brings `value` near 1 when its exponent is out of range.

    At most ``2^limit`` either way (2^-exponent overflows for denormal values); a magnitude row's
    k-th key takes 1022, every normal number's scale (`_row_frame`).
    """
    if _in_unit_range(value):
        return 1.0
    exponent = math.frexp(value)[1]
    return math.ldexp(1.0, min(max(-exponent, -limit), limit))


@nb.njit(cache=True, error_model="numpy")
def _row_frame(kth_key, lam, q, is_mag):
    """The frame `(ref, mult, lam, shift)` in which a row is solved: keys become `(s - ref) * mult`.

    Keys are taken relative to a key of the row (`ref`, the k-th largest, or
    the pooled block's smallest): an entry's ``u = s - value`` is then
    computed from two small numbers and does not cancel when the keys are
    large next to the strength (`u` ~ 1e-6 next to keys ~ 1e3 would keep
    only ten digits; ties at a strength of 1e-16 would keep none).

    * mask: shift invariant.  A strength whose binary exponent lies outside
      +-100 is scaled to [0.5, 1) with the keys: ``mask(x; l) = mask(c x; c l)``,
      whose Jacobian is `c` times that at `x`.  `shift` is 0.
    * magnitude: not shift invariant: the block equation's right-hand side is
      the value itself, ``value + shift`` with ``shift = ref * mult``.  It is
      homogeneous, ``mag(x; l) = mag(c x; l c^(2-p)) / c``, and its Jacobian
      is the same at `x` and `c x`; rows whose k-th key is tiny or huge
      (denormal keys lose digits, and their block equation underflows) are
      solved scaled by a power of two `c` with the strength `l c^(2-p)`,
      exactly (a power of two scales without rounding).  For large p the
      strength's exponent is (p - 2) times the scale's: where it would
      exceed `_STRENGTH_EXPONENT_MAX` (huge keys) the row is solved unscaled
      (p = 6 with s_(k) ~ 1e125 took l c^(2-p) to inf, and every output came
      back 0).  (Where it underflows, tiny keys and large p, the row stays
      scaled: there an exact threshold is not a float number in any frame.)
    """
    # Numba's float() keeps a float32 key float32: the reference must be float64, or every
    # key - ref of float32 keys rounds to float32 (p = 3, float32 ties: outputs 13 eps32 off).
    kth_key = np.float64(kth_key)
    if not is_mag:
        # Scaled when the strength is tiny or huge: the closed-form block equation of q = 4
        # holds l^3, which would underflow or overflow.
        mult = _unit_scale(lam)
        return (kth_key, mult, lam * mult, 0.0)
    mult = _unit_scale(kth_key, 1022)
    if mult != 1.0:
        lam_r = lam * _strength_scale(mult, q)
        if lam_r < _STRENGTH_LOW:
            # Below it the threshold lies closer to the keys near it than a float resolves (the
            # outputs are the hard operator's, ties split evenly): the block value, solved with l_r
            # underflowed, came back at the tie and the tied entries 0 (p = 4, four ties of 2e-200
            # sharing 3 places).  Raised to it, the outputs are the same to the last digit.
            lam_r = _STRENGTH_LOW
        if lam_r < math.inf and math.frexp(lam_r)[1] <= _STRENGTH_EXPONENT_MAX:
            return (kth_key, mult, lam_r, kth_key * mult)
    return (kth_key, 1.0, lam, kth_key)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _quadratic_block_value(count: float, mean: float, wsum: float, lam: float, is_mag: bool, shift: float) -> float:
    """`_closed_block_value` for q = 2 (p = 2), branch-free where `is_mag` is fixed."""
    if is_mag:
        # (value + shift) (n + l w) = n (mean + shift), written relative to the shift.
        return (count * mean - lam * wsum * shift) / (count + lam * wsum)
    return mean - lam * wsum / count


@nb.njit(cache=True, error_model="numpy")
def _closed_block_value(
    count: float, mean: float, m2: float, m3: float, wsum: float, lam: float, q: float, is_mag: bool, shift: float
) -> float:
    """The value of a block (q = 2 or 4) from its central moments and unit weights `wsum`.

    Keys, `mean` and the value are relative to `shift` (see `_row_frame`),
    which only the magnitude's right-hand side ``wsum * (value + shift)`` reads.
    """
    if q == 2.0:
        return _quadratic_block_value(count, mean, wsum, lam, is_mag, shift)
    # q == 4: sum (s - gamma)^3 = l^3 * rhs, with d = mean - gamma: M3 + 3 M2 d + n d^3 = l^3 rhs,
    # rhs = wsum (mask) or wsum (mean + shift - d) (magnitude).  In units of l (d = l e) no power
    # of l is formed: n e^3 + (3 M2 / l^2 [+ wsum l]) e + M3 / l^3 - wsum [(mean + shift)] = 0,
    # so that a strength whose cube over- or underflows (the magnitude's rescaled rows) is solved too.
    il = 1.0 / lam
    m2l = m2 * il * il
    m3l = m3 * il * il * il
    if is_mag:
        e = depressed_cubic_root((3.0 * m2l + wsum * lam) / count, (m3l - wsum * (mean + shift)) / count)
        # The magnitude's value is positive; when it is far below the keys (keys ~1e-113 with
        # l ~ 100), mean - d cancels to a round-off of either sign.
        return max(mean - e * lam, -shift)
    e = depressed_cubic_root(3.0 * m2l / count, (m3l - wsum) / count)
    return mean - e * lam


@nb.njit(cache=True, inline="always", error_model="numpy")
def _block_excess(c, count, mean, m2, m3, wsum, lam, q, is_mag, shift):
    """The block equation at value `c`: strictly decreasing in `c`, 0 at the block value.

    ``sum_B (s - c)^(q-1) - l^(q-1) * rhs`` with ``rhs = wsum`` (mask) or
    ``wsum * (c + shift)`` (magnitude), from the central moments (q = 2 or 4).
    Its sign says on which side of the block value `c` lies, without solving
    the cubic.
    """
    d = mean - c
    rhs = wsum * _target(c, is_mag, shift)
    if q == 2.0:
        return count * d - lam * rhs
    l3 = lam * lam * lam
    if 1e-280 < l3 < 1e280:
        return m3 + d * (3.0 * m2 + count * d * d) - l3 * rhs
    # The cube of l over- or underflows (magnitude rows rescaled far from 1): the same sign in
    # units of l (see `_closed_block_value`).
    e = d / lam
    return m3 / lam / lam / lam + e * (3.0 * (m2 / lam) / lam + count * e * e) - rhs


@nb.njit(cache=True, error_model="numpy")
def _pool_closed(keys, order, lo, hi, kk, lam, q, is_mag, frame):
    """Grow the boundary block with O(1) moment updates; return (a, b, gamma).

    The growth tests compare a neighbour with the block value through the sign
    of `_block_excess`, so the value (a cubic root for q = 4) is solved once at
    the end, and on the way only for the magnitude's left neighbours, whose
    saturation test needs it.
    """
    a = lo + kk - 1
    b = lo + kk + 1
    shift = frame[3]
    # Moments of the two boundary entries.
    x0 = _key(keys, order, a, frame)
    x1 = _key(keys, order, a + 1, frame)
    count = 2.0
    mean = 0.5 * (x0 + x1)
    m2 = 0.5 * (x0 - x1) * (x0 - x1)
    m3 = 0.0
    wsum = 1.0
    gamma = math.nan  # the block value, solved when needed
    while True:
        absorb_left = False
        if a > lo:
            left = _key(keys, order, a - 1, frame)
            if is_mag:
                if math.isnan(gamma):
                    gamma = _closed_block_value(count, mean, m2, m3, wsum, lam, q, is_mag, shift)
                if shift != 0.0 and far_below(gamma + shift, shift):
                    # Known to eps * shift only, the value cannot tell a saturated left neighbour
                    # from a free one (keys 7.5e-18 next to ties at 7.5e-35 whose value is ~1e-102:
                    # the value rounded to 1e-16 times the ties, and the block took the whole
                    # row).  `_pooled_block` solves this block again in absolute terms.
                    return a, b, gamma
                absorb_left = not _saturated(left, gamma, lam, q, is_mag, shift)
            else:
                # The mask's left neighbour is saturated iff left - l >= gamma.
                absorb_left = _block_excess(left - lam, count, mean, m2, m3, wsum, lam, q, is_mag, shift) > 0.0
        if absorb_left:
            a -= 1
            xi = left
            wsum += 1.0
        elif b < hi and _block_excess(_key(keys, order, b, frame), count, mean, m2, m3, wsum, lam, q, is_mag,
                                      shift) < 0.0:
            xi = _key(keys, order, b, frame)
            b += 1
        else:
            break
        # Welford/Terriberry update of (count, mean, M2, M3) with one value.
        delta = xi - mean
        n1 = count + 1.0
        delta_n = delta / n1
        term1 = delta * delta_n * count
        mean += delta_n
        m3 += term1 * delta_n * (n1 - 2.0) - 3.0 * delta_n * m2
        m2 += term1
        count = n1
        gamma = math.nan
    if math.isnan(gamma):
        gamma = _closed_block_value(count, mean, m2, m3, wsum, lam, q, is_mag, shift)
    return a, b, gamma


# `_first_unsaturated`'s band around the saturation level, relative, per unit of 1 + 1/(q - 1): outside
# it, comparing (s - gamma) / l with the level decides as `_saturated` (whose power rounds to an ulp).
_SATURATION_BAND = 4.0 * _EPS


@nb.njit(cache=True, error_model="numpy")
def _first_unsaturated(keys, order, lo, hi, gamma, lam, q, is_mag, frame):
    # Saturation is monotone along a descending row: binary search its end.  An entry is saturated
    # where g(s - gamma) = ((s - gamma) / l)^(q - 1) reaches the target (1, or the magnitude's value):
    # where (s - gamma) / l reaches target^(1 / (q - 1)), one power per search instead of one per
    # probe.  Inside a band around that level, where the two roundings could disagree, the probe
    # asks `_saturated` itself: the same entries as before, to the last one.
    shift = frame[3]
    target = _target(gamma, is_mag, shift)
    level = math.pow(target, 1.0 / (q - 1.0)) if target > 0.0 else math.nan
    if not 1e-300 < level < 1e300:
        level = math.nan  # every probe asks `_saturated` (a level near under- or overflow)
    band = _SATURATION_BAND * (1.0 + 1.0 / (q - 1.0)) * level
    left, right = lo, hi
    while left < right:
        mid = (left + right) // 2
        si = _key(keys, order, mid, frame)
        t = max(si - gamma, 0.0) / lam  # as `g_scalar` forms it
        if t >= level + band:
            saturated = True
        elif t <= level - band:
            saturated = False
        else:
            saturated = _saturated(si, gamma, lam, q, is_mag, shift)
        if saturated:
            left = mid + 1
        else:
            right = mid
    return left


@nb.njit(cache=True, error_model="numpy")
def _first_not_above(keys, order, lo, hi, gamma, frame):
    left, right = lo, hi
    while left < right:
        mid = (left + right) // 2
        if _key(keys, order, mid, frame) > gamma:
            left = mid + 1
        else:
            right = mid
    return left


@nb.njit(cache=True, error_model="numpy")
def _excess(keys, order, lo, hi, kk, gamma, lam, q, is_mag, frame):
    """Return (sum(y) - k, d/dgamma) at threshold gamma, and the free range."""
    a = _first_unsaturated(keys, order, lo, hi, gamma, lam, q, is_mag, frame)
    b = _first_not_above(keys, order, a, hi, gamma, frame)
    # The smallest u of the free range decides whether any u / l underflows (`g_scalar`); the loop
    # runs on the plain power otherwise (the check inside it cost p = 3 a fifth of its time).
    if b > a and ratio_is_tiny(_key(keys, order, b - 1, frame) - gamma, lam, q):
        total, deriv = _free_terms_tiny(keys, order, a, b, float(a - lo) - kk, gamma, lam, q, is_mag, frame)
    else:
        total, deriv = _free_terms(keys, order, a, b, float(a - lo) - kk, gamma, lam, q, is_mag, frame, False)
    return total, deriv, a, b


@nb.njit(cache=True, error_model="numpy")
def _free_terms_tiny(keys, order, a, b, total, gamma, lam, q, is_mag, frame):
    # Out of line: inlined next to the plain loop, it slowed p = 3 by a tenth.
    return _free_terms(keys, order, a, b, total, gamma, lam, q, is_mag, frame, True)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _free_terms(keys, order, a, b, total, gamma, lam, q, is_mag, frame, tiny_ratios):
    """The free entries' part of `_excess`: (`total` plus the sum of their y, its derivative in gamma)."""
    deriv = 0.0
    for i in range(a, b):
        u = _key(keys, order, i, frame) - gamma
        gi = g_scalar(u, lam, q) if tiny_ratios else g_plain(u, lam, q)
        gpi = g_prime_from_g(gi, u, q)  # one power per entry instead of two
        if is_mag:
            value = gamma + frame[3]  # the absolute value (see `_row_frame`)
            total += gi / value
            deriv -= gpi / value + gi / (value * value)
        else:
            total += gi
            deriv -= gpi
    return total, deriv


@nb.njit(cache=True, inline="always", error_model="numpy")
def _split(lower, upper, top, closest):
    """A point inside the bracket [lower, upper] of a block value below `top` (the k-th key).

    The midpoint, or, when the bracket's ends lie at distances from `top`
    that differ by more than a factor 4, their geometric mean: the value of
    a block of ties at a tiny strength lies within ~l of the keys, orders of
    magnitude closer than the bracket is wide, and halving would crawl there.
    `closest` is a lower bound on the value's distance from `top`
    (`_closest_to_top`; 0 where none is known).
    """
    # Distances from `top` below a few of its ulps are not resolved, nor below 1e-300 of the
    # bracket (near = 0 is one of them; 5e-324 where that underflows).
    far = top - lower
    near = max(top - upper, closest, 4.0 * _EPS * abs(top), far * 1e-300, 5e-324)
    if far > 4.0 * near:
        # As sqrt(near) sqrt(far), which does not underflow.
        return top - math.sqrt(near) * math.sqrt(far)
    return 0.5 * (lower + upper)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _closest_to_top(n_below, lam, q, is_mag, value_low):
    """A lower bound on the distance of the block value from `top`, the k-th key (0 where none is known).

    At the value, the k-th entry's weight is at least that of each of the
    `n_below` entries from it on, the k - 1 above it weigh at most 1 each,
    and all weigh k: so it is at least ``1 / n_below``.  That weight is
    ``g(top - value)`` (mask) or ``g(top - value) / value`` (magnitude,
    `value_low` a lower bound of the absolute value); solved for the distance.
    Only `_split` reads it: root finding does not crawl up to the keys from
    1e-300 of the bracket where the strength is not tiny.
    """
    weight = 1.0 / n_below
    if is_mag:
        weight *= max(value_low, 0.0)
    return lam * math.pow(weight, 1.0 / (q - 1.0))


@nb.njit(cache=True, error_model="numpy")
def _pool_rootfind(keys, order, lo, hi, kk, lam, q, is_mag, frame, start, below=math.nan):
    """General q: solve the pooled block equation for its value; return (a, b, gamma).

    `sum(y)` is continuous and non-increasing in the block value.  The bracket
    comes from the boundary entries: at the upper end (the k-th value) fewer
    than k entries are positive; at the lower end (where entry k + 1 is just
    saturated) more than k entries are saturated.  `start` is the first
    point when it lies inside (the value solved in another frame); NaN for the
    bracket's midpoint.  With `below` (> 0) the caller knows the bracket
    ``[-below, 0]`` instead: the value lies just below the frame's key
    (`_solve_below_key`), and splits go geometrically toward 0.
    """
    i0 = lo + kk - 1
    upper = _key(keys, order, i0, frame)
    top = upper
    shift = frame[3]
    if is_mag:
        lower = mag_lower_bracket(_key(keys, order, i0 + 1, frame) + shift, lam, q, shift)
    else:
        lower = _key(keys, order, i0 + 1, frame) - lam
    closest = _closest_to_top(float(hi - i0), lam, q, is_mag, lower + shift)
    # In absolute terms (a frame whose ref is 0: `_pooled_block`'s second solve, or relative to a
    # zero key) the magnitude's value can lie orders of magnitude below the k-th key: split
    # geometrically in the value itself.
    absolute = is_mag and frame[0] == 0.0
    if below > 0.0:
        lower, upper = -below, 0.0
    # A frame of a key below the k-th (the re-solves of q < 2, `_solve_below_key`): the value lies
    # below that key, at u = l y^(p-1) for the key's output y, which for large p is tiny next to the
    # bracket (p = 50, y = 0.0015: u = 1e-139), and halving toward it from the k-th key's side ran
    # out of iterations at 1e-92 (y = 0.013).  Splits go to the key, then geometrically below it.
    key_frame = q < 2.0 and not absolute and top > 0.0
    key_floor = lam * math.pow(_EPS, 1.0 / (q - 1.0))
    # A bound on the sum's rounding relative to its free terms' total (hi - lo + kk terms): steps
    # taken within it only wander in the noise (a few ulps up and down, each an evaluation: on normal
    # rows of 64, a fifth of all evaluations).  Relative to the free terms, not absolute: a flat
    # stretch of tiny exact terms is no noise (p = 1.02).
    noise = 4.0 * _EPS * float(hi - lo + kk)
    gamma = start if lower < start < upper else 0.5 * (lower + upper)
    step_before = step = math.inf  # the last two Newton steps' lengths (inf after a split)
    evaluated = False
    for _ in range(300):
        f, fp, a, b = _excess(keys, order, lo, hi, kk, gamma, lam, q, is_mag, frame)
        evaluated = True
        # f = 0 with no slope (fp = 0) is a flat stretch: every entry between the saturated ones and
        # the zeros contributes 0 there.  The root is its upper end: where the contributions underflow
        # (q - 1 = 200: 1e-4^200), the exact sum is above k all along it; where they are exactly 0
        # (the mask without a fractional entry), any point of it is a root.  Below the end, the last
        # saturated entry's output came out above |x| (p = 1.005).  f = 0 with a slope stops below
        # (Newton's step is 0).
        if f >= 0.0:
            lower = gamma
        else:
            upper = gamma
        nxt = gamma - f / fp if fp < 0.0 else math.nan
        free_total = f - float(a - lo) + kk  # f less its saturated count and k: the free terms' sum
        if fp < 0.0 and abs(f) <= noise * free_total and abs(nxt - gamma) <= 2.0 * _EPS * abs(gamma):
            break
        # Split where Newton would leave the bracket or not halve its step of two Newton steps
        # before (as in `_scalar.mag_fixed_point`: on a steep power, q = 201, it crawled and stopped
        # short).  A split forgets the steps: compared with the split's own step, Newton's (the
        # distance to the root from a point that halving brought halfway there) was rejected
        # again and again, and the bracket closed by halving (25 splits on a normal row, p = 3).
        if lower < nxt < upper and abs(nxt - gamma) <= 0.5 * step_before:
            step_before, step = step, abs(nxt - gamma)
        else:
            # (Not 0: a lower end of 0, where the next key's fixed point underflows, and 1e-300 of an
            # upper end of 1e-46 made the geometric split 0, which stopped there, at the bottom of a
            # stretch where sum(y) = k only because the free entries' z underflows: p = 1.25.)
            floor = max(lower, 1e-300 * upper, 5e-324)
            # Toward the frame's key from below (where it is not the k-th key, `_split`'s business):
            # no closer than where its entry's output would be eps (nor 0: 1e-300 of a bracket of 1e-165
            # underflowed, the split landed on the key and ended the search there, p = 50).
            near = max(-upper, 1e-300 * -lower, key_floor, 5e-324)
            if absolute and upper > 4.0 * floor:
                nxt = math.sqrt(floor) * math.sqrt(upper)
            elif key_frame and lower < 0.0 < upper:
                nxt = 0.0  # at the frame's key, where its entry enters the block
            elif key_frame and upper <= 0.0 and -lower > 4.0 * near:
                nxt = -math.sqrt(near) * math.sqrt(-lower)
            else:
                nxt = _split(lower, upper, top, closest)
            step_before = step = math.inf
        if nxt == gamma or upper - lower <= 2.0 * _EPS * max(abs(lower), abs(upper)):
            break
        gamma = nxt
        evaluated = False
    if not evaluated:
        f, fp, a, b = _excess(keys, order, lo, hi, kk, gamma, lam, q, is_mag, frame)
    # The pooled block always straddles the boundary k - 1 | k.
    return min(a, i0), max(b, i0 + 2), gamma


@nb.njit(cache=True, error_model="numpy")
def _pooled_block(keys, order, lo, hi, kk, lam, q, is_mag, closed):
    """Return (a, b, gamma, frame): the pooled block [a, b) of a row (a == b: none), its value
    `gamma` and the frame `(ref, mult, lam, shift)` in which it was solved (see `_row_frame`):
    the keys are `(s - ref) * mult` there, the strength is `frame[2]`.
    """
    if kk <= 0 or kk >= hi - lo:
        return lo, lo, 0.0, (0.0, 1.0, lam, 0.0)
    frame = _row_frame(float(keys[order[lo + kk - 1]]), lam, q, is_mag)
    lam_r = frame[2]
    # Is there an adjacent violator at the boundary?  Entry k - 1 is
    # unsaturated at the value s[k] of its right neighbour.  The magnitude asks in absolute
    # (scaled) terms: relative to s[k - 1], the value s[k] + shift loses s[k] when it lies
    # far below (rows spanning many orders found no violator where there was one).
    if is_mag:
        no_violator = _saturated(float(keys[order[lo + kk - 1]]) * frame[1], float(keys[order[lo + kk]]) * frame[1],
                                 lam_r, q, is_mag, 0.0)
    else:
        no_violator = _saturated(_key(keys, order, lo + kk - 1, frame), _key(keys, order, lo + kk, frame), lam_r, q,
                                 is_mag, 0.0)
    if no_violator:
        return lo, lo, 0.0, frame
    if closed:
        a, b, gamma = _pool_closed(keys, order, lo, hi, kk, lam_r, q, is_mag, frame)
    else:
        a, b, gamma = _pool_rootfind(keys, order, lo, hi, kk, lam_r, q, is_mag, frame, math.nan)
    if is_mag and far_below(gamma + frame[3], frame[3]):
        # The magnitude's value far below the key it is held relative to (with q < 2 the block's
        # free entries can sit hundreds of orders above it, their outputs ~x; with q = 4 a key
        # 1e-9 times the reference kept only 7 digits in s - ref, and its output came back above
        # |x|): relative to that key it is known to eps times the key only, too coarse to tell
        # the entries near it apart.  Solve again in absolute terms (same scale), where it keeps
        # its own digits, by root finding for every q: the closed form's value, mean - d, cancels
        # there (a threshold of 1e-89 below keys ~1e-31 came out 0).
        start = gamma + frame[3]  # the same value in absolute terms (same scale)
        frame = (0.0, frame[1], frame[2], 0.0)
        a, b, gamma = _pool_rootfind(keys, order, lo, hi, kk, frame[2], q, is_mag, frame, start)
    # For q < 2 (p > 2) g is infinitely steep at 0, so the block's smallest entry needs its
    # u = s - value to full relative precision (an error of eps * |s| in u would put an error
    # of (eps |s| / l)^(q-1) into y): solve again relative to that key, where that helps (for
    # the magnitude, a key within a factor 2 of the value; one far above it has u ~ s).
    # (q < 2 is never `closed`.)  Again while the block's smallest key changes: an entry whose u lies
    # below the rounding of its key in the previous frame was left out of the block there (p = 4,
    # normal rows: u = 1.5e-17 below a key 0.84, held relative to a key 0.92, came back 3.5% off).
    solved_at = -1
    for _ in range(4):
        value = frame[0] + gamma / frame[1]  # in the keys' units (a start for the next frame)
        if q < 2.0 and b < hi and b != solved_at:
            # The value is known to a few ulps of the frame's key (ulps of its own where they are larger).
            resolution = _EPS * (abs(frame[0]) + abs(value))
            solved = _solve_below_key(keys, order, lo, hi, kk, lam, q, is_mag, b, value, resolution)
            if solved[3][1] > 0.0:
                solved_at = b
                a, b, gamma, frame = solved
                continue
        near = not is_mag or float(keys[order[b - 1]]) * frame[1] <= 2.0 * (gamma + frame[3])
        if not (q < 2.0 and b - 1 > lo + kk - 1 and near) or b - 1 == solved_at:
            break
        solved_at = b - 1
        frame = _row_frame(float(keys[order[solved_at]]), lam, q, is_mag)
        a, b, gamma = _pool_rootfind(keys, order, lo, hi, kk, frame[2], q, is_mag, frame,
                                     (value - frame[0]) * frame[1])
    return a, b, gamma, frame


# How close to the next key below the block (in the value's resolution) a value is solved again below it.
_BELOW_KEY_ULPS = 8.0


@nb.njit(cache=True, error_model="numpy")
def _solve_below_key(keys, order, lo, hi, kk, lam, q, is_mag, i, value, resolution):
    """For q < 2 (p > 2): the block solved again just below key `i` (the first key below the block), where
    the block `value` (in the keys' units, known to about `resolution`) ended within `_BELOW_KEY_ULPS`
    resolutions of it, on either side.

    An entry's output is ``(u / l)^(q - 1)``, steep at 0: the exact value can lie closer to the key than
    its rounding (p = 10: y = 0.0045 at u = 8e-22 below a key 0.016), and in a frame of any other key
    it cannot be placed between the key and the next float below it, nor told from the key (p = 8: a
    value 5.5e-22 below a key 0.048, solved relative to a key 0.89, came out 22 of the small key's
    ulps above it, and its entry's y = 4.8e-4 as 0).  Relative to the key itself the value is its own
    small number.  Returns (a, b, gamma, frame) solved in the key's frame, or a frame whose scale is 0
    where the sum's signs do not put the value in ``[-width, 0]`` there (the value is then not below
    the key).
    """
    failed = (lo, lo, 0.0, (0.0, 0.0, lam, 0.0))
    key = float(keys[order[i]])
    near = _BELOW_KEY_ULPS * max(resolution, _EPS * abs(key))
    if not abs(value - key) <= near:
        return failed
    frame = _row_frame(key, lam, q, is_mag)
    # At the key (0 in its frame) the entry contributes nothing and the sum lies below k; at twice the
    # distance the value was found within below it, at or above.
    width = 2.0 * near * frame[1]
    if not (width > 0.0 and _excess(keys, order, lo, hi, kk, 0.0, frame[2], q, is_mag, frame)[0] < 0.0
            and _excess(keys, order, lo, hi, kk, -width, frame[2], q, is_mag, frame)[0] >= 0.0):
        return failed
    a, b, gamma = _pool_rootfind(keys, order, lo, hi, kk, frame[2], q, is_mag, frame, math.nan, width)
    return a, b, gamma, frame


@nb.njit(cache=True, error_model="numpy")
def _pav_row(keys, order, lo, hi, kk, lam, q, is_mag, closed, v, bstart, bend):
    n = keys.shape[0]
    for i in range(n):
        bstart[i] = i
        bend[i] = i
        si = float(keys[order[i]])
        if lo <= i < lo + kk:
            v[i] = mag_fixed_point(si, lam, q) if is_mag else si - lam
        else:
            v[i] = si
    a, b, gamma, frame = _pooled_block(keys, order, lo, hi, kk, lam, q, is_mag, closed)
    for i in range(a, b):
        v[i] = frame[0] + gamma / frame[1]
        bstart[i] = a
        bend[i] = b - 1


def pav_rows(keys, perm, lo, hi, kk, lam, q, is_mag):
    """Solve the isotonic problem of every row and invert the sorting permutation.

    Parameters
    ----------
    keys : (batch, n) float32 or float64
        The rows to sort by (values for the mask, magnitudes for the magnitude
        operator), finite inside the segment below.
    perm : (batch, n) int64
        The descending sorting permutation: the kernels read the sorted row
        ``s_i = keys[perm[i]]`` through it, so no sorted copy is needed.
    lo, hi, kk : (batch,) int64
        The finite segment ``[lo, hi)`` of each row and the number ``kk`` of
        unit weights inside it (infinite entries are handled by the caller).
    lam, q : float
        Regularization strength and conjugate exponent ``q = p / (p - 1)``.
    is_mag : bool
        Magnitude problem (weights ``w/2 v^2``) instead of mask (``w v``).

    Returns
    -------
    v : (batch, n), dtype of ``s``
        The isotonic solution.
    block_start, block_end : (batch, n) int64
        First and last sorted index of the block of every entry.
    inv_perm : (batch, n) int64
        The inverse permutation.
    """
    batch, n = keys.shape
    closed = q == 2.0 or q == 4.0
    v = np.empty((batch, n), dtype=keys.dtype)
    bstart = np.empty((batch, n), dtype=np.int64)
    bend = np.empty((batch, n), dtype=np.int64)
    inv = np.empty((batch, n), dtype=np.int64)
    for r in nb.prange(batch):
        _pav_row(keys[r], perm[r], lo[r], hi[r], kk[r], lam, q, is_mag, closed, v[r], bstart[r], bend[r])
        for i in range(n):
            inv[r, perm[r, i]] = i
    return v, bstart, bend, inv


def topk_rows_forward(keys, perm, x, lo, hi, kk, k, lam, q, is_mag, out, gprime, codes, offset):
    """PAV and the output assembly fused, written straight to input order.

    The CPU fast path of the PAV method: it writes ``out[r, perm[r, i]]``
    directly, so neither a sorted copy nor the inverse permutation is
    materialized.  Arguments as in `pav_rows`; ``x`` (the signed input rows) is
    read only by the magnitude operator; ``k`` is the requested k (for the
    shares of infinite mask entries).  The tests check it against `pav_rows`
    followed by the Array-API assembly of `topk_core._agnostic.assemble`.

    When ``gprime`` has the shape of ``out`` the Jacobian residuals are
    written too, in input order: the weights are a 0/1 prefix, so the only
    pooled block of a row is the free set ``F`` (spec section 6) and every
    other entry is a singleton block.  ``gprime`` is ``g'`` on ``F`` and 0
    elsewhere; for the magnitude, ``codes`` (int8) is ``sign(x)`` on ``F``,
    ``KEPT_CODE`` on the set ``A`` (unit-weight singletons and infinite
    entries) and 0 elsewhere (`MagResiduals`), and ``offset[r]`` is the
    number of unit weights of the pooled block (the ``k - |A|`` of the
    denominator ``D``).  Membership comes from the block's integer bounds,
    never from comparing floats.
    """
    batch, n = keys.shape
    closed = q == 2.0 or q == 4.0
    with_residuals = gprime.shape[0] == batch and gprime.shape[1] == n
    for r in nb.prange(batch):
        row, pr = keys[r], perm[r]
        lo_r, hi_r, kk_r = lo[r], hi[r], kk[r]
        a, b, gamma, frame = _pooled_block(row, pr, lo_r, hi_r, kk_r, lam, q, is_mag, closed)
        n_pos = lo_r
        n_neg = n - hi_r
        share_pos = min(1.0, k / n_pos) if n_pos > 0 else 0.0
        share_neg = max(k - n_pos - (hi_r - lo_r), 0) / n_neg if n_neg > 0 else 0.0
        if with_residuals and is_mag:
            offset[r] = lo_r + kk_r - a if a < b else 0
        # Magnitude rows with fewer than kk non-zero finite entries are returned unchanged, with
        # identity derivatives (see `select._cuts`).
        identity = is_mag and 0 < kk_r and float(row[pr[lo_r + kk_r - 1]]) == 0.0
        for i in range(n):
            j = pr[i]
            if i < lo_r or (identity and i < hi_r):
                val, deriv, kept, free = float(x[r, j]) if is_mag else share_pos, 0.0, True, False
            elif i >= hi_r:
                val, deriv, kept, free = share_neg, 0.0, False, False
            else:
                val, deriv, kept, free = segment_entry(
                    float(row[j]), float(x[r, j]), a <= i < b, i < lo_r + kk_r, gamma, frame, q, is_mag
                )
            emit_entry(r, j, val, deriv, kept, free, is_mag, with_residuals, out, gprime, codes)


def fused_outputs(x, is_mag, with_residuals, into=None):
    """(out, gprime, codes, offset): the arrays the fused kernels write, for rows `x`.

    Residual arrays that are not asked for (or that the operator has not) are
    empty: the kernels read their shapes to know what to write.  The
    magnitude's three residual arrays are views of one allocation
    (`_residual_block`).

    `into`: arrays (out, gprime, codes, offset) that the caller owns (a host
    callback's output buffers; None entries, or None for all), taken instead
    of fresh ones where they have the shape and dtype the kernels write.
    """
    batch, n = x.shape
    given = (None,) * 4 if into is None else into
    out = writable_or_empty(given[0], (batch, n), x.dtype)
    if not with_residuals:
        empty = np.empty((0, 0), dtype=x.dtype)
        return out, empty, np.empty((0, 0), dtype=np.int8), np.zeros(0, dtype=x.dtype)
    if not is_mag:
        gprime = writable_or_empty(given[1], (batch, n), x.dtype)
        return out, gprime, np.empty((0, 0), dtype=np.int8), np.zeros(0, dtype=x.dtype)
    # Unit-weight counts, in the rows' dtype as `MagResiduals.offset` holds them.
    layouts = (((batch, n), x.dtype), ((batch, n), np.int8), ((batch,), x.dtype))
    owned = tuple(writable(a, shape, dtype) for a, (shape, dtype) in zip(given[1:], layouts, strict=True))
    if any(a is None for a in owned):
        owned = _residual_block(*layouts)
    gprime, codes, offset = owned
    offset[:] = 0
    return out, gprime, codes, offset


def writable(array, shape, dtype):
    """`array` viewed as `shape` if it is a writable C-contiguous NumPy array of that size and `dtype`, else None."""
    if array is None:
        return None
    array = np.asarray(array)
    fits = array.dtype == dtype and array.size == math.prod(shape) and array.flags.c_contiguous
    return array.reshape(shape) if fits and array.flags.writeable else None


def writable_or_empty(array, shape, dtype):
    """`writable(array, shape, dtype)`, or a fresh array of that shape and dtype where `array` does not fit."""
    given = writable(array, shape, dtype)
    return np.empty(shape, dtype=dtype) if given is None else given


# Start of each array in a residual block: the cache line.
_BLOCK_ALIGN = 64


def _residual_block(*layouts):
    """Arrays of the given (shape, dtype) carved out of one fresh allocation, each starting on a cache line.

    One block instead of three arrays changes how glibc's malloc hands memory back between calls:
    freeing a block larger than the output raises its trimming threshold above what a call
    allocates, where three smaller arrays left it below, so that every call paid page faults on
    fresh memory again (1,900 per call for (262144, 16) float32 rows: the magnitude's forward
    with residuals took 16 ms against 7 ms without; 10 ms with one block).
    """
    # Python integers throughout: the block serves every call, the smallest too (np.prod and np.cumsum took
    # 10 us of a 55 us call on (64, 16) rows).
    dtypes = [np.dtype(dtype) for _, dtype in layouts]
    sizes = [math.prod(shape) * dtype.itemsize for (shape, _), dtype in zip(layouts, dtypes, strict=True)]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // _BLOCK_ALIGN) * _BLOCK_ALIGN)
    # np.empty's memory starts on a 16-byte boundary only: over-allocate to align the first array.
    raw = np.empty(starts[-1] + _BLOCK_ALIGN, dtype=np.uint8)
    base = (-raw.__array_interface__["data"][0]) % _BLOCK_ALIGN
    return tuple(
        raw[base + start:base + start + size].view(dtype).reshape(shape)
        for (shape, _), dtype, start, size in zip(layouts, dtypes, starts[:-1], sizes, strict=True)
    )


@nb.njit(cache=True, inline="always", error_model="numpy")
def segment_entry(si, xj, in_block, unit_weight, gamma, frame, q, is_mag):
    """Return (value, g', kept, free) of an entry of a row's finite segment.

    `in_block`: the entry is in the pooled block of value `gamma` (in the row's
    `frame`, see `_row_frame`); otherwise it is a singleton, saturated
    (`kept`) when it carries a unit weight, else 0.  `si` is its key, `xj` its
    signed value (read by the magnitude only).
    """
    if in_block:
        lam = frame[2]
        rr = max((si - frame[0]) * frame[1] - gamma, 0.0)
        gi, gpi = g_and_prime(rr, lam, q)
        if is_mag:
            # Homogeneous of degree 1: the derivative is the same in every frame.  |value| = g + r is below
            # |x| on F, but the rounding of g can take it above (p = 1.01: g = (r / l)^100, 112 ulps):
            # capped at |x|, in x's units (after the frame's scale).
            val = math.copysign(min((gi + rr) / frame[1], abs(xj)), xj) if rr > 0.0 else 0.0
            return val, gpi, False, rr > 0.0
        # Degree 0: d/dx = d/d(scaled key) * mult.
        return min(gi, 1.0), gpi * frame[1], False, rr > 0.0
    if unit_weight:
        return (xj if is_mag else 1.0), 0.0, True, False
    return 0.0, 0.0, False, False


@nb.njit(cache=True, inline="always", error_model="numpy")
def set_code(signed, free, kept):
    """The magnitude's residual code of an entry (`MagResiduals.codes`): the sign of `signed` (x, or the
    entry's non-zero output) on the free set, `KEPT_CODE` on A, else 0.

    int8 throughout, the codes' dtype: with int64 literals the selects widen to int64 before the
    store, and the compiler left loops writing codes scalar, with branches (on an AMD EPYC with
    AVX2: with int8 codes the magnitude's forward+VJP took 0.78-0.9x its time; docs/faq.md)."""
    sign = np.int8(1) if signed > 0.0 else np.int8(-1)
    return sign if free else (np.int8(KEPT_CODE) if kept else np.int8(0))


@nb.njit(cache=True, inline="always", error_model="numpy")
def emit_entry(r, j, val, deriv, kept, free, is_mag, with_residuals, out, gprime, codes):
    """Write one output entry and, when asked, its residuals (see `topk_rows_forward`)."""
    out[r, j] = val
    if with_residuals:
        gprime[r, j] = deriv
        if is_mag:
            # The sign of a free entry is that of its (non-zero) output.
            codes[r, j] = set_code(val, free, kept)


# Each row kernel is compiled twice: threads pay off only on large batches, and a
# parallel region on a busy machine waits for its slowest thread.
PARALLEL_MIN_ENTRIES = 1 << 16


def _renamed(py_func, suffix):
    # Numba's on-disk cache is keyed by the function's module and qualified name, not
    # by the `parallel` flag: the two variants need two names, or one loads the other.
    twin = types.FunctionType(
        py_func.__code__, py_func.__globals__, py_func.__name__ + suffix, py_func.__defaults__, py_func.__closure__
    )
    twin.__qualname__ = py_func.__qualname__ + suffix
    twin.__doc__ = py_func.__doc__
    return twin


def _compiled_pair(py_func, fastmath=False, inputs=(0,)):
    """`py_func` compiled serial and parallel, behind one function that picks the variant by the size of its
    first argument, (batch, n) rows or a flat array, runs the parallel one under `parallel.LAUNCH` (where
    `parallel.allowed()`), and passes the arrays at positions `inputs` (those the kernel only
    reads) as read-only views (`read_only`): one signature whoever calls it (the tests and benchmarks
    call the kernels with writable arrays, the operators with read-only ones; each writable variant
    compiled every kernel it reaches again)."""
    serial = nb.njit(cache=True, fastmath=fastmath, error_model="numpy")(py_func)
    parallel = nb.njit(parallel=True, cache=True, fastmath=fastmath, error_model="numpy")(
        _renamed(py_func, "_parallel")
    )

    def dispatch(keys, *args):
        arrays = [keys, *args]
        for i in inputs:
            arrays[i] = read_only(arrays[i])
        # (batch, n) rows, or one flat array of `batch` entries.
        if keys.shape[0] > 1 and keys.size >= PARALLEL_MIN_ENTRIES and _parallel.allowed():
            with _parallel.LAUNCH:
                return parallel(*arrays)
        return serial(*arrays)

    dispatch.__doc__ = py_func.__doc__
    dispatch.__name__ = py_func.__name__
    dispatch.serial, dispatch.parallel = serial, parallel
    return dispatch


pav_rows = _compiled_pair(pav_rows)
topk_rows_forward = _compiled_pair(topk_rows_forward, inputs=(0, 2))


def _flat_keys(flat, keys, is_mag, n_chunks):
    # Chunks of the flattened rows: long contiguous loops the compiler vectorizes, whatever n is.
    size = flat.shape[0]
    bad = 0
    for c in nb.prange(n_chunks):
        prefer_wide_vectors()
        part = flat[c * size // n_chunks:(c + 1) * size // n_chunks]
        chunk_bad = 0
        if is_mag:
            out = keys[c * size // n_chunks:(c + 1) * size // n_chunks]
            for j in range(part.shape[0]):
                a = abs(part[j])
                out[j] = a
                chunk_bad += 0 if a < np.inf else 1  # NaN compares false too
        else:
            for j in range(part.shape[0]):
                chunk_bad += 0 if abs(part[j]) < np.inf else 1
        bad += chunk_bad
    return bad == 0


_flat_keys = _compiled_pair(_flat_keys)


def _chunks(size: int) -> int:
    # Threads only pay off on large arrays (see PARALLEL_MIN_ENTRIES).
    return 4 * nb.get_num_threads() if size >= PARALLEL_MIN_ENTRIES else 1


def read_only(a):
    """A read-only view of the NumPy array `a` (None stays None).

    Numba compiles a kernel once per signature, and an array's writeable flag
    is part of it: JAX's arrays come as read-only views, NumPy's usually
    writable, so the same call compiled every kernel twice (the lane solver
    alone, serial and parallel, about 50 s on a 2-core machine).  The kernels
    never write their inputs: handing them read-only views always makes one
    signature serve both (side by side, `benchmarks/ab_versions.py`, the
    timings moved within the noise, medians 0.96-1.04x).
    """
    if a is None or not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


def row_keys(x):
    """(keys, all_finite) of C-contiguous NumPy rows `x` for the magnitude: |x|, and whether every
    entry of x is finite, in one pass (instead of an abs, an isfinite and an all)."""
    keys = np.empty_like(x)
    return keys, _flat_keys(read_only(x.reshape(-1)), keys.reshape(-1), True, _chunks(x.size))


def all_finite(x):
    """Whether every entry of the C-contiguous NumPy rows `x` is finite (one pass, no temporary)."""
    # The unused `keys` must be writable for Numba to compile the loop that would write it.
    return _flat_keys(read_only(x.reshape(-1)), np.empty(0, dtype=x.dtype), False, _chunks(x.size))
