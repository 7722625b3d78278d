"""Independent references for the tests: none of them shares code with the library.

* `threshold_mask` / `threshold_mag`: the sort-free threshold form of spec
  section 5, one scalar per row found by 200 bisection steps in float64.
* `mp_threshold_mag_parts` / `mp_threshold_mag_row`: the magnitude's threshold form in arbitrary
  precision (mpmath), for rows where float64 cancels (ties at a tiny
  strength, magnitudes spanning hundreds of orders).
* `mp_threshold_mask_row`: the mask's, likewise (large p, where the threshold
  lies closer to a key than float64 resolves).
* `finite_difference_jacobian`: central differences in float64.
* `mask_jacobian` / `mag_jacobian`: the closed forms of spec section 6 for
  one row, with the free and saturated sets read off the operator's output.
* `weighted_output_hessian`: the Hessian of ``<w, op(x)>`` for one row, by
  central differences of those closed forms at the bisection outputs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np


def _q(p: float) -> float:
    return p / (p - 1.0)


def mp_q_minus_one(p: float):
    """``q - 1 = 1 / (p - 1)`` in the current mpmath precision, the float 4/3 read as the rational 4/3.

    The default exponent is 4/3 (api.md), whose float lies 7e-17 below it: taken literally, q - 1 is
    3 + 6.7e-16, and ``(r / l)^(q - 1)`` of a tiny ``r / l`` (1e-113) moves by 1e-13 of itself, which
    a free output cancelling against its threshold (``|x| - t``) shows as hundreds of its ulps.
    """
    import mpmath

    exact = mpmath.mpf(4) / 3 if p == 4.0 / 3.0 else mpmath.mpf(p)
    return 1 / (exact - 1)


def _g(u: np.ndarray, lam: float, p: float) -> np.ndarray:
    return (np.maximum(u, 0.0) / lam) ** (_q(p) - 1.0)


def _excess(y: np.ndarray, k: int) -> float:
    # Count saturated entries exactly, so that tiny fractional parts are not lost against k.
    saturated = y >= 1.0
    return float(np.count_nonzero(saturated) - k) + float(y[~saturated].sum())


def _bisect(excess: Callable[[float], float], lo: float, hi: float) -> float:
    """Root of a non-increasing function with excess(lo) >= 0 >= excess(hi)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    # The upper end has excess <= 0: where the root is the end of a flat stretch
    # (a non-unique threshold), it lies inside the stretch, where outputs are exact.
    return hi


def threshold_mask_row(x: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)

    def y(tau: float) -> np.ndarray:
        return np.minimum(1.0, _g(x - tau, lam, p))

    tau = _bisect(lambda t: _excess(y(t), k), x.min() - lam - 1.0, x.max())
    return y(tau)


def threshold_mag_row(x: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    if np.count_nonzero(a) <= k:
        return x.copy()

    def parts(t: float) -> tuple[np.ndarray, np.ndarray]:
        r = np.maximum(a - t, 0.0)
        return _g(r, lam, p), r

    def excess(t: float) -> float:
        z, _ = parts(t)
        return _excess(np.minimum(1.0, z / t), k)

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        t = _bisect(excess, 0.0, a.max())
        z, r = parts(t)
    return np.where(z >= t, x, np.sign(x) * (z + r))


def mp_threshold_mag_parts(x: np.ndarray, k: int, lam: float, p: float, digits: int = 120):
    """(out, g', saturated, free) of the magnitude operator on one float64 row, computed with `digits`
    significant digits and rounded (g' on the free set, 0 elsewhere; spec sections 5 and 6).

    Bisection on log t (the threshold of spec section 5) over a range that
    reaches e^-2000 below the smallest non-zero magnitude, with enough steps
    for `digits` digits of t; then ``r = |x| - t`` carries those digits.
    Rows with at most k non-zero entries return x (every entry saturated).
    `digits` must also resolve ``sum(y) - k`` where it is tiny: free entries far
    below l add ``z / t`` of 1e-400 and less, and an oracle that cannot see
    them settles anywhere on the stretch where the sum looks flat
    (the first of `tests/test_mag_precision.py::FLAT_BY_UNDERFLOW_ROWS` needs 500 digits).
    """
    import mpmath

    n = len(x)
    with mpmath.workdps(digits):
        exponent = mp_q_minus_one(p)
        strength = mpmath.mpf(lam)
        a = [abs(mpmath.mpf(float(v))) for v in x]
        if sum(1 for v in a if v > 0) <= k:
            return np.asarray(x, dtype=np.float64).copy(), np.zeros(n), np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        # Each distinct magnitude once, times its count: the tests' long rows repeat a short one.
        counts = collections.Counter(abs(float(v)) for v in x)
        distinct = [(mpmath.mpf(v), count) for v, count in counts.items()]

        def total(t):
            return sum(count * min(1, ((v - t) / strength) ** exponent / t) for v, count in distinct if v > t)

        lo = mpmath.log(min(v for v in a if v > 0)) - 2000
        hi = mpmath.log(max(a))
        for _ in range(4 * digits + 40):
            mid = (lo + hi) / 2
            if total(mpmath.exp(mid)) > k:
                lo = mid
            else:
                hi = mid
        t = mpmath.exp(hi)
        out, gprime = np.zeros(n), np.zeros(n)
        saturated, free = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for i, (v, xv) in enumerate(zip(a, x, strict=True)):
            if v <= t:
                continue
            r = v - t
            z = (r / strength) ** exponent
            if z >= t:
                saturated[i], out[i] = True, float(xv)
            else:
                free[i] = True
                out[i] = float(mpmath.sign(xv) * (z + r))
                gprime[i] = float(exponent * z / r)  # (q - 1) l^(1-q) r^(q-2)
    return out, gprime, saturated, free


def assert_within_input_rounding(y: np.ndarray, expected: np.ndarray, x: np.ndarray, label: str) -> None:
    """|y - expected| <= 1e-12 |expected| + 64 ulps of |x|, entry by entry (float64).

    Relative to each entry, or to its own input's rounding: a free output of
    1e-17 next to an input of 3e12 (its r = |x| - t is 3e-30 of t) is 0 in
    float64.
    """
    bound = 1e-12 * np.abs(expected) + 64 * np.finfo(np.float64).eps * np.abs(x)
    error = np.abs(y - expected) / bound
    assert error.max() <= 1.0, f"{label}: error {error.max():.2e} of the bound at entry {error.argmax()}"


def mp_threshold_mask_row(x: np.ndarray, k: int, lam: float, p: float, digits: int = 120) -> np.ndarray:
    """The mask of one float64 row (1 <= k < n) in `digits`-digit arithmetic, rounded: bisection on the
    threshold tau of ``sum_i min(1, ((x_i - tau)_+ / l)^(q - 1)) = k`` with enough steps for `digits`
    digits of tau (spec section 5)."""
    import mpmath

    with mpmath.workdps(digits):
        exponent = mp_q_minus_one(p)
        strength = mpmath.mpf(lam)
        keys = [mpmath.mpf(float(v)) for v in x]

        def outputs(tau):
            return [min(1, ((v - tau) / strength) ** exponent) if v > tau else mpmath.mpf(0) for v in keys]

        lo, hi = min(keys) - strength - 1, max(keys)
        for _ in range(4 * digits + 40):
            mid = (lo + hi) / 2
            if sum(outputs(mid)) > k:
                lo = mid
            else:
                hi = mid
        return np.array([float(v) for v in outputs(hi)])


def mp_threshold_mag_row(x: np.ndarray, k: int, lam: float, p: float, digits: int = 120) -> np.ndarray:
    """The magnitude operator of one float64 row in `digits`-digit arithmetic (`mp_threshold_mag_parts`)."""
    return mp_threshold_mag_parts(x, k, lam, p, digits)[0]


def mag_vjp_from_parts(x: np.ndarray, k: int, gprime, saturated, free, u: np.ndarray) -> np.ndarray:
    """J^T u of the magnitude operator from its sets and g' (spec section 6), in float64."""
    signs = np.sign(x)
    denominator = gprime[free].sum() + (k - np.count_nonzero(saturated))
    c = ((1.0 + gprime) * signs * u)[free].sum() / denominator if free.any() else 0.0
    return np.where(saturated, u, np.where(free, (1.0 + gprime) * u - signs * gprime * c, 0.0))


def threshold_rows(fn: Callable, x2d: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    return np.stack([fn(row, k, lam, p) for row in np.asarray(x2d, dtype=np.float64)])


def finite_difference_jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """J[i, j] = d f_i / d x_j by central differences (float64, 1-D x)."""
    x = np.asarray(x, dtype=np.float64)
    cols = []
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = eps
        cols.append((f(x + e) - f(x - e)) / (2.0 * eps))
    return np.stack(cols, axis=1)


def mask_jacobian(y: np.ndarray, lam: float, p: float) -> np.ndarray:
    """Jacobian of the soft mask of one row, from its output `y`.

    On the free set `F = {0 < y < 1}`, `y = ((x - tau) / l)^(q-1)`, so
    `g' = (q-1)/l * y^((q-2)/(q-1))` and `J = diag(g') - g' g'^T / sum(g')` on `F`.
    """
    q = _q(p)
    free = (y > 0) & (y < 1)
    gp = np.where(free, (q - 1.0) / lam * np.where(free, y, 1.0) ** ((q - 2.0) / (q - 1.0)), 0.0)
    total = gp.sum()
    jac = np.diag(gp)
    if total > 0:
        jac -= np.outer(gp, gp) / total
    return jac


def _solve_r(a: np.ndarray, lam: float, q: float) -> np.ndarray:
    """`r >= 0` with `(r / l)^(q-1) + r = a`, by bisection (the left side increases in r)."""
    lo, hi = np.zeros_like(a), a.copy()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = (mid / lam) ** (q - 1.0) + mid > a
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return 0.5 * (lo + hi)


def mag_jacobian(x: np.ndarray, out: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    """Jacobian of the soft top-k in magnitude of one row, from its input and output.

    `A`: entries returned unchanged (non-zero); `F`: the other non-zero entries,
    with `|out| = g(r) + r`; `D = sum_F g' + (k - |A|)` and
    `J_ij = (1 + g'_i)(delta_ij - s_i s_j g'_j / D)` on `F`, the identity on `A`.
    """
    q = _q(p)
    kept = (out == x) & (x != 0)
    free = (out != 0) & ~kept
    r = _solve_r(np.abs(out), lam, q)
    gp = np.where(free, (q - 1.0) / lam * (np.where(free, r, 1.0) / lam) ** (q - 2.0), 0.0)
    s = np.sign(x)
    denom = gp.sum() + (k - kept.sum())
    jac = np.diag(kept.astype(float) + (1.0 + gp) * free)
    if denom > 0:
        jac -= ((1.0 + gp) * s)[:, None] * (s * gp)[None, :] / denom * free[:, None] * free[None, :]
    return jac


def rounding_reach(x: np.ndarray, res, is_mag: bool) -> np.ndarray:
    """How far each output of the row `x` moves when every input moves by its own rounding, in units of
    eps: the Jacobian (spec section 6) applied to |x|, from residuals in input order (first row of
    `res`).  Ties at small strengths reach far; entries far below the threshold's keys do not."""
    g = np.asarray(res.gprime)[0]
    ax = np.abs(x)
    denominator = g.sum() + (float(np.asarray(res.offset).reshape(-1)[0]) if is_mag else 0.0)
    spread = (g * ax).sum() / denominator if denominator > 0 else 0.0  # the threshold's reach
    if is_mag:
        return np.where(g > 0, (1.0 + g) * (ax + spread), ax)
    return 1.0 + g * (ax + spread)


def _weighted_output_gradient(op: str, x: np.ndarray, w: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    """``J(x)^T w`` of one row, from the bisection output and the closed-form Jacobian."""
    if op == "mask":
        return mask_jacobian(threshold_mask_row(x, k, lam, p), lam, p).T @ w
    return mag_jacobian(x, threshold_mag_row(x, k, lam, p), k, lam, p).T @ w


def weighted_output_hessian(op: str, x: np.ndarray, w: np.ndarray, k: int, lam: float, p: float,
                            eps: float = 1e-5) -> np.ndarray:
    """Hessian of ``<w, op(x)>`` for one row ("mask" or "mag"): central differences of ``J(x)^T w`` (the
    closed forms above at the bisection outputs), in float64.

    Checked against steps of `eps` / 4: an assertion fails where a step crosses a kink (an entry entering or
    leaving the free set), so that the reference is never silently a difference quotient across one.
    """

    def quotient(step: float) -> np.ndarray:
        return finite_difference_jacobian(lambda t: _weighted_output_gradient(op, t, w, k, lam, p), x, step)

    hess = quotient(eps)
    finer = quotient(eps / 4.0)
    scale = max(1.0, float(np.abs(hess).max()))
    assert np.abs(hess - finer).max() <= 1e-6 * scale, "a difference step crosses a kink: pick another row"
    return finer
