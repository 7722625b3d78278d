"""Dykstra's alternating projections for the isotonic step, p = 2 only (spec section 4).

After sorting (``argsort`` + ``take_along_axis``), the isotonic problem of the
p = 2 operators is a weighted projection onto the chain
``v_1 >= v_2 >= ... >= v_n``:

* mask: unit weights, target ``s - l w``;
* magnitude: weights ``1 + l w``, target ``s / (1 + l w)``.

The chain is the intersection of ``A = {v_1 >= v_2, v_3 >= v_4, ...}`` and
``B = {v_2 >= v_3, v_4 >= v_5, ...}``.  Projecting onto either is one
vectorized operation on disjoint pairs (a violating pair takes its weighted
mean), applied to all rows at once; Dykstra's algorithm alternates the two
with correction terms and converges to the projection onto the intersection.

Stopping: after at most `max_iter` iterations (default `DEFAULT_MAX_ITER`), or
earlier, checked every `CHECK_EVERY` iterations, once the largest change of
the iterate over one iteration, less 4 ulps of the iterate (rounding, not
progress), is at most ``tol`` times a unit (default `DEFAULT_TOL`): ``l`` for
the mask (``v / l`` is on the scale of its output), ``l min(1, c / (1 + l))``
for the magnitude, ``c`` the row's k-th largest ``|x|`` (`_mag_tol_unit`: its
outputs are at most ``|x|``).  Stopped by `max_iter` first, on arrays that can
be read, it warns `DykstraNotConverged`.  Traced arrays (``jax.jit``) cannot
be read: they always run `max_iter` iterations.

Blocks (the one place where a tolerance is unavoidable): the solution of these
two problems has at most one pooled block, the one that straddles the k-th
sorted position (the unconstrained targets are already non-increasing on both
sides of it; see `topk_core._pav.kernels`).  It is read from the converged
iterate as the run of adjacent links around position k that are (a) *active*:
the pair was pooled by the last projection onto its set (its Dykstra
correction is non-zero, exactly 0 otherwise), and (b) *closed*: the two values
differ by at most ``block_tol = BLOCK_TOL_FACTOR * sqrt(tol)`` times the unit, plus
``BLOCK_TOL_FACTOR * sqrt(4 eps)`` times the larger of the two: the stopping
test's rounding allowance of 4 ulps of the iterate, treated as `tol` is.  The
iterate's round-off grows with it, and the magnitude's iterate with ``|x|``:
with the absolute part alone, converged blocks (and tied entries) were split
from ``|x| ~ 1e6`` in float32 and ``1e14`` in float64 on.  Criterion
(a) keeps tied entries that were never pooled (e.g. two tied saturated
entries) out of the block, whatever the tolerance, so they get the exact zero
(mask) or identity (magnitude) derivative.  The block's value is then
recomputed exactly as the weighted mean of its targets, so that outputs,
blocks and the closed-form Jacobian of `jacobians.py` agree with each other;
when the blocks are right (Dykstra converged) the result equals PAV's up to
round-off.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from .._compat import default_int, device
from .assemble import assemble_mag, assemble_mask, kth_key
from .common import all_true, count, nan_rows_of, poison, positions
from .residuals import MagResiduals, MaskResiduals
from .threshold import check_strength


class DykstraNotConverged(UserWarning):
    """Warned when `method="dykstra"` reaches `max_iter` on readable arrays before its tolerance is met."""


DEFAULT_MAX_ITER = 1000
"""Iteration cap (`max_iter=None`).  Dykstra needs O(L^2) iterations for a
pooled block of length L: a few tens for the blocks of MoE-sized rows, far
more than this for blocks of hundreds of entries (the result is then an
approximation, with blocks read from the last iterate)."""

DEFAULT_TOL = 1e-7
"""Stopping tolerance (`tol=None`) on the largest change of the iterate over one iteration, in units of
``l`` (mask) or ``l min(1, c / (1 + l))`` (magnitude; see the module's docstring)."""

CHECK_EVERY = 8
"""The stopping test (a reduction and a host read) runs every this many iterations."""

BLOCK_TOL_FACTOR = 10.0


def _pairs(w: Any, xp: Any) -> Any:
    batch, length = w.shape
    return xp.reshape(w, (batch, length // 2, 2))


def _project(z: Any, coef: Any, active: Any, xp: Any) -> Any:
    """Weighted projection of disjoint pairs ``(z[..., 0], z[..., 1])`` onto ``left >= right``."""
    left, right = z[..., 0], z[..., 1]
    mean = left + coef * (right - left)  # coef = w_right / (w_left + w_right)
    pool = (left < right) & active
    return xp.where(pool[..., None], mean[..., None], z)


def _project_a(z: Any, coef_a: Any, act_a: Any, xp: Any) -> Any:
    batch, length = z.shape
    core = _project(_pairs(z[:, 1 : length - 1], xp), coef_a, act_a, xp)
    return xp.concat([z[:, :1], xp.reshape(core, (batch, length - 2)), z[:, length - 1 :]], axis=-1)


def _project_b(z: Any, coef_b: Any, act_b: Any, xp: Any) -> Any:
    return xp.reshape(_project(_pairs(z, xp), coef_b, act_b, xp), z.shape)


def _padded(v: Any, length: int, xp: Any) -> Any:
    """Working layout: one pad in front, pads at the end up to an even `length`."""
    n = v.shape[-1]
    zero = xp.zeros_like(v[:, :1])
    return xp.concat([zero, v] + [zero] * (length - n - 1), axis=-1)


def isotonic_dykstra(
    target: Any, weight: Any, active: Any, max_iter: int, tol: Any, xp: Any, loop: Callable[..., Any] | None = None
) -> tuple[Any, Any]:
    """Weighted decreasing isotonic regression of (batch, n) rows by Dykstra's algorithm.

    Parameters
    ----------
    target, weight : (batch, n) float arrays (weights > 0; `weight=None` means 1)
    active : (batch, n) bool
        Entries that take part; a pair is projected only when both are active.
    max_iter : int
    tol : (batch, 1) float array
        Stop when the largest change of a row's iterate over one iteration,
        less 4 ulps of the iterate, is at most its `tol` (checked every
        `CHECK_EVERY` iterations).
    loop : callable, optional
        ``loop(cond, body, state)`` with the semantics of
        ``jax.lax.while_loop`` (checked every iteration), instead of a Python
        loop that a tracer would unroll `max_iter` times.

    Returns
    -------
    v : (batch, n) array
        The last iterate.
    pooled_link : (batch, n - 1) bool
        Whether the link between entries i and i + 1 was pooled by the last
        projection onto its set (non-zero Dykstra correction).
    """
    n = target.shape[-1]
    length = n + 2 + (n % 2)
    act = _padded(xp.astype(active, target.dtype), length, xp) > 0
    act_a_pairs = _pairs(act[:, 1 : length - 1], xp)
    act_b_pairs = _pairs(act, xp)
    act_a = act_a_pairs[..., 0] & act_a_pairs[..., 1]
    act_b = act_b_pairs[..., 0] & act_b_pairs[..., 1]
    if weight is None:
        coef_a = coef_b = 0.5
    else:
        w = _padded(weight, length, xp) + xp.astype(~act, target.dtype)  # pads weigh 1 (never pooled)
        wa, wb = _pairs(w[:, 1 : length - 1], xp), _pairs(w, xp)
        coef_a = wa[..., 1] / (wa[..., 0] + wa[..., 1])
        coef_b = wb[..., 1] / (wb[..., 0] + wb[..., 1])
    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        x, p, c, it, _ = state
        z = x + p
        y = _project_a(z, coef_a, act_a, xp)
        p = z - y
        z = y + c
        x_next = _project_b(z, coef_b, act_b, xp)
        c = z - x_next
        return x_next, p, c, it + 1, x_next - x

    # A change of a few ulps of the iterate is rounding, not progress (float32 iterates near 1
    # move by ~1e-7 for ever, and a float32 tolerance of 1e-7 l was never met).
    ulps = 4.0 * float(xp.finfo(target.dtype).eps)
    x = _padded(target, length, xp)
    zero = xp.zeros_like(x)
    state = (x, zero, zero, xp.zeros((), dtype=default_int(xp), device=device(x)), zero)
    if loop is not None:
        def cond(st: tuple[Any, ...]) -> Any:
            moving = xp.any(_largest_change(st, ulps, xp) > tol)
            return (st[3] < max_iter) & (moving | (st[3] == 0))

        state = loop(cond, body, state)
    else:
        settled = None
        for it in range(1, max_iter + 1):
            state = body(state)
            if it % CHECK_EVERY == 0 or it == max_iter:
                settled = all_true(_largest_change(state, ulps, xp) <= tol, xp)
                if settled:
                    break
        if settled is False:
            # Readable arrays only (traced ones cannot be read): the result is an approximation.
            warnings.warn(
                f"method='dykstra' stopped at max_iter={max_iter} before its tolerance was met: the result "
                "is an approximation (a pooled block of L entries needs O(L^2) iterations); raise max_iter, "
                "or use method='pav' or 'threshold', which are exact",
                DykstraNotConverged,
                stacklevel=2,
            )
    x, p, c = state[0], state[1], state[2]
    v = x[:, 1 : n + 1]
    # Link j joins entries j and j + 1 (working index j + 1): set A for even j, B for odd j.
    j = positions(n - 1, x, xp)
    pooled_link = xp.where(j % 2 == 0, p[:, 1:n] != 0, c[:, 1:n] != 0)
    return v, pooled_link


def _largest_change(state: tuple[Any, ...], ulps: float, xp: Any) -> Any:
    """(batch, 1): the largest change of a row's iterate over the last iteration, less `ulps` of the iterate."""
    return xp.max(xp.abs(state[4]) - ulps * xp.abs(state[0]), axis=-1, keepdims=True)


def _controls(max_iter: int | None, tol: float | None) -> tuple[int, float]:
    return DEFAULT_MAX_ITER if max_iter is None else int(max_iter), DEFAULT_TOL if tol is None else float(tol)


def _boundary_block(
    v: Any, pooled_link: Any, lo: Any, hi: Any, kk: Any, block_tol: Any, xp: Any
) -> tuple[Any, Any, Any, Any]:
    """The pooled block around the k-th position of the finite segment, from the iterate.

    Returns ``block_start``, ``block_end`` (batch, n) integer arrays, the (batch, n)
    membership mask and the (batch, 1) flag of rows that have a pooled block.
    """
    n = v.shape[-1]
    pos = positions(n, v, xp)
    if n == 1:
        start = pos + xp.zeros_like(kk)  # n = 1: (batch, 1), every entry its own block
        none = start > 0
        return start, start, none, none
    j = pos[:, : n - 1]
    left, right = v[:, :-1], v[:, 1:]
    # Closed: within `block_tol`, or within the iterate's round-off, which grows with |v| (the
    # magnitude's with |x|): the stopping test discounts 4 ulps of the iterate as rounding, and a
    # converged block stopped there differs by a few ulps of |v| from link to link (float32 rows
    # near 1e6 and float64 rows near 1e14 split their blocks, and tied entries, at l = 0.1).
    scale = xp.maximum(xp.abs(left), xp.abs(right))
    closed = xp.abs(left - right) <= block_tol + _block_rtol(v.dtype, xp) * scale
    linked = pooled_link & closed & (j >= lo) & (j < hi - 1)
    split = lo + kk  # the boundary is the link split - 1 (between split - 1 and split)
    has = (kk > 0) & (kk < hi - lo)
    has = has & xp.take_along_axis(linked, xp.clip(split - 1, 0, n - 2), axis=-1)
    broken = ~linked
    start = xp.max(xp.where(broken & (j < split - 1), j + 1, lo), axis=-1, keepdims=True)
    end = xp.min(xp.where(broken & (j >= split - 1), j, hi - 1), axis=-1, keepdims=True)
    inside = has & (pos >= start) & (pos <= end)
    return xp.where(inside, start, pos), xp.where(inside, end, pos), inside, has


def _block_rtol(dtype: Any, xp: Any) -> float:
    """The relative part of the block tolerance: `BLOCK_TOL_FACTOR` times the square root of the
    stopping test's rounding allowance, 4 ulps (as the absolute part is of `tol`)."""
    return BLOCK_TOL_FACTOR * math.sqrt(4.0 * float(xp.finfo(dtype).eps))


def _mag_tol_unit(s: Any, lo: Any, shift: Any, lam: Any, xp: Any) -> Any:
    """(batch, 1): the magnitude's unit of `tol`, ``l min(1, c / (1 + l))``.

    An output moves by ``(1 + l) / l`` times its iterate (``g(r) + r`` at
    p = 2), and is at most ``|x|``: a change of ``tol`` times this unit moves
    an output by at most ``tol`` times ``min(1 + l, c)``, relative to the
    output's own scale ``c`` (the k-th largest finite ``|x|``, or the largest
    where that is 0) when ``|x|`` is small next to ``l``.  (With ``tol l``
    alone, rows of ``|x| ~ 1e-6`` at ``l = 1`` stopped 1.5e-2 off.)
    """
    scale = xp.where(shift > 0, shift, kth_key(s, lo, 1, xp))  # the k-th, or the largest finite key
    return lam * xp.minimum(xp.ones_like(scale), scale / (1.0 + lam))


def _sorted_rows(keys: Any, xp: Any) -> tuple[Any, Any]:
    perm = xp.argsort(keys, axis=-1, descending=True, stable=True)
    return perm, xp.argsort(perm, axis=-1, stable=True)


def _check_q(q: float) -> None:
    if q != 2.0:
        raise ValueError(f"method='dykstra' solves the p = 2 operators only; got p = {q / (q - 1.0)!r}")


def dykstra_mask(
    x: Any, k: int, lam: float, q: float, xp: Any, *, max_iter: int | None = None, tol: float | None = None,
    loop: Callable[..., Any] | None = None,
) -> tuple[Any, MaskResiduals]:
    """Soft top-k mask (p = 2) of (batch, n) rows by Dykstra's algorithm, with its residuals.

    Parameters
    ----------
    x : (batch, n) real floating array of any Array-API namespace
    k : int
    lam : float
        Regularization strength ``l > 0``, or a 0-d array of `x`'s dtype (e.g. traced, so that one
        compiled program serves every strength) that the caller has checked
        (`threshold.check_strength`).
    q : float
        Must be 2 (``p = 2``).
    xp : namespace
    max_iter, tol : optional
        Iteration cap (default `DEFAULT_MAX_ITER`) and stopping tolerance on
        the change of the iterate in units of ``l`` (mask) or
        ``l min(1, c / (1 + l))`` (magnitude) (default `DEFAULT_TOL`).
    loop : callable, optional
        A structured loop such as ``jax.lax.while_loop`` (see `isotonic_dykstra`).

    Returns
    -------
    y : (batch, n) array
    residuals : MaskResiduals
        Sorting permutation, its inverse and the blocks read from the iterate.
    """
    _check_q(q)
    iters, rtol = _controls(max_iter, tol)
    check_strength(lam, x.dtype, xp, "dykstra")
    n = x.shape[-1]
    x, nan_rows = nan_rows_of(x, xp)
    perm, inv = _sorted_rows(x, xp)
    s = xp.take_along_axis(x, perm, axis=-1)
    n_pos, n_neg = count(s == xp.inf, xp), count(s == -xp.inf, xp)
    n_fin = n - n_pos - n_neg
    lo, hi, kk = n_pos, n - n_neg, xp.minimum(xp.maximum(k - n_pos, 0), n_fin)
    s = xp.where(xp.isfinite(s), s, xp.zeros_like(s))
    # Relative to the k-th key (shift invariant): near the threshold the keys are then small exact
    # differences (Sterbenz), and target = s - l w keeps l where it is below the keys' ulp (float32
    # ties at l = 1e-10 came back 1 and 0 instead of 0.5 and 0.5); the pool of a tie splits it.
    s = s - kth_key(s, lo, kk, xp)
    pos = positions(n, s, xp)
    unit = (pos >= lo) & (pos < lo + kk)
    target = s - lam * xp.astype(unit, s.dtype)
    active = (pos >= lo) & (pos < hi)
    tol_rows = xp.full_like(s[:, :1], rtol * lam)
    v, pooled_link = isotonic_dykstra(target, None, active, iters, tol_rows, xp, loop)
    bstart, bend, inside, _ = _boundary_block(
        v, pooled_link, lo, hi, kk, BLOCK_TOL_FACTOR * math.sqrt(rtol) * lam, xp
    )
    zero = xp.zeros_like(target)
    size = xp.astype(count(inside, xp), s.dtype)
    gamma = xp.sum(xp.where(inside, target, zero), axis=-1, keepdims=True) / xp.where(size > 0, size, 1.0)
    v = xp.where(inside, gamma, target)
    y, res = assemble_mask(s, v, perm, inv, bstart, bend, lo, kk, lam, q, xp)
    y = xp.take_along_axis(y, inv, axis=-1)
    # Infinite entries (the PAV rule): +inf selected first, -inf last, ties sharing evenly.
    dt = y.dtype
    share_pos = xp.minimum(1.0, k / xp.astype(xp.maximum(n_pos, 1), dt))
    share_neg = xp.astype(xp.maximum(k - n_pos - n_fin, 0), dt) / xp.astype(xp.maximum(n_neg, 1), dt)
    y = xp.where(x == xp.inf, share_pos, xp.where(x == -xp.inf, share_neg, y))
    y = xp.where(nan_rows, xp.nan, y)
    return y, poison(res, nan_rows, xp)


def dykstra_mag(
    x: Any, k: int, lam: float, q: float, xp: Any, *, max_iter: int | None = None, tol: float | None = None,
    loop: Callable[..., Any] | None = None,
) -> tuple[Any, MagResiduals]:
    """Soft top-k in magnitude (p = 2) of (batch, n) rows by Dykstra's algorithm, with its residuals.

    Parameters and returns as in `dykstra_mask` (residuals `MagResiduals`).
    """
    _check_q(q)
    iters, rtol = _controls(max_iter, tol)
    check_strength(lam, x.dtype, xp, "dykstra")
    n = x.shape[-1]
    x, nan_rows = nan_rows_of(x, xp)
    perm, inv = _sorted_rows(xp.abs(x), xp)
    x_sorted = xp.take_along_axis(x, perm, axis=-1)
    s = xp.abs(x_sorted)
    n_inf = count(s == xp.inf, xp)
    lo, hi, kk = n_inf, xp.full_like(n_inf, n), xp.minimum(xp.maximum(k - n_inf, 0), n - n_inf)
    s = xp.where(xp.isfinite(s), s, xp.zeros_like(s))
    pos = positions(n, s, xp)
    unit = xp.astype((pos >= lo) & (pos < lo + kk), s.dtype)
    weight = 1.0 + lam * unit
    # Iterates relative to the k-th key (as the mask's): v = shift + v', with the targets
    # s / w - shift = u / w - (l / (1 + l)) shift w' from the exact differences u = s - shift (w'
    # the unit weights; neither term can overflow); formed as s / w, a tie at a small strength
    # rounds onto one value and stays unsplit.
    shift = kth_key(s, lo, kk, xp)
    u = s - shift
    target = u / weight - (lam / (1.0 + lam)) * shift * unit
    unit_rows = _mag_tol_unit(s, lo, shift, lam, xp)
    v, pooled_link = isotonic_dykstra(target, weight, pos >= lo, iters, rtol * unit_rows, xp, loop)
    bstart, bend, inside, _ = _boundary_block(
        v, pooled_link, lo, hi, kk, BLOCK_TOL_FACTOR * math.sqrt(rtol) * unit_rows, xp
    )
    zero = xp.zeros_like(s)
    wsum = xp.sum(xp.where(inside, weight, zero), axis=-1, keepdims=True)
    # The weighted mean of the targets, with the weights normalized first (w t could overflow).
    share = weight / xp.where(wsum > 0, wsum, 1.0)
    gamma = xp.sum(xp.where(inside, share * target, zero), axis=-1, keepdims=True)
    v = xp.where(inside, gamma, target)
    out, res = assemble_mag(s, x_sorted, v, perm, inv, bstart, bend, lo, kk, lam, q, xp, shift=shift)
    out = xp.take_along_axis(out, inv, axis=-1)
    out = xp.where(nan_rows, xp.nan, out)
    return out, poison(res, nan_rows, xp)
