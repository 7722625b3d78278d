"""The sort-free threshold method (spec section 5): one scalar per row, exact after a polish.

Because the top-k weights are 0/1, both operators are fixed by one scalar per
row, found by monotone root finding on elementwise work plus row reductions
(no sort, no scatter, no Python loop over rows):

* mask: ``y_i = min(1, g(max(x_i - tau, 0)))`` with ``tau`` such that ``sum(y) = k``;
* magnitude: ``r_i = max(|x_i| - t, 0)``, ``z_i = g(r_i)``, ``y_i = min(1, z_i / t)``
  with ``t > 0`` such that ``sum(y) = k``; the output is ``x_i`` where
  ``z_i >= t`` and ``sign(x_i) (z_i + r_i)`` elsewhere.

Algorithm, for all rows at once ((batch, n) arrays, (batch, 1) scalars):

1. **Bracket from the data.**  Mask: with ``m = max(x)``, the root lies in
   ``[min(x) - l, m - l (k/n)^(1/(q-1))]``: at the lower end every entry is
   saturated (``sum(y) = n >= k``), at the upper end every term is at most
   ``g(l (k/n)^(1/(q-1))) = k/n``; the lower end is raised to
   ``(sum(x) - (k - 1) m) / (n - k + 1) - l``, which at least k keys exceed by l.  Magnitude: ``t`` lies in
   ``[min(a/2, g(a/2)), max|x|]`` with ``a`` the smallest non-zero ``|x|``:
   every non-zero entry is saturated at the lower end, none is positive at the
   upper end; the lower end is raised to ``c - g^-1(c)`` with
   ``c = (sum |x| - k max|x|) / (n - k)``, which at least k keys reach, so
   that all k of them saturate there.
2. **Safeguarded Newton** on the monotone, piecewise-smooth scalar equation,
   from the bracket's midpoint (the magnitude's: its geometric split when
   the ends differ by more than a factor 16), or, where the caller passes the
   rows' k-th and (k+1)-th keys (``order_statistics``: the adapters' top-k
   primitives), from PAV's first block (`_first_block`, p <= 3, k <= 64).
   The Newton step of the current support piece ``sum_F g(.) = T`` (``T`` =
   k minus the saturated count) is taken on ``(sum_F g)^a = T^a`` with
   ``a = 1 / (q - 1)``, which is exact when one entry is free and does not
   crawl where ``g`` is flat (q > 2) or steep (q < 2) at 0; a piece with
   ``T = 0`` is left at once, for the point where its last free entry
   vanishes or, when sooner, one Newton step beyond the point where the
   next saturated entry leaves saturation (`_mask_lead`, `_mag_lead`); a
   piece without free entries one or two short of k (``sum(y)`` flat) is
   left for the point where the next key saturates (`_mask_enter`, `_mag_enter`).
   The step is taken when it lands strictly inside the current bracket and
   is at most half the step before last (Numerical Recipes' rtsafe rule),
   or is such a jump, or goes on in the direction of the Newton step just
   taken (jumps and onward steps that do not halve: at most three in a row),
   else the bracket is split (geometric mean when its ends differ by more
   than a factor 4, so that huge and tiny scales cost O(log log) steps; in
   the mask's solve relative to the row maximum only when the far end
   exceeds 64 times the near end and ``l``; arithmetic mean otherwise).  A row has converged once
   ``|sum(y) - k| <= tol * k`` (every ``y_i`` is monotone in the scalar, so
   this bounds the L1 error of ``y``) with a Newton step below ``tol``
   relative to the scalar, once a p = 2 Newton step stays in its piece (the
   equation is then linear and the step landed on the root), or once its
   bracket is a few ulps of its larger end wide (or at most the smallest
   normal number).  At most ``max_iter`` iterations; with eager
   arrays the loop stops when every row has converged and gathers the
   unconverged rows into smaller batches as it goes; under tracing it runs
   the full budget, or one ``loop`` (e.g. ``jax.lax.while_loop``) passed by
   an adapter.
3. **Exact polish.**  With the support (saturated set ``S``, free set ``F``)
   read at the converged scalar, the root of the smooth equation on that
   support is taken: closed form for p = 2 (mask
   ``tau = (sum_F x - l (k - |S|)) / |F|``, magnitude
   ``t = sum_F |x| / (|F| + l (k - |S|))``), one Newton step otherwise; it is
   kept only if it stays in the bracket and leaves the support unchanged; for
   the mask with p > 2, where it is not kept and the threshold settled on
   keys, those keys' entries supply what ``sum(y)`` lacks (`_mask_enter_at_tau`).
   The magnitude's polish runs in the frame of a key near the threshold
   where it has one (see Numerics).
4. **Non-unique threshold** (spec section 6): when no entry is fractional the
   threshold may be anywhere in an interval, and a threshold at an end of it
   would make a spurious free entry with ``y`` within round-off of 0 or 1.
   Rows where the k entries with ``y > 1/2`` are separated from the rest by a
   saturating gap (the test PAV makes at the k-th boundary) get the exact 0/1
   answer with an empty free set.

Residuals feed the same closed-form Jacobians as PAV (`jacobians.py`), in
input order with one segment per row (``perm``, ``inv_perm``,
``block_start`` and ``block_end`` are None): ``g'`` on the free set and 0
elsewhere; for the magnitude also ``scale`` (``1 + g'`` on ``F``, 1 on the
saturated set ``A``), ``sign(x)`` on ``F`` and the (batch, 1)
``offset = k - |A|``, so that the Jacobian denominator is
``D = sum_F g' + (k - |A|)``.

Numerics: the mask is computed relative to the row maximum (ties at a huge
value keep their exact differences), and rows whose threshold lies more than
64 ``l`` below the maximum, and every row for p > 2, are solved a second
time relative to the key nearest to the first threshold (`_mask_recentre`:
relative to the maximum, keys near such a threshold lose digits, and for
p > 2, where ``g`` is steep at 0, an entry an ulp of the threshold above it
has ``y ~ (eps / l)^(q - 1)``, 1e-3 in float32 at p = 3); rows whose finite
values span more than a quarter of the float range are scaled by 1/4 (with
``l``); the magnitude is computed on ``|x|`` scaled by a power of two into
[1, 2) with the equivalent strength ``l c^(2-p)`` (``mag(x; l) = mag(c x; l c^(2-p)) / c``).
For the magnitude, ``r = |x| - t`` carries an absolute error of ``eps t``,
and the free entries can lie far closer above ``t`` than that scale (ties at a
small strength, magnitudes spanning many orders): rows whose threshold
exceeds 64 saturation widths ``l t^(1/(q-1))``, and every row for p > 2, are
solved a second time relative to the non-zero key ``ref`` nearest to the first threshold, when it
lies within a factor 2 of it (`_mag_recentre`).  The keys near the threshold
are then exact differences ``|x| - ref`` (Sterbenz) and the threshold is
carried as ``t = ref + delta`` with a small, accurate ``delta``; only
``r = (|x| - ref) - delta`` uses the shift, while ``t`` itself, which enters
``y = g(r) / t`` and the saturation width (the equation is not shift
invariant), is formed as ``ref + delta``.  The polish of step 3 runs in that
frame (p = 2: ``delta = (sum_F (|x| - ref) - l (k - |S|) ref) / (|F| + l (k - |S|))``),
and the outputs and ``g'`` come from that ``r``.  A threshold below the
float range (tiny entries next to a large one, p < 2) still underflows.
Before ``g`` is evaluated its argument is clipped where the entry saturates,
so no intermediate overflows: the code is warning-free in every namespace.

Infinite entries follow the PAV rule: mask, ``+inf`` selected first and
``-inf`` last (ties among them share evenly); magnitude, ``|x| = inf`` always
kept.  Rows containing NaN give NaN rows and NaN derivatives.

Magnitude rows with at most k non-zero entries (``t = 0``) return ``x``; their
saturated set is every entry when fewer than k entries are non-zero (each
partial derivative is then 1) and the non-zero entries when exactly k are.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from .._compat import array_namespace, default_int, device
from .._validate import check_strength_in_dtype
from .common import all_true, count, nan_rows_of, poison
from .regularizer import g, g_inverse, g_prime_on, strength_scale
from .residuals import MagResiduals, MaskResiduals, mag_codes


class ThresholdNotConverged(UserWarning):
    """Warned when `method="threshold"` reaches `max_iter` on readable arrays before every row has converged."""


def is_array_strength(lam: Any) -> bool:
    """Whether the strength is a 0-d array (e.g. traced by `topk_jax`, so that one compiled program
    serves every strength) rather than a Python number (or a symbolic one, under ``torch.compile``)."""
    return hasattr(lam, "shape") and not isinstance(lam, (int, float))


def check_strength(lam: Any, dtype: Any, xp: Any, method: str) -> None:
    """`check_strength_in_dtype` for a Python strength.  An array strength (`is_array_strength`) cannot
    be read while traced: its caller checks the Python number it came from."""
    if not is_array_strength(lam):
        check_strength_in_dtype(lam, dtype, xp, method)


DEFAULT_MAX_ITER = 100
"""Iteration cap of the root finder (`max_iter=None`).  Random, tied, huge and
tiny rows converge in 3-20 iterations (float64); the safeguards (a split
whenever Newton stops halving its steps, geometric splits across scales)
bound adversarial float64 rows well below this."""

# Constants read inside the root finder's loop and stages are ints where they can be: the PyTorch
# adapter compiles them with float arguments as graph inputs (so that other strengths reuse the
# graphs), and a float global read there became one too, lifted into a tensor at every compiled
# call (three eager operations each: 128-165 operations per forward at (64, 64) with two such
# constants in the loop, 110-141 with none).
_ULPS = 4.0  # a bracket this many ulps wide has converged
_FTOL_ULPS = 8.0  # default `tol`: |sum(y) - k| <= tol * max(k, 1)
# How far above `ftol` the miss of an exact piecewise-linear landing may lie (the rounding of a
# sum of n terms) for the landing to count as the root.
_LANDING_MISS = 64
_MIN_COMPACT = 32  # gather the unconverged rows when at most half of >= this many are left
_RECENTRE_STRENGTHS = 64  # see `_mask_recentre`
_DEEP_ROUNDS = 3  # see `_mag_deep_frames`
# Where the root finder's loop state (`_root`) holds its (batch, 1) flags of converged rows, and its
# iteration count (read by `counting_loop`).
STATE_DONE, STATE_ITERATION = 11, 12
# A piece without free entries whose saturated ones fall this many or fewer short of k is left
# for the point where the next key saturates (`_mask_enter`, `_mag_enter`); further short, the
# bracket is split (entering keys one at a time, k = 100 of 4096 heavy-tailed keys took 100
# iterations).
_ENTER_SHORT = 2
# Newton steps taken in a row without halving (onward steps and jumps) before the bracket is split
# anyway: the safeguard that keeps the worst case near bisection's.
_UNHALVED_RUN = 3
# In the mask's solve relative to the row maximum, a bracket is split at its geometric mean only where
# its far end exceeds this many times its near end and l (`_split`'s spread and floor), else at its
# midpoint.  There the root lies below the maximum by about the keys' spread: with the magnitude's
# rule (a factor 4 between the ends; its threshold is a scale), a bracket from the row's mean to near
# the maximum (whose upper end is l (k/n)^(1/(q-1)) below it) was cut close to the maximum, and
# Newton crawled back down (router rows, float32, 64 entries, k = 6, l = 0.1, at 262,144 rows: loop
# 13 -> 11 iterations for p = 4/3 and 12 -> 10 for p = 2, rows' medians 7 -> 5 and 6 -> 4; the
# 504-case sweep of benchmarks/threshold_sweep.py 6562 -> 6402).  Beyond it, geometric splits still
# cost O(log log) on huge spreads.
_MASK_SPREAD = 64

Stage = Callable[[Callable[..., Any]], Callable[..., Any]]
"""``stage(fn)``: a function computing what `fn` computes (an adapter's compiler, e.g. ``torch.compile``)."""


def counting_loop(runs: list[tuple[int, Any]]) -> Callable[..., Any]:
    """A `loop` for eager arrays (a plain while loop) that records the root finder's loops.

    For each root finder's loop of a solve in turn (the first, then those that solve rows again next
    to a key), appends to `runs` its iterations and, per row, the iteration at which the row converged
    (0: before the first; -1: never).  Other loops (the magnitude's frames, `_mag_deep_frames`) run
    unobserved.  What the tests and `benchmarks/threshold_iterations.py` count.
    """

    def loop(cond: Callable[[Any], Any], body: Callable[[Any], Any], state: tuple[Any, ...]) -> tuple[Any, ...]:
        observed = len(state) == STATE_ITERATION + 1
        count = 0
        if observed:
            xp = array_namespace(state[STATE_DONE])
            converged = xp.where(state[STATE_DONE][:, 0], 0, -1)
        while bool(cond(state)):
            state, count = body(state), count + 1
            if observed:
                converged = xp.where((converged < 0) & state[STATE_DONE][:, 0], count, converged)
        if observed:
            runs.append((count, converged))
        return state

    return loop


def _as_is(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


# Newton steps of `_first_block`: it is only a start, which the root finder polishes.
_FIRST_BLOCK_STEPS = 4
# The smallest q (largest p: 3) that starts there: the power 1 / (q - 1) grows with p.
_FIRST_BLOCK_MIN_Q = 1.5
# The magnitude starts there where its k-th key and strength lie within 2^+-_FIRST_BLOCK_RANGE of 1
# in its frame (keys scaled to the largest: almost every row), where no power of the block's
# equation can overflow; other rows start at the bracket's split.
_FIRST_BLOCK_RANGE = 30.0
# The largest k that asks for the order statistics: top-k primitives are selections for small k and
# sorts for large k (jax.lax.top_k; torch.topk of k = n / 8 of 2^24 keys), and the start was measured on
# router rows (k = 6 of 64).
_FIRST_BLOCK_MAX_K = 64
OrderStatistics = Callable[[Any, int], tuple[Any, Any]]


def _first_block(b0: Any, b1: Any, level: Any, scale: Any, lo: Any, hi: Any, q: float, xp: Any) -> Any:
    """PAV's first block, the root finder's start where an adapter gives the order statistics: the
    point ``v`` in ``[lo, hi]`` where only the k-th and (k+1)-th keys ``b0 >= b1`` are free (the k - 1
    above saturated), ``(r0^(q-1) + r1^(q-1))^(1/(q-1)) = level + scale v^(1/(q-1))`` with
    ``r = max(b - v, 0)`` (`_mask_first_block`, `_mag_first_block`).  Newton steps from `lo`,
    clamped to the bracket, on the equation raised to the power ``1 / (q - 1)`` (as the root finder
    steps, `_newton`): its left side is homogeneous of degree 1 in ``r``, linear where one key is
    free (exact for p = 2 where both are).  Both sides less each other are convex (q > 2) or
    concave (q < 2) and decreasing, so the steps approach the root monotonically (for q < 2 from
    above after the first).  The callers keep every quantity within a few hundred binary orders
    of 1, so that no power overflows; a step that is not finite keeps its point."""
    a = 1.0 / (q - 1.0)
    tiny = float(xp.finfo(lo.dtype).smallest_normal)
    v = lo
    for _ in range(_FIRST_BLOCK_STEPS):
        r0 = xp.maximum(b0 - v, 0.0)
        r1 = xp.maximum(b1 - v, 0.0)
        p0 = xp.pow(r0, q - 1.0)
        p1 = xp.pow(r1, q - 1.0)
        total = xp.maximum(p0 + p1, tiny)
        norm = xp.pow(total, a)
        # d/dv of the left side: -(r0^(q-2) + r1^(q-2)) norm / total, with r^(q-2) = r^(q-1) / r.
        weights = xp.where(r0 > 0, p0 / xp.maximum(r0, tiny), 0.0)
        weights = weights + xp.where(r1 > 0, p1 / xp.maximum(r1, tiny), 0.0)
        vp = xp.maximum(v, tiny)
        right = xp.pow(vp, a)
        h = norm - level - scale * right
        dh = -weights * (norm / total) - scale * a * (right / vp)
        new = xp.clip(v - h / xp.where(dh < 0, dh, -1.0), lo, hi)
        v = xp.where((dh < 0) & xp.isfinite(new), new, v)
    return v


def _mask_first_block(kth: Any, after: Any, lam_r: Any, lo: Any, hi: Any, use: Any, q: float, xp: Any) -> Any:
    """`_first_block` for the mask's ``tau`` in ``[lo, hi]`` on the rows `use` (finite keys), in units of
    ``l`` relative to the k-th key: ``u = (tau - s_k) / l`` lies in ``[-1, 0]`` (at -1 the k-th key
    saturates, at 0 it vanishes), and the (k+1)-th key at ``d = (s_(k+1) - s_k) / l``, which only
    matters above -1, so every value is at most 1 (differences clipped before they are divided)."""
    kth = xp.where(use, kth, 0.0)
    gap = xp.where(use, after - kth, -lam_r)
    d = xp.maximum(gap, -lam_r) / lam_r
    ulo = xp.clip(xp.where(use, lo - kth, -lam_r), -lam_r, 0.0) / lam_r
    uhi = xp.clip(xp.where(use, hi - kth, 0.0), -lam_r, 0.0) / lam_r
    zero = xp.zeros_like(d)
    u = _first_block(zero, d, zero + 1.0, zero, ulo, uhi, q, xp)
    return xp.clip(kth + lam_r * u, lo, hi)


def _mag_first_block(kth: Any, after: Any, lam_r: Any, lo: Any, hi: Any, q: float, xp: Any) -> tuple[Any, Any]:
    """`_first_block` for the magnitude's ``t`` in ``[lo, hi]`` (the k-th and (k+1)-th keys free:
    ``sum g(r) = t``, that is ``(r0^(q-1) + r1^(q-1))^(1/(q-1)) = l t^(1/(q-1))``), from the lower
    end, with t kept above ``2^-60`` times the k-th key; returns the start and where it applies (the
    k-th key and the strength within ``2^+-_FIRST_BLOCK_RANGE``)."""
    bound = 2.0**_FIRST_BLOCK_RANGE
    moderate = (kth >= 1.0 / bound) & (kth <= bound) & (lam_r >= 1.0 / bound) & (lam_r <= bound)
    safe = xp.where(moderate, kth, xp.ones_like(kth))
    vlo = xp.maximum(lo, safe * 2.0**-60)
    vhi = xp.maximum(xp.minimum(hi, safe), vlo)
    t = _first_block(safe, xp.minimum(after, safe), xp.zeros_like(safe), xp.where(moderate, lam_r, 1.0), vlo, vhi,
                     q, xp)
    return xp.clip(t, lo, hi), moderate


def _starts_at_first_block(order_statistics: OrderStatistics | None, k: int, n: int, q: float) -> bool:
    return order_statistics is not None and k < n and k <= _FIRST_BLOCK_MAX_K and q >= _FIRST_BLOCK_MIN_Q


def _mask_block_start(kth: Any, after: Any, lam_r: Any, lo: Any, hi: Any, use: Any, start: Any, q: float, xp: Any
                      ) -> Any:
    """The mask's first point: `_mask_first_block` on the rows `use`, `start` elsewhere."""
    return xp.where(use, _mask_first_block(kth, after, lam_r, lo, hi, use, q, xp), start)


def _mag_block_start(kth: Any, after: Any, lam_r: Any, lo: Any, hi: Any, use: Any, start: Any, q: float, xp: Any
                     ) -> Any:
    """The magnitude's first point: `_mag_first_block` on the rows `use` where it applies, `start` elsewhere."""
    block, moderate = _mag_first_block(kth, after, lam_r, lo, hi, q, xp)
    return xp.where(use & moderate, block, start)


def _split(lo: Any, hi: Any, floor: Any, xp: Any, spread: int = 4) -> Any:
    """A point strictly inside [lo, hi]: geometric mean across scales, else the midpoint.

    A bracket on one side of 0 is split geometrically where its far end
    exceeds `spread` times its near end and `floor` (> 0: the scale of the
    root's own terms, below which no root is sought; 0 to disable).  Brackets
    that contain or end at 0 and reach far beyond `floor` are split at 0 first
    and then geometrically between `floor` and the far end, so that a root
    much closer to 0 than the bracket is wide (a threshold near a key it was
    computed relative to) costs O(log log) splits, not one per halving.
    """
    mid = lo / 2 + hi / 2
    alo, ahi = xp.abs(lo), xp.abs(hi)
    big, small = xp.maximum(alo, ahi), xp.minimum(alo, ahi)
    same_sign = ((lo > 0) & (hi > 0)) | ((lo < 0) & (hi < 0))
    geo = xp.sqrt(small) * xp.sqrt(big)
    out = xp.where(same_sign & (big / spread > xp.maximum(small, floor)), xp.where(hi > 0, geo, -geo), mid)
    far = (floor > 0) & (big > 4 * floor)
    toward_zero = xp.sqrt(big) * xp.sqrt(xp.where(floor > 0, floor, 1.0))
    at_zero_end = xp.where(hi == 0, -toward_zero, toward_zero)
    out = xp.where(far & (lo < 0) & (hi > 0), xp.zeros_like(mid), out)
    return xp.where(far & ((lo == 0) | (hi == 0)), at_zero_end, out)


def _newton(
    free_sum: Any, target: Any, slope: Any, t: Any, has_free: Any, vanish: Any, enter: Any, a: float,
    rhs_scales: bool, guard: float, xp: Any,
) -> tuple[Any, Any, Any]:
    """Newton step on the equation ``S(s) = T t`` of one support piece, in power-transformed form.

    ``S(s) = sum_F g(. - s)`` is the free part of the sum, ``T = k - |saturated|``;
    for the magnitude the right-hand side is ``T t`` with ``t = s``
    (`rhs_scales`), for the mask ``t = 1``.  Newton is applied to
    ``S^a = (T t)^a`` with ``a = 1 / (q - 1)``: exact when the free set has
    one entry, and well conditioned where ``g`` is flat (q > 2) or steep
    (q < 2) at 0, where plain Newton crawls.  For q = 2 (``a = 1``) it is
    plain Newton.  `slope` is ``sum_F g'``.  A piece with ``T = 0`` is left by
    the step `vanish`, one without free entries at most `_ENTER_SHORT` short of k
    by `enter` (``sum(y)`` is flat there: Newton has nothing to go on).  Returns the step (in
    the direction of increasing `s` when ``S > T t``), whether it is usable, and whether it
    is such a jump.
    """
    excess = free_sum - target * t
    plain_den = slope + target if rhs_scales else slope
    one = xp.ones_like(free_sum)
    if a == 1.0:
        num, den = excess, plain_den
    else:
        positive = (free_sum > 0) & (target > 0)
        rho = xp.where(positive, target * t / xp.where(positive, free_sum, one), one)
        transformed = positive & (rho <= 2.0 ** (60.0 / max(a, 1.0)))
        rho_a = xp.pow(xp.where(transformed, rho, one), a)
        # The step is (free_sum (1 - rho^a)) / (a (slope + rhs)), with a divided into the
        # numerator: a (slope + rhs) overflowed where g' is huge (p = 20, keys ~1e-300).
        num = xp.where(transformed, free_sum * (1.0 - rho_a) / a, excess)
        rhs_term = rho_a * free_sum / xp.where(t > 0, t, one) if rhs_scales else 0.0 * one
        den = xp.where(transformed, slope + rhs_term, plain_den)
    # Without free entries sum(y) is constant on the piece: the magnitude's form S = T t has the
    # spurious root t = 0 there (a step from the top of the bracket to 0 that a split then undid).
    ok = (den > xp.abs(num) * guard) & (target > 0) & has_free
    step = num / xp.where(ok, den, one)
    if rhs_scales and a > 1.0:
        # p > 2: far above the root (S << T t), S(t) barely changes, and the step on the convex (T t)^a
        # only halves t: Newton in log t on log S - log(T t) instead, exact where S is constant (magnitudes
        # spanning 1e0-1e300, p = 3: t halved from 1e-140 to 5e-190 one binade at a time, 129 iterations).
        # Not for p = 2, whose steps on a piece land on its root, nor p < 2, whose steps there overshoot.
        far = ok & (step <= -0.25 * t) & (free_sum > 0) & (t > 0)
        safe = xp.where(far, free_sum, one)
        # (S / (T t) < 1 there; at least the smallest normal number: no log(0) where it underflows.)
        tiny = float(xp.finfo(free_sum.dtype).smallest_normal)
        log_ratio = xp.log(xp.maximum(safe / xp.where(far, target * t, one), tiny))
        log_step = log_ratio / (1.0 + xp.where(far, t, one) * slope / safe)
        step = xp.where(far, t * xp.expm1(log_step), step)
    leave = (target == 0) & has_free
    short = (target > 0) & (target <= _ENTER_SHORT) & ~has_free
    jump = leave | short
    return xp.where(leave, vanish, xp.where(short, enter, step)), ok | jump, jump


def _take_rows(arrays: tuple[Any, ...], idx: Any, xp: Any) -> tuple[Any, ...]:
    return tuple(xp.take(a, idx, axis=0) for a in arrays)


def _root(
    evaluate: Callable[..., tuple[Any, ...]], data: tuple[Any, ...], lo: Any, hi: Any,
    active: Any, ftol: Any, step_tol: float, scale: Any, ulps: float, exact_pieces: bool, max_iter: int, xp: Any,
    loop: Callable[..., Any] | None = None, start: Any = None, leave_last: bool = False, spread: int = 4,
    floor: Any = None,
) -> tuple[Any, Any, Any]:
    """Safeguarded Newton on a non-increasing, piecewise-smooth scalar equation per row.

    `evaluate(s, *data)` returns `(excess, step, ok, jump, piece, miss)`:
    `excess` has the sign of ``sum(y) - k`` (non-increasing in `s`), `step`
    is the Newton step (usable where `ok`; `jump` marks exact jumps out of a
    piece, which skip the step-halving rule), `piece` identifies the smooth
    piece that `s` lies in (counts of the nested support sets: equal counts
    mean equal sets) and `miss = |sum(y) - k|`.  A row has converged when
    `miss <= ftol` and the Newton step is below `step_tol` relative to the
    scalar (every ``y_i`` is monotone in `s`, so the outputs are then within
    `ftol` of the root's in L1), when a Newton step of a piecewise-linear
    equation (`exact_pieces`) stayed in its piece (it then landed on the
    root), or when its bracket is a few ulps wide.  A step is taken when it
    lands strictly inside the bracket and is at most half the step before
    last (Numerical Recipes' rtsafe rule), or is a jump, or goes on in the
    direction of the Newton step just taken (jumps and such onward steps that
    do not halve: at most `_UNHALVED_RUN` in a row); else the bracket is split
    (`_split` with `spread` and `floor`, by default `scale`).

    Without `loop`, a Python loop: with readable (eager) arrays it stops once
    every row has converged and gathers the unconverged rows whenever at most
    half of them are left, so a few slow rows do not cost full passes over the
    batch; with traced arrays it runs `max_iter` iterations on fixed shapes.
    `loop(cond, body, state)` (e.g. ``jax.lax.while_loop``) runs the same body
    as a structured loop instead, on fixed shapes.  The first point is
    `start` (inside [lo, hi] where `active`; default `_split`'s point, `hi` where not active).  Returns, for every row,
    the point where it settled (or, when only its bracket closed or the
    budget ran out, the evaluated point with the smallest miss; with
    `leave_last`, points where the step was a jump out of the piece after all
    others) and its final bracket.
    """
    ints = default_int(xp)
    split_floor = scale if floor is None else floor
    tiny = float(xp.finfo(hi.dtype).smallest_normal)

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        s, lo, hi, last, before_last, was_newton, piece_before, result, best_miss, best_leave, unhalved, done, it = state
        excess, step, ok, jump, piece, miss = evaluate(s, *data)
        small_step = ok & (xp.abs(step) <= step_tol * xp.maximum(xp.abs(s), scale))
        settled = (small_step & (miss <= ftol)) | (miss == 0) | ((excess == 0) & ~ok)
        if exact_pieces:
            # A landing that misses k by more than rounding is no root, whatever its piece: a step
            # toward a root outside the bracket (0, on the piece where only the largest key is
            # above a threshold of 5e-38) landed inside it by the rounding of s + step (s - s(1 +
            # eps)), and settled there with sum(y) = 1 for k = 7.
            settled = settled | (was_newton & (piece == piece_before) & (miss <= _LANDING_MISS * ftol))
        # Until a row settles, `result` holds its point of smallest |sum(y) - k| (monotone on each
        # side of the root), the answer when only its bracket closes or the budget runs out.  With
        # `leave_last` (the magnitude, whose outputs are not y), points of a piece left by a jump (k
        # saturated entries and free ones, which only vanish) come after every other: the polish
        # cannot use their support, and as the slope of sum(y) is small there, a small miss can lie
        # 10 ulps of the scalar from the root, which the free outputs multiply by 1 + g' (a float32
        # row: 2.6e-5 off instead of 9e-7).  The mask's y is within its miss of the root's anyway,
        # and float32 ties took it from 1.9e-5 to 8.3e-5 there.
        smaller = miss < best_miss
        leave = jump if leave_last else xp.zeros_like(jump)
        better = ~done & ((~leave & (best_leave | smaller)) | (leave & best_leave & smaller))
        result, best_miss = xp.where(better | (settled & ~done), s, result), xp.where(better, miss, best_miss)
        best_leave = xp.where(better, leave, best_leave)
        lo = xp.where(excess > 0, s, lo)
        hi = xp.where(excess < 0, s, hi)
        # Ulps of the larger end, or a bracket no wider than the smallest normal number: subnormal ends
        # are spaced wider than eps relative to themselves, and a bracket of adjacent subnormals never
        # closed (a magnitude row whose threshold lies among subnormal keys of its frame ran the whole
        # budget); a threshold below the float range (keys spanning 1e+-300, p = 3) was halved from
        # the smallest normal number down through the subnormals (50 iterations) for nothing.
        closed = xp.maximum(ulps * xp.maximum(xp.abs(lo), xp.abs(hi)), xp.full_like(hi, tiny / 2))
        done = done | settled | (hi / 2 - lo / 2 <= closed)
        # Steps below 2 ulps become 2 ulps: at the noise floor this brackets the root from both sides,
        # within the 8 ulps that close a bracket (`ulps` is 4 of them; a floor of 8 ulps overshot, and
        # float32 rows, whose sum(y) cannot meet ftol where an ulp moves it by more, went back and
        # forth 2-3 times more: 262,144 rows of 64, p = 4/3, 18 -> 16 iterations of the loop).
        floor = ulps / 2.0 * xp.abs(s)
        step = xp.where(xp.abs(step) < floor, xp.where(step < 0, -floor, floor), step)
        # Strictly inside, as landed: a jump that rounds onto an end of the bracket is no progress (a
        # magnitude row came back to the same lower end three times).
        landing = s + step
        ok = ok & (step / 2 < hi / 2 - s / 2) & (step / 2 > lo / 2 - s / 2) & (landing > lo) & (landing < hi)
        # rtsafe's rule (a step at most half the step before last), but for jumps and for a step
        # onward from a Newton step in the same direction, whose point lies on the same side of the
        # root: sum(y) steepens there as keys enter, and Newton crawls toward the root from one side
        # (the rule split the bracket, whose far end is the data's, and bisection came back in 3-5
        # iterations); at most `_UNHALVED_RUN` such steps in a row.
        halved = xp.abs(step) <= xp.abs(before_last) / 2
        onward = was_newton & ((step < 0) == (last < 0))
        unhalved = xp.where(ok & ~halved & (jump | onward), unhalved + 1.0, 0.0 * unhalved)
        was_newton = ok & (halved | ((jump | onward) & (unhalved <= _UNHALVED_RUN)))
        unhalved = xp.where(was_newton, unhalved, 0.0 * unhalved)
        nxt = xp.where(was_newton, s + step, _split(lo, hi, split_floor, xp, spread))
        before_last = last
        last = nxt - s
        s = xp.where(done, s, nxt)
        return s, lo, hi, last, before_last, was_newton, piece, result, best_miss, best_leave, unhalved, done, it + 1

    half_width = hi / 2 - lo / 2
    no_piece = xp.zeros_like(hi, dtype=ints) - 1
    # Not the upper end (nothing, or the largest keys alone, above it), from which Newton crawled down
    # a key at a time; rows not solved keep `hi`: their brackets are none (the magnitude's of a zero row).
    start = xp.where(active, _split(lo, hi, split_floor, xp), hi) if start is None else start
    state = (
        start, lo, hi, half_width, half_width, xp.zeros_like(active), no_piece, start, xp.full_like(hi, xp.inf),
        xp.ones_like(active), xp.zeros_like(hi), ~active,
        xp.zeros((), dtype=ints, device=device(hi)),
    )
    if loop is not None:
        state = loop(lambda st: xp.any(~st[STATE_DONE]) & (st[STATE_ITERATION] < max_iter), body, state)
        return state[7], state[1], state[2]
    levels: list[tuple[Any, Any, Any, Any]] = []
    finished = None  # (max_iter >= 1: set by the loop)
    for _ in range(max_iter):
        state = body(state)
        done = state[STATE_DONE]
        finished = all_true(done, xp)
        if finished:
            break
        if finished is None or done.shape[0] < _MIN_COMPACT:
            continue
        # Gather the unconverged rows into a power-of-two batch (few distinct shapes for
        # libraries that compile per shape), padded with copies of the first of them.
        left = int(xp.sum(xp.astype(~done, ints)))
        size = 1 << max(left - 1, 0).bit_length()
        if 2 * size > done.shape[0]:
            continue
        idx = xp.nonzero(~done[:, 0])[0]
        if size > left:
            idx = xp.concat([idx, xp.broadcast_to(idx[:1], (size - left,))])
        levels.append((done, state[7], state[1], state[2]))
        state = (*_take_rows(state[:STATE_DONE], idx, xp), xp.zeros_like(done[:size, :]), state[STATE_ITERATION])
        data = _take_rows(data, idx, xp)
        ftol, scale, split_floor = _take_rows((ftol, scale, split_floor), idx, xp)  # `body` reads these from here
    if finished is False:
        # Readable arrays only (traced ones cannot be read).
        warnings.warn(
            f"method='threshold' stopped at max_iter={max_iter} before every row met its stopping test: "
            "those rows may be approximations (the exact polish that follows succeeds only where the "
            "support read at the best point found is the root's); raise max_iter, or leave it at its "
            f"default ({DEFAULT_MAX_ITER})",
            ThresholdNotConverged,
            stacklevel=2,
        )
    s, lo, hi = state[7], state[1], state[2]
    for done_at, s_at, lo_at, hi_at in reversed(levels):
        pos = xp.cumulative_sum(xp.astype(~done_at[:, 0], ints)) - 1
        pos = xp.clip(pos, 0, None)
        s = xp.where(done_at, s_at, xp.take(s, pos, axis=0))
        lo = xp.where(done_at, lo_at, xp.take(lo, pos, axis=0))
        hi = xp.where(done_at, hi_at, xp.take(hi, pos, axis=0))
    return s, lo, hi


def _controls(dtype: Any, max_iter: int | None, tol: float | None, xp: Any) -> tuple[float, float, int, float]:
    """(rtol, ulps, iterations, the Newton steps' guard) of a solve in `dtype`."""
    finfo = xp.finfo(dtype)
    eps = float(finfo.eps)
    rtol = _FTOL_ULPS * eps if tol is None else float(tol)
    return rtol, _ULPS * eps, DEFAULT_MAX_ITER if max_iter is None else int(max_iter), 4.0 / float(finfo.max)


def _mask_pieces(tau: Any, xs: Any, lam_r: Any, q: float, xp: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(u, uc, above, sat, free)`` at the threshold `tau`: ``u = xs - tau`` and its clip to [0, l]."""
    u = xs - tau
    uc = xp.clip(u, 0.0, lam_r)
    above, sat = u > 0, u >= lam_r
    return u, uc, above, sat, above & ~sat


def _mask_lead(u: Any, sat: Any, free_sum: Any, slope: Any, lam_r: Any, q: float, xp: Any) -> Any:
    """The step out of a piece with k saturated entries and free ones, across the next saturation edge.

    On such a piece ``sum(y) - k`` is the free entries' total, which only vanishes with them; but
    the root lies before that wherever a saturated entry leaves saturation first (at ``u = l``)
    and takes over the excess.  The step goes to that edge and one Newton step beyond it, with
    the excess and slope read here and ``g'(l) = (q - 1) / l`` of the leaving entry (an
    overestimate of the step: the free total only decreases on the way).  Jumping to where the
    free entries vanish instead overshot the root, and Newton from the far side came back to the
    same point, and the structured loop of 4096 float32 p = 4/3 rows ran 24 iterations, not 14.
    """
    edge = xp.min(xp.where(sat, u, xp.full_like(u, xp.inf)), axis=-1, keepdims=True) - lam_r
    return edge + free_sum / (slope + (q - 1.0) / lam_r)


def _mask_enter(unsaturated: Any, lam_r: Any) -> Any:
    """The step from a piece without free entries down to where the next key below the threshold saturates.

    `unsaturated` is the row's largest ``u = x - tau`` outside the saturated set: on such a
    piece the next key's (on others the largest free entry's, where the free entries vanish).
    Every saturated entry stays saturated on the way, and the next key adds 1 to ``sum(y)``
    there, the whole shortfall when it is one (the point is then the root, or below it when
    further keys enter too).
    """
    return unsaturated - lam_r


def _mask_evaluate(tau: Any, xs: Any, lam_r: Any, kkf: Any, q: float, guard: float, xp: Any):
    n = xs.shape[-1]
    u, uc, above, sat, free = _mask_pieces(tau, xs, lam_r, q, xp)
    gu = g(uc, lam_r, q, xp)
    n_sat, n_above = count(sat, xp), count(above, xp)
    target = kkf - xp.astype(n_sat, kkf.dtype)
    # The free entries' total on its own: summed with the saturated entries' ones and less k, it kept
    # only the digits of k (p = 2 used that shortcut; see `_mag_evaluate`).
    free_sum = xp.sum(xp.where(free, gu, xp.zeros_like(gu)), axis=-1, keepdims=True)
    excess = free_sum - target
    if q == 2.0:  # g' = 1 / l on the free set
        slope = xp.astype(n_above - n_sat, kkf.dtype) / lam_r
    else:
        slope = xp.sum(g_prime_on(uc, free, lam_r, q, xp), axis=-1, keepdims=True)
    one = xp.ones_like(target)
    # One reduction for two steps: where the free entries vanish, and (pieces without them) where
    # the next key saturates.
    unsaturated = xp.max(xp.where(sat, xp.full_like(u, -xp.inf), u), axis=-1, keepdims=True)
    vanish = xp.minimum(unsaturated, _mask_lead(u, sat, free_sum, slope, lam_r, q, xp))
    has_free = n_above > n_sat
    enter = _mask_enter(unsaturated, lam_r)
    step, ok, jump = _newton(
        free_sum, target, slope, one, has_free, vanish, enter, 1.0 / (q - 1.0), False, guard, xp
    )
    # No free entry and exactly k saturated: sum(y) = k holds exactly (inside a non-unique interval).
    miss = xp.where(~has_free & (target == 0), 0.0 * excess, xp.abs(excess))
    return excess, step, ok, jump, n_above * (n + 1) + n_sat, miss


def _mask_recentre(
    evaluate: Callable[..., tuple[Any, ...]], xs: Any, xf: Any, fin: Any, c: Any, top: Any, bottom: Any, tau: Any,
    lo: Any, hi: Any, lam_r: Any, kkf: Any, solve: Any, ftol: Any, rtol: float, ulps: float, q: float,
    guard: float, iters: int, xp: Any, loop: Callable[..., Any] | None, fuse: Stage,
) -> tuple[Any, Any, Any, Any]:
    """Solve the mask again relative to the threshold found relative to the row maximum.

    Relative to the maximum, every key carries a rounding error of up to
    ``eps * (max - min)``: when the threshold lies far below the maximum
    (one dominant entry), keys near it lose the digits that `y` depends on,
    and ties appear that are not in the data.  Relative to the key nearest to
    that threshold they keep their precision.  That key is found by a solve
    in the absolute frame (keys as they are, each to its own precision),
    started from the first root; its bracket, widened by the rounding of its
    keys, brackets the last root; a row whose widened bracket does not
    straddle the root (a sign check) takes the whole data bracket instead.
    Rows whose threshold is within 64 `l` of the maximum lose at most about
    64 ulps of `y` and keep the first solve, except for p > 2 (q < 2), where
    `g` is steep at 0 and an ulp of the threshold is ``(eps / l)^(q - 1)``
    of an entry's `y` (float32, p = 3: 1.2e-3 off PAV, 1.6e-7 solved
    again, for 40-80% more iterations); those need no absolute solve (their
    keys near the threshold kept their digits) and go from the first root
    and bracket to the key's frame.  Returns ``(xs, tau, lo, hi)``, each row
    in its own frame.
    """
    # Where the first equation had no root (keys that collapsed into one value make sum(y)
    # jump past k), its point of smallest miss can lie outside the final bracket.
    anchor = xp.clip(tau, lo, hi)
    # Rounding of eps * |anchor| moves y by about eps * |anchor| / l: rows with the threshold
    # within _RECENTRE_STRENGTHS strengths of the maximum keep the first solve (unless p > 2).
    far = solve & (-anchor > _RECENTRE_STRENGTHS * lam_r)
    again = far | (solve & (q < 2.0))
    if all_true(~again, xp):  # readable arrays and no row to solve again (traced arrays: None)
        return xs, tau, lo, hi
    keys, xa, lo_a, hi_a, start = fuse(_mask_absolute_frame)(xf, fin, c, top, bottom, anchor, lo, hi, far, lam_r, xp)
    # Only rows far below their maximum need the absolute frame to find the key nearest to their
    # threshold; the others (p > 2) take their first root and bracket there as they are (what the
    # solve leaves for rows it does not solve: with readable arrays and no far row it is skipped,
    # as an eager loop evaluates every row once before it looks at them).
    tau_a = start
    if not all_true(~far, xp):
        # For p > 2 splits toward 0 go down to the key frames' floor: far below l, where outputs are
        # still large (keys spanning 1e-26..1e7, p = 50: a root near 1e-30 approached by halving
        # from 1e-5, out of iterations).
        tau_a, lo_a, hi_a = _root(
            evaluate, (xa, lam_r, kkf), lo_a, hi_a, far, ftol, rtol, lam_r, ulps, q == 2.0, iters, xp, loop,
            start=start, floor=_near(ftol, lam_r, q, xp) if q < 2.0 else None,
        )
    xs, lo2, hi2, start, near = fuse(_mask_key_frame)(
        keys, xs, fin, c, top, bottom, tau_a, lo_a, hi_a, again, lam_r, kkf, ftol, q, guard, xp
    )
    tau2, lo2, hi2 = _root(
        evaluate, (xs, lam_r, kkf), lo2, hi2, again, ftol, rtol, lam_r, ulps, q == 2.0, iters, xp, loop,
        start=start, floor=near,
    )
    return xs, xp.where(again, tau2, tau), xp.where(again, lo2, lo), xp.where(again, hi2, hi)


def _mask_absolute_frame(
    xf: Any, fin: Any, c: Any, top: Any, bottom: Any, anchor: Any, lo: Any, hi: Any, far: Any, lam_r: Any, xp: Any
) -> tuple[Any, ...]:
    """The keys as they are (each to its own precision), the bracket and the start of their solve.

    Rows `far` below their maximum get the data's bracket; the others the first solve's, in absolute
    terms and widened by the rounding of its keys (they are not solved in this frame).
    """
    big = float(xp.finfo(xf.dtype).max)
    eps = float(xp.finfo(xf.dtype).eps)
    # Far below the maximum, keys that differ by less than eps * (max - min) collapsed into one
    # value of the first frame, whose threshold can then be off by that much (a row spanning
    # 1e-8..1e8 in float32 lost three digits; 1e-15..1e15, all).  Keys as they are (the absolute
    # frame) keep their own precision, eps |x|: a solve there places the threshold among the keys
    # near it, wherever it lies.
    keys = xf * c
    xa = xp.where(fin, keys, -big)
    # The data's own bracket: every finite entry saturated at its lower end, none positive at its upper.
    lo_a, hi_a = bottom * c - lam_r, top * c
    # Within _RECENTRE_STRENGTHS strengths of the maximum the first frame's keys, and so its root, are
    # off by a few eps |threshold| at most, and adding the maximum rounds once more.
    pad = 4.0 * eps * (xp.abs(lo) + xp.abs(hi) + xp.abs(top * c))
    lo_a = xp.where(far, lo_a, xp.maximum(lo + top * c - pad, lo_a))
    hi_a = xp.where(far, hi_a, xp.minimum(hi + top * c + pad, hi_a))
    return keys, xa, lo_a, hi_a, xp.clip(anchor + top * c, lo_a, hi_a)


def _mask_key_frame(
    keys: Any, xs: Any, fin: Any, c: Any, top: Any, bottom: Any, tau_a: Any, lo_a: Any, hi_a: Any, again: Any,
    lam_r: Any, kkf: Any, ftol: Any, q: float, guard: float, xp: Any,
) -> tuple[Any, ...]:
    """The frame of the key nearest to the absolute threshold: keys, checked bracket, start and floor of splits."""
    big = float(xp.finfo(keys.dtype).max)
    eps = float(xp.finfo(keys.dtype).eps)
    # Its point of smallest miss too can lie outside its final bracket, far from the root: where
    # the keys near the threshold are tied within their own rounding (float32 keys ~1e7 with
    # l ~ 1e-4), sum(y) jumps past k between adjacent floats and no point comes close.
    tau_a = xp.minimum(xp.maximum(tau_a, lo_a), hi_a)
    # The reference is the key nearest to that threshold: a data value, so it carries no rounding
    # error of its own, and the keys near the threshold are small next to it.
    dist = xp.where(fin, xp.abs(keys - tau_a), xp.inf)
    nearest = xp.max(xp.where(dist == xp.min(dist, axis=-1, keepdims=True), keys, -big), axis=-1, keepdims=True)
    ref = xp.where(again, nearest, top * c)
    xs = xp.where(again, xp.where(fin, keys - ref, -big), xs)
    # The absolute frame's bracket in the new frame, widened by the rounding of its keys.
    shift = top * c - ref
    slack = 8.0 * eps * (xp.abs(lo_a) + xp.abs(hi_a) + xp.abs(ref) + lam_r)
    lo2, hi2 = (lo_a - ref) - slack, (hi_a - ref) + slack
    # Widened brackets that fail the sign check fall back to the data's own bracket: every
    # finite entry saturated at its lower end, none positive at its upper end.
    low_ok = _mask_evaluate(lo2, xs, lam_r, kkf, q, guard, xp)[0] >= 0
    high_ok = _mask_evaluate(hi2, xs, lam_r, kkf, q, guard, xp)[0] <= 0
    lo2 = xp.where(low_ok, lo2, (bottom * c - ref) - lam_r)
    hi2 = xp.where(high_ok, hi2, shift)
    # The root can lie much closer to the key than l: where the key's own output y is small, at
    # g_inverse(y) = l y^(1/(q - 1)) below it, a distance of no consequence once y is within the
    # tolerance.  Splits toward the key go geometrically down to that floor (with a floor of l,
    # bisection took 15-17 halvings to a root 3e-11 below a key, p = 3, float32, for rows whose key
    # had y ~ 2e-5).
    return xs, lo2, hi2, xp.clip(tau_a - ref, lo2, hi2), _near(ftol, lam_r, q, xp)


def _mask_frame(x: Any, k: int, lam: float, q: float, rtol: float, xp: Any) -> tuple[Any, ...]:
    """The rows relative to their maximum, the count of entries to select, the data bracket and its midpoint."""
    n = x.shape[-1]
    dt = x.dtype
    big = float(xp.finfo(dt).max)
    x, nan_rows = nan_rows_of(x, xp)
    pos_inf, neg_inf = x == xp.inf, x == -xp.inf
    fin = xp.isfinite(x)
    n_pos, n_neg = count(pos_inf, xp), count(neg_inf, xp)
    n_fin = n - n_pos - n_neg
    kk = xp.minimum(xp.maximum(k - n_pos, 0), n_fin)
    solve = (kk > 0) & (kk < n_fin) & ~nan_rows
    kkf, n_fin_f = xp.astype(kk, dt), xp.astype(n_fin, dt)

    # Relative to the row maximum; rows spanning more than a quarter of the range scaled by 1/4.
    xf = xp.where(fin, x, xp.zeros_like(x))
    has_fin = n_fin > 0
    top = xp.where(has_fin, xp.max(xp.where(fin, xf, -big), axis=-1, keepdims=True), 0.0)
    bottom = xp.where(has_fin, xp.min(xp.where(fin, xf, big), axis=-1, keepdims=True), 0.0)
    c = xp.where(top / 2 - bottom / 2 > big / 8, xp.full_like(top, 0.25), xp.ones_like(top))
    lam_r = lam * c
    xs = xp.where(fin, xf * c - top * c, -big)  # non-finite entries never reach the support

    ratio = xp.where(solve, kkf / xp.where(solve, n_fin_f, 1.0), 0.5)
    hi = -g_inverse(ratio, lam_r, q, xp)
    lo = (bottom * c - top * c) - lam_r
    # At least k keys reach (sum - (k - 1) max) / (n - k + 1) (else the sum would be smaller), and all
    # k are saturated at a threshold l below it, so sum(y) >= k there: relative to the maximum, the mean over
    # (n - k + 1) / n, less l.  On rows of 64 normal logits that is about -2.7 (the root lies near
    # -2.2) against min - max - l, about -5.  The factor covers the rounding of the mean; a mean
    # too large to divide is left out.
    frac = xp.astype(n_fin - kk + 1, dt) / xp.where(n_fin > 0, n_fin_f, 1.0)
    mean = xp.sum(xp.where(fin, xs / xp.where(n_fin > 0, n_fin_f, 1.0), 0.0), axis=-1, keepdims=True)
    divisible = solve & (mean > -(big / 8) * frac)
    reach = xp.where(divisible, mean, 0.0) / xp.where(divisible, frac, 1.0)
    lo = xp.where(divisible, xp.maximum(lo, reach * (1.0 + 2.0**-10) - lam_r), lo)
    ftol = rtol * xp.maximum(kkf, 1.0)
    infinities = pos_inf, neg_inf, n_pos, n_neg, n_fin
    start = xp.where(solve, lo / 2 + hi / 2, hi)  # the root finder's first point: the bracket's midpoint
    return nan_rows, infinities, fin, kk, solve, kkf, xf, top, bottom, c, lam_r, xs, lo, hi, ftol, start


def _mask_split_floor(lam_r: Any, hi: Any, q: float, xp: Any) -> Any:
    """The first root finding's floor of geometric splits (`_split`): the strength, or for p > 2 the data
    bracket's upper end below the maximum, ``l (k/n)^(p-1)``, where it lies closer.

    For p > 2 the free outputs ``(u / l)^(1/(p-1))`` are large far below ``u = l``: a root 5e-11 below
    the maximum at ``l = 0.1``, ``p = 20`` (keys spanning 1e-50..1e-11), which splits floored at `l`
    approached by halving from -l, 31 halvings for 100 iterations (`ThresholdNotConverged`).
    """
    if q >= 2.0:
        return lam_r
    return xp.minimum(lam_r, xp.maximum(-hi, xp.full_like(hi, float(xp.finfo(hi.dtype).smallest_normal))))


def _near(ftol: Any, strength: Any, q: float, xp: Any) -> Any:
    """The key frames' floor of splits toward the key: where a key's output is `ftol`, ``g_inverse(ftol)``
    below it at `strength`, and at least the smallest normal number (for large p that distance, ``l
    ftol^(p-1)``, underflows, and with a floor of 0 brackets across the key were halved down to a root
    ~1e-58 below it: p = 50, out of iterations)."""
    tiny = xp.full_like(ftol, float(xp.finfo(ftol.dtype).smallest_normal))
    return xp.maximum(g_inverse(ftol, strength, q, xp), tiny)


def _rounded_to_saturation(keys: Any, sat: Any, free: Any, n_win: Any, low_win: Any, kk: Any, xp: Any) -> Any:
    """The entries read as saturated that are free: where k or more are read as saturated next to free
    entries, the smallest of them (with its ties), whose ``y`` (mask) or ``z / t`` (magnitude) lies
    within an ulp of 1.

    The free weights sum to k minus the saturated count, a positive integer when any entry is free: k
    saturated entries next to free ones are one too many.  Left saturated, the Jacobian loses the
    entry's g' (mask: p = 5/4, ``y = 1 - 1e-18`` next to free outputs of 1e-20..1e-18, whose products
    came back O(1) off, relative to their 1e-13 scale).  `n_win` and `low_win` are the count and the
    smallest key of the winners (the entries with ``y > 1/2``, `sat` among them), which are the
    saturated entries wherever k or more are (the free weights then sum to about 0): no reduction of
    its own but one.
    """
    return (n_win >= kk) & xp.any(free, axis=-1, keepdims=True) & sat & (keys == low_win)


def _mask_enter_at_tau(
    tau: Any, pieces: tuple[Any, Any, Any], xs: Any, lam_r: Any, kkf: Any, lo: Any, rows: Any, q: float, xp: Any,
) -> Any:
    """For p > 2 (q < 2), the polish where the root finder settled on keys: the entries at `tau` (u = 0)
    supply what ``sum(y)`` lacks of k, each its share, at ``tau - g_inverse(share)``, kept where that
    misses k by less.  `rows`: the rows whose Newton polish was not taken; `pieces`: ``(u, uc, above)`` of
    `_mask_pieces` at `tau`, read before that polish (the same for those rows).

    The root finder stops once ``|sum(y) - k| <= tol k``, and can do so on a key (0 in a key's frame),
    whose entry is then 0; the Newton polish, whose step enters that key (the support changes), is not
    taken.  For p > 2 the entering entry's ``y = (u / l)^(q - 1)`` is steep and takes nearly all of the
    deficit: float32 rows of 1024 (k = 32, p = 3, l = 1) had an entry 9e-10 above the threshold at 0
    instead of 3e-5 (250 float32 ulps; 10 with this step).  For p <= 2 the deficit spreads over the
    free entries, whose y are within it of the root's anyway.
    """
    u, uc, above = pieces
    zero = xp.zeros_like(uc)

    def mass(uc: Any, above: Any) -> Any:  # sum(y)
        return xp.sum(xp.where(above, g(uc, lam_r, q, xp), zero), axis=-1, keepdims=True)

    total = mass(uc, above)
    n_at = xp.astype(count(u == 0, xp), tau.dtype)
    deficit = kkf - total
    use = rows & (n_at > 0) & (deficit > 0)
    share = xp.where(use, deficit / xp.where(use, n_at, 1.0), xp.zeros_like(deficit))
    candidate = tau - g_inverse(xp.minimum(share, 1.0), lam_r, q, xp)
    use = use & (candidate >= lo) & (candidate < tau)
    _, uc_c, above_c, _, _ = _mask_pieces(candidate, xs, lam_r, q, xp)
    return xp.where(use & (xp.abs(mass(uc_c, above_c) - kkf) < deficit), candidate, tau)


def _mask_output(
    k: int, q: float, guard: float, nan_rows: Any, infinities: tuple[Any, ...], fin: Any, kk: Any, solve: Any,
    kkf: Any, xs: Any, c: Any, lam_r: Any, tau: Any, lo: Any, hi: Any, xp: Any,
) -> tuple[Any, Any]:
    """The exact polish of the threshold, the outputs and g' on the free set."""
    dt = xs.dtype
    big = float(xp.finfo(dt).max)
    # Exact polish on the support read at tau, kept only if the support does not change.
    u, uc, above, sat, free = _mask_pieces(tau, xs, lam_r, q, xp)
    if q == 2.0:
        n_free = xp.astype(count(free, xp), dt)
        target = kkf - xp.astype(count(sat, xp), dt)
        sum_free = xp.sum(xp.where(free, xs, xp.zeros_like(xs)), axis=-1, keepdims=True)
        candidate = (sum_free - lam_r * target) / xp.where(n_free > 0, n_free, 1.0)
        usable = n_free > 0
    else:
        _, step, usable, _, _, _ = _mask_evaluate(tau, xs, lam_r, kkf, q, guard, xp)
        candidate = tau + xp.where(usable, step, xp.zeros_like(step))
    usable = usable & solve & (candidate >= lo) & (candidate <= hi)
    _, _, above_c, sat_c, _ = _mask_pieces(candidate, xs, lam_r, q, xp)
    usable = usable & xp.all((above_c == above) & (sat_c == sat), axis=-1, keepdims=True)
    tau = xp.where(usable, candidate, tau)
    if q < 2.0:
        tau = _mask_enter_at_tau(tau, (u, uc, above), xs, lam_r, kkf, lo, solve & ~usable, q, xp)

    _, uc, _, sat, free = _mask_pieces(tau, xs, lam_r, q, xp)
    sat, free = sat & solve, free & solve
    y = g(uc, lam_r, q, xp)

    # Non-unique threshold: k clear winners separated from the rest by a saturating gap.
    winners = (y > 0.5) & fin
    n_win = count(winners, xp)
    low_win = xp.min(xp.where(winners, xs, big / 2), axis=-1, keepdims=True)  # (with big, big + big / 4 overflowed)
    high_rest = xp.max(xp.where(fin & ~winners, xs, -big / 4), axis=-1, keepdims=True)
    gap = xp.clip(low_win - high_rest, 0.0, 2.0 * lam_r)
    flat = solve & (n_win == kk) & (g(gap, lam_r, q, xp) >= 1.0)
    one, zero = xp.ones_like(y), xp.zeros_like(y)
    y = xp.where(flat, xp.where(winners, one, zero), y)
    free = free & ~flat
    free = free | _rounded_to_saturation(xs, sat, free, n_win, low_win, kk, xp)
    if q < 2.0:
        y = _mask_unresolved(y, xs, lam_r, kkf, lo, hi, solve & ~flat, q, xp)

    # Rows without a root: nothing (kk = 0) or every finite entry (kk = n_fin) selected.
    pos_inf, neg_inf, n_pos, n_neg, n_fin = infinities
    y = xp.where(solve, y, xp.where(kk > 0, one, zero))
    share_pos = xp.minimum(1.0, k / xp.astype(xp.maximum(n_pos, 1), dt))
    share_neg = xp.astype(xp.maximum(k - n_pos - n_fin, 0), dt) / xp.astype(xp.maximum(n_neg, 1), dt)
    y = xp.where(pos_inf, share_pos, xp.where(neg_inf, share_neg, y))
    y = xp.where(nan_rows, xp.nan, y)
    return y, c * g_prime_on(uc, free, lam_r, q, xp)


# A row's sum(y) (mask) or sum of weights (magnitude) that misses k by more than this many times
# `_FTOL_ULPS` ulps of k after the polish has no float threshold that meets k (`_mask_unresolved`).
_UNRESOLVED_MISS = 64
_UNDERFLOW_TOP_STEPS = 4  # fixed-point steps of `_mag_underflow_top`


def _unresolved_rows(weights: Any, kkf: Any, rows: Any, low: Any, high: Any, xp: Any) -> tuple[Any, Any]:
    """(rows to interpolate, their weight ``theta``) from the sums of the weights at the threshold found
    (`weights`) and at its bracket's ends (`low` >= k >= `high`, the lower end's sum the larger)."""
    eps = float(xp.finfo(weights.dtype).eps)
    miss = xp.abs(weights - kkf)
    span = low - high
    use = rows & (miss > _UNRESOLVED_MISS * _FTOL_ULPS * eps * xp.maximum(kkf, 1.0))
    use = use & (span > 0) & (low >= kkf) & (high <= kkf)
    return use, (kkf - high) / xp.where(use, span, 1.0)


def _mask_unresolved(y: Any, xs: Any, lam_r: Any, kkf: Any, lo: Any, hi: Any, rows: Any, q: float, xp: Any) -> Any:
    """The mask where no float threshold gives ``sum(y) = k`` (p > 2 only): interpolated between its bracket's ends.

    For p > 2 (q < 2), ``g`` is steep at 0: an entry just below the threshold has ``y = g(u)`` with
    ``u = l y^(p-1)``, which can lie below the rounding of the key in every frame (p = 50: ``u ~
    1e-58`` for ``y = 0.065``; ties of a key at a strength far below it).  The root finder then
    closes its bracket on the two floats around the key, with ``sum(y)`` above k at the lower end
    and below at the upper one, and the entries at the key come back all or nothing.  The outputs
    are taken as the convex combination of the two ends' outputs with ``sum(y) = k``: every
    entry stays in [0, 1] and in order, tied keys get equal shares, and the entries that the two
    ends agree on keep their values.  Rows whose polished threshold meets k are left as they are.
    """
    # (Non-finite entries sit at -max in this frame (`_mask_frame`): y = 0 at every threshold.)
    y_lo = g(xp.clip(xs - lo, 0.0, lam_r), lam_r, q, xp)
    y_hi = g(xp.clip(xs - hi, 0.0, lam_r), lam_r, q, xp)
    use, theta = _unresolved_rows(
        xp.sum(y, axis=-1, keepdims=True), kkf, rows, xp.sum(y_lo, axis=-1, keepdims=True),
        xp.sum(y_hi, axis=-1, keepdims=True), xp,
    )
    return xp.where(use, y_hi + theta * (y_lo - y_hi), y)


def threshold_mask(
    x: Any, k: int, lam: float, q: float, xp: Any, *, max_iter: int | None = None, tol: float | None = None,
    loop: Callable[..., Any] | None = None, stage: Stage | None = None,
    order_statistics: OrderStatistics | None = None,
) -> tuple[Any, MaskResiduals]:
    """Soft top-k mask of (batch, n) rows by the threshold method, with its residuals.

    Parameters
    ----------
    x : (batch, n) real floating array of any Array-API namespace
    k : int
        ``1 <= k <= n``.
    lam, q : float
        Regularization strength ``l > 0`` and conjugate exponent ``q = p / (p - 1)``.  `lam` may
        also be a 0-d array of `x`'s dtype (e.g. traced, so that one compiled program serves every
        strength), which the caller has checked (`check_strength`).
    xp : namespace
        The namespace of `x`; every operation runs there (and on its device).
    max_iter : int, optional
        Iteration cap of the root finder (default `DEFAULT_MAX_ITER`).
    tol : float, optional
        The root finder stops once ``|sum(y) - k| <= tol * k`` (default 8
        ulps of the dtype); the polish then solves the equation of the
        support it found.
    loop : callable, optional
        ``loop(cond, body, state)`` with the semantics of
        ``jax.lax.while_loop``: runs the root finder as one structured loop
        (fixed shapes, early exit) instead of a Python loop, which a tracer
        would unroll ``max_iter`` times.  For adapters.
    stage : callable, optional
        ``stage(fn)`` returns a function that computes what `fn` computes
        (e.g. ``torch.compile(fn)``); it is applied to the pure stretches
        between the root finder's loops (arrays and Python scalars in, a
        tuple of arrays out, no host reads), so that an adapter can fuse
        them.  For adapters.
    order_statistics : callable, optional
        ``order_statistics(keys, k)`` returns the k-th and (k+1)-th largest
        entries of each row of `keys` ((batch, 1) arrays; ``1 <= k < n``),
        e.g. from a top-k primitive; the root finder then starts at PAV's
        first block (p <= 3, k <= 64), which about halves its iterations on
        rows of logits.  Called outside the stages.  For adapters.

    Returns
    -------
    y : (batch, n) array
    residuals : MaskResiduals
        ``perm = inv_perm = None``, one block per row, ``g'`` on the free set.
    """
    check_strength(lam, x.dtype, xp, "threshold")
    fuse = _as_is if stage is None else stage
    rtol, ulps, iters, guard = _controls(x.dtype, max_iter, tol, xp)
    nan_rows, infinities, fin, kk, solve, kkf, xf, top, bottom, c, lam_r, xs, lo, hi, ftol, start = fuse(_mask_frame)(
        x, k, lam, q, rtol, xp
    )
    if _starts_at_first_block(order_statistics, k, x.shape[-1], q):
        # Outside the stages: k is a new constant of `order_statistics` for each k (compiled stages would be
        # traced again).  Rows whose entries are all finite start at PAV's first block.
        kth, after = order_statistics(xs, k)
        all_finite = infinities[4] == x.shape[-1]  # n_fin
        start = fuse(_mask_block_start)(kth, after, lam_r, lo, hi, solve & all_finite, start, q, xp)

    def evaluate(tau: Any, xs: Any, lam_r: Any, kkf: Any) -> tuple[Any, ...]:
        return _mask_evaluate(tau, xs, lam_r, kkf, q, guard, xp)

    tau, lo, hi = _root(
        evaluate, (xs, lam_r, kkf), lo, hi, solve, ftol, rtol, lam_r, ulps, q == 2.0, iters, xp, loop, start=start,
        spread=_MASK_SPREAD, floor=_mask_split_floor(lam_r, hi, q, xp),
    )
    xs, tau, lo, hi = _mask_recentre(
        evaluate, xs, xf, fin, c, top, bottom, tau, lo, hi, lam_r, kkf, solve, ftol, rtol, ulps, q, guard, iters,
        xp, loop, fuse,
    )
    y, gprime = fuse(_mask_output)(
        k, q, guard, nan_rows, infinities, fin, kk, solve, kkf, xs, c, lam_r, tau, lo, hi, xp
    )
    return y, poison(MaskResiduals(None, None, None, None, gprime), nan_rows, xp)


def _mag_pieces(delta: Any, d: Any, ref: Any, lam_r: Any, q: float, xp: Any) -> tuple[Any, ...]:
    """Pieces of the magnitude at the threshold ``t = ref + delta``, with keys ``d = |x| - ref``.

    ``r = d - delta``: in the frame of a key near the threshold (`_mag_recentre`)
    the keys near it are exact differences and `delta` is small, so `r` keeps
    its digits; ``ref = 0`` is the plain frame (``d = |x|``, ``delta = t``).
    Returns ``(r, rc, above, sat, free, t)``.
    """
    t = ref + delta
    r = d - delta
    # Entries with r >= sat_r have g(r) >= t, i.e. y = 1.
    sat_r = g_inverse(t, lam_r, q, xp)
    rc = xp.clip(r, 0.0, sat_r)
    above, sat = r > 0, r >= sat_r
    return r, rc, above, sat, above & ~sat, t


def _mag_lead(r: Any, sat: Any, t: Any, free_sum: Any, slope: Any, lam_r: Any, q: float, xp: Any) -> Any:
    """`_mask_lead` for the magnitude: the step in ``t`` across the next saturation edge and beyond.

    An entry leaves saturation where ``r = |x| - t`` meets the saturation width
    ``w(t) = g^-1(t)``, whose slope is ``w / ((q - 1) t)``; beyond that edge it takes over the
    excess with the slope ``g'(w) + 1 = (q - 1) t / w + 1`` (``g(w) = t``).  Both ratios are
    capped at 2^60, so that extreme frames cannot overflow.
    """
    cap = 2.0**60
    width = g_inverse(t, lam_r, q, xp)
    gap = xp.min(xp.where(sat, r - width, xp.full_like(r, xp.inf)), axis=-1, keepdims=True)
    scaled_t = (q - 1.0) * t
    one = xp.ones_like(t)
    small = width < cap * scaled_t  # (the divisions only where the ratio is below the cap)
    growth = xp.where(small, xp.where(small, width, one) / xp.where(small, scaled_t, one), cap)
    large = width > scaled_t / cap
    leaving = xp.where(large, xp.where(large, scaled_t, one) / xp.where(large, width, one), cap)
    return gap / (1.0 + growth) + free_sum / (slope + leaving + 1.0)


def _mag_enter(unsaturated: Any, t: Any, lam_r: Any, q: float, xp: Any) -> Any:
    """`_mask_enter` for the magnitude: the step in ``t`` to where the next key ``a`` below it saturates,
    ``t + g^-1(t) = a`` (`unsaturated`: the row's largest ``r = a - t`` outside the saturated set).

    From ``a - g^-1(a)``, below that point; for q >= 2 one Newton step toward it, which stays
    below it (``g^-1`` is concave; exact for q = 2).
    """
    key = xp.maximum(t + unsaturated, xp.zeros_like(t))
    width = g_inverse(key, lam_r, q, xp)
    if q >= 2.0:
        t0 = key - width
        positive = t0 > 0
        w0 = g_inverse(xp.where(positive, t0, xp.zeros_like(t0)), lam_r, q, xp)
        slope = 1.0 + w0 / ((q - 1.0) * xp.where(positive, t0, xp.ones_like(t0)))
        width = xp.where(positive, key - t0 - (t0 + w0 - key) / slope, width)
    return unsaturated - width


def _mag_evaluate(delta: Any, d: Any, ref: Any, lam_r: Any, kkf: Any, q: float, guard: float, xp: Any):
    n = d.shape[-1]
    r, rc, above, sat, free, t = _mag_pieces(delta, d, ref, lam_r, q, xp)
    z = g(rc, lam_r, q, xp)
    n_sat, n_above = count(sat, xp), count(above, xp)
    target = kkf - xp.astype(n_sat, kkf.dtype)
    # The free entries' total on its own.  For p = 2 it was the sum of every z less |S| t (saturated
    # entries have z = g(l t) = t), which keeps only the digits of k t: with 830 saturated
    # entries and one unit of free weight the bracket's sign test was 1e-13 of t off, the bracket lost
    # the root, the closed-form polish fell outside it and was dropped, and a free output 1% of its
    # input came out 3 times the entry-by-entry bound off (`benchmarks/mag_entrywise.py`, long rows).
    free_sum = xp.sum(xp.where(free, z, xp.zeros_like(z)), axis=-1, keepdims=True)
    if q == 2.0:  # g' = 1 / l on the free set
        slope = xp.astype(n_above - n_sat, kkf.dtype) / lam_r
    else:
        slope = xp.sum(g_prime_on(rc, free, lam_r, q, xp), axis=-1, keepdims=True)
    # As for the mask: one reduction for the vanishing point and the next key.
    unsaturated = xp.max(xp.where(sat, xp.full_like(r, -xp.inf), r), axis=-1, keepdims=True)
    vanish = xp.minimum(unsaturated, _mag_lead(r, sat, t, free_sum, slope, lam_r, q, xp))
    has_free = n_above > n_sat
    enter = _mag_enter(unsaturated, t, lam_r, q, xp)
    step, ok, jump = _newton(free_sum, target, slope, t, has_free, vanish, enter, 1.0 / (q - 1.0), True, guard, xp)
    excess = free_sum - target * t
    miss = xp.where(~has_free & (target == 0), 0.0 * excess, xp.abs(excess) / xp.where(t > 0, t, 1.0))
    return excess, step, ok, jump, n_above * (n + 1) + n_sat, miss


def _mag_start(lo: Any, hi: Any, solve: Any, floor: Any, xp: Any) -> Any:
    """The first point of the magnitude's root finder: its bracket's midpoint where the ends lie within a factor
    16, else `_split`'s (geometric across scales).  Rows of logits have ends within a factor 2-5, where
    `_split` takes the geometric mean above a factor 4: the midpoint saved an iteration of the loop
    (262,144 float32 rows of 64, p = 4/3: 13 -> 11), while heavy tails kept the geometric split
    (the midpoint took Cauchy and lognormal rows 1.5x the iterations)."""
    near = solve & (hi < 16.0 * lo)
    return xp.where(near, lo / 2 + hi / 2, xp.where(solve, _split(lo, hi, floor, xp), hi))


def _mag_recentre(
    evaluate: Callable[..., tuple[Any, ...]], an: Any, nonzero: Any, t: Any, lo: Any, hi: Any, lo0: Any, hi0: Any,
    lam_r: Any, kkf: Any, solve: Any, ftol: Any, rtol: float, ulps: float, q: float, guard: float, iters: int,
    xp: Any, loop: Callable[..., Any] | None, fuse: Stage,
) -> tuple[Any, Any, Any, Any, Any]:
    """Solve the magnitude again relative to the key nearest to the threshold found first.

    With ``t`` rounded to the float grid, ``r = |x| - t`` has an absolute error
    of up to ``eps t``: where the free entries lie within a few saturation
    widths ``l t^(1/(q-1))`` of a threshold that is far larger (ties at a small
    strength, magnitudes spanning many orders), `r`, and with it every free
    output, loses digits, or the free set vanishes (``t`` rounds onto the
    tied key).  Relative to a key ``ref`` within a factor 2 of ``t``, the
    keys near the threshold are exact differences (Sterbenz) and the
    threshold is carried as ``t = ref + delta`` with a small, accurate
    ``delta``; the equation is not shift invariant (``t`` itself enters
    ``y = g(r) / t`` and the saturation width), so ``t`` is formed where it
    is needed and only ``r = (|x| - ref) - delta`` uses the shift.  The first
    bracket, widened by a few ulps of ``t``, brackets ``delta`` (checked;
    else the data bracket is taken); the solve starts from the first root.
    Rows whose threshold lies within 64 saturation widths of 0 lose about 64
    ulps of ``y`` at most and keep the first frame, except for p > 2, where
    ``g`` is steep at 0 and entries at the edge of the support lose far more
    (float32, p = 3: 6.4e-4 off PAV in the first frame, 6.6e-7 in the key's).  Returns
    ``(d, ref, delta, lo, hi)``: the keys, the reference (0 in the plain
    frame), the threshold and its bracket, each row in its own frame.
    """
    zero = xp.zeros_like(t)
    plain = (an, zero, t, lo, hi)
    # (Not xp.clip: rows without a root may keep a bracket with lo > hi.)
    anchor = xp.minimum(xp.maximum(t, lo), hi)
    width = g_inverse(anchor, lam_r, q, xp)
    again = solve & ((anchor > _RECENTRE_STRENGTHS * width) | (q < 2.0))
    if all_true(~again, xp):  # readable arrays and no row to solve again (traced arrays: None)
        return plain
    d, ref, again, lo2, hi2, start, near = fuse(_mag_key_frame)(
        an, nonzero, anchor, again, lo, hi, lo0, hi0, lam_r, kkf, width, ftol, q, guard, xp
    )
    delta, lo2, hi2 = _root(
        evaluate, (d, ref, lam_r, kkf), lo2, hi2, again, ftol, rtol, width, ulps, q == 2.0, iters, xp, loop,
        start=start, leave_last=True, floor=near,
    )
    return d, ref, xp.where(again, delta, t), xp.where(again, lo2, lo), xp.where(again, hi2, hi)


def _mag_key_frame(
    an: Any, nonzero: Any, anchor: Any, again: Any, lo: Any, hi: Any, lo0: Any, hi0: Any, lam_r: Any, kkf: Any,
    width: Any, ftol: Any, q: float, guard: float, xp: Any,
) -> tuple[Any, ...]:
    """The frame of the non-zero key nearest to the first threshold: keys, checked bracket, start and floor of
    splits."""
    eps = float(xp.finfo(an.dtype).eps)
    zero = xp.zeros_like(anchor)
    # The reference is the non-zero key nearest to the threshold (a data value, exact); a
    # frame only helps where it is within a factor 2, so that delta = t - ref is exact too.
    dist = xp.where(nonzero, xp.abs(an - anchor), xp.inf)
    nearest = xp.max(xp.where(dist == xp.min(dist, axis=-1, keepdims=True), an, 0.0), axis=-1, keepdims=True)
    again = again & (nearest <= 2.0 * anchor) & (anchor <= 2.0 * nearest)
    ref = xp.where(again, nearest, zero)
    d = xp.where(again, an - ref, an)
    slack = 8.0 * eps * hi
    # delta >= -ref keeps t = ref + delta >= 0 (at t = 0 every non-zero entry saturates).
    lo2, hi2 = xp.maximum((lo - ref) - slack, -ref), (hi - ref) + slack
    low_ok = _mag_evaluate(lo2, d, ref, lam_r, kkf, q, guard, xp)[0] >= 0
    high_ok = _mag_evaluate(hi2, d, ref, lam_r, kkf, q, guard, xp)[0] <= 0
    lo2 = xp.where(low_ok, lo2, lo0 - ref)
    hi2 = xp.where(high_ok, hi2, hi0 - ref)
    # As in the mask's key frame (`_mask_key_frame`): a key whose output y = g(r) / t is small lies
    # ``width y^(1/(q - 1))`` (`g_inverse` at the strength `width`) above the threshold; splits toward it
    # go geometrically down to that distance at y = ftol.
    return d, ref, again, lo2, hi2, xp.minimum(xp.maximum(anchor - ref, lo2), hi2), _near(ftol, width, q, xp)


def _mag_scales(lam: Any, q: float, dtype: Any, xp: Any) -> tuple[float, float, Any, Any]:
    """Constants of the magnitude's scaling: (p, emax, the strength's exponent range).

    Python floats, except the range for an array strength (`is_array_strength`): 0-d arrays.
    """
    big = float(xp.finfo(dtype).max)
    p = q / (q - 1.0)
    # The largest finite number's exponent: 1023 (float64), 127 (float32).  Not floor(log2(big)), which
    # rounds to 1024 and 128: a row whose largest |x| lies in [2^1023, 2^1024) was then scaled by
    # 2^-1023, a subnormal number, which XLA on the CPU flushes to zero (topk_jax returned x unchanged).
    emax = math.frexp(big)[1] - 1
    log_lam = xp.log2(lam) if is_array_strength(lam) else math.log2(lam)
    lam_lo = -(emax - 2.0) + 8.0 - log_lam
    lam_hi = emax - 8.0 - log_lam - max(1.0, 1.0 / (q - 1.0))
    return p, emax, lam_lo, lam_hi


def _rounded(value: Any, like: Any, xp: Any, up: bool) -> Any:
    """``ceil(value)`` (`up`) or ``floor(value)`` of a Python float or a 0-d array, as an array like `like`."""
    if is_array_strength(value):
        return xp.zeros_like(like) + (xp.ceil(value) if up else xp.floor(value))
    return xp.full_like(like, math.ceil(value) if up else math.floor(value))


class _MagFrame(NamedTuple):
    """A magnitude row set up for the root finder (`_mag_frame`); (batch, n) or (batch, 1) arrays."""

    x: Any  # the rows, NaN rows' entries replaced (`nan_rows_of`)
    nan_rows: Any
    infinite: Any  # infinite entries, and those set aside as saturating (`_mag_deep_frames`)
    fin: Any
    kk: Any  # places left for the finite entries
    kkf: Any  # kk in the rows' dtype
    nonzero: Any
    n_nonzero: Any
    solve: Any  # rows with a positive threshold to find
    c: Any  # the power of two that scales |x| into the frame
    lam_r: Any  # the equivalent strength in the frame
    an: Any  # |x| in the frame (0 for the entries set aside)
    lo: Any  # the data bracket
    hi: Any
    ftol: Any  # the root finder's tolerance on sum(y)
    floor: Any  # its floor of splits
    start: Any  # its first point


def _mag_frame(
    x: Any, k: int, lam: Any, q: float, rtol: float, p: float, emax: float, lam_lo: Any, lam_hi: Any,
    xp: Any, saturating: Any = None,
) -> _MagFrame:
    """|x| scaled into [1, 2), the equivalent strength, the count of entries to keep, the data bracket, and the
    root finder's floor of splits and first point.

    `saturating` (optional, like `x`): keys known to saturate (`_mag_deep_cut`), set aside as the
    infinite ones are: weight 1, output `x`, the rest of the row solved for the places left."""
    n = x.shape[-1]
    dt = x.dtype
    x, nan_rows = nan_rows_of(x, xp)
    a = xp.abs(x)
    infinite = a == xp.inf
    if saturating is not None:
        infinite = infinite | saturating
    fin = ~infinite
    n_inf = count(infinite, xp)
    n_fin = n - n_inf
    kk = xp.minimum(xp.maximum(k - n_inf, 0), n_fin)
    af = xp.where(fin, a, xp.zeros_like(a))
    nonzero = af > 0
    n_nonzero = count(nonzero, xp)
    solve = (kk > 0) & (n_nonzero > kk) & ~nan_rows
    kkf = xp.astype(kk, dt)

    # Scale |x| by a power of two c into [1, 2); the strength becomes l c^(2 - p), kept in a range
    # where neither it nor l t^(1/(q-1)) (t <= 2) can overflow or vanish.
    top = xp.max(af, axis=-1, keepdims=True)
    e = xp.clip(xp.floor(xp.log2(xp.where(top > 0, top, 1.0))), -(emax - 1.0), emax - 1.0)
    if p > 2.0:
        # Huge keys and large p: the scale is bounded where l c^(2-p) would exceed 2^lam_hi (p = 6,
        # keys to 1e300: clipped, the strength changed the problem and free entries came back 0).
        e = xp.minimum(e, _rounded(lam_hi / (p - 2.0), e, xp, up=False))
    elif p < 2.0:
        e = xp.maximum(e, _rounded(-lam_hi / (2.0 - p), e, xp, up=True))
    two = xp.full_like(e, 2.0)
    c = xp.pow(two, -e)
    # Below 2^lam_lo (tiny keys and large p) the threshold is not a float number in any frame
    # scaled to a key; the clipped strength keeps exact ties split evenly there.
    level = -e * (2.0 - p)
    inside = (level >= lam_lo) & (level <= lam_hi)
    lam_r = lam * xp.where(inside, strength_scale(xp.where(inside, -e, xp.zeros_like(e)), q, xp),
                           xp.pow(two, xp.clip(level, lam_lo, lam_hi)))
    an = af * c

    smallest = xp.min(xp.where(nonzero, an, 2.0), axis=-1, keepdims=True)
    half = smallest / 2
    lo = xp.where(half > lam_r, half, xp.minimum(half, g(xp.minimum(half, lam_r), lam_r, q, xp)))
    hi = xp.max(an, axis=-1, keepdims=True)
    # At least k keys reach c_k = (sum |x| - k max|x|) / (n - k) (else the sum would be smaller), and
    # all k saturate wherever t + g^-1(t) <= c_k, so sum(y) >= k at c_k - g^-1(c_k) (below that
    # point): a lower end far above the smallest key's (random rows: 0.6 against 0.01 of a root at
    # 0.7), which the bracket's first geometric splits crawled up from.  The factor covers the
    # rounding of the sum.
    spare = xp.astype(n_fin - kk, dt)
    mass = (xp.sum(an, axis=-1, keepdims=True) - kkf * hi) / xp.where(spare > 0, spare, 1.0) * (1.0 - 2.0**-10)
    mass = xp.where(mass > 0, mass, xp.zeros_like(mass))
    lo = xp.where(solve, xp.maximum(lo, mass - g_inverse(mass, lam_r, q, xp)), lo)
    ftol = rtol * xp.maximum(kkf, 1.0)
    # The threshold can lie hundreds of orders below the largest key (whose scale is 1 here): the
    # root finder splits its bracket geometrically down to the smallest normal number (with a
    # floor of 0 it halved, about 3 steps per order, and ran out of iterations from spans of
    # 1e+-100 on).
    floor = xp.full_like(hi, float(xp.finfo(dt).smallest_normal))
    start = _mag_start(lo, hi, solve, floor, xp)
    return _MagFrame(x, nan_rows, infinite, fin, kk, kkf, nonzero, n_nonzero, solve, c, lam_r, an, lo, hi, ftol, floor,
                     start)


def _mag_deep_levels(hi: Any, lam_r: Any, depth: float, q: float, xp: Any) -> tuple[tuple[Any, Any], ...]:
    """The levels that `_mag_deep_cut` tests, each with its edge ``2 level + g^-1(2 level)``: `depth` below
    the largest key, and 2^24 times the smallest normal number, which reaches rows whose frame is not
    scaled to their largest key (p > 2 and huge keys: float32, p = 3, a key of 2.8e37 over normal ones
    sat at 170 in its frame, with a saturation width of 56 at the first level)."""
    tiny = float(xp.finfo(hi.dtype).smallest_normal)
    levels = (hi * depth, xp.full_like(hi, tiny * 2.0**24))
    return tuple((level, 2.0 * level + g_inverse(2.0 * level, lam_r, q, xp)) for level in levels)


def _mag_deep_rows(an: Any, hi: Any, lam_r: Any, kk: Any, solve: Any, depth: float, q: float, xp: Any) -> Any:
    """Rows that `_mag_deep_cut` may cut: fewer than k keys at or above an edge (keys there saturate at
    its level, so ``sum(y) >= k`` there otherwise).  One comparison per key: every call pays it."""
    (_, edge_a), (_, edge_b) = _mag_deep_levels(hi, lam_r, depth, q, xp)
    return solve & (count(an >= xp.maximum(edge_a, edge_b), xp) < kk)


def _mag_deep_cut(an: Any, hi: Any, lam_r: Any, kkf: Any, solve: Any, depth: float, q: float, xp: Any) -> Any:
    """Keys certain to saturate in rows whose threshold lies below one of `_mag_deep_levels`.

    ``sum(y) < k`` at a level puts the threshold below it (``sum(y)`` does not increase with the
    threshold; the test reads keys at or above the level, normal numbers of the frame, and the free
    outputs it could lose to underflow are below 2^-24 each).  Every key at or above the level's
    edge ``2 level + g^-1(2 level)`` is then saturated (``|x| - t >= g^-1(t)`` for every
    ``t <= 2 level``: ``g^-1`` increases; the factor 2 covers the test's rounding).
    """
    tiny = float(xp.finfo(an.dtype).smallest_normal)
    zero = xp.zeros_like(hi)
    cut = xp.zeros_like(solve & (an > 0))
    for level, edge in _mag_deep_levels(hi, lam_r, depth, q, xp):
        _, rc, _, sat, free, _ = _mag_pieces(level, an, zero, lam_r, q, xp)
        free_sum = xp.sum(xp.where(free, g(rc, lam_r, q, xp), xp.zeros_like(rc)), axis=-1, keepdims=True)
        below = xp.astype(count(sat, xp), kkf.dtype) + free_sum / level < kkf
        cut = cut | (below & solve & (level >= tiny) & (an >= edge))
    return cut


def _mag_deep_frames(
    frame: _MagFrame, reframe: Callable[[Any], _MagFrame], rows: Callable[[_MagFrame], Any],
    cut: Callable[[_MagFrame], Any], xp: Any, loop: Callable[..., Any] | None,
) -> _MagFrame:
    """The frames of rows whose threshold lies far below their largest key, each row in its own.

    The frame scales a row to its largest key; keys more than about 2^-emax below it (in float64 some
    300 orders, in float32 some 38, fewer where the exponent p or the strength brings powers of them
    near underflow) become subnormal numbers or zeros, and a threshold among them was lost: k = 2,
    ``x = (1e250, 1e-250, 3e-251, -2e-251)`` came back with 1e250 alone, float32 ``(1e20, 1e-20, ...)``
    too.  Where the threshold lies below ``2^-(emax // 2)`` times the largest key (some 150 orders in
    float64, 19 in float32) or near the frame's underflow, the keys certain to saturate there
    (`_mag_deep_cut`: the largest ones) are set aside and the rest of the row is framed again, now
    scaled to its own largest key, for the places left; at most `_DEEP_ROUNDS` times (enough for every
    span of finite keys).  Other rows keep their frame.  `rows` picks the rows to test (one comparison
    per key, which every call pays; with `loop`, traced arrays, nothing more where no row is picked).
    """
    frame = _MagFrame(*frame)
    maybe = rows(frame)
    saturating = xp.zeros_like(frame.nonzero)  # (a (batch, n) boolean array)

    def round_of(saturating: Any, new_cut: Any) -> tuple[Any, Any, _MagFrame]:
        saturating = saturating | new_cut
        frame = _MagFrame(*reframe(saturating))  # (a compiled stage may hand back a plain tuple)
        # Rows that set nothing aside this round are done (their frame is as before).
        return saturating, rows(frame) & xp.any(new_cut, axis=-1, keepdims=True), frame

    if loop is None:
        for _ in range(_DEEP_ROUNDS):
            if all_true(~maybe, xp):  # (traced arrays: None, every round runs)
                break
            new_cut = cut(frame) & maybe
            if all_true(~new_cut, xp):  # rows picked, none deep (large strengths): no new frame
                break
            saturating, maybe, frame = round_of(saturating, new_cut)
        return frame

    # The loop's state is flat: (saturating, maybe, rounds, *the frame's fields).
    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        saturating, maybe, frame = round_of(state[0], cut(_MagFrame(*state[3:])) & state[1])
        return (saturating, maybe, state[2] + 1, *frame)

    rounds = xp.zeros((), dtype=default_int(xp), device=device(maybe))
    state = loop(lambda st: xp.any(st[1]) & (st[2] < _DEEP_ROUNDS), body, (saturating, maybe, rounds, *frame))
    return _MagFrame(*state[3:])


def _mag_output(
    x: Any, k: int, q: float, guard: float, nan_rows: Any, infinite: Any, fin: Any, kk: Any, kkf: Any,
    nonzero: Any, n_nonzero: Any, solve: Any, c: Any, lam_r: Any, an: Any, d: Any, ref: Any, delta: Any, lo: Any,
    hi: Any, xp: Any,
) -> tuple[Any, ...]:
    """The exact polish of the threshold, the outputs and the residuals' arrays (g', set codes, offset)."""
    dt = x.dtype
    zero_ref = xp.zeros_like(hi)
    # Exact polish on the support read at delta, kept only if the support does not change.
    _, _, above, sat, free, _ = _mag_pieces(delta, d, ref, lam_r, q, xp)
    if q == 2.0:
        # t = sum_F |x| / (|F| + l (k - |S|)), i.e. delta = t - ref from the exact differences d.
        n_free = xp.astype(count(free, xp), dt)
        target = kkf - xp.astype(count(sat, xp), dt)
        sum_free = xp.sum(xp.where(free, d, xp.zeros_like(d)), axis=-1, keepdims=True)
        den = n_free + lam_r * target
        candidate = (sum_free - lam_r * target * ref) / xp.where(den > 0, den, 1.0)
        usable = (den > 0) & (n_free > 0)
    else:
        _, step, usable, _, _, _ = _mag_evaluate(delta, d, ref, lam_r, kkf, q, guard, xp)
        candidate = delta + xp.where(usable, step, xp.zeros_like(step))
    usable = usable & solve & (candidate >= lo) & (candidate <= hi) & (ref + candidate > 0)
    _, _, above_c, sat_c, _, _ = _mag_pieces(xp.where(usable, candidate, delta), d, ref, lam_r, q, xp)
    usable = usable & xp.all((above_c == above) & (sat_c == sat), axis=-1, keepdims=True)
    delta = xp.where(usable, candidate, delta)
    # (The sets at delta are still `above` and `sat`: the polish keeps them.)
    delta = _mag_underflow_top(an, d, ref, delta, hi, above, sat, kk, solve, lam_r, q, xp)

    r, rc, _, sat, free, t = _mag_pieces(delta, d, ref, lam_r, q, xp)
    sat, free = sat & solve, free & solve
    z = g(rc, lam_r, q, xp)

    # Non-unique threshold: k saturated winners, and saturation still holds at the largest loser.
    winners = (sat | (free & (z > 0.5 * t))) & fin
    n_win = count(winners, xp)
    low_win = xp.min(xp.where(winners, an, 2.0), axis=-1, keepdims=True)
    high_rest = xp.max(xp.where(fin & ~winners, an, 0.0), axis=-1, keepdims=True)
    _, _, _, still_sat, _, _ = _mag_pieces(high_rest, low_win, zero_ref, lam_r, q, xp)
    flat = solve & (n_win == kk) & still_sat
    sat = xp.where(flat, winners, sat)
    free = free & ~flat
    # Left saturated, the Jacobian's denominator D = sum g' + k - |S| lost its 1 (p = 5/4, keys spanning
    # 1e-16..1e-55: the free set's products came back O(1) off).
    demoted = _rounded_to_saturation(an, sat, free, n_win, low_win, kk, xp)
    sat, free = sat & ~demoted, free | demoted

    signs = xp.sign(x)
    zero = xp.zeros_like(x)
    # At most |x| (a free entry lies below saturation): rounding could put it a few ulps above.
    soft = signs * xp.minimum((z + xp.where(free, r, zero)) / c, xp.abs(x))
    out = xp.where(sat, x, xp.where(free, soft, zero))
    if q < 2.0:
        out = _mag_unresolved(out, x, signs, c, an, d, ref, sat, free, z, t, lam_r, kkf, lo, hi, solve & ~flat, q, xp)

    # Rows without a positive threshold: kk = 0 keeps only infinite entries; at most kk non-zero
    # entries return x (every entry saturated when fewer than kk are non-zero, else the non-zero ones).
    identity = (kk > 0) & (n_nonzero <= kk)
    kept = identity & xp.where(n_nonzero < kk, fin, nonzero)
    out = xp.where(solve, out, xp.where(identity, x, zero))
    saturated = xp.where(solve, sat, kept) | infinite
    out = xp.where(infinite, x, out)
    out = xp.where(nan_rows, xp.nan, out)

    gprime = g_prime_on(rc, free, lam_r, q, xp)
    offset = xp.astype(xp.maximum(k - count(saturated, xp), 0), dt)
    return out, gprime, mag_codes(free, saturated, signs, xp), offset


def _mag_underflow_top(
    an: Any, d: Any, ref: Any, delta: Any, hi: Any, above: Any, sat: Any, kk: Any, solve: Any, lam_r: Any, q: float,
    xp: Any,
) -> Any:
    """`delta`, moved to the top of a stretch on which ``sum(y) = k`` holds only because the free entries'
    ``z = g(r)`` underflows to 0 (k entries saturated, the free ones hundreds of orders below l); `above`
    and `sat` are the sets at `delta`.

    Below that top the exact sum exceeds k by ``sum_F z / t``, beyond the dtype, so the root is the top: the
    level ``t = g(a - t)`` at which the smallest saturated key `a` leaves saturation.  The root finder
    settled anywhere on the stretch, and the free outputs ``|x| - t`` were off by the difference
    (``x = (-2e-147, -3.6e-146, -2.6e-38)``, ``k = 1``, ``l = 58``, ``p = 1.25``: 2e-11 of themselves).
    ``t = g(a - t)`` is solved by its fixed-point iteration from ``g(a)``: there ``t`` is
    many orders below ``a``, and each step multiplies the error by about ``(q - 1) t / a``.  Row
    reductions only (the largest free ``r``, whose z is 0 when every free z is): the outputs' pieces are
    computed once, at the point this returns.
    """
    free = above & ~sat
    largest_free = xp.max(xp.where(free, d, xp.full_like(d, -xp.inf)), axis=-1, keepdims=True) - delta
    has_free = largest_free > 0
    vanishing = g(xp.where(has_free, largest_free, xp.zeros_like(largest_free)), lam_r, q, xp) == 0
    stretch = solve & (count(sat, xp) == kk) & has_free & vanishing
    a = xp.min(xp.where(sat, an, xp.full_like(an, xp.inf)), axis=-1, keepdims=True)
    a = xp.where(stretch & xp.isfinite(a), a, xp.zeros_like(a))
    t = g(a, lam_r, q, xp)
    for _ in range(_UNDERFLOW_TOP_STEPS):
        t = g(xp.maximum(a - t, xp.zeros_like(a)), lam_r, q, xp)
    top = t - ref
    # Only up, within the bracket, and where the iteration has converged (one more step moves t by a few
    # ulps at most).  Not "where the key is still saturated", a - t >= g^-1(t): at its own fixed point
    # that holds only up to rounding, and pow(t, 1 / (q - 1)) of a tiny t is off by |ln t| times the
    # exponent's rounding (17 ulps at t = 1e-88, q = 4), so the key read as unsaturated there and
    # the row stayed at the bottom (x = (-4.7e-151, -1.2e-44, -9.8e-125), k = 1, l = 1.09, p = 4/3).
    # Read as free at the top, the key is saturated for the Jacobian (`_rounded_to_saturation`).
    step = g(xp.maximum(a - t, xp.zeros_like(a)), lam_r, q, xp) - t
    converged = xp.abs(step) <= 16.0 * xp.finfo(an.dtype).eps * t
    return xp.where(stretch & (a > 0) & (top > delta) & (top <= hi) & converged, top, delta)


def _mag_unresolved(
    out: Any, x: Any, signs: Any, c: Any, an: Any, d: Any, ref: Any, sat: Any, free: Any, z: Any, t: Any,
    lam_r: Any, kkf: Any, lo: Any, hi: Any, rows: Any, q: float, xp: Any,
) -> Any:
    """`_mask_unresolved` for the magnitude: where no float threshold meets ``sum(y) = k`` (the weights
    ``y = z / t``, 1 on the saturated set), the outputs interpolated between the bracket's ends.

    Free entries at the threshold have ``r = l (y t)^(p-1)``, which underflows in every frame for tied
    keys far below the strength's scale (keys near 1e-221 at l = 6017, p = 5; or 1e-200 at l = 0.85):
    the ties came back kept or dropped together, 21-33% of the largest output off.  Interpolated, a tie
    sharing ``k - |S|`` places gets ``y |x|`` each, its limit there.
    """
    zero = xp.zeros_like(an)

    def weights(sat_e: Any, free_e: Any, z_e: Any, t_e: Any) -> Any:
        """(batch, 1): ``sum(y)`` (with ``t <= 0`` read as 1)."""
        free_sum = xp.sum(xp.where(free_e, z_e, zero), axis=-1, keepdims=True) / xp.where(t_e > 0, t_e, 1.0)
        return xp.astype(count(sat_e, xp), kkf.dtype) + free_sum

    def at(delta: Any) -> tuple[Any, Any]:
        r_e, rc_e, _, sat_e, free_e, t_e = _mag_pieces(delta, d, ref, lam_r, q, xp)
        z_e = g(rc_e, lam_r, q, xp)
        level = xp.where(sat_e, an, xp.where(free_e, z_e + r_e, zero))
        ends = weights(sat_e, free_e, z_e, t_e)
        return xp.where(t_e > 0, ends, xp.full_like(ends, -1.0)), level  # (no bracket end at t <= 0)

    w_lo, level_lo = at(lo)
    w_hi, level_hi = at(hi)
    use, theta = _unresolved_rows(weights(sat, free, z, t), kkf, rows, w_lo, w_hi, xp)
    moved = use & (level_lo != level_hi)
    level = level_hi + theta * (level_lo - level_hi)
    return xp.where(moved, signs * xp.minimum(level / c, xp.abs(x)), out)


def threshold_mag(
    x: Any, k: int, lam: float, q: float, xp: Any, *, max_iter: int | None = None, tol: float | None = None,
    loop: Callable[..., Any] | None = None, stage: Stage | None = None,
    order_statistics: OrderStatistics | None = None,
) -> tuple[Any, MagResiduals]:
    """Soft top-k in magnitude of (batch, n) rows by the threshold method, with its residuals.

    Parameters and returns as in `threshold_mask` (residuals `MagResiduals`).
    """
    check_strength(lam, x.dtype, xp, "threshold")
    fuse = _as_is if stage is None else stage
    dt = x.dtype
    rtol, ulps, iters, guard = _controls(dt, max_iter, tol, xp)
    p, emax, lam_lo, lam_hi = _mag_scales(lam, q, dt, xp)
    frame = fuse(_mag_frame)(x, k, lam, q, rtol, p, emax, lam_lo, lam_hi, xp)
    depth = 2.0 ** -(emax // 2)
    frame = _mag_deep_frames(
        frame, lambda saturating: fuse(_mag_frame)(x, k, lam, q, rtol, p, emax, lam_lo, lam_hi, xp, saturating),
        lambda fr: fuse(_mag_deep_rows)(fr.an, fr.hi, fr.lam_r, fr.kk, fr.solve, depth, q, xp),
        lambda fr: fuse(_mag_deep_cut)(fr.an, fr.hi, fr.lam_r, fr.kkf, fr.solve, depth, q, xp), xp, loop,
    )
    x, nan_rows, infinite, fin, kk, kkf, nonzero, n_nonzero, solve, c, lam_r, an, lo, hi, ftol, floor, start = frame
    if _starts_at_first_block(order_statistics, k, x.shape[-1], q):
        kth, after = order_statistics(an, k)  # as for the mask: outside the stages
        start = fuse(_mag_block_start)(kth, after, lam_r, lo, hi, solve & xp.all(fin, axis=-1, keepdims=True), start,
                                       q, xp)

    def evaluate(delta: Any, d: Any, ref: Any, lam_r: Any, kkf: Any) -> tuple[Any, ...]:
        return _mag_evaluate(delta, d, ref, lam_r, kkf, q, guard, xp)

    zero_ref = xp.zeros_like(hi)
    t, lo1, hi1 = _root(
        evaluate, (an, zero_ref, lam_r, kkf), lo, hi, solve, ftol, rtol, floor, ulps, q == 2.0, iters, xp, loop,
        start=start, leave_last=True,
    )
    d, ref, delta, lo1, hi1 = _mag_recentre(
        evaluate, an, nonzero, t, lo1, hi1, lo, hi, lam_r, kkf, solve, ftol, rtol, ulps, q, guard, iters, xp, loop,
        fuse,
    )
    out, gprime, codes, offset = fuse(_mag_output)(
        x, k, q, guard, nan_rows, infinite, fin, kk, kkf, nonzero, n_nonzero, solve, c, lam_r, an, d, ref, delta,
        lo1, hi1, xp,
    )
    return out, poison(MagResiduals(None, None, None, None, gprime, codes, offset), nan_rows, xp)
