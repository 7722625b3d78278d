"""The p-norm regularizer through its conjugate: the one place where g, g' and g'' are written.

With `q = p / (p - 1)`, `g(u) = sign(u) (|u| / l)^(q - 1)` is the gradient of
`Q*(u) = l^(1-q)/q |u|^q`, the conjugate of `(l/p) |y|^p` (spec section 4).
The operators only evaluate `g` at `u >= 0`, which the callers guarantee.
"""

from __future__ import annotations

from typing import Any


def conjugate_exponent(p: float) -> float:
    """Return `q = p / (p - 1)`, snapping p = 4/3 and p = 2 to the exact q = 4 and q = 2.

    `4/3` in floating point gives `q = 4.000000000000001`; snapping keeps the
    closed-form (cubic) path of the solvers for the default exponent.
    """
    if abs(p - 2.0) <= 1e-12:
        return 2.0
    if abs(p - 4.0 / 3.0) <= 1e-12:
        return 4.0
    return p / (p - 1.0)


def strength_scale(m: Any, q: float, xp: Any) -> Any:
    """``2^(m (2 - p))`` for integer-valued `m`: the magnitude's strength in a frame scaled by ``c = 2^m`` is
    ``l c^(2-p)`` (``mag(x; l) = mag(c x; l c^(2-p)) / c``).

    For the default ``p = 4/3`` (``q = 4``, snapped) the exponent ``2 m / 3`` is split into whole numbers and
    thirds: the float of 2/3 is 3.7e-17 off (and ``2 - p`` of the float 4/3 7.4e-17), which times
    ``m = 216`` moved the strength by 1.1e-14 of itself and the threshold, its cube, by 90 ulps, which a
    free output ``|x| - t`` near ``t`` cancels to.  Other p are taken as their float (q's rounding is of
    the same order).
    """
    two = xp.full_like(m, 2.0)
    if q == 4.0:
        twice = 2.0 * m
        whole = xp.floor(twice / 3.0)
        return xp.pow(two, whole) * xp.pow(two, (twice - 3.0 * whole) / 3.0)
    return xp.pow(two, m * (2.0 - q / (q - 1.0)))


def g(u: Any, lam: float, q: float, xp: Any) -> Any:
    """`(u / l)^(q - 1)` for `u >= 0`.

    For q < 2 (p > 2) the power shrinks the range, and `u / l` can underflow
    where the result is a normal number (``u = 1e-220``, ``l = 1e279``:
    ``g = 1e-250``); it is then formed as ``u^(q-1) / l^(q-1)``, both in range.
    For q > 2 the power widens the range: the quotient first cannot lose what
    the result keeps.
    """
    if q == 2.0:
        return u / lam
    if q == 4.0:
        t = u / lam
        return t * t * t
    if q < 2.0:
        return xp.pow(u, q - 1.0) / lam ** (q - 1.0)
    return xp.pow(u / lam, q - 1.0)


def g_inverse(v: Any, lam: float, q: float, xp: Any) -> Any:
    """`l v^(1 / (q - 1))` for `v >= 0`: the `u` with `g(u) = v` (the saturation width at level `v`).

    For q < 2 the power widens the range (``v^2`` for p = 3 underflows where
    ``l v^2`` is a normal number); it is then formed as
    ``(l^(q-1) v)^(1/(q-1))``, whose base is nearer 1 than the result.
    """
    if q == 2.0:
        return lam * v
    if q < 2.0:
        base = lam ** (q - 1.0) * v
        # A width beyond the float range is inf (no key saturates), without an overflow warning.
        limit = float(xp.finfo(v.dtype).max) ** (q - 1.0)
        inside = base < limit
        width = xp.pow(xp.where(inside, base, xp.zeros_like(base)), 1.0 / (q - 1.0))
        return xp.where(inside, width, xp.inf)
    return lam * xp.pow(v, 1.0 / (q - 1.0))


def g_prime_on(u: Any, free: Any, lam: float, q: float, xp: Any) -> Any:
    """`g'(u) = (q - 1) l^(1 - q) u^(q - 2)` on the free set, exactly 0 elsewhere.

    For q != 2 the power is singular at u = 0 (p < 2 gives 0 * inf = NaN under
    autodiff, p > 2 gives inf); it is evaluated only where `free` holds, on a
    safe stand-in value elsewhere, so neither values nor gradients see it.
    """
    if q == 2.0:
        return xp.where(free, xp.ones_like(u) / lam, xp.zeros_like(u))
    if q < 2.0:
        # (q - 1) / (l^(q-1) u^(2-q)): as in `g`, u / l may underflow where g' is a normal number.
        v = xp.where(free, u, xp.ones_like(u))
        num = (q - 1.0) / lam ** (q - 1.0)
        den = xp.pow(v, 2.0 - q)
        # Beyond the float range (subnormal keys, whose frame clips the strength: 2e-313 with p = 3
        # gave 4.5e309) g' is inf, reached without the division's overflow (a warning, an error
        # where warnings are).
        huge = den < num / xp.finfo(u.dtype).max
        deriv = xp.where(huge, xp.full_like(u, xp.inf), num / xp.where(huge, xp.ones_like(u), den))
    else:
        t = xp.where(free, u / lam, xp.ones_like(u))
        deriv = (q - 1.0) / lam * (t * t if q == 4.0 else xp.pow(t, q - 2.0))
    return xp.where(free, deriv, xp.zeros_like(u))


def curvature_ratio(gp: Any, lam: float, q: float, xp: Any) -> Any:
    """``g''(u) / g'(u) = (q - 2) / u`` from ``g'(u) > 0`` alone (second-order derivatives).

    ``u = l (l g' / (q - 1))^(1 / (q - 2))`` inverts ``g'(u) = (q - 1) / l (u / l)^(q - 2)``; the base is a
    ratio near 1 in scale, so neither `l` nor `u` need be moderate.  The power multiplies the relative
    rounding of g' by ``1 / |q - 2|`` (1/2 for the default p = 4/3, 9 at p = 1.9), which the factor
    ``q - 2`` of the result takes back: the error stays about one rounding of ``g'' / g'`` at u's scale.
    """
    if q == 2.0:
        return xp.zeros_like(gp)
    u = lam * xp.pow(gp * (lam / (q - 1.0)), 1.0 / (q - 2.0))
    return (q - 2.0) / u
