"""The sort-free route (a row's threshold by vectorized passes over the row, p = 2 and 4/3) against the full-sort route.

The full-sort route (argsort, `pav_rows` with integer blocks, Array-API
assembly) is checked against the reference PAV and the threshold oracle
elsewhere.  Here the sort-free iteration must give the same outputs and
Jacobian products on rows of every kind, settle on ordinary rows (so that
the comparison is really of this route), hand back the rows it cannot settle
(the exact route then answers), and serve both drivers: a row per thread,
and a long row split across the threads.
"""

from __future__ import annotations

import os

import array_api_compat.numpy as xp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from topk_core._agnostic import jacobians
from topk_core._agnostic.residuals import MagResiduals, MaskResiduals
from topk_core._pav import select, sortfree
from topk_core._pav.kernels import fused_outputs, read_only
from topk_core._pav_path import pav_mag, pav_mask

from ._oracles import assert_within_input_rounding, mp_threshold_mag_row, rounding_reach
from ._rows import rows_of_kind, rows_spanning_many_orders

SOLVE = {"mask": pav_mask, "mag": pav_mag}
PRODUCT = {"mask": jacobians.mask_jvp_rows, "mag": jacobians.mag_vjp_rows}
EXPONENTS = {"p=2": 2.0, "p=4/3": 4.0}  # the route's conjugate exponents q


@pytest.fixture(params=list(EXPONENTS), ids=list(EXPONENTS))
def q(request) -> float:
    return EXPONENTS[request.param]


@pytest.fixture
def short_rows_too(monkeypatch):
    """Let rows of a few dozen entries take the sort-free route (it starts at hundreds of entries otherwise)."""
    monkeypatch.setattr(select, "SORTFREE_MIN_N", 20)
    monkeypatch.setattr(select, "SORTFREE_CUBIC_MIN_N", 20)


def _assert_same_as_full_sort(x, k, lam, q, operator, rng):
    solve, product = SOLVE[operator], PRODUCT[operator]
    y_fast, res_fast = solve(x, k, lam, q, with_residuals=True, fused=True)
    y_ref, res_ref = solve(x, k, lam, q, with_residuals=True, fused=False)
    assert res_fast.perm is None  # the selection kernel's driver ran (the full-sort route was not taken)
    eps = np.finfo(x.dtype).eps
    scale = max(1.0, float(np.abs(x).max()) / lam)
    np.testing.assert_allclose(y_fast, y_ref, rtol=100 * eps * scale, atol=100 * eps * scale)
    u = rng.normal(size=x.shape).astype(x.dtype)
    np.testing.assert_allclose(
        product(res_fast, u, xp), product(res_ref, u, xp), rtol=1e3 * eps * scale, atol=1e3 * eps * scale
    )


def _settles(x, k, lam, q, is_mag):
    """Whether `_sortfree_row` solves every row of `x` (with_residuals, scratch as the kernel has it)."""
    keys = np.ascontiguousarray(np.abs(x) if is_mag else x)
    arrays = fused_outputs(x, is_mag, True)
    sample = np.empty(sortfree.sample_size(x.shape[1]))
    state = np.empty(sortfree.STATE_SIZE)
    ref_cast = np.empty(1, dtype=x.dtype)
    return [
        select._sortfree_row(keys, x, r, k, lam, q, is_mag, True, *arrays, sample, state, ref_cast)
        for r in range(x.shape[0])
    ]


@pytest.mark.parametrize("kind", ["normal", "ties", "spread", "offset", "uniform"])
@pytest.mark.parametrize("n", [40, 300, 2000])
def test_sortfree_route_equals_full_sort_route(rng, q, float_dtype, operator, kind, n, short_rows_too):
    x = rows_of_kind(rng, 6, n, kind, float_dtype)
    for k in sorted({17, max(17, n // 8), n // 2, n - 1}):
        # Strengths not commensurate with the ties' spacing: with 0.5 and 3.0 a tied group can
        # land exactly on y = 1 or y = 0, a kink where the routes take different one-sided
        # derivatives (both valid).
        for lam in (1.3e-3, 0.137, 2.71):
            if kind == "offset" and float_dtype == np.float32 and lam < 0.1:
                continue  # float32 keys near 1e3 are 6e-5 apart: the full-sort reference rounds to that
            _assert_same_as_full_sort(x, k, lam, q, operator, rng)


@pytest.mark.parametrize("kind", ["normal", "spread", "offset", "uniform"])
def test_ordinary_rows_settle_on_the_sortfree_route(rng, q, float_dtype, operator, kind):
    # So that the comparison above is one of this route: rows without ties settle in it.
    x = rows_of_kind(rng, 8, 3000, kind, float_dtype)
    for k in (17, 375, 1500, 2999):
        assert all(_settles(x, k, 0.1, q, operator == "mag")), k


def test_magnitude_rows_with_fewer_than_k_nonzero_entries_go_back(rng, q, short_rows_too):
    # The threshold is then 0 (the row is returned as it is): the iteration, which keeps it
    # positive, cannot settle and hands the row back to the exact route.
    x = rng.normal(size=(3, 200))
    x[:, 20:] = 0.0
    k = 30
    assert not any(_settles(x, k, 0.1, q, True))
    y, _ = pav_mag(x, k, 0.1, q, with_residuals=False)
    np.testing.assert_array_equal(y, x)
    _assert_same_as_full_sort(x, k, 0.1, q, "mag", rng)


def test_no_fractional_entry_gives_exact_zeros_and_ones(rng, q, short_rows_too):
    # The top k keys lie more than l above the others: the threshold is not unique, the
    # answer is exactly 0/1 and the Jacobian 0 (spec section 6).
    k = 40
    x = rng.normal(size=(4, 500)) * 0.01
    x[:, :k] += 5.0
    assert all(_settles(x, k, 0.1, q, False))
    y, res = pav_mask(x, k, 0.1, q, with_residuals=True)
    expected = np.zeros_like(x)
    expected[:, :k] = 1.0
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(jacobians.mask_jvp_rows(res, rng.normal(size=x.shape), xp), 0.0)


def test_every_entry_free_when_the_strength_is_huge(rng, q, short_rows_too):
    x = rng.normal(size=(3, 400))
    assert all(_settles(x, 50, 1e6, q, False))
    _assert_same_as_full_sort(x, 50, 1e6, q, "mask", rng)


@pytest.mark.parametrize("start", [-1e4, -3.0, 0.5, 2.0, 1e4])
def test_iteration_settles_from_any_start(rng, q, operator, start):
    # An open bracket widens (doubling) until it holds the root, then narrows: the
    # threshold does not depend on the start that the sample gives.
    is_mag = operator == "mag"
    x = rng.normal(size=(1, 5000))
    keys = np.abs(x) if is_mag else x
    k = 600
    state = np.empty(sortfree.STATE_SIZE)
    thresholds = []
    for t0 in (start, None):
        if t0 is None:
            t0, _ = sortfree.sample_start(keys, 0, k, 0.1, q, is_mag, np.empty(128), state)
        sortfree.start_state(state, abs(t0) if is_mag else t0, 0.0, is_mag, 1.0)
        for _ in range(200):
            status = sortfree.advance(state, sortfree.row_sums(keys[0], 0, 5000, 0.0, state[0], 0.1, q, is_mag),
                                      float(k), 0.0, 0.1, q, is_mag)
            if status != sortfree.ITERATE:
                break
        assert status == sortfree.SOLVED
        thresholds.append(state[0])
    np.testing.assert_allclose(thresholds[0], thresholds[1], rtol=1e-13)


@pytest.mark.parametrize("n_parts", [1, 3, 8])
def test_long_row_driver_equals_full_sort_route(rng, q, float_dtype, operator, n_parts):
    # The driver of a few long rows, each pass split into n_parts parts across the threads.
    is_mag = operator == "mag"
    eps = np.finfo(float_dtype).eps
    for kind in ("normal", "ties", "offset"):
        x = rows_of_kind(rng, 2, 5000, kind, float_dtype)
        keys = np.ascontiguousarray(np.abs(x) if is_mag else x)
        scale = max(1.0, float(np.abs(x).max()) / 0.1)
        for k in (17, 625, 4000):
            y, gprime, codes, offset = arrays = fused_outputs(x, is_mag, True)
            select._select_long_rows(read_only(keys), read_only(x), k, 0.1, q, is_mag, *arrays, n_parts, 8192, True)
            if is_mag:
                res = MagResiduals(None, None, None, None, gprime, codes, offset[:, None].astype(x.dtype))
            else:
                res = MaskResiduals(None, None, None, None, gprime)
            y_ref, res_ref = SOLVE[operator](x, k, 0.1, q, with_residuals=True, fused=False)
            np.testing.assert_allclose(y, y_ref, rtol=100 * eps * scale, atol=100 * eps * scale)
            u = rng.normal(size=x.shape).astype(x.dtype)
            np.testing.assert_allclose(
                PRODUCT[operator](res, u, xp), PRODUCT[operator](res_ref, u, xp),
                rtol=1e3 * eps * scale, atol=1e3 * eps * scale,
            )


# Tied keys at their saturation level to 2e-16 next to keys 4e6 times smaller (k = 15 per 21, p = 4/3):
# the magnitude's threshold (5.4e-8) lies far below the free set's mean key.  The closed-form
# step, exact to eps times that mean only, settled 9e-18 off it, and the free entries near 1e-6
# lost 6 digits of |x| - t on both drivers (found from the lanes' property test); such rows now
# go to the selection kernel, which solves them in absolute terms.
FAR_BELOW_ROW = (5e-07,) + (1e-06,) * 5 + (2.26579182e-01,) * 2 + (4.53158364e-01,) * 13


@pytest.mark.parametrize(("lam", "reps"), [(60.0, 40), (600.0, 50)])
def test_magnitude_threshold_far_below_the_free_keys_keeps_its_digits(lam, reps):
    x = np.tile(FAR_BELOW_ROW, reps)[None]
    y, _ = pav_mag(x, 15 * reps, lam, 4.0, with_residuals=False, fused=True)
    expected = mp_threshold_mag_row(x[0], 15 * reps, lam, 4.0 / 3.0, digits=60)
    assert_within_input_rounding(y[0], expected, x[0], f"l = {lam}")


@pytest.mark.parametrize("n_parts", [1, 3])
def test_long_row_driver_keeps_the_digits_of_a_threshold_far_below_the_free_keys(n_parts):
    reps = 400
    x = np.tile(FAR_BELOW_ROW, reps)[None]
    k = 15 * reps
    arrays = fused_outputs(x, True, False)
    select._select_long_rows(read_only(np.abs(x)), read_only(x), k, 60.0, 4.0, True, *arrays, n_parts, 8192, True)
    y_ref, _ = pav_mag(x, k, 60.0, 4.0, with_residuals=False, fused=False)
    assert_within_input_rounding(arrays[0][0], y_ref[0], x[0], f"{n_parts} parts")


# Keys 1.0 and 1e-7 (k = 181 of 450, p = 2): the sample's start, 0.5, is the frame's reference, and the
# threshold settled on 9.96e-8, known there to eps * 0.5 only: the free entries' |x| - t (7.4e-10) lost
# 7 digits.  A settled threshold far below its frame now moves the frame next to itself and iterates on.
FAR_BELOW_START_ROW = (1.0,) * 6 + (1e-7,) * 9


def test_magnitude_threshold_far_below_the_start_is_solved_again_next_to_itself():
    x = np.tile(FAR_BELOW_START_ROW, 30)[None]
    assert all(_settles(x, 181, 1.0, 2.0, True))  # on this route, not handed back
    y, _ = pav_mag(x, 181, 1.0, 2.0, with_residuals=False)
    expected = mp_threshold_mag_row(x[0], 181, 1.0, 2.0, digits=60)
    assert_within_input_rounding(y[0], expected, x[0], "single-row driver")
    x = np.tile(FAR_BELOW_START_ROW, 400)[None]
    arrays = fused_outputs(x, True, False)
    select._select_long_rows(read_only(np.abs(x)), read_only(x), 181 * 400 // 30, 1.0, 2.0, True, *arrays, 3, 8192,
                             True)
    y_ref, _ = pav_mag(np.concatenate([x, np.full_like(x, np.nan)]), 181 * 400 // 30, 1.0, 2.0, with_residuals=False)
    assert_within_input_rounding(arrays[0][0], y_ref[0], x[0], "long-row driver")


# p = 4/3 magnitude thresholds many orders below the free keys and far below the first iterates
# (both found by the float32-vs-float64 property): keys 10 (kept), 1e-11 (free) and 1e-32, whose
# threshold 2.8e-33 a single Newton correction from 1.3e-22 left 1e-6 off (the output of 1e-32 with
# it); and keys 100, 1, 5.6e-13, 1e-14 (free) and 1e-38, whose threshold 7.5e-41, reached by a
# correction of nearly -8.4e-23, kept only eps * 8.4e-23 (it came out 2.4e-38: the output of 1e-38
# came back 0 instead of 9.9e-39).  The polish now iterates on the absolute threshold to convergence,
# and a root the frame cannot hold moves the frame first.
DEEP_BELOW_ROWS = [
    ((1e-32, 10.0, 10.0) + (1e-11,) * 23, 30, 91),
    ((100.0, 100.0, 1e-38, 100.0, 1.0, 5.62341325e-13, 100.0) + (1e-14,) * 20, 30, 181),
]


_ANSWERS: dict = {}


def _deep_below_answer(x, k):
    # The oracle's answer (80 digits), once per row.
    key = (x.tobytes(), k)
    if key not in _ANSWERS:
        _ANSWERS[key] = mp_threshold_mag_row(x, k, 2.0, 4.0 / 3.0, digits=80)
    return _ANSWERS[key]


def _assert_close_to(y, expected, x, label):
    if y.dtype == np.float32:  # float32 outputs: the float64 answer rounded, to an ulp
        bound = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64) + 1e-45
        assert np.all(np.abs(y.astype(np.float64) - expected) <= bound), label
    else:
        assert_within_input_rounding(y, expected, x, label)


@pytest.mark.parametrize(("row", "reps", "k"), DEEP_BELOW_ROWS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("frame", ["absolute", "at the start"])
def test_magnitude_threshold_deep_below_its_first_iterates_keeps_its_digits(row, reps, k, dtype, frame):
    # The iteration from a start among the free keys (1e-12), in the absolute frame (ref = 0) or in
    # one at the start, which cannot hold the threshold: it must settle on the row's outputs.
    x = np.tile(np.asarray(row, dtype=dtype), reps)[None]
    expected = _deep_below_answer(x[0].astype(np.float64), k)
    arrays = fused_outputs(x, True, True)
    state = np.empty(sortfree.STATE_SIZE)
    ref = 0.0 if frame == "absolute" else float(dtype(1e-12))
    sortfree.start_state(state, 1e-12 - ref, ref, True, 1e-12)
    keys = np.abs(x)
    assert select.sortfree_iterate(keys, x, 0, k, 2.0, 4.0, True, True, *arrays, state, ref, np.empty(1, dtype))
    _assert_close_to(arrays[0][0], expected, x[0].astype(np.float64), f"iteration, {frame} frame")
    # And every route's answer (rows of this scale leave the sort-free route at its start).
    y, _ = pav_mag(x, k, 2.0, 4.0, with_residuals=False)
    _assert_close_to(y[0], expected, x[0].astype(np.float64), "single-row driver")
    wide = np.tile(x, (1, 10))
    arrays = fused_outputs(wide, True, False)
    select._select_long_rows(read_only(np.abs(wide)), read_only(wide), 10 * k, 2.0, 4.0, True, *arrays, 3, 8192,
                             True)
    # (The same row ten times over: each output is the short row's.)
    _assert_close_to(arrays[0][0], np.tile(expected, 10), wide[0].astype(np.float64), "long-row driver")


def test_route_choice():
    assert select.sortfree_applies(4096, 512, 2.0, 0.1)
    assert select.sortfree_applies(4096, 512, 4.0, 0.1)
    assert not select.sortfree_applies(4096, 512, 3.0, 0.1)  # no closed form for the block: PAV's root finder
    assert not select.sortfree_applies(4096, 8, 2.0, 0.1)  # small k: tracked order statistics, few candidates
    assert select.sortfree_applies(300, 64, 2.0, 0.1)
    assert not select.sortfree_applies(256, 64, 2.0, 0.1)  # short rows: the selection kernel or the lanes
    assert not select.sortfree_applies(512, 64, 4.0, 0.1)  # p = 4/3 pays from longer rows on
    assert not select.sortfree_applies(4096, 512, 2.0, 1e-40)  # a strength the frame would rescale


@pytest.mark.parametrize("scale", [1e-310, 1e-300, 1e-160, 1e-40, 1e40, 1e160, 1e250])
def test_magnitude_rows_of_extreme_scale(rng, q, scale):
    # The magnitude is homogeneous: its outputs and products scale with the row.  Rows whose
    # threshold lies beyond 2^+-100 are handed back (sums of d^3 would under- or overflow),
    # and the selection kernel solves them in a rescaled frame.  Compared relative to the scale.
    x = rng.normal(size=(3, 2000)) * scale
    k = 250
    settles = _settles(x, k, 0.1, q, True)
    assert not any(settles) if not 1e-30 < scale < 1e30 else all(settles)
    y, res = pav_mag(x, k, 0.1, q, with_residuals=True)
    y_ref, res_ref = pav_mag(x, k, 0.1, q, with_residuals=True, fused=False)
    np.testing.assert_allclose(y / scale, y_ref / scale, rtol=1e-12, atol=1e-12)
    u = rng.normal(size=x.shape)
    np.testing.assert_allclose(jacobians.mag_vjp_rows(res, u, xp), jacobians.mag_vjp_rows(res_ref, u, xp),
                               rtol=1e-10, atol=1e-10)


# Magnitudes of at least 1e-100 (or exact zeros): rows whose non-zero magnitudes span more than
# ~1e200 are a known defect of the full-sort reference with p = 4/3, see
# `test_magnitude_of_rows_spanning_1e254_with_p_4_3` in tests/test_nonfinite.py.
_long_rows = st.integers(300, 700).flatmap(
    lambda n: arrays(np.float64, n, elements=st.one_of(
        st.just(0.0), st.floats(1e-100, 1e3), st.floats(-1e3, -1e-100)))
)


@settings(max_examples=40, deadline=None)
@given(x=_long_rows, data=st.data(), lam=st.floats(1e-3, 1e2), q=st.sampled_from([2.0, 4.0]), is_mag=st.booleans())
def test_sortfree_invariants_and_agreement_on_arbitrary_rows(x, data, lam, q, is_mag):
    # Hypothesis rows (repeated values, zeros, spans of 1e3): the sort-free route keeps the
    # capped simplex and the order, and agrees with the full-sort route.
    k = data.draw(st.integers(16, x.size - 1))
    rows = x[None, :]
    solve = pav_mag if is_mag else pav_mask
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(select, "SORTFREE_MIN_N", 20)
        patch.setattr(select, "SORTFREE_CUBIC_MIN_N", 20)
        y, _ = solve(rows, k, lam, q, with_residuals=False)
    y_ref, _ = solve(rows, k, lam, q, with_residuals=False, fused=False)
    scale = max(1.0, float(np.abs(x).max()) / lam)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12 * scale, atol=1e-12 * scale)
    if is_mag:
        # Shrinks toward 0, never past it.
        assert np.all(np.abs(y[0]) <= np.abs(x) * (1 + 1e-12)) and np.all(y[0] * x >= 0)
    else:
        assert np.all((y >= 0) & (y <= 1))
        assert abs(y.sum() - k) <= 1e-9 * scale * x.size
        assert np.all(np.diff(y[0][np.argsort(-x, kind="stable")]) <= 1e-9)  # larger inputs get no less


@settings(max_examples=int(os.environ.get("TOPK_HYPOTHESIS_EXAMPLES", "40")), deadline=None)
@given(x=rows_spanning_many_orders(20, 60), data=st.data(), lam=st.floats(1e-3, 1e2),
       q=st.sampled_from([2.0, 4.0]), is_mag=st.booleans())
def test_sortfree_route_agrees_entrywise_on_rows_spanning_many_orders(x, data, lam, q, is_mag):
    # As the property of every PAV route (tests/test_properties.py), for this one: each output within
    # a few ulps of its reach (how far it moves when the inputs move by their rounding; ties at small
    # strengths reach far) of the full-sort route's.  Such a search found magnitude thresholds far below
    # the free keys that the closed-form step knew to eps times those keys only.
    k = data.draw(st.integers(16, x.size - 1))
    rows = x[None, :]
    lam = lam if is_mag else lam * float(np.max(np.abs(x)))
    solve = pav_mag if is_mag else pav_mask
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(select, "SORTFREE_MIN_N", 20)
        patch.setattr(select, "SORTFREE_CUBIC_MIN_N", 20)
        y, _ = solve(rows, k, lam, q, with_residuals=False)
    # The reference: the fused full-sort route, which a NaN row in the batch selects (the unfused
    # route, which assembles outputs from absolute block values, has no digits of |x| - t left when
    # |x| is large next to the strength: ties of 1e24 with p = 4/3 came back 2.4 x).
    y_ref, res_ref = solve(np.stack([x, np.full_like(x, np.nan)]), k, lam, q, with_residuals=True)
    tol = 64 * np.finfo(np.float64).eps * rounding_reach(x, res_ref, is_mag) + 1e-300
    assert np.all(np.abs(y[0] - y_ref[0]) <= tol)
