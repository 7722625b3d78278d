"""A row's threshold by iteration over the whole row, with no sort: the CPU fast path for long rows, p = 2 and 4/3.

The selection kernel (module `select`) finds a row's order statistics, then
orders the entries between its cuts (the candidates) and runs PAV on them.
On long rows both cost more than a vectorized sort: the selection is a
branchy quickselect, and the candidates are many (a few percent of 10^6
entries).  Neither is needed: the solution is fixed by one threshold `t`
(spec section 5), and on fixed sets (saturated `S`, free `F`) the equation
``sum(y) = k`` is PAV's block equation of `F`, with a closed form for p = 2
(linear) and p = 4/3 (a cubic): `kernels._closed_block_value`.  So, per row,

1. the same iteration on a strided sample of the row, with k scaled to the
   sample's size, gives a first threshold (`sample_start`);
2. every step is one pass over the row that counts `S` and `F` and sums
   powers of ``d = s - t`` over `F` at the current threshold (no branch: the
   compiler vectorizes it), then solves the equation exactly on those sets
   (a Newton step of the piecewise smooth ``sum(y)``), safeguarded by a
   bracket that the signs of ``sum(y) - k`` narrow (and widen, doubling, while
   one end is still open), steps strictly inside it and Brent's rule;
3. the row is solved when the sets at the new threshold are the ones it was
   computed from: it is then the root on those sets and they are its own,
   the exact threshold of the row (`advance`); a threshold settled on an end
   of a non-unique interval is moved inside it (`leave_interval_end`);
4. one more pass writes the outputs and residuals (`emit_row`), vectorized;
   when a step is small enough that the sets should not change
   (`worth_emitting`), the drivers write the outputs at once and confirm the
   sets from that pass's counts, which saves the confirming pass.  Both
   drivers take these decisions through `ready_to_emit` and `settle`.

Rows need 3-5 passes for p = 2, 5-6 for p = 4/3.  A row that does not settle
within `MAX_STEPS` is left to the caller (the selection kernel solves it
exactly), and so is a magnitude row of extreme scale (see `select`).  The threshold is
held relative to a value `ref` of the keys' own dtype next to it, so that
``s - ref`` is exact for float32 keys and ``d`` keeps its digits when the keys
are large next to the strength (or, for the magnitude, when the free entries
are ties at a small strength); the magnitude's saturation width and
right-hand side read the absolute threshold ``ref + t``.  The drivers (a
row per thread, or a long row split across the threads) are in `select`.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._scalar import g_prime_scalar, g_scalar
from .kernels import _closed_block_value, far_below, set_code
from .vector_width import prefer_wide_vectors

# Passes per row before the row is handed back to the selection kernel.
MAX_STEPS = 40
# A step of at most this many ulps of the threshold's scale is a step to the threshold itself.
_STEP_ULPS = 8.0
_EPS = np.finfo(np.float64).eps
# Newton steps at most of `_cubic_polish` (quadratic convergence: a few from any start below the keys).
_POLISH_STEPS = 12
# Fast-math flags of the passes over a row, which change only the last bits and let the compiler
# vectorize: reassociated sums (`row_sums`), and a multiplication by 1 / l instead of a division
# by l per entry (the passes that write outputs), which would cost several times the rest.
_REASSOC = {"reassoc"}
_ARCP = {"arcp"}
# Status codes of `advance` (RECENTRE: move the frame next to the absolute threshold in state[9],
# `recentre`), and the length of its state.
ITERATE, SOLVED, FAILED, RECENTRE = 0, 1, -1, 2
STATE_SIZE = 10


@nb.njit(cache=True, error_model="numpy")
def sample_size(n: int) -> int:
    """Size of the strided sample that starts a row of `n` entries: 2 sqrt(n), within [64, 4096], at most n."""
    return min(n, max(64, min(4096, 2 * int(math.sqrt(n)))))


@nb.njit(cache=True, inline="always", error_model="numpy")
def _width(t, lam, q, is_mag):
    # How far above the threshold a key is saturated: l for the mask; for the magnitude
    # g(s - t) >= t, i.e. s - t >= l t^(1/(q-1)), with `t` absolute (not relative to `ref`).
    if not is_mag:
        return lam
    return lam * t if q == 2.0 else lam * np.cbrt(t)


@nb.njit(cache=True, error_model="numpy")
def _entry_sets(s, ref, t, width):
    """(d, saturated, free) of a key `s` at threshold `t` (relative to `ref`): the one definition of the sets.

    Not inlined by Numba, so compiled without the callers' fast-math flags:
    LLVM still inlines it, but may not reassociate ``(s - ref) - t`` into
    ``s - (ref + t)``, which would lose the digits of `d` the frame keeps.
    """
    d = (s - ref) - t
    return d, d >= width, (d > 0.0) & (d < width)


@nb.njit(cache=True, fastmath=_REASSOC, error_model="numpy")
def row_sums(row, j0, j1, ref, t, lam, q, is_mag):
    """(|S|, |F|, sum_F d, sum_F d^2, sum_F d^3) over row[j0:j1] at threshold `t`, d = s - ref - t.

    Reassociated sums (`_REASSOC`); `d` and the sets come from `_entry_sets`,
    compiled without it, so they are those of `emit_row` to the bit.
    """
    prefer_wide_vectors()
    width = _width(ref + t, lam, q, is_mag)
    cubic = q != 2.0
    n_sat = 0
    n_free = 0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    part = row[j0:j1]  # a view indexed from 0: see `emit_row`
    for j in range(part.shape[0]):
        d, sat, free = _entry_sets(float(part[j]), ref, t, width)
        n_sat += 1 if sat else 0
        n_free += 1 if free else 0
        e = d if free else 0.0
        s1 += e
        if cubic:
            e2 = e * e
            s2 += e2
            s3 += e2 * e
    return n_sat, n_free, s1, s2, s3


@nb.njit(cache=True, error_model="numpy")
def _step(ref, t, rest, n_sat, n_free, s1, s2, s3, lam, q, is_mag):
    """(f, root): ``f = sum(y) - rest`` at `t` (relative to `ref`), and the root of that equation on
    the sets at `t` (NaN when the free set is empty), from the sums of `row_sums`."""
    # sum_F g(d) = sum_F (d / l)^(q-1): s1 / l (q = 2) or s3 / l^3 (q = 4); the magnitude's y is
    # g(d) / t, with t absolute.
    lq = lam if q == 2.0 else lam * lam * lam
    f = n_sat + (s1 if q == 2.0 else s3) / (lq * (ref + t) if is_mag else lq) - rest
    if n_free == 0:
        return f, math.nan
    mean = s1 / n_free
    # Central moments of F (shift invariant, so taken from the d = s - t).
    m2 = max(s2 - s1 * mean, 0.0)
    m3 = s3 - 3.0 * mean * s2 + 2.0 * n_free * mean * mean * mean
    unit = rest - n_sat  # the free set's unit weights
    if is_mag:
        # The keys relative to `ref` have mean t + mean: the value comes back relative to `ref`.
        return f, _closed_block_value(float(n_free), t + mean, m2, m3, unit, lam, q, is_mag, ref)
    return f, t + _closed_block_value(float(n_free), mean, m2, m3, unit, lam, q, is_mag, 0.0)


@nb.njit(cache=True, inline="always", error_model="numpy")
def far_below_width(ref, t, lam, q, is_mag):
    """Whether the magnitude's threshold (p = 4/3; `t` relative to `ref`) lies below its saturation width,
    and so possibly far below the free keys, which lie within that width above it.

    There the closed-form step, ``mean - (mean - t)`` in effect, is exact to
    eps times the free set's mean key only: tied keys at their saturation level
    next to keys 4e6 times smaller settled 9e-18 off a threshold of 5.4e-8, and
    the free entries near 1e-6 lost 6 digits of ``|x| - t``.  Such a threshold
    is polished (`_cubic_polish`) once its sets are confirmed.  (For p = 2 the
    closed form has no such cancellation.)
    """
    return is_mag and q == 4.0 and ref + t < _width(ref + t, lam, q, is_mag)


@nb.njit(cache=True, error_model="numpy")
def _cubic_polish(ref, t, unit, n_free, s1, s2, s3, lam):
    """The root of a magnitude's equation (p = 4/3) on the sets at `t` (relative to `ref`), as an absolute
    threshold, from the sums of `row_sums` at `t`: ``h = sum_F (d - u)^3 - l^3 unit T`` at ``T = ref + t + u``,
    a cubic in u exact to eps times T (`unit`: the free set's unit weights).

    h is decreasing and convex below the free keys, so Newton steps converge
    to its root without a safeguard (after the first, from below),
    quadratically: from 1.3e-22 to a root of 2.8e-33 under free keys of
    1e-11 in two steps (one step had left the root 1e-6 off, and the outputs
    of keys near it with it).  The iterate is the absolute threshold itself,
    not a correction of `t`, nor `t` relative to `ref`: either keeps only
    eps t (or eps ref) of a root far below it (a root of 7.5e-41 came out
    2.4e-38 from 8.4e-23).  u's own rounding moves the cubic's terms by eps
    of themselves only.
    """
    l3 = lam * lam * lam
    root = ref + t
    for _ in range(_POLISH_STEPS):
        u = (root - ref) - t
        h = s3 - u * (3.0 * s2 - u * (3.0 * s1 - n_free * u)) - l3 * unit * root
        slope = 3.0 * s2 - u * (6.0 * s1 - 3.0 * n_free * u) + l3 * unit  # -h'
        step = h / slope
        root += step
        if abs(step) <= _EPS * abs(root):
            break
    return root


@nb.njit(cache=True, inline="always", error_model="numpy")
def frame_holds(ref, t, is_mag):
    """Whether a settled threshold `t` is known to its own digits in its frame (`ref`: a key-dtype value
    next to the start).  A magnitude threshold that ended far below the start (`kernels.far_below`)
    is known to eps ref only: keys 1.0 and 1e-7 (k = 181 of 450) started at 0.5 and settled on
    9.96e-8 to 1e-9 of it, and the free entries' |x| - t lost 7 digits.  The caller then moves
    the frame next to the threshold (`recentre`) and iterates on.  (The mask's outputs, in
    [0, 1], do not mind.)"""
    return not (is_mag and far_below(ref + t, ref))


@nb.njit(cache=True, inline="always", error_model="numpy")
def key_dtype_value(value, ref_cast):
    """`value` rounded to the keys' dtype (through `ref_cast`, a 1-array of it), as float64: a frame
    reference for which s - ref is exact for float32 keys (Numba's float() would keep it float32,
    and s - ref would round)."""
    ref_cast[0] = value
    return np.float64(ref_cast[0])


@nb.njit(cache=True, error_model="numpy")
def recentre(state, ref, ref_cast):
    """Move the iteration's frame to a value of the keys' dtype next to its threshold; return the new ref.

    The threshold is `state[9]` where a polish left it (absolute, with all its
    digits, `advance`), else ``ref + state[0]``.  The threshold and its bracket
    are shifted into the new frame; the threshold counts as not coming from a
    step there, so a step and a pass that confirms its sets solve the row
    again in the new frame.
    """
    absolute = state[9] if state[9] == state[9] else ref + state[0]
    new_ref = key_dtype_value(absolute, ref_cast)
    shift = ref - new_ref
    state[0] = absolute - new_ref
    state[1] += shift
    state[2] += shift
    state[4] = 0.0
    state[7] = np.inf  # Brent's rule: the next step is not judged by the old frame's steps
    state[8] = np.inf
    state[9] = np.nan
    return new_ref


@nb.njit(cache=True, error_model="numpy")
def advance(state, sums, rest, ref, lam, q, is_mag):
    """One step of the iteration from the sums at the current threshold; returns ITERATE, SOLVED, FAILED or
    RECENTRE.

    `state` (float64, STATE_SIZE): threshold (relative to `ref`), bracket ends lo and hi
    (infinite while open), the span of the next widening, whether the
    threshold came from an unsafeguarded step (1.0; 2.0: from a polish on
    SOLVED, whose sets `settle` checks), the counts |S|, |F| at the threshold
    it came from, the lengths of the last two steps, and the absolute root
    of the last polish (NaN: none).  On SOLVED the threshold is the row's; no
    step is taken.  On RECENTRE the step's root lies far below the frame: the
    driver moves the frame there (`ready_to_emit`) and iterates on.
    """
    t, lo, hi, span = state[0], state[1], state[2], state[3]
    n_sat, n_free, s1, s2, s3 = sums
    # Below the saturation width the closed form cancels (`far_below_width`); Newton steps on
    # the same sets do not.  Their root is absolute (state[9] keeps it for `recentre`).
    polish = far_below_width(ref, t, lam, q, is_mag) and n_free > 0
    root = _cubic_polish(ref, t, rest - n_sat, n_free, s1, s2, s3, lam) if polish else math.nan
    state[9] = root
    if state[4] == 1.0 and n_sat == state[5] and n_free == state[6]:
        if polish:
            moved = abs((root - ref) - t) > _STEP_ULPS * _EPS * abs(root)
            state[0] = root - ref
            # The sets at the polished threshold must be these (`settle` compares the counts of
            # the pass that writes the outputs): mark it as a threshold that moved.
            state[4] = 2.0 if moved else 1.0
        return SOLVED
    f, nxt = _step(ref, t, rest, n_sat, n_free, s1, s2, s3, lam, q, is_mag)
    if polish:
        nxt = root - ref
    if f == 0.0 and n_free == 0:
        # No fractional entry: the threshold is not unique, and any t of the interval (this one
        # included) gives the exact 0/1 answer with an empty free set.
        return SOLVED
    if f > 0.0:
        lo = t
    elif f < 0.0:
        hi = t
    if polish and ref != 0.0 and far_below(root, ref):
        # The frame cannot hold the step's root (relative to ref it keeps eps ref of it, and may
        # round onto the bracket's end): move the frame next to it first.
        state[1], state[2] = lo, hi
        return RECENTRE
    # Strictly inside: a step onto an end of the bracket (an earlier iterate) would let two
    # iterates alternate for ever on a piecewise-linear sum(y); bisect then.  False for NaN.
    from_step = lo < nxt < hi
    # Brent's rule: a step longer than half the one before the last is not converging (far
    # from the root, where the sets change a lot, the steps crawl): bisect instead.
    from_step = from_step and abs(nxt - t) <= 0.5 * state[8]
    # (The magnitude's step rounds to ulps of its absolute threshold: with the saturation width, l times
    # it at p = 2, as the scale, l = 3255 stopped 3e-12 of the threshold off, rows spanning many orders.)
    scale = abs(ref + t) if is_mag else _width(ref + t, lam, q, is_mag)
    if abs(nxt - t) <= _STEP_ULPS * _EPS * (abs(t) + scale):
        # The root on these sets is t itself, to rounding (the sets changed by entries at
        # d = 0, or f is a rounding error): stay, and the next pass confirms the sets.
        nxt, from_step = t, True
    if not from_step:
        if math.isinf(hi):
            nxt = t + span
            span *= 2.0
        elif math.isinf(lo):
            nxt = t - span
            span *= 2.0
        else:
            nxt = 0.5 * (lo + hi)
            if nxt == t:
                return FAILED  # the bracket has shrunk to nothing without a root
    state[8], state[7] = state[7], abs(nxt - t)
    state[0], state[1], state[2], state[3] = nxt, lo, hi, span
    state[4] = 1.0 if from_step else 0.0
    state[5], state[6] = n_sat, n_free
    return ITERATE


@nb.njit(cache=True, error_model="numpy")
def _largest_unsaturated(row, ref, t, width, zero_only):
    """The largest key of `row` (relative to `ref`) that is not saturated at `t`, or (`zero_only`)
    that is 0 there; -inf when there is none."""
    best = -np.inf
    for j in range(row.shape[0]):
        s = float(row[j])
        _, sat, free = _entry_sets(s, ref, t, width)
        below = not (sat or (free and zero_only))
        best = max(best, s - ref if below else -np.inf)
    return best


@nb.njit(cache=True, inline="always", error_model="numpy")
def _at_interval_end(state, k):
    # Whether the counts at a solved threshold say it may sit on an end of a non-unique
    # interval (see `leave_interval_end`).
    n_sat, n_free = state[5], state[6]
    return n_free > 0.0 and (n_sat + n_free == k or n_sat == k)


@nb.njit(cache=True, error_model="numpy")
def worth_emitting(state, t_prev, k, ref, lam, q, is_mag):
    """Whether to write the outputs at the threshold `advance` just stepped to from `t_prev`, on the bet
    that it keeps the sets it was computed from (then it is solved, and the pass that would confirm it
    is saved; the caller compares the counts that `emit_row` returns with state[5], state[6]).

    Bets when the step was a closed-form one and moves the ends of the free
    window past fewer than a quarter of an entry, at the window's density.
    """
    if state[4] != 1.0 or state[6] == 0.0 or _at_interval_end(state, k):
        return False
    if far_below_width(ref, state[0], lam, q, is_mag):
        return False  # a pass confirms the sets first, then the threshold is polished (`advance`)
    return abs(state[0] - t_prev) * 2.0 * state[6] < 0.25 * _width(ref + t_prev, lam, q, is_mag)


@nb.njit(cache=True, inline="always", error_model="numpy")
def ready_to_emit(status, row, state, t_prev, k, ref, ref_cast, lam, q, is_mag):
    """After `advance` (which returned `status` and stepped from `t_prev`): whether the driver writes the
    row's outputs now (`emit_row`), then hands their counts to `settle`; returns (write, the frame's ref).

    Yes at a solved threshold (first moved off an end of a non-unique interval,
    `leave_interval_end`), unless its frame does not resolve it
    (`frame_holds`): the frame then moves next to it (`recentre`) and the
    iteration goes on there, with no pass spent on outputs the frame cannot
    give.  And yes on the bet of `worth_emitting` that the threshold just
    stepped to keeps its sets.
    """
    if status == RECENTRE or (status == SOLVED and not frame_holds(ref, state[0], is_mag)):
        return False, recentre(state, ref, ref_cast)
    if status == SOLVED:
        leave_interval_end(row, ref, state, k, lam, q, is_mag)
        return True, ref
    return status == ITERATE and worth_emitting(state, t_prev, k, ref, lam, q, is_mag), ref


@nb.njit(cache=True, inline="always", error_model="numpy")
def settle(status, state, n_sat, n_free, ref, ref_cast, is_mag):
    """Whether the outputs just written (with set counts `n_sat`, `n_free`) are the row's; returns
    (settled, the frame's ref, which moves when the threshold re-centres).

    They are at a solved threshold (whose sets, when `advance` polished it,
    must be those it came from), or on a won bet (the counts are those the
    threshold came from), unless the threshold is not known to its own
    digits in its frame (`frame_holds`): the frame then moves next to it
    (`recentre`) and the iteration goes on there.
    """
    same_sets = n_sat == state[5] and n_free == state[6]
    if not ((status == SOLVED and state[4] != 2.0) or same_sets):
        return False, ref
    if not frame_holds(ref, state[0], is_mag):
        return False, recentre(state, ref, ref_cast)
    return True, ref


@nb.njit(cache=True, error_model="numpy")
def leave_interval_end(row, ref, state, k, lam, q, is_mag):
    """Move a solved threshold off an end of a non-unique interval, where its free set is spurious.

    When no entry is fractional, every threshold of an interval solves the
    row (spec section 6) and the iteration, which approaches from outside,
    settles on an end of it within rounding: there the entries of one group
    sit at y = 1 - eps (|S| + |F| = k) or y = eps (|S| = k) and form a free
    set that is not there.  Then the (k+1)-th largest key `s_(k+1)` is the
    largest key below that group; at ``t = s_(k+1)`` the k largest keys are
    all saturated exactly when the row has no violator (PAV's own test,
    ``g(s_(k) - s_(k+1)) >= target``), and that threshold, inside the
    interval, is taken.  One or two passes, on such rows only.
    """
    if not _at_interval_end(state, k):
        return
    t = state[0]
    width = _width(ref + t, lam, q, is_mag)
    # Below the group: the zero set (|S| + |F| = k), or the free and zero sets (|S| = k).
    t_next = _largest_unsaturated(row, ref, t, width, state[5] != k)
    if is_mag and not ref + t_next > 0.0:
        return
    sums = row_sums(row, 0, row.shape[0], ref, t_next, lam, q, is_mag)
    if sums[0] == k and sums[1] == 0:
        state[0] = t_next
        state[5], state[6] = k, 0.0


@nb.njit(cache=True, error_model="numpy")
def start_state(state, t, ref, is_mag, span):
    """Set `state` (see `advance`) to start at threshold `t` (relative to `ref`) with an open bracket."""
    state[0] = t
    state[1] = -ref if is_mag else -np.inf  # the magnitude's threshold is positive
    state[2] = np.inf
    state[3] = span
    state[4] = 0.0
    state[5] = -1.0
    state[6] = -1.0
    state[7] = np.inf
    state[8] = np.inf
    state[9] = np.nan


@nb.njit(cache=True, error_model="numpy")
def sample_start(keys, r, k, lam, q, is_mag, sample, state):
    """A first threshold (absolute) for row `r` and the span of a first widening, from the iteration
    run on a strided sample of ``len(sample)`` keys with k scaled to its size."""
    n = keys.shape[1]
    n_s = sample.shape[0]
    low = np.inf
    high = -np.inf
    for i in range(n_s):
        v = float(keys[r, (i * n) // n_s])
        sample[i] = v
        low = min(low, v)
        high = max(high, v)
    span = high - low + lam
    start_state(state, 0.5 * (low + high), 0.0, is_mag, span)
    rest = k * n_s / n
    for _ in range(MAX_STEPS):
        t = state[0]
        if advance(state, row_sums(sample, 0, n_s, 0.0, t, lam, q, is_mag), rest, 0.0, lam, q, is_mag) != ITERATE:
            break
    return state[0], span


@nb.njit(cache=True, error_model="numpy")
def emit_row(keys, x, r, j0, j1, ref, t, lam, q, is_mag, with_residuals, out, gprime, codes):
    """Write the outputs (and residuals) of entries [j0, j1) of row `r` at its threshold `t`
    (relative to `ref`); returns (|S|, |F|) over them.

    Each loop is its own function over 1-D views indexed from 0 (indices
    Numba knows to be non-negative), with selects only: the compiler
    vectorizes them, which it does not do for one loop with every case.
    """
    width = _width(ref + t, lam, q, is_mag)
    s_row = keys[r, j0:j1]
    if is_mag:
        counts = _mag_values(s_row, x[r, j0:j1], out[r, j0:j1], ref, t, width, lam, q)
    else:
        counts = _mask_values(s_row, out[r, j0:j1], ref, t, width, lam, q)
    if with_residuals:
        if is_mag:
            # g' and the set codes in one loop (measured 0.94-0.97x the time of two).
            _mag_residuals(s_row, x[r, j0:j1], gprime[r, j0:j1], codes[r, j0:j1], ref, t, width, lam, q)
        else:
            _free_derivatives(s_row, gprime[r, j0:j1], ref, t, width, lam, q)
    return counts


@nb.njit(cache=True, fastmath=_ARCP, error_model="numpy")
def _mask_values(s_row, y_row, ref, t, width, lam, q):
    prefer_wide_vectors()
    n_sat = 0
    n_free = 0
    for j in range(s_row.shape[0]):
        d, sat, free = _entry_sets(float(s_row[j]), ref, t, width)
        n_sat += 1 if sat else 0
        n_free += 1 if free else 0
        y_row[j] = 1.0 if sat else min(g_scalar(d if free else 0.0, lam, q), 1.0)
    return n_sat, n_free


@nb.njit(cache=True, fastmath=_ARCP, error_model="numpy")
def _mag_values(s_row, x_row, y_row, ref, t, width, lam, q):
    prefer_wide_vectors()
    n_sat = 0
    n_free = 0
    for j in range(s_row.shape[0]):
        s = float(s_row[j])
        d, sat, free = _entry_sets(s, ref, t, width)
        n_sat += 1 if sat else 0
        n_free += 1 if free else 0
        xj = x_row[j]
        # On F: sign(x) (g(d) + d), spec section 5, capped at the key s = |x|: below it exactly (F lies
        # below saturation), at most a few ulps above it once rounded.
        value = min(g_scalar(d if free else 0.0, lam, q) + d, s)
        y_row[j] = xj if sat else (math.copysign(value, xj) if free else 0.0)
    return n_sat, n_free


@nb.njit(cache=True, fastmath=_ARCP, error_model="numpy")
def _free_derivatives(s_row, g_row, ref, t, width, lam, q):
    prefer_wide_vectors()
    for j in range(s_row.shape[0]):
        d, _, free = _entry_sets(float(s_row[j]), ref, t, width)
        g_row[j] = g_prime_scalar(d if free else 0.0, lam, q)


@nb.njit(cache=True, fastmath=_ARCP, error_model="numpy")
def _mag_residuals(s_row, x_row, g_row, code_row, ref, t, width, lam, q):
    prefer_wide_vectors()
    for j in range(s_row.shape[0]):
        d, sat, free = _entry_sets(float(s_row[j]), ref, t, width)
        g_row[j] = g_prime_scalar(d if free else 0.0, lam, q)
        code_row[j] = set_code(x_row[j], free, sat)
