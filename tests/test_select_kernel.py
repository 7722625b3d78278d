"""The selection-first kernel (rows with finite keys) against the full-sort route.

The full-sort route (argsort, `pav_rows` with integer blocks, Array-API
assembly) is checked against the reference PAV and the threshold oracle
elsewhere; here the fast path must give the same outputs and the same
Jacobian products on every selection route: order statistics tracked in SIMD
lanes across rows, read off a presorted row, tracked in a small buffer, or
selected with np.partition.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from topk_core._agnostic import jacobians
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._pav import select
from topk_core._pav.kernels import fused_outputs, read_only
from topk_core._pav_path import pav_mag, pav_mask


@pytest.fixture(params=["lanes-or-presorted", "presorted", "tracked-or-partitioned"])
def selection_route(request, monkeypatch):
    if request.param == "presorted":
        monkeypatch.setattr(select, "LANE_TRACK_MAX", 0)
    if request.param == "tracked-or-partitioned":
        monkeypatch.setattr(select, "PRESORT_MAX_N", 0)
        monkeypatch.setattr(select, "SORT_BOUNDS_MAX_N", 0)
    return request.param


def _cases(rng: np.random.Generator, dtype):
    for trial in range(24):
        n = int(rng.choice([2, 3, 7, 16, 17, 40, 300]))
        batch = int(rng.integers(1, 5))
        x = rng.normal(size=(batch, n)) * rng.choice([1e-3, 1.0, 50.0])
        if trial % 3 == 0:
            x = np.round(x * 2) / 2  # ties, zeros
        k = int(rng.choice([1, 2, max(1, n // 8), n // 2 + 1, n - 1, n]))
        lam = float(rng.choice([1e-4, 0.1, 1.0, 100.0]))
        yield x.astype(dtype), min(max(k, 1), n), lam


@pytest.mark.parametrize("is_mag", [False, True], ids=["mask", "mag"])
def test_select_route_equals_full_sort_route(rng, p, float_dtype, is_mag, selection_route):
    q = conjugate_exponent(p)
    solve = pav_mag if is_mag else pav_mask
    product = jacobians.mag_vjp_rows if is_mag else jacobians.mask_jvp_rows
    eps = np.finfo(float_dtype).eps
    for x, k, lam in _cases(rng, float_dtype):
        y_fast, res_fast = solve(x, k, lam, q, with_residuals=True, fused=True)
        y_ref, res_ref = solve(x, k, lam, q, with_residuals=True, fused=False)
        assert res_fast.perm is None  # the selection kernel ran
        scale = max(1.0, float(np.abs(x).max()) / lam)
        np.testing.assert_allclose(y_fast, y_ref, rtol=100 * eps * scale, atol=100 * eps * scale, err_msg=str((k, lam)))
        u = rng.normal(size=x.shape).astype(float_dtype)
        if is_mag and k < x.shape[1]:
            # Fewer than k + 1 non-zero magnitudes: a kink, where each route keeps the
            # tied zeros of its own sort order (both are valid choices).
            desc = -np.sort(-np.abs(x), axis=-1)
            u[desc[:, k] == 0] = 0.0
        np.testing.assert_allclose(
            product(res_fast, u, xp), product(res_ref, u, xp),
            rtol=1e3 * eps * scale, atol=1e3 * eps * scale, err_msg=str((x, k, lam)),
        )


def test_forward_only_equals_forward_with_residuals(rng, p, operator):
    q = conjugate_exponent(p)
    solve = pav_mag if operator == "mag" else pav_mask
    x = rng.normal(size=(50, 33))
    y_only, none = solve(x, 4, 0.3, q, with_residuals=False)
    y_res, _ = solve(x, 4, 0.3, q, with_residuals=True)
    assert none is None
    np.testing.assert_array_equal(y_only, y_res)


@pytest.mark.parametrize("n", [2, 5, 16, 17, 200])
def test_order_statistics_match_a_sort(rng, n):
    top = np.empty(select.TRACK_MAX)
    for _ in range(20):
        row = np.round(rng.normal(size=n), 1)  # ties
        k = int(rng.integers(1, n))
        desc = np.sort(row)[::-1]
        assert select.order_statistics(row, k, top) == (desc[k - 1], desc[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 63, 64, 130, 3000])
def test_lane_order_statistics_match_a_sort(rng, dtype, batch):
    # Batches that do not fill the last group of lanes; ties; both compiled variants.
    for n, k in [(2, 1), (16, 2), (17, 11), (64, 8), (97, 24), (192, 32), (256, 1)]:
        rows = np.round(rng.normal(size=(batch, n)), 1).astype(dtype)
        desc = -np.sort(-rows, axis=-1)
        expected = np.stack([desc[:, k - 1], desc[:, k]], axis=-1)
        for variant in (select.lane_order_statistics.serial, select.lane_order_statistics.parallel):
            for n_chunks in (1, 3):
                bounds = variant(read_only(rows), k, n_chunks)  # read-only: the operators' signature
                assert bounds.dtype == np.float64
                np.testing.assert_array_equal(bounds, expected)


def test_every_entry_a_candidate_when_the_strength_is_huge(rng):
    # The cuts then keep the whole row: the selection route degenerates to a full sort.
    x = rng.normal(size=(3, 500))
    y, _ = pav_mask(x, 50, 1e6, 2.0, with_residuals=False)
    np.testing.assert_allclose(y, np.full_like(x, 0.1), atol=1e-5)


@pytest.mark.parametrize("is_mag", [False, True], ids=["mask", "mag"])
@pytest.mark.parametrize(("n_parts", "n_sample"), [(1, 8192), (3, 64), (8, 3), (5, 2)])
def test_long_row_route_equals_the_row_per_thread_route(rng, p, is_mag, n_parts, n_sample):
    # The long-row kernel splits each row across threads and brackets its order
    # statistics from a sample (n_sample = 2 or 3 makes the bracket miss, exercising
    # the fallback); it must reproduce the row-per-thread kernel exactly.
    q = conjugate_exponent(p)
    for x, k, lam in _cases(rng, np.float64):
        keys = np.ascontiguousarray(np.abs(x) if is_mag else x)
        outputs = []
        for long_route in (False, True):
            arrays = fused_outputs(x, is_mag, True)  # out, g', codes, offset
            if long_route:
                select._select_long_rows(read_only(keys), read_only(x), k, lam, q, is_mag, *arrays, n_parts, n_sample,
                                         False)
            else:
                select._select_rows.serial(read_only(keys), read_only(x), k, lam, q, is_mag, *arrays, 1,
                                           np.empty((0, 2)), 0,
                                            np.empty(0, np.int64))
            outputs.append(arrays)
        for a, b in zip(*outputs, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str((x, k, lam)))


def test_long_rows_take_the_split_route(monkeypatch, rng):
    calls = []
    original = select._select_long_rows
    monkeypatch.setattr(select, "LONG_ROW_MIN_N", 64)
    monkeypatch.setattr(select, "_select_long_rows", lambda *a: calls.append(a[0].shape) or original(*a))
    x = rng.normal(size=(1, 500))
    y, _ = pav_mask(x, 40, 0.1, 4.0, with_residuals=False)
    assert calls == [(1, 500)]
    np.testing.assert_allclose(y.sum(), 40.0, rtol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 31, 33, 80])
def test_candidates_are_ordered_on_every_route(rng, m):
    # Ranks (m <= RANK_MAX), insertion sort, argsort: a descending order of the values,
    # ties included, that uses every index once.
    for _ in range(10):
        cval = np.round(rng.normal(size=m), 1)
        order = np.full(m, -1, dtype=np.int64)
        select._order_candidates(cval, m, order)
        assert sorted(order) == list(range(m))
        assert np.all(np.diff(cval[order]) <= 0)
