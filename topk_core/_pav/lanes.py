"""Many short rows solved side by side, one SIMD lane per row: the CPU fast path for p = 2 and 4/3.

For rows of at most `LANE_MAX_N` entries (`CUBIC_LANE_MAX_N` for p = 4/3; longer ones, up to
`select.SMALL_K_LANE_MAX_N`, when k is small), the per-row
work of the selection kernel (classification, ordering of the candidates, pooled block) is scalar
code whose branches depend on the data, and costs more than a vectorized sort
of the row.  Here `LANES` rows are transposed at a time (by 8 x 8 blocks in
registers, module `transpose`), so that every step
works on one entry of `LANES` rows at once, and each row's threshold (spec
section 5) is found by iterating on its sets (``e = (key - threshold) / l``,
``g = e^(q - 1)``):

* mask: ``S = {e >= 1}``, ``F = {0 < e < 1}`` and ``|S| + sum_F g = k``;
* magnitude: ``A = {g >= t}``, ``F = {e > 0, g < t}`` and
  ``|A| + sum_F g / t = k`` (t the absolute threshold);

both in the row's frame: keys and threshold relative to the k-th largest key
(as in `kernels._row_frame`), so that ``key - threshold`` does not cancel.

The iteration starts from PAV's first block (the k-th and (k+1)-th keys, one
unit weight), usually the answer, and a row is solved when the sets at its
iterate are those the iterate was computed from: the sets are level sets of
the keys, so equal counts mean equal sets (the start counts as computed from
|S| = k - 1, |F| = 2, so one pass can confirm it).  Each step is safeguarded
by the bracket that the row's two order statistics give (module `select`).

* p = 2: the equation is linear on fixed sets, so each step solves it
  exactly on the sets of the current iterate (PAV's closed form for the
  block ``F``; a Newton step on the piecewise-linear `sum(y)`).
* p = 4/3: a cubic on fixed sets.  The start solves the first block's cubic
  by Halley steps from bounds of its root (`_cubic_start`: no cube root, so
  it vectorizes too); a pass gathers ``sum_F e``, ``sum_F e^2`` and
  ``sum_F e^3`` at the iterate, and the step solves the cubic of those sets
  from these sums by Newton steps per lane (no further pass over the
  entries), so it too is exact on the sets of its iterate.

The last pass a row needs, the one that finds the sets its iterate came
from, is the outputs': they are written at every lane's iterate, and the
sets counted as they are written confirm the lanes whose iterate is the
root of the sets it came from (`_confirm`: each step records whether its
root converged).  A row solved at the start, or after one step, costs no
pass of its own.

A group iterates until its slowest lane has converged.  Measured, a few
passes over every group (`lane_passes`: one to three, the outputs'
included), then a second lane solve of the rows left, gathered into full
groups of their own (`lane_retry_passes`, driven by
`select.topk_rows_select`), beats passes over every group until all have
converged.

Rows not solved within their passes, and rows that need what the lanes do
not do (a rescaled frame, a magnitude row with at most k non-zero keys, a
magnitude threshold far below the keys that the lanes' frame does not
resolve), are flagged and solved again by the selection kernel.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._scalar import lower_bracket_relative, quadratic_fixed_point
from .kernels import _compiled_pair, _in_unit_range, _quadratic_block_value, _unit_scale, far_below, set_code
from .transpose import BLOCK, lanes_to_rows, rows_to_lanes
from .vector_width import prefer_wide_vectors, unfolded_one

# Rows processed side by side (one SIMD lane each).
LANES = 64
# From this row length on, a solve with residuals writes outputs and residuals row by row from x at
# each row's threshold (`_row_outputs`), not in the lane layout then transposed back (two
# transpositions, outputs and g').  Measured (float32, k = n/10, 1M entries, fresh processes,
# interleaved, forward+VJP, ratios to np.sort): n = 64: mask 1.34-1.45 -> 1.20-1.35 (p = 2),
# 1.47-1.60 -> 1.31-1.48 (p = 4/3), magnitude 1.67-1.96 -> 1.64-1.72 (p = 4/3), p = 2 within noise;
# n = 80 and 48 alike or better; n = 32 worse for the p = 2 mask (1.56-1.65 -> 1.61-1.77).  The
# mask's forward alone keeps the lane layout: row by row it was no faster at 64 and slower at 32-48
# (0.57-0.61 -> 0.62-0.70 at 48, p = 2 mask): the loop over a row is short for the vector units.
# The magnitude's forward goes row by row too (`_mag_row_values`): on an AMD EPYC with AVX2 its
# forwards took 0.91-0.95x their time at (16384, 64) and (21846, 48), p = 2 and 4/3 (interleaved,
# `benchmarks/ab_versions.py`; the lane solver alone, `bench_lanes.py`: 0.66-0.87x at n = 64),
# not measured on an AVX-512 CPU.
ROW_OUTPUTS_MIN_N = 48
# Rows up to this length take the lanes (p = 2 and 4/3): measured against the selection kernel
# (the whole forward with the lanes on and off, rows handed back included; float32, k = n/8,
# 4M entries, best of 21 runs; benchmarks/bench_lanes.py, table in docs/methods.md), the
# lanes take 0.13-0.46x its time at n <= 24, 0.28-0.58x at 32-96, 0.47-0.83x at 128-256 (with
# residuals alike; earlier, k = n/2 and k = 4: 0.45-0.9x; l = 1 and 10: 0.03-0.3x), and 1.2-1.57x
# at 384-512 for p = 2, where k + 1 > 33 takes the order statistics from a sort and the sort-free
# route serves p = 2 (an Intel Xeon with AVX-512; the limit was 80 before the three-deep sweeps,
# the finiteness check in the lanes and the row-by-row write-back with residuals).  Longer rows
# with a small k: `select.SMALL_K_LANE_MAX_N`.
LANE_MAX_N = 256
# The same for p = 4/3, whose selection kernel costs more (its blocks' cubics) and whose sort-free
# route starts at 768: the lanes took 0.5-0.75x its time at 512 for k = 4 and 256, 0.7-1.0x for
# k = n/8 (0.75-1.05x at 384), 0.7-1.0x at 640, and lost at 768 (1.0-1.35x).
CUBIC_LANE_MAX_N = 512
# Steps per row in the second lane solve before a row is handed to the selection kernel
# (random rows need 2-4).
MAX_PASSES = 16
# One pass over every group for rows up to FIRST_PASSES_N[0] entries, two beyond (three for
# the p = 2 magnitude beyond FIRST_PASSES_N[1]; the outputs' pass counts: `lane_rows`; the
# measurement below predates that, when it came after them), then a second lane solve of the rows left,
# gathered into full groups (at most MAX_PASSES there).  Measured against MAX_PASSES over every
# group (float32, k = n/8, 4M entries): 0.9-0.94x its time for the p = 2 mask, 0.93-1.0x for
# its magnitude, 0.88-1.0x for p = 4/3, at n = 8-96; one pass more or fewer was slower.
FIRST_PASSES_N = (24, 48)
# After those passes a group with more than this many rows still iterating goes on (up to
# MAX_PASSES): rows left to the second lane solve start again from their order statistics, which
# costs more than a pass over the group when many are left.  Larger strengths move the sets
# further from the start: with l = 1 or 10, 80-100% of random rows were left (the p = 4/3
# magnitude, n = 16 and 64), and the forwards took 1.5-3x their time at l = 0.1.  Measured
# (float32, k = n/10, 1M and 4M entries, l = 0.1, 1, 10, both operators and exponents, best of 7),
# against no such rule: at l = 1 and 10 0.5-0.8x the time ((262144, 16): the p = 2 mask 15.6-18
# -> 10.5-11.5 ms at l = 10, the p = 4/3 magnitude 17-21.7 -> 11.4-12.5 ms at l = 1), at l = 0.1
# 0.9-1.0x; 8 and 32 were the same within the noise (benchmarks/bench_strengths.py: the p = 2
# magnitude at n = 64, which makes three passes anyway, the same at every strength).
BUSY_LANES = 16
_EPS = np.finfo(np.float64).eps
# Largest entries that each sweep of `sweep_order_statistics` takes out of every lane: a sweep
# loads and stores an entry and the running values of every lane once, however deep its cascade.
# Against one per sweep (`select.lane_order_statistics`, float32 rows of 64, 1M entries, fresh
# processes, interleaved): 0.85-0.9x the time at k + 1 = 9 and 17.  Four would waste three levels
# at k + 1 = 9.
SWEEP_DEPTH = 3
# A lane's sets are counted in one sum, |S| + FREE_WEIGHT |F| (`_set_code`): more than the longest
# row the lanes take (`select.SMALL_K_LANE_MAX_N`), so that equal sums mean equal counts (and so
# equal sets).
FREE_WEIGHT = 4096.0
# The row-index argument (`subset`, `rows`) of the kernels meaning every row.
EVERY_ROW = np.empty(0, dtype=np.int64)
# A row has converged when its Newton step is at most this many ulps of its scale.
_STEP_ULPS = 8.0
# Newton steps on a cubic of fixed sets (p = 4/3, `_step`), from the previous iterate: quadratic
# convergence from a few tens of percent.  The last one's size must say the root converged, for the
# outputs' pass to confirm it (`_confirm`): with five, 1-1.2% of random rows of 64 more than with a
# pass to confirm them were left to the second lane solve, with six none.
_CUBIC_NEWTON = 6
_CBRT_HALF_UP = 0.7937005259841  # >= 0.5^(1/3)
# Halley steps on the first block's cubic (`_cubic_start`).
_CUBIC_HALLEY = 3
# Newton steps toward the magnitude's lower bracket (p = 4/3), from above: any iterate is a bound.
_BRACKET_NEWTON = 2


def lanes_serve(q: float, lam: float) -> bool:
    """Whether the lane solver serves exponent `q` and strength `lam` (rows of some length)."""
    # A strength the mask's frame would rescale (`kernels._row_frame`) stays with the selection kernel.
    return (q == 2.0 or q == 4.0) and _unit_scale(lam) == 1.0


def lanes_apply(n: int, q: float, lam: float) -> bool:
    """Whether the lane solver serves rows of `n` entries, exponent `q` and strength `lam`, whatever k (longer
    rows with a small k: `select.lane_route`)."""
    longest = LANE_MAX_N if q == 2.0 else CUBIC_LANE_MAX_N
    return n <= longest and lanes_serve(q, lam)


def lane_passes(q: float, n: int, is_mag: bool) -> int:
    """The passes over every group of rows of `n` entries the lane solver makes (at most, the outputs' included)
    for exponent `q` before the rows left are handed on (to a second lane solve, `lane_retry_passes`)."""
    # Longer rows, and the magnitude's, move their sets more often after the start (random rows,
    # p = 2, left after one pass: mask 3% at n = 16, 13% at 32, 38% at 64; magnitude 9%, 30%, 67%).
    return 1 + (n > FIRST_PASSES_N[0]) + (q == 2.0 and is_mag and n > FIRST_PASSES_N[1])


def busy_lanes() -> int:
    """How many rows of a group may still iterate after its `lane_passes` for the group to stop there
    (more go on, up to MAX_PASSES: see `BUSY_LANES`)."""
    return BUSY_LANES


def lane_retry_passes(q: float) -> int:
    """The passes of a second lane solve on the rows the first left (0: none, they go to the selection kernel)."""
    return MAX_PASSES


@nb.njit(cache=True, inline="always", error_model="numpy")
def _entry_sets(a, t, inv, q, is_mag, level):
    """(e, g, saturated, free) of a key `a` at threshold `t`, both relative to the lane's `ref` (inv = 1 / l):
    the one definition of the sets.  ``e = (a - t) / l`` and ``g = e^(q - 1)`` (q = 2 or 4).
    `level` (see `_levels`) is the magnitude's saturation level, the absolute threshold
    ``ref + t``, or the mask's, l itself: the mask saturates at ``a - t >= l``, compared
    without the rounding of e (or e^3), so that a row without a violator, solved at
    ``t = s_(k) - l``, gives exact ones."""
    e = (a - t) * inv
    g = e if q == 2.0 else e * e * e
    sat = g >= level if is_mag else a - t >= level
    return e, g, sat, (e > 0.0) & ~sat


@nb.njit(cache=True, inline="always", error_model="numpy")
def _lane_key(raw, j, lane, ref, is_mag):
    """Entry `j` of a lane's row as the lanes solve it, from the row as loaded (`raw`): `_relative_key`."""
    return _relative_key(raw[j, lane], ref, is_mag)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _relative_key(xj, ref, is_mag):
    """An entry `xj` as the lanes solve it: its key (x, or the magnitude's |x|) relative to its lane's `ref`, in
    float64 (the one definition, for the passes and both ways of writing the outputs)."""
    key = float(xj)
    return (abs(key) if is_mag else key) - ref


@nb.njit(cache=True, error_model="numpy")
def _pass(raw, ref, tau, level, lam, q, is_mag, acc):
    """Per lane, at its threshold: |S| (|A|), |F| and the sums over F the step needs.

    p = 2: ``sum_F e`` (mask) or ``sum_F (|x| - ref)`` (magnitude) in ``acc[2]``
    (``acc[3:5]`` stay 0); p = 4/3: ``sum_F e``, ``sum_F e^2``, ``sum_F e^3`` in
    ``acc[2:5]``.  A loop over the lanes, which the compiler vectorizes, per
    four entries: the sums stay in registers across them (measured 20% faster
    than one entry per loop, whose sums went through memory every entry).
    """
    prefer_wide_vectors()
    inv = 1.0 / lam
    _clear(acc)
    n = raw.shape[0]
    if q == 2.0:
        for j in range(0, n - 3, 4):
            for lane in range(LANES):
                t, lv, r = tau[lane], level[lane], ref[lane]
                n_sat, n_free, s1 = acc[0, lane], acc[1, lane], acc[2, lane]
                for u in range(4):
                    a = _lane_key(raw, j + u, lane, r, is_mag)
                    _, g, sat, free = _entry_sets(a, t, inv, q, is_mag, lv)
                    s1 += (a if is_mag else g) if free else 0.0
                    n_sat += 1.0 if sat else 0.0
                    n_free += 1.0 if free else 0.0
                acc[0, lane], acc[1, lane], acc[2, lane] = n_sat, n_free, s1
        for j in range(n - n % 4, n):
            for lane in range(LANES):
                a = _lane_key(raw, j, lane, ref[lane], is_mag)
                _, g, sat, free = _entry_sets(a, tau[lane], inv, q, is_mag, level[lane])
                acc[2, lane] += (a if is_mag else g) if free else 0.0
                acc[0, lane] += 1.0 if sat else 0.0
                acc[1, lane] += 1.0 if free else 0.0
        return
    for j in range(0, n - 3, 4):
        for lane in range(LANES):
            t, lv, r = tau[lane], level[lane], ref[lane]
            n_sat, n_free, s1, s2, s3 = acc[0, lane], acc[1, lane], acc[2, lane], acc[3, lane], acc[4, lane]
            for u in range(4):
                e, g, sat, free = _entry_sets(_lane_key(raw, j + u, lane, r, is_mag), t, inv, q, is_mag, lv)
                n_sat += 1.0 if sat else 0.0
                n_free += 1.0 if free else 0.0
                s1 += e if free else 0.0
                s2 += e * e if free else 0.0
                s3 += g if free else 0.0
            acc[0, lane], acc[1, lane], acc[2, lane], acc[3, lane], acc[4, lane] = n_sat, n_free, s1, s2, s3
    for j in range(n - n % 4, n):
        for lane in range(LANES):
            e, g, sat, free = _entry_sets(_lane_key(raw, j, lane, ref[lane], is_mag), tau[lane], inv, q, is_mag,
                                          level[lane])
            acc[0, lane] += 1.0 if sat else 0.0
            acc[1, lane] += 1.0 if free else 0.0
            acc[2, lane] += e if free else 0.0
            acc[3, lane] += e * e if free else 0.0
            acc[4, lane] += g if free else 0.0


@nb.njit(cache=True, inline="always", error_model="numpy")
def _clear(acc):
    for i in range(acc.shape[0]):
        for lane in range(LANES):
            acc[i, lane] = 0.0


@nb.njit(cache=True, inline="always", error_model="numpy")
def _step(t, ref, lam, q, k, is_mag, n_sat, n_free, s1, s2, s3, newton):
    """(f(t), the root of the equation on the sets at t, or NaN when the free set is empty, and the size of
    the root's last Newton increment), t relative to ref; p = 4/3 takes `newton` Newton steps on its
    cubic (p = 2 solves its equation exactly: an increment of 0).

    f > 0: the free set sums to more than it must, the threshold lies above t.
    """
    rest = k - n_sat  # what the free set must sum to (times the absolute threshold, magnitude)
    if q == 2.0:
        if is_mag:
            # sum_F (|x| - t) / (l t) = rest with t absolute, solved for t on these sets: PAV's
            # closed form of a block with |F| entries of mean s / |F| and `rest` unit weights.
            f = (s1 - n_free * t) / (lam * (ref + t)) - rest
            root = _quadratic_block_value(n_free, s1 / n_free, rest, lam, is_mag, ref)
            return f, (root if n_free > 0.0 else math.nan), 0.0
        # Piecewise linear: the Newton step, exact once the sets are right.
        f = s1 - rest
        return f, (t + lam * f / n_free if n_free > 0.0 else math.nan), 0.0
    # sum_F g = rest (mask) or rest (ref + t) (magnitude).  On these sets, at t + l d, it reads
    # h(d) = sum_F (e - d)^3 - rest (1, or ref + t + l d) = 0: a cubic in d from the sums at t,
    # decreasing (h' = -3 sum_F (e - d)^2 (- rest l)) and convex below the mean of e, so Newton steps
    # from d = 0 converge to its root without a safeguard of their own (after the first they
    # approach it from below).  Solved on its sets, like the p = 2 step, a row whose sets moved
    # after the start takes a pass or two more, not four or five.
    f = s3 - rest * (ref + t if is_mag else 1.0)
    d = 0.0
    increment = 0.0
    for _ in range(newton):
        d2 = d * d
        h = s3 - 3.0 * d * s2 + 3.0 * d2 * s1 - n_free * d2 * d - rest * (ref + t + lam * d if is_mag else 1.0)
        slope = 3.0 * s2 - 6.0 * d * s1 + 3.0 * n_free * d2 + (rest * lam if is_mag else 0.0)  # -h'
        increment = h / slope
        d += increment
    return f, (t + lam * d if n_free > 0.0 else math.nan), abs(increment) * lam


@nb.njit(cache=True, error_model="numpy")
def _start(state, ref, lows, gaps, lam, q, k, is_mag):
    """Every lane's start from its k-th and (k+1)-th keys (`ref` on entry, `lows`): the frame, the
    bracket and PAV's first block (p = 2; p = 4/3 solves its cubic in `_cubic_start`), or the
    answer (no violator), or a hand-back.  Selects only, no branch: the compiler vectorizes it
    (with q a constant: see `_update`).

    The first block is F = {s_(k), s_(k+1)} with |S| = k - 1 and one unit weight: its value
    solves the equation on these sets, which a first pass that counts them confirms.
    """
    prefer_wide_vectors()
    if q == 2.0:
        _start_lanes(state, ref, lows, gaps, lam, 2.0, k, is_mag)
    else:
        _start_lanes(state, ref, lows, gaps, lam, 4.0, k, is_mag)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _start_lanes(state, ref, lows, gaps, lam, q, k, is_mag):
    # `_start`'s loop over the lanes.
    tau, lo, hi, active, prev_sat, prev_free, exact = state[0], state[1], state[2], state[3], state[4], state[5], state[6]
    inv = 1.0 / lam
    for lane in range(LANES):
        upper, below = ref[lane], lows[lane]
        gap = below - upper  # keys relative to s_(k): the row's frame
        gaps[lane] = gap
        prev_sat[lane] = k - 1.0
        prev_free[lane] = 2.0
        exact[lane] = 1.0  # p = 2: the closed form (p = 4/3: `_cubic_start`)
        hi[lane] = 0.0
        # p = 2: the first block's closed form (only the magnitude's reads the absolute frame,
        # `upper`); p = 4/3 solves its cubic in `_cubic_start`.
        start = _quadratic_block_value(2.0, 0.5 * gap, 1.0, lam, is_mag, upper) if q == 2.0 else 0.0
        if is_mag:
            # t lies in (fixed point of s_(k+1), s_(k)); for p = 4/3 a lower bound of that fixed
            # point comes from `_cubic_start`.
            lo[lane] = lower_bracket_relative(quadratic_fixed_point(below, lam), upper) if q == 2.0 else -upper
            # No violator: s_(k) is saturated at t = s_(k+1), where the free set is empty (the
            # selection kernel's rule; the threshold is not unique).  In absolute terms (ref = 0):
            # relative to s_(k), t = s_(k) + (s_(k+1) - s_(k)) can round far from s_(k+1) when
            # s_(k+1) << s_(k).
            solved = _entry_sets(upper, below, inv, q, is_mag, below)[2]
            ref[lane] = 0.0 if solved else upper
            tau[lane] = below if solved else start
            # At most k non-zero keys, or a rescaled frame: the selection kernel's.
            handed_back = (below == 0.0) | ~_in_unit_range(upper)
            active[lane] = -1.0 if handed_back else (0.0 if solved else 1.0)
        else:
            lo[lane] = gap - lam
            # No violator at the boundary: the top k are saturated at any tau in
            # [s_(k+1), s_(k) - l]; the right end leaves the free set empty.
            solved = -gap >= lam
            tau[lane] = -lam if solved else start
            active[lane] = 0.0 if solved else 1.0


@nb.njit(cache=True, error_model="numpy")
def _cubic_start(state, ref, gaps, lam, is_mag):
    """p = 4/3: the start of every active lane, PAV's first block, and the magnitude's lower bracket.

    The first block (|S| = k - 1, F = {s_(k), s_(k+1)}, one unit weight) has
    ``(e0 - d)^3 + (e1 - d)^3 = 1`` (mask) or ``= ref + l d`` (magnitude), with
    the threshold ``l d`` and ``e = key / l`` relative to ref.  With
    ``d = c + x``, ``c = (e0 + e1) / 2``, ``h = (e0 - e1) / 2`` this is
    ``x^3 + P x + Q = 0``: ``P = 3 h^2 (+ l / 2)``, ``Q = 1 / 2`` (or ``(ref + l c) / 2``),
    P >= 0 < Q.  The root is negative, with ``|x| <= Q / P`` and ``|x| <= Q^(1/3)
    <= (Q + 2) / 3``; from that bound, Halley steps (``x -= 2 f f' / (2 f'^2 - f f'')``,
    whose denominator ``12 x^4 + 6 P x^2 + 2 P^2 - 6 Q x`` is positive for x < 0)
    converge to it: no cube root, and the loop over the lanes vectorizes.  Three Halley
    steps gave the root as closely as five Newton steps (within 2 ulps on random rows)
    with three divisions per lane instead of five: the p = 4/3 forwards at (262144, 16)
    took 0.94-0.97x their time (both versions alternating in one process).

    The magnitude's threshold lies above the fixed point u of ``((s - u) / l)^3 = u``
    at ``s = s_(k+1)``: ``u = s - w`` with ``w^3 / l^3 + w - s = 0``, convex and
    increasing in w >= 0, so Newton steps from an upper bound of w (s, and
    ``l (s + 2) / 3 >= l s^(1/3)``) stay above it and ``s - w`` bounds u from below
    (the vectorized stand-in for `_scalar.mag_lower_bracket`, whose cubic takes a
    cube root per lane).
    """
    prefer_wide_vectors()
    # A loop for each operator, `is_mag` a constant there: read at run time, the store of the bracket
    # was a masked store (`vector_width.unfolded_one`).
    if is_mag:
        _cubic_start_lanes(state, ref, gaps, lam, True)
    else:
        _cubic_start_lanes(state, ref, gaps, lam, False)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _cubic_start_lanes(state, ref, gaps, lam, is_mag):
    # `_cubic_start`'s loop over the lanes.
    inv = 1.0 / lam
    unit = unfolded_one(state)  # plain stores of what a lane keeps (`vector_width.unfolded_one`)
    for lane in range(LANES):
        # Every load before the selects at the end: a load in a select's branch (``else
        # state[0, lane]``) is not speculated, and the loop compiled to scalar code (a division per
        # Newton step and lane).
        gap, r, old_tau, old_lo = gaps[lane], ref[lane], state[0, lane], state[1, lane]
        iterating = state[3, lane] == 1.0
        c = 0.5 * gap / lam
        h = -c
        if is_mag:
            p = 3.0 * h * h + 0.5 * lam
            q = 0.5 * (r + lam * c)
            x = -min(q / p, (q + 2.0) / 3.0)
        else:
            p = 3.0 * h * h
            q = 0.5
            x = -min(q / p, _CBRT_HALF_UP)
        for _ in range(_CUBIC_HALLEY):
            f = x * (x * x + p) + q
            d1 = 3.0 * x * x + p
            x -= 2.0 * f * d1 / (2.0 * d1 * d1 - 6.0 * x * f)
        start = lam * (c + x)
        state[0, lane] = start if iterating else old_tau * unit
        # Whether the start is the first block's root to within the rounding (`_confirm`): the Newton
        # step from it is (the last Halley step's size would say so only of the iterate before it).
        newton = (x * (x * x + p) + q) / (3.0 * x * x + p)
        state[6, lane] = 1.0 if _converged(abs(newton) * lam, _step_scale(r, start, lam, is_mag)) else 0.0
        if is_mag:
            s = r + gap
            w = min(s, lam * (s + 2.0) / 3.0)
            # Every iterate bounds w from above, so a few steps do: the bound only safeguards the
            # iteration (five steps, two divisions each, took 0.7 ms of a 9.5 ms forward at
            # (262144, 16) and left as many rows to the retry on random data).
            for _ in range(_BRACKET_NEWTON):
                rw = w * inv
                w -= (rw * rw * rw + w - s) / (3.0 * rw * rw * inv + 1.0)
            bound = s - w - r - 8.0 * _EPS * r
            state[1, lane] = bound if iterating else old_lo * unit


@nb.njit(cache=True, error_model="numpy")
def _absolute_frame(state, ref):
    """Magnitude lanes whose start lies far below their `ref` (`kernels.far_below`) go on in absolute terms (ref = 0).

    Held relative to ref = s_(k), the threshold is known to eps ref only, and
    so is the saturation level t = ref + tau it sets: far below s_(k) (strengths
    large next to the keys) that is too coarse to tell saturated entries from
    free ones, whose g differs from t by less.  There, keys and threshold are
    far apart and the absolute frame does not cancel.
    """
    prefer_wide_vectors()
    for lane in range(LANES):
        was_exact, prev_sat = state[6, lane], state[4, lane]  # loaded before the selects (see `_advance`)
        far = far_below(ref[lane] + state[0, lane], ref[lane]) & (state[3, lane] == 1.0)  # iterating lanes only
        shift = ref[lane] if far else 0.0
        for i in range(3):  # the threshold and its bracket
            state[i, lane] += shift
        # Moved, the threshold is known to eps ref only, where its own size is far below: it is no root of
        # any sets (-1, as a bracket's midpoint in `_advance`), so that the first pass steps to the root
        # of its sets in absolute terms instead of confirming it within the step's tolerance, which
        # scales with l (x = (5e-3, 5e-8, 0.5), k = 2, l = 2, p = 4/3: the free output 1e-11 of itself
        # off, as the iterate held relative to 5e-3 was).
        state[4, lane] = -1.0 if far else prev_sat
        state[6, lane] = 0.0 if far else was_exact
        ref[lane] -= shift


@nb.njit(cache=True, error_model="numpy")
def _update(state, acc, ref, lam, q, k, is_mag):
    """One safeguarded step of every active lane (rows of `state`: see `lane_rows`); returns how many
    lanes still iterate.  Selects only, no branch: the compiler vectorizes it.

    Each exponent has its own loop, with q a constant there: with q read at run time
    the loop holding both steps compiled to scalar code on an AVX2 CPU (AMD EPYC,
    Zen 3: a `vdivsd` per division and lane; it vectorized with AVX-512), and the
    short-row forwards there took 1.1-1.3x their present time (`benchmarks/ab_versions.py
    c1c619a 5b2ef63`: 0.77-0.91x with the split).
    """
    prefer_wide_vectors()
    if q == 2.0:
        return _advance(state, state, acc, ref, lam, 2.0, k, is_mag, _CUBIC_NEWTON)
    return _advance(state, state, acc, ref, lam, 4.0, k, is_mag, _CUBIC_NEWTON)


@nb.njit(cache=True, error_model="numpy")
def _iterating(state):
    """How many lanes of `state` iterate (see `lane_rows`)."""
    count = 0
    for lane in range(LANES):
        count += 1 if state[3, lane] == 1.0 else 0
    return count


@nb.njit(cache=True, error_model="numpy")
def _confirm(state, sets, ref, lam, q, k, is_mag):
    """The lanes that the outputs' pass confirms (`sets`: every lane's `_set_code` sum at its iterate): an
    iterate that is the root of the sets it was computed from (to within its step's rounding,
    `state[6]`) and whose sets are those is solved, as a pass there would find (`_advance`), with
    no step; so is one with no fractional entry and k saturated.  Returns how many lanes still
    iterate (the outputs of the others are written at their iterates)."""
    prefer_wide_vectors()
    unit = unfolded_one(state)  # a plain store of what a lane keeps (`vector_width.unfolded_one`)
    remaining = 0
    for lane in range(LANES):
        t = state[0, lane]
        was_active = state[3, lane]
        active = was_active == 1.0
        code = sets[lane]
        exact_root = (code == state[4, lane] + FREE_WEIGHT * state[5, lane]) & (state[6, lane] == 1.0)
        # No free entry and k saturated: the code is k itself.
        solved = exact_root | (code == k)
        unfounded = _unfounded(ref[lane], t, t, _resolved_scale(ref[lane], t, lam, q, is_mag), is_mag)
        state[3, lane] = (-1.0 if unfounded else 0.0) if active & solved else was_active * unit
        remaining += 1 if active & ~solved else 0
    return remaining


@nb.njit(cache=True, inline="always", error_model="numpy")
def _step_scale(ref, t, lam, is_mag):
    """The scale of a step's rounding at `t` (relative to `ref`).  The mask's p = 4/3 steps come from Newton
    steps on the cubic of e = (key - t) / l, exact to its rounding only: their tolerance scales with l.
    The magnitude's equation ``sum_F e^3 = rest (ref + t)`` is rounded relative to its right-hand side
    and its slope is at least ``rest l``, so its root is known to a few ulps of the absolute threshold
    ``ref + t`` (as at p = 2).  With l as its scale (until 2026-12-07) a lane took an iterate 90 ulps
    off as converged where l lies far above the keys (l = 1.05e-8 over a k-th key of 4.7e-11: a free
    output 30 times below its input came back 3.5 times the documented bound off)."""
    return ref + t if is_mag else abs(t) + lam


@nb.njit(cache=True, inline="always", error_model="numpy")
def _resolved_scale(ref, t, lam, q, is_mag):
    """The scale of `_unfounded`'s test "not above 0 by more than 8 ulps of it": for p = 4/3, l (with keys
    ~1e-31 next to l ~ 0.4 a lane ended at -1e-45 where the threshold lies near 1e-89: such lanes are the
    selection kernel's), the step's scale before `_step_scale` took the absolute threshold; the
    absolute threshold for p = 2."""
    return ref + t if is_mag and q == 2.0 else abs(t) + lam


@nb.njit(cache=True, inline="always", error_model="numpy")
def _converged(change, scale):
    """Whether a change of an iterate is within the rounding of a step of that `scale` (`_step_scale`)."""
    return change <= _STEP_ULPS * _EPS * scale


@nb.njit(cache=True, inline="always", error_model="numpy")
def _unfounded(ref, root, t, scale, is_mag):
    """Whether a magnitude lane solved at `t` (its step's `root` next to it) is the caller's: its threshold is
    one the lane's frame does not resolve (the selection kernel solves it again in absolute terms):
    one not above 0 by more than the step's rounding (keys ~1e-31 next to l ~ 0.4, p = 4/3: the
    step's tolerance, which scales with l, passed a threshold of -1e-45 where it lies near
    1e-89), and one still held relative to s_(k) that ended far below it (the start did not
    foresee it, so `_absolute_frame` kept the lane relative), known there to eps s_(k) only."""
    return is_mag & (_converged(ref + root, scale) | ((ref != 0.0) & far_below(ref + t, ref)))


@nb.njit(cache=True, inline="always", error_model="numpy")
def _advance(state, new, acc, ref, lam, q, k, is_mag, newton):
    # `_update` from `state` into `new` (which may be `state`), with `newton` steps on a p = 4/3 cubic.
    unit = unfolded_one(state)
    remaining = 0
    for lane in range(LANES):
        t = state[0, lane]
        lo = state[1, lane]
        hi = state[2, lane]
        # Loaded before the selects that keep them: read inside a select's branch (``else state[6, lane]``),
        # it took `_update` to 2.4x its time (as `_cubic_start` found of its loads).
        was_active, prev_sat, prev_free, was_exact = state[3, lane], state[4, lane], state[5, lane], state[6, lane]
        active = was_active == 1.0
        n_sat, n_free = acc[0, lane], acc[1, lane]
        f, nxt, increment = _step(t, ref[lane], lam, q, k, is_mag, n_sat, n_free, acc[2, lane], acc[3, lane],
                                  acc[4, lane], newton)
        size = _step_scale(ref[lane], t, lam, is_mag)
        # What a lane keeps goes through `unit` (`vector_width.unfolded_one`): plain stores, not masked ones.
        lo = t if active & (f > 0.0) else lo * unit
        hi = t if active & (f < 0.0) else hi * unit
        # A root outside the bracket gives way to its midpoint, which is no root of any sets: the
        # sets recorded for it below are none (-1), so that it is never taken for a solution.
        inside = (lo <= nxt) & (nxt <= hi)
        nxt = nxt if inside else 0.5 * (lo + hi)
        same_sets = (n_sat == prev_sat) & (n_free == prev_free)
        # Solved: the sets the iterate came from are its own, or no entry is fractional and
        # exactly k are saturated (the non-unique case, any tau of the interval will do).  Not
        # f = 0 on an empty free set: the magnitude's f is 0 there at an absolute threshold of 0
        # too, where every non-zero key is saturated (a start whose threshold underflowed to 0
        # took all 12 entries of a row with k = 1).
        non_unique = (n_free == 0.0) & (n_sat == k)
        # Nor a root that the bracket refutes: keys whose sets flip within the rounding of the
        # root (a pair at its saturation level to 2e-16 of it, p = 4/3, l = 60) moved the iterate
        # out and back, and the loose tolerance of the p = 4/3 step took a midpoint, 4e-11 off.
        solved = (same_sets & inside & _converged(abs(nxt - t), size)) | non_unique
        # A solved lane stays at its iterate, the root of the sets counted there (its step is within
        # the rounding), whose outputs are written in those sets, whichever pass solved it (`_confirm`).
        t_new = nxt if active & ~non_unique & ~solved else t * unit
        unfounded = _unfounded(ref[lane], nxt, t_new, _resolved_scale(ref[lane], t, lam, q, is_mag), is_mag)
        # Whether the new iterate is the root of those sets to within the rounding, so that equal
        # counts at it confirm it with no step (`_confirm`): its Newton steps converged, and the
        # p = 4/3 cubic, expanded about t, was evaluated within a strength of t (where its terms
        # stay of the size of those of the free keys).
        exact = _converged(increment, size) & ((q == 2.0) | (abs(nxt - t) <= lam))
        # Every value before the stores: selects on the same condition (`active`) with stores between
        # them were merged into branches, whose stores became masked stores (`vector_width.unfolded_one`).
        code = (-1.0 if unfounded else 0.0) if active & solved else was_active
        sat = (n_sat if inside else -1.0) if active else prev_sat
        free = n_free if active else prev_free
        exact_now = (1.0 if exact else 0.0) if active else was_exact
        new[0, lane] = t_new
        new[1, lane] = lo
        new[2, lane] = hi
        new[3, lane] = code
        new[4, lane] = sat
        new[5, lane] = free
        new[6, lane] = exact_now
        remaining += 1 if active & ~solved else 0
    return remaining


@nb.njit(cache=True, inline="always", error_model="numpy")
def _entry_outputs(a, t, inv, q, is_mag, level):
    """(output, g', saturated, free) of a key `a` at threshold `t` (arguments of `_entry_sets`): the one
    definition of a free entry's output and g', for the lane layout (`_lane_outputs`,
    `_output_entry`) and the rows (`_row_outputs`).  The output is the mask's g, or the
    magnitude's |value| ``g + (a - t)`` (its sign is x's); ``g' = 1 / l`` or ``3 e^2 / l`` (p = 4/3);
    both are meaningful on the free set only."""
    e, g, sat, free = _entry_sets(a, t, inv, q, is_mag, level)
    return (g + (a - t) if is_mag else g), (inv if q == 2.0 else 3.0 * e * e * inv), sat, free


@nb.njit(cache=True, inline="always", error_model="numpy")
def _capped_at(value, xj):
    """The magnitude's |value| ``g + (a - t)`` of a free entry `xj`, capped at |x|: below it exactly (F lies
    below saturation), and at most a few ulps above it once rounded.  A select (`min`), which the
    loops keep vectorized; `value` in float64, |x| exact in it, so that the output's dtype rounds it
    to at most |x| too."""
    return min(value, abs(float(xj)))


@nb.njit(cache=True, inline="always", error_model="numpy")
def _output_entry(xj, r, t, lv, inv, q, is_mag, signed, unit):
    """(what `_lane_outputs` writes over an entry `xj` as loaded and to `gbuf`, saturated, free), at threshold
    `t` and level `lv` (the key relative to `r`).  Scalars only: with the arrays passed in, their
    reference counts were updated per entry (a call each)."""
    value, gp, sat, free = _entry_outputs(_relative_key(xj, r, is_mag), t, inv, q, is_mag, lv)
    if signed:
        # x on A (times a 1 the compiler cannot fold: stored as read, it made the store a masked
        # one, `vector_width.unfolded_one`), its sign times the value on F, else 0.  The value on F
        # is capped at |x|, which its rounding could pass (`_capped_at`).
        written = xj * unit if sat else (math.copysign(_capped_at(value, xj), xj) if free else 0.0)
    elif is_mag:
        # On F, a - t > 0 (e > 0): the value is positive, or +0 once rounded to float32;
        # -0 marks the entries outside F and A (`_mag_row` reads the sign bit, and copies the
        # value, capped here, with x's sign).
        written = -1.0 if sat else (_capped_at(value, xj) if free else -0.0)
    else:
        written = 1.0 if sat else (value if free else 0.0)
    return written, (gp if free else 0.0), sat, free


@nb.njit(cache=True, inline="always", error_model="numpy")
def _saturated_count(code):
    """|S| of a lane's `_set_code` sum."""
    return code - FREE_WEIGHT * math.floor(code / FREE_WEIGHT)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _set_code(sat, free):
    """|S| + FREE_WEIGHT |F| of one entry: a lane's sets counted in one sum (`_confirm`)."""
    return (1.0 if sat else 0.0) + (FREE_WEIGHT if free else 0.0)


@nb.njit(cache=True, error_model="numpy")
def _lane_outputs(rows, frame, lam, q, is_mag, signed, gbuf, with_residuals, sets):
    """Outputs (and g') of a group at its thresholds, in the lane layout (vectorized), over its rows as
    loaded (`rows`, in the outputs' dtype: float32 rows go back by float32 block transposes), and
    every lane's sets there in `sets` (`_set_code`), which confirm the lanes whose sets they keep
    (`_confirm`).  `frame`: every lane's ref, threshold and level (rows 0-2; see `_entry_sets`).

    rows: with `signed` (the magnitude's forward without residuals), the outputs themselves: x on
    A, its sign times the value on F, else 0, which go back as they are, with no pass over each
    row after.  Otherwise the mask's value, or the magnitude's |value| on F (>= +0), -1 on A
    (whose output is x itself) and -0 elsewhere, which tells the magnitude's sets apart
    (`_mag_row`); gbuf: g' on F (1 / l, or 3 e^2 / l for p = 4/3), else 0 (written only
    `with_residuals`: the mask's, whose g' goes back by block transposes; the magnitude's rows
    compute theirs as they write their codes).

    Measured per group of 64 rows of 64 (float32, one thread): the counts took the loop from 1.7
    to 2.15 us (a pass takes 2.1).  With four entries per loop over the lanes (the counts in
    registers, as in `_pass`) it took 7.2-8.2 us, whether the outputs went to another array than
    the rows and ref, threshold and level came from three arrays (8.2) or not (7.2-7.6).
    """
    prefer_wide_vectors()
    inv = 1.0 / lam
    for lane in range(LANES):
        sets[lane] = 0.0
    # A loop for each kind of output, its flags constants there: with all three read at run time, the
    # magnitude's signed outputs took 1.2x their time, and a run-time `with_residuals` made the store of
    # g' a masked store (`vector_width.unfolded_one`; tests/test_vector_width.py).
    if signed:
        _output_loop(rows, frame, inv, q, True, True, gbuf, False, sets)
    elif with_residuals:
        _output_loop(rows, frame, inv, q, is_mag, False, gbuf, True, sets)
    else:
        _output_loop(rows, frame, inv, q, is_mag, False, gbuf, False, sets)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _output_loop(rows, frame, inv, q, is_mag, signed, gbuf, with_residuals, sets):
    # `_lane_outputs`' loop.
    unit = unfolded_one(rows)
    for j in range(rows.shape[0]):
        for lane in range(LANES):
            written, gp, sat, free = _output_entry(rows[j, lane], frame[0, lane], frame[1, lane], frame[2, lane], inv,
                                                   q, is_mag, signed, unit)
            rows[j, lane] = written
            if with_residuals:
                gbuf[j, lane] = gp
            sets[lane] += _set_code(sat, free)


@nb.njit(cache=True, error_model="numpy")
def _mag_rows(x, rows, used, out, codes, gprime, free_gprime, frame, lam):
    """`_mag_row` of the rows `rows[:used]` of a group, at the lanes' ref, threshold and level in `frame` (those of
    its outputs' pass, `_lane_outputs`).

    A function of its own, called once per group: with the loop over the group's rows in
    `_lane_chunk`, each row's inlined call took and dropped a reference to the arrays (atomic
    operations that the compiler kept there, and not where the chunk was inlined into its
    caller): at (262144, 16), float32, p = 4/3, the magnitude's forward with residuals took
    1.2x its time (one thread: 16.3 ms against 13.4 ms for the lane solver's first call;
    `perf` put 7% of the time in the reference counts, against 1.5-4% with this function).
    """
    prefer_wide_vectors()
    inv = 1.0 / lam
    for lane in range(used):
        _mag_row(x, rows[lane], out, codes, gprime, free_gprime, frame[0, lane], frame[1, lane], frame[2, lane], inv)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _mag_row(x, r, out, codes, gprime, free_gprime, ref, t, level, inv):
    """Row `r` of the magnitude's outputs and set codes from the codes stored in it (`lane_rows`, a solve with
    residuals in the lane layout).

    `out[r]` holds the codes of `_lane_outputs` (-1 on A: the output is x itself; the value
    on F, given x's sign; -0 elsewhere).  F is told apart by the sign bit, not by a positive
    value: a value that rounded to +0 in float32 is still on F.  `free_gprime` > 0 is g' on F,
    the same for every entry (p = 2: 1 / l); otherwise (p = 4/3) g' is `_entry_outputs`' of the
    key at the lane's `ref`, threshold `t` and `level` (inv = 1 / l), the numbers the lanes
    compute, bit for bit (measured against g' written in the lane layout and transposed back,
    float32, side by side: the forward with residuals took 0.95-1.0x its time at (262144, 16),
    0.95x at (65536, 32), the same at (524288, 8)).  Written here with the codes, in one loop
    of selects, which the compiler vectorizes.
    """
    # A loop for each case, whether g' is written a constant there: read at run time, it made the store
    # of g' a masked store (`vector_width.unfolded_one`).
    if free_gprime > 0.0:
        _mag_row_entries(x, r, out, codes, gprime, free_gprime, True, ref, t, level, inv)
    else:
        _mag_row_entries(x, r, out, codes, gprime, free_gprime, False, ref, t, level, inv)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _mag_row_entries(x, r, out, codes, gprime, free_gprime, constant_gprime, ref, t, level, inv):
    # `_mag_row`'s loop.
    n = x.shape[1]
    # In the rows' dtype throughout: a float64 literal in a select widens every entry (measured when
    # forwards came this way too: the p = 4/3 magnitude's at n = 64 took 0.85-0.95x its time without).
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    g_free = out.dtype.type(free_gprime)
    for j in range(n):
        m = out[r, j]
        xj = x[r, j]
        free = math.copysign(one, m) > zero
        codes[r, j] = set_code(xj, free, m < zero)
        if constant_gprime:
            gprime[r, j] = g_free if free else zero
        else:
            # The cubic's (q = 4) g' = 3 e^2 / l of the key as the lanes solve it (`_output_entry`).
            gp = _entry_outputs(_relative_key(xj, ref, True), t, inv, 4.0, True, level)[1]
            gprime[r, j] = out.dtype.type(gp) if free else zero
        out[r, j] = xj if m < zero else (math.copysign(m, xj) if m > zero else zero)


@nb.njit(cache=True, error_model="numpy")
def _row_outputs(x_row, out_row, g_row, code_row, ref, t, level, lam, q, is_mag):
    """One row's outputs and residuals (g', and the magnitude's set codes) at its threshold, read off its
    entries in input order (no transposition back); returns its sets there (`_set_code`).

    The sets are `_entry_sets` of the keys as the lanes hold them (``key - ref``
    in float64), so that each entry lands in the set it had in the lanes.  A
    function over 1-D views with selects only: the compiler vectorizes the loop.
    """
    prefer_wide_vectors()
    return _row_entries(x_row, out_row, g_row, code_row, ref, t, level, lam, q, is_mag, True)


@nb.njit(cache=True, error_model="numpy")
def _mag_row_values(x_row, out_row, no_codes, ref, t, level, lam, q):
    """`_row_outputs` of the magnitude's forward without residuals: the outputs alone, and the sets (the
    residual rows the loop is typed with, `out_row` for g' and `no_codes`, an empty int8 array, are never
    written)."""
    prefer_wide_vectors()
    return _row_entries(x_row, out_row, out_row, no_codes, ref, t, level, lam, q, True, False)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _row_entries(x_row, out_row, g_row, code_row, ref, t, level, lam, q, is_mag, with_residuals):
    # The loop of `_row_outputs` and `_mag_row_values`, `with_residuals` a constant in each.
    inv = 1.0 / lam
    n_sat = 0
    n_free = 0
    zero = out_row.dtype.type(0)
    for j in range(x_row.shape[0]):
        xj = x_row[j]
        a = _relative_key(xj, ref, is_mag)
        value, gp, sat, free = _entry_outputs(a, t, inv, q, is_mag, level)
        if with_residuals:
            g_row[j] = gp if free else 0.0
        n_sat += 1 if sat else 0
        n_free += 1 if free else 0
        if is_mag:
            # The sign copied in the outputs' dtype (rounding is symmetric: the same numbers), not x widened
            # to float64 for it: the loop took 0.94-0.98x its time (float32, AVX2).  The value capped at |x|
            # in float64 (`_capped_at`: the key's own widening of x, no other).
            signed = math.copysign(out_row.dtype.type(_capped_at(value, xj)), xj)
            out_row[j] = xj if sat else (signed if free else zero)
            if with_residuals:
                code_row[j] = set_code(xj, free, sat)
        else:
            out_row[j] = 1.0 if sat else (value if free else 0.0)
    return n_sat + FREE_WEIGHT * n_free  # `_set_code`


@nb.njit(cache=True, inline="always", error_model="numpy")
def _levels(ref, tau, lam, is_mag, level):
    # Each lane's saturation level (see `_entry_sets`): once per pass, not per entry.
    for lane in range(LANES):
        level[lane] = ref[lane] + tau[lane] if is_mag else lam


@nb.njit(cache=True, inline="always", error_model="numpy")
def row_count(subset, batch):
    """How many rows a kernel solves: those `subset` names, or all `batch` when it is `EVERY_ROW`."""
    return subset.shape[0] if subset.shape[0] > 0 else batch


@nb.njit(cache=True, inline="always", error_model="numpy")
def row_at(subset, i):
    """The row at position `i` of the rows a kernel solves (see `row_count`)."""
    return subset[i] if subset.shape[0] > 0 else i


@nb.njit(cache=True, inline="always", error_model="numpy")
def load_group(keys, r0, rows, out, subset):
    """Transpose the group of rows from position `r0` on into `out` (n, LANES), one row per lane, in
    the dtype of `out`; `rows` (LANES,) receives each lane's row.  The positions index `subset`
    (row indices), or the rows themselves when `subset` is empty.  Lanes past the last row repeat
    the first: harmless, never read back.  Shared by the lane solver and `select.lane_order_statistics`."""
    used = min(LANES, row_count(subset, keys.shape[0]) - r0)
    for lane in range(LANES):
        rows[lane] = row_at(subset, r0 + lane if lane < used else r0)
    n = keys.shape[1]
    # 8 x 8 blocks in registers (module `transpose`), the last n % 8 entries one by one.
    blocked = n - n % BLOCK if _unit_stride(keys) and _unit_stride(out) else 0
    for first in range(0, LANES, BLOCK):
        for j0 in range(0, blocked, BLOCK):
            rows_to_lanes(keys, rows, first, j0, out)
    for lane in range(LANES):
        r = rows[lane]
        for j in range(blocked, n):
            out[j, lane] = keys[r, j]


@nb.njit(cache=True, inline="always", error_model="numpy")
def store_group(z, used, rows, out):
    """Write the group `z` (n, LANES) back to the rows `rows[:used]` of `out` (batch, n), in the dtype of `out`:
    the inverse of `load_group`.  Full groups of float32 rows go by 8 x 8 blocks in registers (for
    float64 rows the loop below was as fast)."""
    n = z.shape[0]
    blocked = n - n % BLOCK if used == LANES and out.itemsize == 4 and _unit_stride(out) and _unit_stride(z) else 0
    for first in range(0, LANES, BLOCK):
        for j0 in range(0, blocked, BLOCK):
            lanes_to_rows(z, j0, first, out, rows)
    for lane in range(used):
        r = rows[lane]
        for j in range(blocked, n):
            out[r, j] = z[j, lane]


@nb.njit(cache=True, inline="always", error_model="numpy")
def _unit_stride(a):
    # Contiguous along the last axis, as the block transposes read and write it.
    return a.strides[1] == a.itemsize


@nb.njit(cache=True, error_model="numpy")
def sweep_order_statistics(columns, k, uppers, belows, poison):
    """`_sweeps` of the keys in `columns`, which they destroy (`select.lane_order_statistics`)."""
    _sweeps(columns, columns, False, k, uppers, belows, poison)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _sweeps(rows, columns, is_mag, k, uppers, belows, poison):
    """The k-th and (k+1)-th largest keys of every lane of `rows` (n, LANES; x, or the magnitude's |x|)
    into `uppers`, `belows` (arrays of the dtype of `columns`), adding ``key - key`` to `poison` per lane
    (0 for finite keys, NaN otherwise).

    Each sweep moves the three largest remaining entries of every lane out by a cascade of three
    compare-exchanges per entry: one entry of all lanes per step, a loop the compiler vectorizes,
    with no data-dependent branch; ceil((k + 1) / 3) sweeps, O((k + 1) n) per lane.  The first reads
    the keys off `rows` (left as they are; `columns` may be `rows` itself) and leaves what remains
    in `columns` (n, LANES) for the next, which destroy it but for the last: reading the first
    sweep's keys off the rows saves a pass that copied them to `columns` (`lane_rows`).

    The running largest entries are stored through `vector_width.unfolded_one` (plain stores,
    not masked ones: see there).  Inlined into `lane_rows` (called there instead, the p = 4/3
    magnitude's forward at (16384, 64) took 1.04x its time in two side-by-side runs).
    """
    prefer_wide_vectors()
    unit = unfolded_one(uppers)
    tops = np.empty((SWEEP_DEPTH, LANES), dtype=columns.dtype)
    for base in range(0, k + 1, SWEEP_DEPTH):
        # The last sweep leaves `columns` as they are: what remains in them is not read again.
        last = base + SWEEP_DEPTH >= k + 1
        for i in range(SWEEP_DEPTH):
            for lane in range(LANES):
                tops[i, lane] = -np.inf
        # Whether a sweep is the first and whether it keeps what remains are constants in its loop: a
        # run-time `last` made the store to `columns` a masked store (`vector_width.unfolded_one`).
        if base == 0 and last:
            _sweep(rows, columns, is_mag, tops, poison, unit, True, False)
        elif base == 0:
            _sweep(rows, columns, is_mag, tops, poison, unit, True, True)
        elif last:
            _sweep(columns, columns, is_mag, tops, poison, unit, False, False)
        else:
            _sweep(columns, columns, is_mag, tops, poison, unit, False, True)
        # Entry by entry: a slice assignment compiles Numba's shape-mismatch error, its message formatting
        # included (3-4 s of the serial `lane_rows`' 27 s on an empty cache), for shapes that always match.
        for i in range(SWEEP_DEPTH):
            for lane in range(LANES):
                if base + i == k - 1:
                    uppers[lane] = tops[i, lane]
                if base + i == k:
                    belows[lane] = tops[i, lane]


@nb.njit(cache=True, inline="always", error_model="numpy")
def _sweep(source, columns, is_mag, tops, poison, unit, first, keep):
    # One sweep of `_sweeps` over `source` (the rows for the `first`, which reads their keys and checks
    # them, else `columns`), keeping what remains in `columns` (`keep`).
    for j in range(source.shape[0]):
        for lane in range(LANES):
            if first:
                key = abs(source[j, lane]) if is_mag else source[j, lane]
                poison[lane] += key - key
            else:
                key = source[j, lane]
            b = _cascade(tops, lane, key, unit)
            if keep:
                columns[j, lane] = b


@nb.njit(cache=True, inline="always", error_model="numpy")
def _cascade(tops, lane, b, unit):
    """Pass `b` down the running largest entries of `lane` (`tops`, descending); returns what falls out."""
    for i in range(SWEEP_DEPTH):
        a = tops[i, lane]
        tops[i, lane] = a * unit if a > b else b
        b = b if a > b else a
    return b


@nb.njit(cache=True, error_model="numpy")
def _lane_chunk(x, k, lam, q, is_mag, bounds, out, gprime, codes, offset, unresolved, n_chunks, max_passes, subset,
                busy_lanes, c):
    """Chunk `c` of the `n_chunks` of `lane_rows` (arguments as there): its share of the groups, with scratch
    buffers of its own; returns how many of its lanes held a non-finite key."""
    batch, n = x.shape
    with_residuals = gprime.shape[0] == batch and gprime.shape[1] == n
    # The magnitude's g' is written with its codes (`_mag_row`): the p = 2 one (1 / l on F) from the signs of
    # F, the p = 4/3 one from x; the mask's is computed in the lane layout.
    free_gprime = 1.0 / lam if is_mag and q == 2.0 else 0.0
    lane_gprime = with_residuals and not is_mag
    row_order = (with_residuals or is_mag) and n >= ROW_OUTPUTS_MIN_N
    no_codes = np.empty(0, dtype=np.int8)  # the rows of codes of the mask (it has none) and of forwards alone
    bounds_inside = bounds.shape[0] != batch
    count = row_count(subset, batch)
    groups = -(-count // LANES)
    non_finite = 0  # lanes of the chunk that held a non-finite key
    pass_limit = max_passes if busy_lanes >= LANES else max(max_passes, MAX_PASSES)
    prefer_wide_vectors()
    gbuf = np.empty((n, LANES), dtype=x.dtype)  # g' in the lane layout, in the dtype of `gprime` (x's)
    acc = np.empty((5, LANES), dtype=np.float64)  # rows: see `_pass` (p = 2 leaves the last two 0)
    gaps = np.empty(LANES, dtype=np.float64)  # s_(k+1) - s_(k)
    # Per lane: tau, bracket lo and hi, active (1: iterating, 0: solved, -1: left to the
    # caller), the set counts |S|, |F| the current tau was computed from, and whether tau is
    # their root to within its step's rounding (1, else 0: `_confirm`).
    state = np.empty((7, LANES), dtype=np.float64)
    sets = np.empty(LANES, dtype=np.float64)  # the sets at the outputs' thresholds (`_set_code`)
    tau, active = state[0], state[3]
    # Per lane: the frame's ref, the threshold (copied for the outputs) and the level (`_levels`).
    frame = np.empty((3, LANES), dtype=np.float64)
    ref, level = frame[0], frame[2]
    lows = np.empty(LANES, dtype=np.float64)  # s_(k+1)
    rows = np.empty(LANES, dtype=np.int64)
    # The sweeps run in the input's dtype: float32 sweeps take half the time of float64 ones.
    columns = np.empty((n, LANES) if bounds_inside else (0, LANES), dtype=x.dtype)
    # The rows as loaded, in their dtype: the sweeps' columns are taken from them, every pass reads
    # its keys off them (`_lane_key`), and the outputs in the lane layout are written over them
    # (`_lane_outputs`), in the dtype of `out` (x's), which float32 rows take back by float32
    # block transposes.
    raw = np.empty((n, LANES), dtype=x.dtype)
    uppers = np.empty(LANES, dtype=x.dtype)
    belows = np.empty(LANES, dtype=x.dtype)
    poison = np.zeros(LANES, dtype=x.dtype)  # per lane: 0 while the keys it held were finite, else NaN
    going_on = False  # whether the chunk's last group went on past its first passes
    for grp in range(c * groups // n_chunks, (c + 1) * groups // n_chunks):
        r0 = grp * LANES
        used = min(LANES, count - r0)
        load_group(x, r0, rows, raw, subset)
        if bounds_inside:
            # The keys (the magnitude's |x|, with no array of them: `select.topk_rows_select`), and
            # whether all are finite (NaN fails the test too): the caller checks the rows no
            # other way.
            # key - key is 0 for a finite key, NaN for NaN and both infinities: a sum per lane in the
            # keys' dtype, with no select (an int64 count narrows such a loop to 128-bit vectors on
            # an AVX2 host).
            _sweeps(raw, columns, is_mag, k, uppers, belows, poison)
        for lane in range(LANES):
            if bounds_inside:
                ref[lane], lows[lane] = uppers[lane], belows[lane]
            else:
                ref[lane], lows[lane] = bounds[rows[lane], 0], bounds[rows[lane], 1]
        _start(state, ref, lows, gaps, lam, q, k, is_mag)
        if q != 2.0:
            _cubic_start(state, ref, gaps, lam, is_mag)
        if is_mag:
            _absolute_frame(state, ref)
        # Passes over the group (`max_passes` at first, the outputs' included), then its outputs at
        # every lane's iterate, which confirm the lanes whose sets they keep (`_confirm`): the last
        # pass a row needs, the one that finds the sets its iterate came from, is the outputs'.
        # A chunk whose last group went on past its first passes (below; large strengths) expects
        # this one to: its passes go on until few lanes iterate before the outputs' pass, which
        # would be wasted on many (at l = 10 the p = 2 mask's forward took 1.2x its time).
        remaining = _iterating(state)
        passes = 0
        target = pass_limit - 1 if going_on else max_passes - 1
        while True:
            if passes > 0 and not row_order:
                load_group(x, r0, rows, raw, subset)  # the outputs' pass wrote over the rows
            while remaining > 0 and passes < target:
                _levels(ref, tau, lam, is_mag, level)
                _pass(raw, ref, tau, level, lam, q, is_mag, acc)
                remaining = _update(state, acc, ref, lam, q, k, is_mag)
                passes += 1
                if passes == max_passes and remaining <= busy_lanes:
                    going_on = False  # this group need not go on, nor, likely, the next
                # A group that goes on stops as soon as few enough lanes iterate.
                if passes >= max_passes and remaining <= busy_lanes:
                    break
            # The outputs (of unresolved rows too: the caller overwrites them).
            _levels(ref, tau, lam, is_mag, level)
            if row_order:
                for lane in range(used):
                    r = rows[lane]
                    if with_residuals:
                        sets[lane] = _row_outputs(x[r], out[r], gprime[r], codes[r] if is_mag else no_codes,
                                                  ref[lane], tau[lane], level[lane], lam, q, is_mag)
                    else:
                        sets[lane] = _mag_row_values(x[r], out[r], no_codes, ref[lane], tau[lane], level[lane],
                                                     lam, q)
                for lane in range(used, LANES):  # lanes past the last row repeat the first
                    sets[lane] = sets[0]
            else:
                for lane in range(LANES):
                    frame[1, lane] = tau[lane]
                _lane_outputs(raw, frame, lam, q, is_mag, is_mag and not with_residuals, gbuf, lane_gprime,
                              sets)
            if max_passes == 0:
                break  # no pass allowed: only the lanes solved at the start are
            passes += 1
            remaining = _confirm(state, sets, ref, lam, q, k, is_mag)
            # Past `max_passes`, only a group with many lanes still iterating goes on (its outputs
            # are written again): the rows left are solved again from the start, which costs more
            # than a pass for many.
            if remaining <= busy_lanes or passes >= pass_limit:
                break
            going_on = True
            target = pass_limit - 1
        for lane in range(used):
            unresolved[rows[lane]] = active[lane] != 0.0
        if is_mag and with_residuals:
            for lane in range(used):
                offset[rows[lane]] = k - _saturated_count(sets[lane])  # the unit weights of F: k - |A|
        if row_order:
            continue
        # Back to input order.
        store_group(raw, used, rows, out)
        if is_mag and with_residuals:
            # The sets' codes (raw: -1 on A, the value on F, else 0) went back as they are; each
            # row's outputs and residuals are read off them and x, contiguously.
            _mag_rows(x, rows, used, out, codes, gprime, free_gprime, frame, lam)
        elif with_residuals:
            store_group(gbuf, used, rows, gprime)
    for lane in range(LANES):
        non_finite += 0 if poison[lane] == 0.0 else 1
    return non_finite


def lane_rows(x, k, lam, q, is_mag, bounds, out, gprime, codes, offset, unresolved, n_chunks,
              max_passes, subset, busy_lanes=LANES):
    """Solve rows of `x` LANES at a time (module docstring); flag the rows left to the caller.

    Arguments as in `select._select_rows` (q = 2 or 4; no keys: the mask's are x, and the
    magnitude's |x| the lanes take as they load x), with `bounds` the (batch, 2) k-th
    and (k+1)-th largest keys of every row (1 <= k < n), or empty: they are then
    found here, by `sweep_order_statistics` on the rows already in the lane
    layout (no second transposition; for small k only), `unresolved` a
    (batch,) bool array, set where a row was not solved here (its outputs are
    then garbage, to be overwritten), and `max_passes` the passes over every group,
    the outputs' included (0: the outputs at the start, where only rows without a violator
    are solved), `subset` the indices of the rows to solve (in place), or empty for every
    row; a group with more than `busy_lanes` rows still iterating after `max_passes` passes
    goes on, up to MAX_PASSES (its outputs are written again).

    Returns whether every key was finite, as far as the lanes looked (with `bounds` empty, every
    entry of the rows solved; otherwise none, and True): rows with a non-finite key come out as
    garbage, flagged or not, and are the caller's to solve again.
    """
    # Each chunk is a call of one function (`_lane_chunk`), compiled once for both variants: with the chunk's
    # body in the parallel loop, Numba's parfor passes ran over the whole inlined solver and each variant
    # compiled it on its own.  Measured (empty cache, float32 magnitude, p = 4/3, `first_call.py`): a first
    # call at (16384, 64) 54 -> 47.5 s, then one at (64, 64) (the serial variant) 13.7 -> 4.2 s; the calls
    # themselves as fast (`ab_versions.py`: 0.99-1.05x) once the chunk's per-row loop became a function of
    # its own (`_mag_rows`; before, the magnitude's forward with residuals at (262144, 16) took 1.2x the
    # time of the inlined chunk).  Numba's parallel loop counts in uint64: the cast
    # keeps the chunk's signature, which it would otherwise compile a second time.
    non_finite = 0
    for c in nb.prange(n_chunks):
        non_finite += _lane_chunk(x, k, lam, q, is_mag, bounds, out, gprime, codes, offset, unresolved, n_chunks,
                                  max_passes, subset, busy_lanes, np.int64(c))
    return non_finite == 0

lane_rows = _compiled_pair(lane_rows)
