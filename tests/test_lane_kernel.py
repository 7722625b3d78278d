"""The lane solver (many short rows side by side, p = 2 and 4/3) against the full-sort route.

The full-sort route (argsort, `pav_rows` with integer blocks, Array-API
assembly) is checked against the reference PAV elsewhere; the lane solver
must give the same outputs and Jacobian products on every kind of row, hand
the rows it does not solve to the selection kernel, and never be used where
it does not apply.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from topk_core._agnostic import jacobians
from topk_core._agnostic.residuals import KEPT_CODE
from topk_core._pav import lanes, select
from topk_core._pav.kernels import fused_outputs, read_only
from topk_core._pav_path import pav_mag, pav_mask

from ._rows import rows_of_kind

SOLVE = {"mask": pav_mask, "mag": pav_mag}
PRODUCT = {"mask": jacobians.mask_jvp_rows, "mag": jacobians.mag_vjp_rows}
# Conjugate exponents q of the exponents the lanes serve (p = 2 and 4/3).
Q_VALUES = [2.0, 4.0]
Q_IDS = ["p=2", "p=4/3"]


@pytest.fixture(params=Q_VALUES, ids=Q_IDS)
def q(request) -> float:
    return request.param


@pytest.fixture
def lane_calls(monkeypatch):
    """Records the calls of the lane solver: (shape of the rows, number of rows named, 0: every row)."""
    calls = []
    original = select.lane_rows
    monkeypatch.setattr(select, "lane_rows", lambda x, *a: calls.append((x.shape, a[12].shape[0])) or original(x, *a))
    return calls


def _assert_same(operator, x, k, lam, rng, q=2.0):
    solve = SOLVE[operator]
    y, res = solve(x, k, lam, q, with_residuals=True, fused=True)
    y_ref, res_ref = solve(x, k, lam, q, with_residuals=True, fused=False)
    eps = np.finfo(x.dtype).eps
    scale = max(1.0, float(np.abs(x).max()) / lam)
    np.testing.assert_allclose(y, y_ref, rtol=100 * eps, atol=100 * eps * scale, err_msg=str((k, lam)))
    u = rng.normal(size=x.shape).astype(x.dtype)
    if operator == "mag":
        # Rows with at most k non-zero magnitudes sit on a kink (see test_select_kernel).
        desc = -np.sort(-np.abs(x), axis=-1)
        u[desc[:, k] == 0] = 0.0
    np.testing.assert_allclose(
        PRODUCT[operator](res, u, xp), PRODUCT[operator](res_ref, u, xp),
        rtol=1e3 * eps * scale, atol=1e3 * eps * scale, err_msg=str((k, lam)),
    )


@pytest.mark.parametrize("kind", ["normal", "ties", "spread", "dominant"])
@pytest.mark.parametrize(
    ("q", "batch", "n"),
    [(2.0, 1, 2), (2.0, 63, 16), (2.0, 64, 17), (2.0, 130, 48), (2.0, 700, 7), (2.0, 5, 33), (2.0, 70, 64), (2.0, 30, 80),
     (4.0, 1, 2), (4.0, 63, 16), (4.0, 130, 12), (4.0, 700, 7), (4.0, 5, 9), (4.0, 130, 40), (4.0, 70, 48),
     (4.0, 70, 64), (4.0, 30, 80), (2.0, 20, 128), (4.0, 20, 200), (2.0, 3, 256), (4.0, 66, 256), (4.0, 3, 512)],
)
def test_lane_route_equals_full_sort_route(rng, operator, float_dtype, kind, q, batch, n, lane_calls):
    x = rows_of_kind(rng, batch, n, kind, float_dtype)
    # Strengths that are not dyadic: with dyadic keys (the ties) a dyadic strength can put a key
    # exactly on the edge of the free set, a kink where each route keeps its own one-sided Jacobian.
    for k in sorted({1, max(1, n // 8), n // 2, n - 1} - {0}):
        for lam in (1.1e-4, 0.1, 0.7, 33.3):
            _assert_same(operator, x, k, lam, rng, q)
    assert lane_calls  # the lane solver ran


@pytest.mark.parametrize("max_passes", [0, 1, 2, 16])
@pytest.mark.parametrize(("q", "retry_passes"), [(2.0, 0), (2.0, 16), (4.0, 0), (4.0, 2), (4.0, 8)],
                         ids=["p=2-no-retry", "p=2-retry-16", "p=4/3-no-retry", "p=4/3-retry-2", "p=4/3-retry-8"])
def test_rows_left_unsolved_go_to_the_selection_kernel(monkeypatch, rng, operator, q, max_passes, retry_passes,
                                                       lane_calls):
    # With too few steps allowed, some (0: all) rows are handed back and solved again: first by
    # a second lane solve on those rows (`retry_passes`, 0: none), then by the selection kernel;
    # with many, the rows the lanes converge on match too.
    monkeypatch.setattr(select, "lane_passes", lambda q, n, is_mag: max_passes)
    monkeypatch.setattr(select, "lane_retry_passes", lambda q: retry_passes)
    monkeypatch.setattr(select, "busy_lanes", lambda: lanes.LANES)  # no group goes on past max_passes
    x = rows_of_kind(rng, 300, 40 if q == 2.0 else 16, "ties", np.float64)
    # Ties are multiples of 1/2: a strength l with l * r a multiple of 1/2 for some r <= k puts a
    # threshold exactly on a tie (a kink, where each route keeps its own one-sided Jacobian).
    for k in (1, 5, 10):
        for lam in (0.0137, 0.737, 10.37):
            _assert_same(operator, x, k, lam, rng, q)
    assert lane_calls
    # The second lane solve runs on the rows left only, and only when it has passes.
    retried = [named for _, named in lane_calls if named]
    if retry_passes == 0:
        assert not retried
    elif max_passes == 0:
        assert len(retried) == len(lane_calls) // 2 and min(retried) > 0


@pytest.mark.parametrize("n", [16, 64])
def test_groups_with_many_rows_iterating_go_on_past_their_passes(rng, operator, q, n):
    # One pass allowed, at a strength that moves the sets far from the start: with `busy_lanes` a
    # group stops only once at most that many of its rows iterate (or at MAX_PASSES), without it
    # most rows are left; either way the rows solved are those of a full solve.
    x = rng.normal(size=(640, n))
    left = {}
    for busy in (lanes.LANES, 16):
        arrays = [np.zeros_like(a) for a in fused_outputs(x, operator == "mag", True)]
        unresolved = np.zeros(640, np.bool_)
        lanes.lane_rows.serial(read_only(x), 2, 10.0, q, operator == "mag", np.empty((0, 2)), *arrays, unresolved,
                               1, 1, lanes.EVERY_ROW, busy)
        left[busy] = unresolved.reshape(10, lanes.LANES).sum(axis=1)
        full = [np.zeros_like(a) for a in fused_outputs(x, operator == "mag", True)]
        lanes.lane_rows.serial(read_only(x), 2, 10.0, q, operator == "mag", np.empty((0, 2)), *full,
                               np.zeros(640, np.bool_), 1, lanes.MAX_PASSES, lanes.EVERY_ROW, lanes.LANES)
        for got, want in zip(arrays, full, strict=True):
            if got.size:
                np.testing.assert_array_equal(got[~unresolved], want[~unresolved])
    assert left[lanes.LANES].sum() > 4 * 640 // 10  # the case this is about
    assert np.all(left[16] <= 16) and left[16].sum() < left[lanes.LANES].sum()


def test_first_passes_grow_with_the_row_length(operator):
    # One pass over every group for short rows, more for long ones (the magnitude's at least as
    # many as the mask's); both exponents have a second lane solve.
    is_mag = operator == "mag"
    for q in Q_VALUES:
        counts = [lanes.lane_passes(q, n, is_mag) for n in (2, 16, 24, 25, 48, 49, 96)]
        assert counts == sorted(counts) and counts[0] == 1 and counts[-1] >= 2
        assert lanes.lane_passes(q, 96, True) >= lanes.lane_passes(q, 96, False)
        assert lanes.lane_retry_passes(q) > 0


@pytest.mark.parametrize("n", [24, lanes.ROW_OUTPUTS_MIN_N + 16], ids=["lane-layout-outputs", "row-order-outputs"])
def test_a_subset_of_rows_is_solved_in_place_as_in_a_full_solve(rng, operator, q, n):
    # The second lane solve of the driver: the rows named (any order, any count), and no other,
    # get the outputs, residuals and flags a solve of every row gives them, to the bit (with
    # outputs written in the lane layout and transposed back, or row by row: `_row_outputs`).
    x = rows_of_kind(rng, 200, n, "ties", np.float64)
    subset = rng.permutation(200)[:77]
    results = []
    for rows in (lanes.EVERY_ROW, subset):
        arrays = [np.full_like(a, 7) for a in fused_outputs(x, operator == "mag", True)]
        unresolved = np.zeros(200, np.bool_)
        lanes.lane_rows.serial(read_only(x), 3, 0.3, q, operator == "mag", np.empty((0, 2)), *arrays, unresolved, 1,
                               lanes.MAX_PASSES, rows, lanes.LANES)
        results.append((*arrays, unresolved))
    untouched = np.setdiff1d(np.arange(200), subset)
    for every, some in zip(*results, strict=True):
        if every.size:
            np.testing.assert_array_equal(some[subset], every[subset])
            np.testing.assert_array_equal(some[untouched], 0 if some.dtype == np.bool_ else 7)


@pytest.mark.parametrize("kind", ["normal", "ties", "dominant"])
def test_outputs_written_row_by_row_equal_those_transposed_back(rng, operator, float_dtype, q, kind):
    # From ROW_OUTPUTS_MIN_N on, a solve with residuals writes its outputs row by row
    # (`_row_outputs`), the mask's forward alone in the lane layout and the magnitude's by a loop of
    # its own (`_mag_row_values`): the same numbers, to the bit.
    n = lanes.ROW_OUTPUTS_MIN_N + 16
    x = rows_of_kind(rng, 150, n, kind, float_dtype)
    for k, lam in ((1, 0.1), (n // 8, 0.7), (n // 2, 33.3)):
        y_only, _ = SOLVE[operator](x, k, lam, q, with_residuals=False)
        y_res, _ = SOLVE[operator](x, k, lam, q, with_residuals=True)
        np.testing.assert_array_equal(y_res, y_only, err_msg=str((k, lam)))


def _lane_state(tau, came_from, exact):
    """A `lane_rows` state (every lane iterating at `tau`, its iterate computed from the sets `came_from` =
    (|S|, |F|), `exact` whether it is their root to within the rounding) with a wide bracket."""
    state = np.zeros((7, lanes.LANES))
    state[0], state[1], state[2], state[3] = tau, -1.0, 1.0, 1.0
    state[4], state[5], state[6] = came_from[0], came_from[1], exact
    return state


@pytest.mark.parametrize("is_mag", [False, True], ids=["mask", "mag"])
def test_the_outputs_pass_confirms_only_exact_roots_of_the_sets_it_finds(q, is_mag):
    # `_confirm` solves a lane when the sets counted at its iterate are those it came from and the
    # iterate is their root (state row 6), or when no entry is fractional and k are saturated.
    k = 5
    ref = np.full(lanes.LANES, 0.0 if is_mag else 1.0)
    tau = 0.3 if is_mag else -0.05
    sets = np.full(lanes.LANES, 4.0 + lanes.FREE_WEIGHT * 3.0)  # |S| = 4, |F| = 3 found at tau
    sets[-1] = k  # |S| = k, F empty: the non-unique case, solved whatever the state
    cases = {  # came_from, exact -> solved
        ((4.0, 3.0), 1.0): True,
        ((4.0, 3.0), 0.0): False,  # the sets match, but the iterate is not known to be their root
        ((3.0, 4.0), 1.0): False,  # other sets
        ((-1.0, 3.0), 1.0): False,  # a midpoint step: no sets
        ((7.0, 0.0), 1.0): False,  # 7 = 4 + 3, but the free entries count FREE_WEIGHT each
    }
    for (came_from, exact), solved in cases.items():
        state = _lane_state(tau, came_from, exact)
        remaining = lanes._confirm(state, sets, ref.copy(), 0.1, q, k, is_mag)
        assert remaining == lanes.LANES - 1 - (lanes.LANES - 1) * solved
        np.testing.assert_array_equal(state[3, :-1], 0.0 if solved else 1.0)
        assert state[3, -1] == 0.0
        assert state[0, 0] == tau  # no step is taken


def test_a_magnitude_threshold_the_frame_does_not_resolve_is_handed_back(q):
    # Confirmed at a threshold far below the key it is held relative to, or (p = 4/3, whose rounding
    # scales with l) not above 0 by more than the rounding, a magnitude lane is the selection
    # kernel's (-1), as after a pass (`_advance`).
    sets = np.full(lanes.LANES, 4.0 + lanes.FREE_WEIGHT * 3.0)
    for ref, tau in ((0.0, 1e-300), (1.0, -0.9)) if q == 4.0 else ((1.0, -0.9),):
        state = _lane_state(tau, (4.0, 3.0), 1.0)
        lanes._confirm(state, sets, np.full(lanes.LANES, ref), 0.1, q, 5, True)
        np.testing.assert_array_equal(state[3], -1.0)


def test_set_codes_tell_every_pair_of_counts_apart():
    # |S| + FREE_WEIGHT |F| is one-to-one on the counts of the longest rows the lanes serve.
    longest = max(lanes.LANE_MAX_N, lanes.CUBIC_LANE_MAX_N, select.SMALL_K_LANE_MAX_N)
    assert lanes.FREE_WEIGHT > longest
    n_sat, n_free = np.meshgrid(np.arange(longest + 1.0), np.arange(longest + 1.0))
    valid = n_sat + n_free <= longest
    codes = (n_sat + lanes.FREE_WEIGHT * n_free)[valid]
    assert np.unique(codes).size == codes.size
    np.testing.assert_array_equal([lanes._saturated_count(c) for c in codes[::997]], n_sat[valid][::997])


def test_unsolved_rows_are_flagged(rng, q):
    keys = rng.normal(size=(100, 16))
    unresolved = np.zeros(100, dtype=np.bool_)
    bounds = select._row_bounds(keys, 3)
    args = (read_only(keys), 3, 1.0, q, False, bounds, *fused_outputs(keys, False, True))
    lanes.lane_rows.serial(*args, unresolved, 1, 0, lanes.EVERY_ROW, lanes.LANES)
    # With no step allowed, only the rows without a violator (a gap of at least l after
    # the k-th key, solved at the start) are solved.
    np.testing.assert_array_equal(unresolved, bounds[:, 0] - bounds[:, 1] < 1.0)
    assert unresolved.any()
    lanes.lane_rows.serial(*args, unresolved, 2, lanes.MAX_PASSES, lanes.EVERY_ROW, lanes.LANES)
    assert not unresolved.any()


def test_no_violator_gives_the_exact_hard_mask_and_no_free_entry(rng, q, lane_calls):
    # Gaps of at least l around the k-th entry: y is 0/1 and the Jacobian vanishes.
    x = np.tile(np.array([5.0, 3.0, 1.0, 0.5, -1.0]), (70, 1)) + rng.normal(size=(70, 1))
    y, res = pav_mask(x, 2, 1.0, q, with_residuals=True)
    np.testing.assert_array_equal(y, np.tile([1.0, 1.0, 0.0, 0.0, 0.0], (70, 1)))
    np.testing.assert_array_equal(res.gprime, 0.0)
    assert lane_calls


def test_magnitude_without_violator_keeps_the_top_k_with_identity_derivatives(rng, q, lane_calls):
    # s_(k) saturated at a threshold s_(k+1): any threshold in between solves the row, the hard
    # top-k is exact and locally constant in its set, so its derivatives are 1 on it and 0 off it.
    # (p = 4/3 lanes once converged to the interval's end, where s_(k) looked free.)
    x = np.tile(np.array([5.0, -3.0, 1.2, 0.5, -0.1]), (70, 1)) * rng.uniform(1.0, 2.0, size=(70, 1))
    y, res = pav_mag(x, 2, 1.0, q, with_residuals=True)
    np.testing.assert_array_equal(y, x * np.array([1.0, 1.0, 0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(res.gprime, 0.0)
    np.testing.assert_array_equal(res.codes, np.tile([KEPT_CODE, KEPT_CODE, 0, 0, 0], (70, 1)))
    assert lane_calls


def test_magnitude_rows_with_few_non_zero_entries(rng, lane_calls):
    # At most k non-zero keys: the row is returned unchanged with identity derivatives
    # (the selection kernel's rule); the lanes hand such rows back.
    x = rng.normal(size=(90, 16))
    x[::2, 2:] = 0.0  # two non-zero entries, k = 3
    for q in Q_VALUES:
        y, res = pav_mag(x, 3, 0.1, q, with_residuals=True)
        np.testing.assert_array_equal(y[::2], x[::2])
        np.testing.assert_array_equal(res.codes[::2], KEPT_CODE)
        _assert_same("mag", x, 3, 0.1, rng, q)
    assert lane_calls


LONG = select.SMALL_K_LANE_MAX_N + 1
SMALL_K_MAX = select.LANE_TRACK_MAX - 1  # the largest k of the longer rows the lanes take


@pytest.mark.parametrize(
    ("p", "lam", "batch", "n", "k"),
    [(1.5, 0.1, 200, 16, 2), (3.0, 0.1, 200, 8, 2), (2.0, 1e-200, 200, 16, 2), (4.0 / 3.0, 1e200, 200, 16, 2),
     # Longer rows with a larger k, all rows longer than SMALL_K_LANE_MAX_N, or fewer than LANES of them.
     (2.0, 0.1, 200, lanes.LANE_MAX_N + 1, SMALL_K_MAX + 1), (4.0 / 3.0, 0.1, 200, lanes.CUBIC_LANE_MAX_N + 1, 40),
     (2.0, 0.1, 70, LONG, 2), (4.0 / 3.0, 0.1, 70, LONG, 2), (2.0, 0.1, lanes.LANES - 1, 300, 2),
     # p = 2 rows the sort-free route keeps.
     (2.0, 0.1, 200, lanes.CUBIC_LANE_MAX_N + 1, select.TRACK_MAX)],
)
def test_lanes_only_where_they_apply(rng, operator, p, lam, batch, n, k, lane_calls):
    # p other than 2 and 4/3, a strength outside the unscaled frame, rows longer than LANE_MAX_N
    # (CUBIC_LANE_MAX_N for p = 4/3) unless k is small and the rows many.
    SOLVE[operator](rng.normal(size=(batch, n)), k, lam, p / (p - 1.0), with_residuals=False)
    assert lane_calls == []


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize(("n", "ks"), [(300, (1, 4, SMALL_K_MAX)), (700, (3, SMALL_K_MAX)),
                                       (select.SMALL_K_LANE_MAX_N, (1, 8))])
def test_longer_rows_with_a_small_k_take_the_lanes(rng, operator, float_dtype, q, kind, n, ks, lane_calls):
    # Past LANE_MAX_N (CUBIC_LANE_MAX_N), rows with k + 1 <= LANE_TRACK_MAX take the lanes when there are
    # at least LANES of them, and give the full sort's outputs and products.
    x = rows_of_kind(rng, lanes.LANES + 6, n, kind, float_dtype)
    for k in ks:
        if q == 2.0 and k + 1 > select.TRACK_MAX and n > lanes.CUBIC_LANE_MAX_N:
            continue  # the sort-free route's (test above)
        for lam in (1.1e-4, 0.7):
            lane_calls.clear()
            _assert_same(operator, x, k, lam, rng, q)
            assert lane_calls, (k, lam)


def test_both_compiled_variants_agree(rng, operator, q):
    x = rows_of_kind(rng, 3000, 24, "ties", np.float32)
    keys = np.abs(x) if operator == "mag" else x
    bounds = select._row_bounds(keys, 4)
    results = []
    for variant, n_chunks in ((lanes.lane_rows.serial, 1), (lanes.lane_rows.parallel, 7)):
        arrays = fused_outputs(x, operator == "mag", True)  # the mask's scale, signs, offset are empty
        unresolved = np.empty(3000, np.bool_)
        # Read-only x and every argument given: the signature the operators compile (another is compiled anew).
        variant(read_only(x), 4, 0.3, q, operator == "mag", bounds, *arrays, unresolved, n_chunks, lanes.MAX_PASSES,
                lanes.EVERY_ROW, lanes.LANES)
        results.append((*arrays, unresolved))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 63, 130])
def test_order_statistics_found_in_the_lanes_equal_given_ones(rng, operator, float_dtype, q, batch):
    # With empty bounds the lane kernel sweeps its own transposed rows for them: the same
    # order statistics, so the same outputs, residuals and hand-backs, to the bit.
    x = rows_of_kind(rng, batch, 20, "ties", float_dtype)
    keys = np.ascontiguousarray(np.abs(x) if operator == "mag" else x)
    for k in (1, 2, 5, 11):
        results = []
        for bounds in (select._row_bounds(keys, k), np.empty((0, 2))):
            assert bounds.shape[0] in (0, batch)
            arrays = fused_outputs(x, operator == "mag", True)
            unresolved = np.empty(batch, np.bool_)
            lanes.lane_rows.serial(read_only(x), k, 0.3, q, operator == "mag", bounds, *arrays, unresolved, 1,
                                   lanes.MAX_PASSES, lanes.EVERY_ROW, lanes.LANES)
            results.append((*arrays, unresolved))
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [2, 3, 12, 13])
def test_sweeps_find_the_order_statistics(rng, n):
    # Every k, odd and even n.
    for k in range(1, n):
        columns = np.round(rng.normal(size=(n, lanes.LANES)), 1)  # ties
        desc = -np.sort(-columns, axis=0)
        uppers, belows = np.empty(lanes.LANES), np.empty(lanes.LANES)
        scratch = columns.copy()
        lanes.sweep_order_statistics(scratch, k, uppers, belows, np.zeros(lanes.LANES))
        np.testing.assert_array_equal(uppers, desc[k - 1])
        np.testing.assert_array_equal(belows, desc[k])
        # The lanes' use: the magnitude's keys |x| read off the rows as loaded, which stay as they are, the
        # later sweeps in a buffer of their own, and the finiteness sums per lane.
        signed = columns * np.where(rng.random(columns.shape) < 0.5, -1.0, 1.0)
        signed[0, 3] = np.nan
        rows, poison = signed.copy(), np.zeros(lanes.LANES)
        lanes._sweeps(rows, np.empty_like(rows), True, k, uppers, belows, poison)
        np.testing.assert_array_equal(rows, signed)
        keep = np.arange(lanes.LANES) != 3
        desc_abs = -np.sort(-np.abs(columns), axis=0)
        np.testing.assert_array_equal(uppers[keep], desc_abs[k - 1][keep])
        np.testing.assert_array_equal(belows[keep], desc_abs[k][keep])
        assert np.isnan(poison[3]) and np.all(poison[keep] == 0.0)
