"""Scalar building blocks of the Numba kernels (one row, float64 arithmetic).

`g(u) = (u / l)^(q - 1)` is the gradient of the conjugate regularizer
(spec section 4); the kernels only evaluate it at `u >= 0`.  `q == 2` and
`q == 4` (p = 2 and p = 4/3) take exact polynomial shortcuts.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

_EPS = np.finfo(np.float64).eps


# Below it, u / l loses digits to gradual underflow (and is 0 under 2^-1074), while for q < 2 its
# power g lies far above it.
_RATIO_TINY = 2.0**-960


@nb.njit(cache=True, inline="always", error_model="numpy")
def g_plain(u: float, lam: float, q: float) -> float:
    """Return g(u) = (u / l)^(q - 1) for u >= 0 (0 for u <= 0, never NaN) as the plain power of u / l,
    exact where the ratio is not below `_RATIO_TINY` or q >= 2 (see `g_scalar`).

    Selects, not branches, on the sign of `u` (the branches on `q` are the
    same for a whole loop): loops over entries stay vectorizable.  The block
    equation's loop (`kernels._excess`) uses it after checking its smallest u.
    """
    t = (u if u > 0.0 else 0.0) / lam
    if q == 2.0:
        return t
    if q == 4.0:
        return t * t * t
    return math.pow(t, q - 1.0)


@nb.njit(cache=True, inline="always", error_model="numpy")
def ratio_is_tiny(u: float, lam: float, q: float) -> bool:
    """Whether `g_plain` loses g(u) to the underflow of u / l (q < 2 only; see `g_scalar`)."""
    return q < 2.0 and u > 0.0 and u / lam < _RATIO_TINY


@nb.njit(cache=True, inline="always", error_model="numpy")
def g_scalar(u: float, lam: float, q: float) -> float:
    """Return g(u) for u >= 0 (0 for u <= 0, never NaN), at any u / l.

    For q < 2, g = (u / l)^(q - 1) lies far above u / l where the ratio is tiny: there u and l are
    taken apart, ``u^(q - 1) l^(1 - q)`` (each in range for q - 1 < 1).  A magnitude row scaled into
    a frame whose strength is near 2^1000 (`kernels._row_frame`) put u / l = 2.5e-326 for an entry
    1e26 below the k-th key (p = 5): g came back 0 for 1e-82, and g' = (q - 1) (u / l)^(q - 2) / l
    inf; the block equation lost such terms (on a spanning row of 1024 at p = 8: a sum 6e-6 off, its
    value 2e-7 off, g' 2e-9 off).
    """
    # q = 2 and 4 first, as in `g_plain`: the sort-free route's loops (`sortfree`) vectorize only so
    # (with the check ahead of them, its forward at p = 4/3 took 4.8x its time on rows of 4096).
    if q != 2.0 and q != 4.0 and ratio_is_tiny(u, lam, q):
        return math.pow(u, q - 1.0) * math.pow(lam, 1.0 - q)
    return g_plain(u, lam, q)


@nb.njit(cache=True, inline="always", error_model="numpy")
def g_prime_from_g(gu: float, u: float, q: float) -> float:
    """g'(u) = (q - 1) g(u) / u from `gu` = g(u), for u > 0 (0 for u <= 0): no power of its own (the
    block equation's Newton steps, the residuals' g' of `g_and_prime` and `g_prime_scalar`)."""
    return (q - 1.0) * gu / u if u > 0.0 else 0.0


@nb.njit(cache=True, inline="always", error_model="numpy")
def g_prime_scalar(u: float, lam: float, q: float) -> float:
    """Return g'(u) for u > 0 (0 for u <= 0: the kink is handled by the caller); selects, as `g_scalar`."""
    positive = u > 0.0
    t = (u if positive else 0.0) / lam
    if q == 2.0:
        return 1.0 / lam if positive else 0.0
    if q == 4.0:
        return 3.0 * t * t / lam
    return g_prime_from_g(g_scalar(u, lam, q), u, q)


@nb.njit(cache=True, inline="always", error_model="numpy")
def g_and_prime(u: float, lam: float, q: float) -> tuple[float, float]:
    """Return (g(u), g'(u)) for u > 0 ((0, 0) for u <= 0), with one power for general q: g' = (q - 1) g / u,
    in range where u / l underflows (see `g_scalar`)."""
    gu = g_scalar(u, lam, q)
    if q == 2.0 or q == 4.0:
        return gu, g_prime_scalar(u, lam, q)
    return gu, g_prime_from_g(gu, u, q)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _cardano(pc: float, qc: float) -> float:
    # The real root of d^3 + pc d + qc = 0 (pc >= 0) for coefficients of moderate size.
    disc = math.sqrt(0.25 * qc * qc + pc * pc * pc / 27.0)
    a = np.cbrt(0.5 * abs(qc) + disc)
    b = pc / (3.0 * a)
    d = -qc / (a * a + pc / 3.0 + b * b)
    deriv = 3.0 * d * d + pc
    if deriv > 0.0:
        d -= (d * d * d + pc * d + qc) / deriv
    return d


@nb.njit(cache=True, error_model="numpy")
def depressed_cubic_root(pc: float, qc: float) -> float:
    """The unique real root of d^3 + pc d + qc = 0 for pc >= 0, for coefficients of any size.

    Cardano's formula written without cancellation: with
    A = cbrt(|qc|/2 + sqrt(qc^2/4 + pc^3/27)) and B = pc/(3A), the root
    A - B equals |qc| / (A^2 + AB + B^2) where AB = pc/3.  One Newton step
    polishes the last bits.  Coefficients whose squares or cubes would over-
    or underflow are first scaled: ``d = 2^e delta`` with 2^e near the larger
    of sqrt(pc) and cbrt(|qc|), exact powers of two; where the linear term
    then dominates by far, the root is ``-qc / pc`` to first order.
    """
    if qc == 0.0:
        return 0.0
    aq = abs(qc)
    if 1e-90 < aq < 1e90 and pc < 1e60:
        return _cardano(pc, qc)
    e = max(math.frexp(aq)[1] // 3, math.frexp(pc)[1] // 2 if pc > 0.0 else -1100)
    pcs = math.ldexp(pc, -2 * e)
    qcs = math.ldexp(qc, -3 * e)
    if abs(qcs) < 1e-60 * pcs:
        # |d| ~ |qc| / pc, far below sqrt(pc): d^3 is a relative correction of d^2 / pc.
        d = -qc / pc
        return d - d * (d / pc) * d
    return math.ldexp(_cardano(pcs, qcs), e)


@nb.njit(cache=True, inline="always", error_model="numpy")
def quadratic_fixed_point(s: float, lam: float) -> float:
    """`mag_fixed_point` for q = 2 (p = 2): g(s - u) = (s - u) / l = u, branch-free."""
    return s / (1.0 + lam) if s > 0.0 else 0.0


@nb.njit(cache=True, error_model="numpy")
def mag_fixed_point(s: float, lam: float, q: float) -> float:
    """Value u of a saturated magnitude entry: the root of g(s - u) = u in [0, s].

    With d = s - u this is g(d) + d = s, increasing in d, so bisection with
    Newton steps inside the bracket [0, s] converges for every q.  For q = 4,
    a cubic in units of l (d = l e, ``e^3 + l e - s = 0``), so that no power
    of l appears for any strength.  Where u is far below s (any q), a few
    steps of the contracting iteration ``u = g(s - u)`` instead.
    """
    if q == 2.0:
        return quadratic_fixed_point(s, lam)
    if s <= 0.0:
        return 0.0
    u = g_scalar(s, lam, q)  # the value when it is far below s
    if u < 1e-6 * s:
        # u = g(s - u) as a fixed-point iteration that contracts by about (q - 1) u / s per step,
        # each gaining six digits, with no cancellation (s - d from the cubic or the bisection
        # below keeps none of a u far below s).
        for _ in range(3):
            u = g_scalar(s - u, lam, q)
        return u
    if q == 4.0:
        d = depressed_cubic_root(lam, -s) * lam
        return s - min(max(d, 0.0), s)
    # d = s - u solves g(d) + d = s: d <= s and g(d) <= s bound it above (d <= l s^(1/(q-1)), g's
    # inverse at s), and g(d), d <= s/2 at the bound below; the two ends lie within a factor
    # 2^max(1, 1/(q-1)).  Newton starts at the end it converges from without leaving the bracket
    # (g is convex for q > 2, concave below): 4-7 steps instead of 6-13 from the midpoint of [0, s].
    inverse = lam * math.pow(s, 1.0 / (q - 1.0))
    lo = min(0.5 * s, inverse * math.pow(0.5, 1.0 / (q - 1.0)))
    hi = min(s, inverse)
    d = hi if q > 2.0 else lo
    step_before = step = s  # the last two Newton steps' lengths (s after a bisection)
    for _ in range(200):
        gd = g_scalar(d, lam, q)
        f = gd + d - s
        if f == 0.0:
            break
        if f > 0.0:
            hi = d
        else:
            lo = d
        fp = g_prime_from_g(gd, d, q) + 1.0
        nxt = d - f / fp
        if abs(nxt - d) <= 2.0 * _EPS * d and abs(f) <= 4.0 * _EPS * s:
            # Newton's step within two ulps and f within its rounding: the root.  (Tested first: a step
            # that rounds to nothing leaves the bracket, and its bisection crawled to the root in 45
            # halvings, q = 5.)
            d = nxt
            break
        # Bisect where Newton would leave the bracket or not halve its step of two Newton steps before:
        # far from the root of a steep power (q = 201, p = 1.005) Newton shrinks d by 1/(q - 1) a step, and
        # 200 steps stopped at d = 0.21 for a root at 0.1 (the magnitude's outputs came back ~1e8 for
        # x ~ 1).  A bisection forgets the steps: compared with its own step, Newton's was rejected again
        # and again, and the bracket closed by halving (q = 5, l = 0.1: 50 steps for a root at 0.1).
        # (The ends count: the bound below is the root where g(d) = d = s / 2.)
        if lo <= nxt <= hi and abs(nxt - d) <= 0.5 * step_before:
            step_before, step = step, abs(nxt - d)
        else:
            nxt = 0.5 * (lo + hi)
            step_before = step = s
        if nxt == d or hi - lo <= 4.0 * _EPS * hi:
            d = nxt
            break
        d = nxt
    return s - d


@nb.njit(cache=True, inline="always", error_model="numpy")
def mag_lower_bracket(s: float, lam: float, q: float, ref: float) -> float:
    """A lower end of a magnitude threshold held relative to `ref`, from the absolute key `s` below it.

    The threshold lies above the fixed point of `s` (`mag_fixed_point`); taken
    relative to `ref` and moved out by the rounding of that subtraction.
    """
    return lower_bracket_relative(mag_fixed_point(s, lam, q), ref)


@nb.njit(cache=True, inline="always", error_model="numpy")
def lower_bracket_relative(u: float, ref: float) -> float:
    """A lower end of a threshold above the absolute value `u`, held relative to `ref` (moved out by the
    rounding of the subtraction)."""
    return u - ref - 4.0 * np.finfo(np.float64).eps * abs(ref)
