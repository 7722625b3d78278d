"""Selection-first PAV: the CPU fast path for rows with finite keys, with no full sort.

The solution of a row is fixed by one threshold `t` (spec section 5), and `t`
lies strictly between two values read off the row's order statistics
`s_(k) >= s_(k+1)` (the k-th and (k+1)-th largest keys):

* `t < s_(k)`: there fewer than k entries are positive, so `sum(y) < k`;
* `t > s_(k+1) - l` (mask) or `t > u(s_(k+1))` (magnitude, `u` the fixed point
  of `g(s - u) = u`): there at least k + 1 entries are saturated.

Saturation is monotone in the threshold, so an entry saturated at `s_(k)` is
saturated at `t` (y = 1, identity for the magnitude) and an entry below the
lower bound is 0.  Only the entries in between, the candidates, can be
fractional or pooled.  Each row therefore costs one selection (O(n)), one
classification pass, and a sort of the candidates only, followed by the same
boundary-block PAV as the full-sort route (`kernels._pooled_block`) on them
with `k - (number saturated)` unit weights.  With the benchmarks' strengths a
row of 10^6 keeps a few percent of its entries as candidates; when the
strength is so large that every entry is a candidate, this is the full sort.

Both cuts are moved outward by a few float64 ulps: a candidate too many is
harmless (PAV classifies it exactly), a misclassified entry would not be.

`topk_rows_select` is also the driver of the two other CPU routes, which hand
the rows they do not settle back to this kernel: many short rows with p = 2
or 4/3 go to the lane solver (module `lanes`), and long rows with p = 2 or 4/3 to
the sort-free iteration (module `sortfree`), which needs neither the order
statistics nor an order of the candidates.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from . import parallel
from ._scalar import mag_fixed_point
from .kernels import (
    _compiled_pair,
    _pooled_block,
    _row_frame,
    _unit_scale,
    emit_entry,
    read_only,
    segment_entry,
    set_code,
)
from .lanes import (
    CUBIC_LANE_MAX_N,
    EVERY_ROW,
    LANES,
    busy_lanes,
    lane_passes,
    lane_retry_passes,
    lane_rows,
    lanes_apply,
    lanes_serve,
    load_group,
    row_at,
    row_count,
    sweep_order_statistics,
)
from .sortfree import (
    FAILED,
    MAX_STEPS,
    STATE_SIZE,
    advance,
    emit_row,
    key_dtype_value,
    ready_to_emit,
    row_sums,
    sample_size,
    sample_start,
    settle,
    start_state,
)
from .vector_width import prefer_wide_vectors

# k + 1 up to this many: keep the k + 1 largest keys in a small sorted buffer
# (a few insertions per row); beyond it, select with np.partition.
TRACK_MAX = 16
# Candidate sets up to RANK_MAX entries are ordered by counting ranks, up to INSERTION_MAX
# by insertion sort, larger ones by np.argsort.
RANK_MAX = 8
INSERTION_MAX = 32
# Rows up to this length get their order statistics from a pass over all rows before the
# kernel: `lane_order_statistics` for rows up to LANE_TRACK_MAX_N entries with k + 1 at most
# LANE_TRACK_MAX, else np.sort of the keys (values only).
PRESORT_MAX_N = 256
# Longer rows up to this length whose k + 1 exceeds TRACK_MAX, when the sort-free route does not
# serve them, take np.sort of the keys too: NumPy's vectorized sort costs a fraction of Numba's
# np.partition row by row (a quarter at 4096 entries).
SORT_BOUNDS_MAX_N = 1 << 16
# The lanes' sweeps (`lanes.sweep_order_statistics`) against np.sort of the keys, on 4M float32
# entries (AVX-512 machine, 2 threads against np.sort's one, Numba's cache filled): 0.2-0.4x its
# time for k + 1 = 9, 0.4-0.5x at 17 and 0.6-0.75x at 33, for rows of 32-192 entries; rows of
# 256 (a transposed group no longer fits the L1 cache) take 1-1.8x its time.  (Measured with one
# entry per sweep; three per sweep, `lanes.SWEEP_DEPTH`, took 0.85-0.9x that time at n = 64.)
LANE_TRACK_MAX = 33
LANE_TRACK_MAX_N = 192
# Rows longer than the lanes' own limits (`lanes.LANE_MAX_N`, `CUBIC_LANE_MAX_N`), up to this length, take
# the lanes too when k + 1 <= LANE_TRACK_MAX (their sweeps find the order statistics) and there are at
# least LANES rows (fewer would leave lanes idle).  Measured with k = 8 (`benchmarks/bench_lanes.py --k 8
# --lengths ...`, float32, 4M entries, l = 0.1): the lanes took 0.47-0.66x the selection kernel's time
# at n = 384-512, 0.55-0.79x at 768, 0.63-0.90x at 1024, 0.84-1.18x at 2048 (p = 4/3 lost there) and
# 1.07-1.73x at 4096; the public forwards against the routes they took before (ratios to np.sort):
# p = 2 at n = 384-1024, k = 8: 0.84-1.98 -> 0.50-0.96; p = 4/3 at 640-1024, k = 8-32: 0.83-2.65 -> 0.53-1.01.
SMALL_K_LANE_MAX_N = 1024
# Rows at least this long, in batches smaller than the thread count, are split across
# the threads (selection and classification) instead of taking one thread per row.
LONG_ROW_MIN_N = 1 << 17
# Size of the strided sample that brackets the order statistics of a long row.
SAMPLE_SIZE = 8192
# Rows at least this long, with p = 2 (SORTFREE_MIN_N) or p = 4/3 (SORTFREE_CUBIC_MIN_N) and
# k + 1 > TRACK_MAX, first try the sort-free iteration of module `sortfree` (no order statistics,
# no ordering of candidates).  Measured against np.sort bounds and the selection kernel (float32,
# k = n/8, AVX-512 machine): for p = 2, 0.25-0.7x their time from 384 entries on, 1x at 256; for
# p = 4/3, which needs more passes of more work, 0.6-0.9x from 768 on, 1.1-1.3x at 384-512.
SORTFREE_MIN_N = PRESORT_MAX_N + 1
SORTFREE_CUBIC_MIN_N = 768
_EPS = np.finfo(np.float64).eps


@nb.njit(cache=True, error_model="numpy")
def order_statistics(row, k, top):
    """Return the k-th and (k+1)-th largest entries of `row` (1 <= k < len(row)) as floats.

    `top` is a float64 scratch buffer; when ``k + 1 <= len(top)`` it holds the
    k + 1 largest entries seen so far, in descending order.
    """
    n = row.shape[0]
    m = k + 1
    if m <= top.shape[0]:
        last = -np.inf
        for i in range(n):
            v = float(row[i])
            if i >= m and v <= last:
                continue
            j = min(i, m - 1)
            while j > 0 and top[j - 1] < v:
                top[j] = top[j - 1]
                j -= 1
            top[j] = v
            last = top[m - 1]
        return top[k - 1], top[k]
    part = np.partition(row, n - k)  # ascending: part[n - k] is the k-th largest
    below = -np.inf
    for i in range(n - k):
        below = max(below, np.float64(part[i]))
    return np.float64(part[n - k]), below


@nb.njit(cache=True, error_model="numpy")
def _order_candidates(cval, m, order):
    """Fill order[:m] with the indices of cval[:m] in descending order of value."""
    if m <= RANK_MAX:
        # At most RANK_MAX^2 compares with no data-dependent branch: cheaper than the
        # mispredicted moves of an insertion sort for the few candidates of a typical row.
        for i in range(m):
            v = cval[i]
            rank = 0
            for j in range(m):
                w = cval[j]
                rank += 1 if (w > v) | ((w == v) & (j < i)) else 0
            order[rank] = i
        return
    if m <= INSERTION_MAX:
        for i in range(m):
            v = cval[i]
            j = i
            while j > 0 and cval[order[j - 1]] < v:
                order[j] = order[j - 1]
                j -= 1
            order[j] = i
        return
    ascending = np.argsort(cval[:m])
    for i in range(m):
        order[i] = ascending[m - 1 - i]


@nb.njit(cache=True, error_model="numpy")
def _cuts(upper, below, lam, q, is_mag):
    """(zero_cut, saturated_cut): keys below the first are 0, keys above the second saturated."""
    if is_mag and upper == 0.0:
        # Fewer than k non-zero keys: every entry is saturated, so the row is returned as it is
        # and each partial derivative is 1 (a zero moved off 0 still leaves at most k non-zero
        # entries), as in the threshold method. Keys are >= 0: all lie above a cut at -1.
        return -1.0, -1.0
    if is_mag:
        # In the row's frame (a power-of-two scale for tiny or huge keys, see `_row_frame`).
        _, mult, lam_r, _ = _row_frame(upper, lam, q, is_mag)
        zero_cut, saturated_cut = _frame_cuts(upper * mult, below * mult, lam_r, q, is_mag)
        return zero_cut / mult, saturated_cut / mult
    return _frame_cuts(upper, below, lam, q, is_mag)


@nb.njit(cache=True, error_model="numpy")
def _frame_cuts(upper, below, lam, q, is_mag):
    margin = 8.0 * _EPS * (abs(upper) + abs(below) + lam)
    if is_mag:
        # Saturated at gamma: g(s - gamma) >= gamma, i.e. s >= gamma + l gamma^(1/(q-1)).
        if q == 2.0:
            grow = upper
        elif q == 4.0:
            grow = np.cbrt(upper)
        else:
            grow = math.pow(upper, 1.0 / (q - 1.0))
        return mag_fixed_point(below, lam, q) - margin, upper + lam * grow + margin
    # Saturated at gamma: g(s - gamma) >= 1, i.e. s >= gamma + l.
    return below - lam - margin, upper + lam + margin


@nb.njit(cache=True, inline="always", error_model="numpy")
def _classify(
    keys, x, r, j0, j1, zero_cut, saturated_cut, is_mag, with_residuals, out, gprime, codes, cval, cidx
):
    """Write entries [j0, j1) of row `r` as if each were saturated or 0, and collect the candidates.

    Returns (number saturated, number of candidates); the candidates, the
    entries between the cuts, are stored from index `j0` of `cval`/`cidx` on
    and are overwritten by the caller.  No loop has a data-dependent branch.
    """
    n_saturated = 0
    for j in range(j0, j1):
        sat = float(keys[r, j]) > saturated_cut
        out[r, j] = (x[r, j] if is_mag else 1.0) if sat else 0.0
        n_saturated += 1 if sat else 0
    if with_residuals:
        for j in range(j0, j1):
            gprime[r, j] = 0.0
        if is_mag:
            for j in range(j0, j1):
                codes[r, j] = set_code(0.0, False, float(keys[r, j]) > saturated_cut)
    # Branch-free compaction: every entry is written at the next free slot, which
    # advances only past candidates (candidates are scattered: a branch mispredicts).
    m = j0
    for j in range(j0, j1):
        sj = float(keys[r, j])
        cval[m] = sj
        cidx[m] = j
        m += 1 if (zero_cut <= sj) & (sj <= saturated_cut) else 0
    return n_saturated, m - j0


@nb.njit(cache=True, inline="always", error_model="numpy")
def _solve_candidates(r, k, n_saturated, m, cval, cidx, order, x, lam, q, is_mag, closed, with_residuals,
                      out, gprime, codes, offset):
    """Sort the m candidates of row `r`, pool them, and write their outputs (and residuals)."""
    _order_candidates(cval, m, order)
    kk = k - n_saturated
    a, b, gamma, frame = _pooled_block(cval, order, 0, m, kk, lam, q, is_mag, closed)
    if with_residuals and is_mag:
        offset[r] = kk - a if a < b else 0
    for i in range(m):
        j = cidx[order[i]]
        val, deriv, kept, free = segment_entry(cval[order[i]], float(x[r, j]), a <= i < b, i < kk, gamma, frame, q, is_mag)
        emit_entry(r, j, val, deriv, kept, free, is_mag, with_residuals, out, gprime, codes)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _all_saturated(r, x, is_mag, with_residuals, out, gprime, codes, offset):
    # k == n: every entry is saturated.  `with_residuals` a constant in each loop: read at run time, the
    # stores of the residuals were masked stores (`vector_width.unfolded_one`).
    if with_residuals:
        _saturated_entries(r, x, is_mag, True, out, gprime, codes)
        if is_mag:
            offset[r] = 0
    else:
        _saturated_entries(r, x, is_mag, False, out, gprime, codes)


@nb.njit(cache=True, inline="always", error_model="numpy")
def _saturated_entries(r, x, is_mag, with_residuals, out, gprime, codes):
    # `_all_saturated`'s loop.
    for j in range(x.shape[1]):
        val = float(x[r, j]) if is_mag else 1.0
        emit_entry(r, j, val, 0.0, True, False, is_mag, with_residuals, out, gprime, codes)


def sortfree_applies(n: int, k: int, q: float, lam: float) -> bool:
    """Whether rows of `n` entries try the sort-free iteration of module `sortfree` before the exact route."""
    min_n = SORTFREE_MIN_N if q == 2.0 else SORTFREE_CUBIC_MIN_N
    return n >= min_n and k + 1 > TRACK_MAX and k < n and (q == 2.0 or q == 4.0) and _unit_scale(lam) == 1.0


@nb.njit(cache=True, error_model="numpy")
def _sortfree_start(keys, r, k, lam, q, is_mag, sample, state, ref_cast):
    """Start row `r`'s iteration (module `sortfree`) from its sample; returns (usable, the frame's `ref`).

    Not usable: a magnitude row whose threshold is tiny or huge (binary exponent
    beyond +-100, as `kernels._row_frame` measures it), where the sums of
    powers of d under- or overflow; the selection kernel rescales such rows.
    """
    t0, span = sample_start(keys, r, k, lam, q, is_mag, sample, state)
    if is_mag and _unit_scale(t0) != 1.0:
        return False, 0.0
    # The threshold is held relative to a value of the keys' dtype next to t0: s - ref is then exact
    # for float32 keys, and d = (s - ref) - t keeps its digits for keys next to the threshold.
    ref = key_dtype_value(t0, ref_cast)
    start_state(state, t0 - ref, ref, is_mag, span)
    return True, ref


@nb.njit(cache=True, error_model="numpy")
def _sortfree_row(keys, x, r, k, lam, q, is_mag, with_residuals, out, gprime, codes, offset, sample,
                  state, ref_cast):
    """Solve row `r` by the sort-free iteration; False when it did not settle (the outputs it may have
    written on a lost bet are all written again by the caller's exact route)."""
    usable, ref = _sortfree_start(keys, r, k, lam, q, is_mag, sample, state, ref_cast)
    if not usable:
        return False
    return sortfree_iterate(keys, x, r, k, lam, q, is_mag, with_residuals, out, gprime, codes, offset,
                            state, ref, ref_cast)


@nb.njit(cache=True, error_model="numpy")
def sortfree_iterate(keys, x, r, k, lam, q, is_mag, with_residuals, out, gprime, codes, offset, state,
                     ref, ref_cast):
    """The iteration of `_sortfree_row` from the start in `state` (threshold relative to `ref`, a value of the
    keys' dtype); False when the row did not settle within `MAX_STEPS` passes."""
    n = keys.shape[1]
    row = keys[r]
    for _ in range(MAX_STEPS):
        t_prev = state[0]
        status = advance(state, row_sums(row, 0, n, ref, t_prev, lam, q, is_mag), float(k), ref, lam, q, is_mag)
        emit, ref = ready_to_emit(status, row, state, t_prev, k, ref, ref_cast, lam, q, is_mag)
        if emit:
            # Outputs not settled are written again later (or by the caller's exact route).
            n_sat, n_free = emit_row(keys, x, r, 0, n, ref, state[0], lam, q, is_mag, with_residuals, out, gprime,
                                     codes)
            settled, ref = settle(status, state, n_sat, n_free, ref, ref_cast, is_mag)
            if settled:
                _sortfree_offset(r, k, n_sat, n_free, is_mag, with_residuals, offset)
                return True
        if status == FAILED:
            return False
    return False


@nb.njit(cache=True, inline="always", error_model="numpy")
def _sortfree_offset(r, k, n_sat, n_free, is_mag, with_residuals, offset):
    if with_residuals and is_mag:
        # The free set's unit weights (k - |A|), as PAV's pooled block counts them.
        offset[r] = k - n_sat if n_free > 0 else 0


@nb.njit(cache=True, error_model="numpy")
def _select_chunk(keys, x, k, lam, q, is_mag, out, gprime, codes, offset, n_chunks, bounds, n_sample, rows, c):
    """Chunk `c` of the `n_chunks` of `_select_rows` (arguments as there): its share of the rows, with scratch
    buffers of its own (per chunk of rows, not per row)."""
    batch, n = keys.shape
    count = row_count(rows, batch)
    bounds_given = bounds.shape[0] == batch
    closed = q == 2.0 or q == 4.0
    with_residuals = gprime.shape[0] == batch and gprime.shape[1] == n
    sortfree = not bounds_given and n_sample > 0
    prefer_wide_vectors()
    cval = np.empty(n, dtype=np.float64)
    cidx = np.empty(n, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    top = np.empty(TRACK_MAX, dtype=np.float64)
    sample = np.empty(n_sample if sortfree else 0, dtype=np.float64)
    state = np.empty(STATE_SIZE, dtype=np.float64)
    ref_cast = np.empty(1, dtype=keys.dtype)
    for i in range(c * count // n_chunks, (c + 1) * count // n_chunks):
        r = row_at(rows, i)
        if k >= n:
            _all_saturated(r, x, is_mag, with_residuals, out, gprime, codes, offset)
            continue
        if sortfree and _sortfree_row(keys, x, r, k, lam, q, is_mag, with_residuals, out, gprime, codes,
                                      offset, sample, state, ref_cast):
            continue
        if bounds_given:
            upper, below = bounds[r, 0], bounds[r, 1]
        else:
            upper, below = order_statistics(keys[r], k, top)
        zero_cut, saturated_cut = _cuts(upper, below, lam, q, is_mag)
        n_saturated, m = _classify(
            keys, x, r, 0, n, zero_cut, saturated_cut, is_mag, with_residuals, out, gprime, codes,
            cval, cidx,
        )
        _solve_candidates(r, k, n_saturated, m, cval, cidx, order, x, lam, q, is_mag, closed, with_residuals,
                          out, gprime, codes, offset)


def _select_rows(keys, x, k, lam, q, is_mag, out, gprime, codes, offset, n_chunks, bounds, n_sample,
                 rows):
    """Kernel of `topk_rows_select`; rows are processed in `n_chunks` chunks.

    `bounds` is either (batch, 2): the k-th and (k+1)-th largest key of every
    row, or empty (they are selected here, row by row).  With ``n_sample > 0``
    (and no bounds) each row first tries the sort-free iteration of module
    `sortfree`, started from a sample of that size (see `sortfree_applies`).
    `rows`: the indices of the rows to solve, in place (those the lane solver
    left), or empty for every row.
    """
    # Each chunk is a call of one function, compiled once for both variants, its counter cast to int64 (see
    # `lanes.lane_rows`).
    for c in nb.prange(n_chunks):
        _select_chunk(keys, x, k, lam, q, is_mag, out, gprime, codes, offset, n_chunks, bounds, n_sample, rows,
                      np.int64(c))


_select_rows = _compiled_pair(_select_rows, inputs=(0, 1))


@nb.njit(parallel=True, cache=True, error_model="numpy")
def _select_long_rows(keys, x, k, lam, q, is_mag, out, gprime, codes, offset, n_parts, n_sample,
                      sortfree):
    """`_select_rows` for a few long rows: each row is split into `n_parts` parts across the threads.

    With `sortfree` (see `sortfree_applies`), each row first tries the
    sort-free iteration of module `sortfree`, every pass split across the
    threads; a row that does not settle takes the exact route below.

    The order statistics come from a bracket: quantiles of a strided sample
    of `n_sample` keys, checked by counting (at most k - 1 keys above it, at
    least k + 1 from its lower end on); the keys inside it are gathered and
    selected with np.partition.  A bracket that fails the check falls back to
    the selection of `order_statistics` on the whole row.
    """
    batch, n = keys.shape
    closed = q == 2.0 or q == 4.0
    with_residuals = gprime.shape[0] == batch and gprime.shape[1] == n
    cval = np.empty(n, dtype=np.float64)
    cidx = np.empty(n, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    top = np.empty(TRACK_MAX, dtype=np.float64)
    part_a = np.zeros(n_parts, dtype=np.int64)
    part_b = np.zeros(n_parts, dtype=np.int64)
    n_sample = min(n, n_sample)
    sample = np.empty(n_sample, dtype=np.float64)
    start_sample = np.empty(sample_size(n) if sortfree else 0, dtype=np.float64)
    state = np.empty(STATE_SIZE, dtype=np.float64)
    ref_cast = np.empty(1, dtype=keys.dtype)
    part_sums = np.zeros((5, n_parts), dtype=np.float64)
    for r in range(batch):
        if k >= n:
            _all_saturated(r, x, is_mag, with_residuals, out, gprime, codes, offset)
            continue
        if sortfree:
            usable, ref = _sortfree_start(keys, r, k, lam, q, is_mag, start_sample, state, ref_cast)
            solved = False
            for _ in range(MAX_STEPS if usable else 0):
                t_prev = state[0]
                for c in nb.prange(n_parts):
                    n_sat, n_free, s1, s2, s3 = row_sums(keys[r], c * n // n_parts, (c + 1) * n // n_parts, ref,
                                                         t_prev, lam, q, is_mag)
                    part_sums[0, c], part_sums[1, c], part_sums[2, c] = n_sat, n_free, s1
                    part_sums[3, c], part_sums[4, c] = s2, s3
                totals = (int(part_sums[0].sum()), int(part_sums[1].sum()), part_sums[2].sum(), part_sums[3].sum(),
                          part_sums[4].sum())
                status = advance(state, totals, float(k), ref, lam, q, is_mag)
                emit, ref = ready_to_emit(status, keys[r], state, t_prev, k, ref, ref_cast, lam, q, is_mag)
                if emit:
                    # As in `_sortfree_row`, every pass split across the threads.
                    for c in nb.prange(n_parts):
                        part_a[c], part_b[c] = emit_row(keys, x, r, c * n // n_parts, (c + 1) * n // n_parts, ref,
                                                        state[0], lam, q, is_mag, with_residuals, out, gprime, codes)
                    n_sat, n_free = part_a.sum(), part_b.sum()
                    solved, ref = settle(status, state, n_sat, n_free, ref, ref_cast, is_mag)
                    if solved:
                        _sortfree_offset(r, k, n_sat, n_free, is_mag, with_residuals, offset)
                        break
                if status == FAILED:
                    break
            if solved:
                continue
        for i in range(n_sample):
            sample[i] = float(keys[r, (i * n) // n_sample])
        sample.sort()
        pos = ((n - k) * n_sample) // n  # where s_(k) should fall in the ascending sample
        spread = int(4.0 * math.sqrt(n_sample)) + 2
        lo_v = sample[max(pos - spread, 0)]
        hi_v = sample[min(pos + spread, n_sample - 1)]
        for c in nb.prange(n_parts):
            above = 0
            inside = 0
            for j in range(c * n // n_parts, (c + 1) * n // n_parts):
                v = float(keys[r, j])
                above += 1 if v > hi_v else 0
                inside += 1 if (lo_v <= v) & (v <= hi_v) else 0
            part_a[c] = above
            part_b[c] = inside
        n_above = part_a.sum()
        n_inside = part_b.sum()
        if n_above <= k - 1 and n_above + n_inside >= k + 1:
            start = 0
            for c in range(n_parts):  # part c gathers from offset part_a[c]
                part_a[c] = start
                start += part_b[c]
            for c in nb.prange(n_parts):
                m = part_a[c]
                for j in range(c * n // n_parts, (c + 1) * n // n_parts):
                    v = float(keys[r, j])
                    if (lo_v <= v) & (v <= hi_v):
                        cval[m] = v
                        m += 1
            rank = k - n_above  # s_(k) is the rank-th largest key inside the bracket
            inside_keys = np.partition(cval[:n_inside], n_inside - rank)
            upper = inside_keys[n_inside - rank]
            below = -np.inf
            for i in range(n_inside - rank):
                below = max(below, inside_keys[i])
        else:
            upper, below = order_statistics(keys[r], k, top)
        zero_cut, saturated_cut = _cuts(upper, below, lam, q, is_mag)
        for c in nb.prange(n_parts):
            j0 = c * n // n_parts
            part_a[c], part_b[c] = _classify(
                keys, x, r, j0, (c + 1) * n // n_parts, zero_cut, saturated_cut, is_mag, with_residuals,
                out, gprime, codes, cval, cidx,
            )
        # Gather the parts' candidates to the front (each part wrote from its own start).
        n_saturated = 0
        # An int64, not a literal 0: for one, the candidates' kernels (`_solve_candidates`) compiled a second time.
        m = np.int64(0)
        for c in range(n_parts):
            j0 = c * n // n_parts
            for i in range(part_b[c]):
                cval[m + i] = cval[j0 + i]
                cidx[m + i] = cidx[j0 + i]
            m += part_b[c]
            n_saturated += part_a[c]
        _solve_candidates(r, k, n_saturated, m, cval, cidx, order, x, lam, q, is_mag, closed, with_residuals,
                          out, gprime, codes, offset)


def topk_rows_select(keys, x, k, lam, q, is_mag, out, gprime, codes, offset):
    """Selection-first fused forward of rows whose keys are all finite.

    Same outputs and residuals as `kernels.topk_rows_forward` (see there for
    the arguments; here there is no permutation and no infinite segment, and
    the magnitude's `keys` may be None where `lane_route` holds: they are then
    taken from `x`, with no array of them unless a row needs the selection kernel), in
    O(n) per row plus a sort of the candidates (module docstring).  Many short
    rows with p = 2 or 4/3 go to the lane solver (`lanes.lane_rows`), long rows with
    p = 2 or 4/3 to the sort-free iteration (`sortfree_applies`); both hand
    the rows they do not settle back to this kernel.

    Returns True, or False where `lanes_check_finite` holds and the lane solver
    found a non-finite entry (the caller need not check the keys there): the
    outputs are then garbage, for the route that handles such rows.
    """
    batch, n = x.shape
    keys, x = read_only(keys), read_only(x)  # one signature of every kernel below (`kernels.read_only`)
    threads = nb.get_num_threads()
    lanes = lane_route(batch, n, k, q, lam)
    lanes_load_all = lanes and lanes_find_bounds(k)  # `lanes_check_finite`, its route decided once
    if keys is None and not lanes_load_all:
        keys = read_only(np.abs(x))  # the lanes alone take the magnitude's keys from x
    if n >= LONG_ROW_MIN_N and batch < threads and parallel.allowed():
        with parallel.LAUNCH:  # parallel within each row
            _select_long_rows(keys, x, k, lam, q, is_mag, out, gprime, codes, offset, 4 * threads, SAMPLE_SIZE,
                              sortfree_applies(n, k, q, lam))
        return True
    n_chunks = min(batch, 4 * threads)
    if lanes:
        # For small k the lane kernel finds the order statistics itself, on the rows it has
        # already transposed; otherwise they come from np.sort.
        bounds = np.empty((0, 2)) if lanes_load_all else _row_bounds(keys, k)
        unresolved = np.empty(batch, dtype=np.bool_)
        if not lane_rows(x, k, lam, q, is_mag, bounds, out, gprime, codes, offset, unresolved,
                         min(-(-batch // LANES), n_chunks), lane_passes(q, n, is_mag), EVERY_ROW,
                         busy_lanes()):
            return False
        rows = np.flatnonzero(unresolved)
        if rows.size and lane_retry_passes(q):
            # The few rows left, gathered into full lane groups: more passes on them cost a
            # fraction of a pass over every group (most groups hold one of them).
            # busy_lanes passed (LANES: no group stops early), not left to its default: an omitted
            # argument is a signature of its own, compiled again (38 s for the parallel variant).
            lane_rows(x, k, lam, q, is_mag, bounds, out, gprime, codes, offset, unresolved,
                      min(-(-rows.size // LANES), n_chunks), lane_retry_passes(q), rows, LANES)
            rows = rows[unresolved[rows]]
        if rows.size:
            keys = read_only(np.abs(x)) if keys is None else keys
            _select_subset(rows, keys, x, k, lam, q, is_mag, out, gprime, codes, offset, bounds)
        return True
    sortfree = sortfree_applies(n, k, q, lam)
    bounds = np.empty((0, 2)) if sortfree else _row_bounds(keys, k)
    n_sample = sample_size(n) if sortfree else 0
    _select_rows(keys, x, k, lam, q, is_mag, out, gprime, codes, offset, n_chunks, bounds, n_sample,
                 EVERY_ROW)
    return True


def lane_route(batch: int, n: int, k: int, q: float, lam: float) -> bool:
    """Whether `topk_rows_select` gives `batch` rows of `n` entries to the lane solver first (`lanes.lane_rows`):
    short rows (`lanes.lanes_apply`), and rows up to SMALL_K_LANE_MAX_N entries with a small k."""
    if k >= n or not lanes_serve(q, lam):
        return False
    if lanes_apply(n, q, lam):
        return True
    # Past the short rows, the sort-free route keeps the p = 2 rows it serves (`sortfree_applies`) beyond
    # CUBIC_LANE_MAX_N entries, where it was the faster (the mask at n = 1024-2048, k = 32).
    sortfree_kept = q == 2.0 and k + 1 > TRACK_MAX and n > CUBIC_LANE_MAX_N
    return batch >= LANES and n <= SMALL_K_LANE_MAX_N and lanes_find_bounds(k) and not sortfree_kept


def lanes_check_finite(batch: int, n: int, k: int, q: float, lam: float) -> bool:
    """Whether the lane solver loads every entry of `batch` rows of `n` entries (it finds their order
    statistics itself) and so tells `topk_rows_select` when one is not finite: no pass of the caller's
    need check."""
    return lane_route(batch, n, k, q, lam) and lanes_find_bounds(k)


def lanes_find_bounds(k: int) -> bool:
    """Whether the lane solver, on the rows it takes, finds their k-th and (k+1)-th largest keys itself (its
    sweeps), loading every entry."""
    return k + 1 <= LANE_TRACK_MAX


def _select_subset(rows, keys, x, k, lam, q, is_mag, out, gprime, codes, offset, bounds):
    """`_select_rows` on the rows `rows` only (those the lane solver left), solved in place."""
    _select_rows(keys, x, k, lam, q, is_mag, out, gprime, codes, offset,
                 min(rows.size, 4 * nb.get_num_threads()), bounds, 0, rows)


def _row_bounds(keys, k):
    """(batch, 2) float64: the k-th and (k+1)-th largest key of every row, from a pass over all rows
    before the kernel; empty when the kernel selects them row by row (rows longer than
    PRESORT_MAX_N with k + 1 <= TRACK_MAX, or longer than SORT_BOUNDS_MAX_N) and when k >= n.

    Both passes beat selecting inside the kernel row by row, whose branches mispredict
    on every row: for short rows and small k, tracking in SIMD lanes across rows;
    otherwise, NumPy's vectorized sort of the values.
    """
    batch, n = keys.shape
    if k >= n:
        return np.empty((0, 2))
    if n <= LANE_TRACK_MAX_N and k + 1 <= LANE_TRACK_MAX:
        return lane_order_statistics(keys, k, min(-(-batch // LANES), 4 * nb.get_num_threads()))
    if n > PRESORT_MAX_N and (k + 1 <= TRACK_MAX or n > SORT_BOUNDS_MAX_N):
        return np.empty((0, 2))
    ascending = np.sort(keys, axis=-1)
    return np.stack([ascending[:, n - k], ascending[:, n - k - 1]], axis=-1).astype(np.float64)


def lane_order_statistics(keys, k, n_chunks):
    """(batch, 2) float64: the k-th and (k+1)-th largest entries of every row (1 <= k < n).

    Rows are taken LANES at a time and transposed, so that each step works on one
    entry of LANES rows at once (`lanes.sweep_order_statistics`): O((k + 1) n) per
    row with no data-dependent branch.  Rows are split into `n_chunks` chunks of
    whole lane groups.
    """
    batch, n = keys.shape
    bounds = np.empty((batch, 2), dtype=np.float64)
    groups = -(-batch // LANES)
    for c in nb.prange(n_chunks):
        prefer_wide_vectors()
        columns = np.empty((n, LANES), dtype=keys.dtype)
        rows = np.empty(LANES, dtype=np.int64)
        uppers = np.empty(LANES, dtype=keys.dtype)
        belows = np.empty(LANES, dtype=keys.dtype)
        poison = np.zeros(LANES, dtype=keys.dtype)  # the sweeps' finiteness sums, not read here
        for grp in range(c * groups // n_chunks, (c + 1) * groups // n_chunks):
            r0 = grp * LANES
            used = min(LANES, batch - r0)
            load_group(keys, r0, rows, columns, EVERY_ROW)
            sweep_order_statistics(columns, k, uppers, belows, poison)
            for lane in range(used):
                bounds[r0 + lane, 0] = uppers[lane]
                bounds[r0 + lane, 1] = belows[lane]
    return bounds


lane_order_statistics = _compiled_pair(lane_order_statistics)
