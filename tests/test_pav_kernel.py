"""The Numba PAV kernel against the slow reference PAV and scipy's isotonic regression."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import isotonic_regression

from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._pav import pav_rows
from topk_core._pav.reference import reference_isotonic


def _solve(keys: np.ndarray, k: int, lam: float, p: float, is_mag: bool):
    keys = np.atleast_2d(keys)
    perm = np.argsort(-keys, axis=-1, kind="stable")
    s = np.ascontiguousarray(np.take_along_axis(keys, perm, axis=-1))
    batch, n = s.shape
    full = np.full(batch, n, dtype=np.int64)
    v, bstart, bend, inv = pav_rows(
        keys, perm, np.zeros(batch, np.int64), full, np.full(batch, k, np.int64), lam, conjugate_exponent(p), is_mag
    )
    return s, perm, v, bstart, bend, inv


def _rows(rng: np.random.Generator, count: int):
    for trial in range(count):
        n = int(rng.integers(2, 14))
        x = rng.normal(size=n) * rng.choice([0.05, 1.0, 20.0])
        if trial % 4 == 0:
            x = np.round(x)  # ties
        yield x, int(rng.integers(1, n + 1)), float(rng.choice([1e-3, 0.1, 1.0, 10.0]))


@pytest.mark.parametrize("is_mag", [False, True], ids=["mask", "mag"])
def test_kernel_matches_reference_pav(rng, p, is_mag):
    for x, k, lam in _rows(rng, 40):
        keys = np.abs(x) if is_mag else x
        s, _, v, bstart, bend, _ = _solve(keys, k, lam, p, is_mag)
        w = [1.0 if i < k else 0.0 for i in range(s.shape[1])]
        v_ref, ids = reference_isotonic(list(s[0]), w, lam, p, is_mag)
        tol = 1e-10 * max(1.0, np.abs(s).max())
        np.testing.assert_allclose(v[0], v_ref, rtol=1e-10, atol=tol)
        # Same partition, except that adjacent blocks of equal value may be pooled or not
        # (the reference's bisection can round a tie into a spurious violation).
        for i in range(s.shape[1] - 1):
            pooled, pooled_ref = bstart[0, i + 1] == bstart[0, i], ids[i + 1] == ids[i]
            assert pooled == pooled_ref or abs(v_ref[i] - v_ref[i + 1]) <= tol, (x, k, lam, i)
        # block_end is the last index of the block that starts at block_start
        for i in range(s.shape[1]):
            assert bstart[0, bend[0, i]] == bstart[0, i]
            assert bend[0, i] + 1 == s.shape[1] or bstart[0, bend[0, i] + 1] == bend[0, i] + 1


@pytest.mark.parametrize("is_mag", [False, True], ids=["mask", "mag"])
def test_p2_isotonic_step_matches_scipy(rng, is_mag):
    for x, k, lam in _rows(rng, 40):
        keys = np.abs(x) if is_mag else x
        s, _, v, _, _, _ = _solve(keys, k, lam, 2.0, is_mag)
        w = (np.arange(s.shape[1]) < k).astype(float)
        if is_mag:
            # sum (s - v)^2 / (2 l) + w v^2 / 2: weighted isotonic fit of s / (1 + l w)
            expected = isotonic_regression(s[0] / (1 + lam * w), weights=1 + lam * w, increasing=False).x
        else:
            expected = isotonic_regression(s[0] - lam * w, increasing=False).x
        np.testing.assert_allclose(v[0], expected, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(s).max()))


def test_inverse_permutation_and_all_rows_in_one_call(rng):
    x = rng.normal(size=(50, 33))
    _, perm, _, _, _, inv = _solve(x, 5, 0.3, 4 / 3, False)
    np.testing.assert_array_equal(np.take_along_axis(perm, inv, axis=-1), np.broadcast_to(np.arange(33), (50, 33)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_keeps_dtype(dtype):
    _, _, v, bstart, _, inv = _solve(np.array([[3.0, 2.0, 1.0, 0.5]], dtype=dtype), 2, 1.0, 4 / 3, False)
    assert v.dtype == dtype
    assert bstart.dtype == np.int64 and inv.dtype == np.int64


def test_block_growth_is_linear_for_a_large_pooled_block():
    # Equal spacing and a large strength pool almost the whole row into one block:
    # a quadratic merge would take minutes at n = 2e5; the linear kernel takes milliseconds.
    n = 200_000
    x = np.linspace(1.0, 0.0, n)[None, :]
    for p in (2.0, 4 / 3, 1.5):
        _, _, _, bstart, bend, _ = _solve(x, n // 2, 1e3, p, False)
        assert bend[0, n // 2] - bstart[0, n // 2] > n // 2


def test_kernels_are_cached_to_disk():
    from topk_core._pav import _scalar, kernels

    for fn in (kernels.pav_rows.parallel, kernels.pav_rows.serial, kernels._pav_row, _scalar.mag_fixed_point):
        assert fn._cache.__class__.__name__ != "NullCache"


def test_serial_and_parallel_kernels_have_their_own_disk_cache():
    # Numba keys its cache files by module and qualified name only: with one name,
    # whichever variant compiled first was loaded for both, and the threads never ran.
    from topk_core._pav import kernels, select

    for pair in (kernels.pav_rows, kernels.topk_rows_forward, select._select_rows):
        serial, parallel = pair.serial, pair.parallel
        assert serial.py_func.__qualname__ != parallel.py_func.__qualname__
        assert serial._cache._impl.filename_base != parallel._cache._impl.filename_base
        assert parallel.targetoptions.get("parallel") and not serial.targetoptions.get("parallel")


def test_serial_and_parallel_kernels_agree(rng):
    from topk_core._pav import kernels

    keys = kernels.read_only(np.abs(rng.normal(size=(64, 40))))  # the operators' signature (no compilation of its own)
    perm = np.ascontiguousarray(np.argsort(-keys, axis=-1))
    args = (np.zeros(64, np.int64), np.full(64, 40, np.int64), np.full(64, 7, np.int64), 0.5, 4.0, True)
    for a, b in zip(kernels.pav_rows.serial(keys, perm, *args), kernels.pav_rows.parallel(keys, perm, *args), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("route", ["select", "full_sort"])
def test_mask_of_large_tied_keys_sums_to_k(p, route):
    # Regression (found by hypothesis): 14 keys equal to 385 with l = 1e-3 and p = 3 gave
    # entries 1/14 with a relative error of 1e-8, as `s - value` cancelled. The mask is
    # shift invariant; the kernels now work relative to the row's k-th key.
    import topk_numpy as tk

    x = np.full((2, 15), 385.0)
    x[1, 0] += 1e-5  # a near-tie
    if route == "full_sort":
        x[:, -1] = -np.inf  # an infinite entry sends the row through the full-sort kernel
    else:
        x[:, -1] = 0.0
    for k in (1, 3, 13):
        y = tk.soft_topk_mask(x, k, regularization_strength=1e-3, p=p)
        np.testing.assert_allclose(y.sum(axis=-1), k, rtol=0, atol=1e-13)
        np.testing.assert_allclose(y[0, :-1], k / 14, rtol=1e-13)


@pytest.mark.parametrize("route", ["select", "full_sort"])
@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-3, 1e3, 1e200, 1e300])
def test_magnitude_of_tiny_and_huge_rows_is_homogeneous(p, route, scale):
    # mag(c x; l c^(2-p)) = c mag(x; l); c = 1e-3 and 1e3 check the identity itself (no rescaling
    # in the kernel there). Rows of tiny or huge keys are solved rescaled by a
    # power of two; before, their block equations underflowed or overflowed (e.g. keys ~1e200
    # with p = 4/3 lost their second entry, and denormal keys came back 10^150 times larger).
    import topk_numpy as tk

    x = np.array([[3.0, 1.0, 1.0, 0.5, -2.0, 0.25], [0.3, -0.2, 0.1, 0.25, -0.05, 0.0]])
    if route == "full_sort":
        x = np.concatenate([x, np.full((1, 6), np.nan)])  # a NaN row sends the array through the full sort
    lam = 0.5
    want = tk.soft_topk_mag(x, 2, regularization_strength=lam, p=p)
    got = tk.soft_topk_mag(x * scale, 2, regularization_strength=lam * scale ** (2.0 - p), p=p)
    np.testing.assert_allclose(got / scale, want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("route", ["select", "full_sort", "unfused"])
@pytest.mark.parametrize("scale", [2.0**-400, 2.0**-120, 2.0**-3, 2.0**3, 2.0**120, 2.0**400])
def test_mask_with_tiny_and_huge_strengths_is_homogeneous(p, route, scale):
    # mask(c x; c l) = mask(x; l), with the Jacobian divided by c. For p = 4/3 the
    # closed-form block equation holds l^3, which underflowed for l below ~1e-103 (a row
    # with l = 1e-276 summed to 1.001 instead of 2) and overflowed above ~1e102; strengths
    # outside 2^+-100 are now solved scaled by a power of two. 2^+-3 checks the identity.
    import array_api_compat.numpy as xp

    from topk_core._agnostic import jacobians
    from topk_core._agnostic.regularizer import conjugate_exponent
    from topk_core._pav_path import pav_mask

    x = np.array([[3.0, 1.0, 1.0, 0.5, -2.0, 0.25], [0.3, -0.2, 0.1, 0.25, -0.05, 0.0]])
    u = np.array([[0.3, -1.0, 0.5, 2.0, 0.1, -0.7], [1.0, 0.2, -0.4, 0.9, 0.3, 0.5]])
    if route == "full_sort":
        x[:, -1] = -np.inf  # an infinite entry sends the array through the full-sort kernel
    q = conjugate_exponent(p)
    lam = 0.4
    fused = route != "unfused"
    want, res0 = pav_mask(x, 2, lam, q, fused=fused)
    got, res = pav_mask(x * scale, 2, lam * scale, q, fused=fused)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=-1), 2.0, rtol=1e-13)
    j0 = jacobians.mask_jvp_rows(res0, u, xp)
    j = jacobians.mask_jvp_rows(res, u, xp)
    np.testing.assert_allclose(j * scale, j0, rtol=1e-11, atol=1e-11 * np.abs(j0).max())


def test_magnitude_of_denormal_ties():
    # Found by hypothesis: two denormal keys, k = 1, l = 2, p = 3/2 came back as 2e-162.
    import topk_numpy as tk

    x = np.array([2.22507386e-309, 2.22507386e-309])
    for p in (1.25, 4.0 / 3.0, 1.5, 2.0, 3.0):
        y = tk.soft_topk_mag(x, 1, regularization_strength=2.0, p=p)
        assert np.all(np.abs(y) <= np.abs(x))


_TINY_TIE_LIMIT = pytest.mark.xfail(
    strict=True, reason="known limit (p > 8, where method='pav' is refused): the block value of ties of tiny keys "
    "lies within r ~ 1e-300 t of the keys, not a float number; the threshold method splits them (docs/methods.md)")


@pytest.mark.parametrize(("p", "a"), [
    (3.0, 1e-20), (3.0, 1e-100), (3.0, 1e-307), (3.5, 1e-250), (4.0, 1e-200), (4.0, 1e-307), (6.0, 1e-20),
    (6.0, 1e-100), pytest.param(20.0, 1e-20, marks=_TINY_TIE_LIMIT),
])
def test_magnitude_of_tiny_ties_at_large_p(p, a):
    # Each output is t / 2 + r with r / t = l (t / 2)^(p-1) / t: a / 2 to the last digit here.  PAV's
    # kernel (method="pav" takes p <= 8 only).  p = 6 at 1e-100 and 3.5 to 4 from 1e-200 on came back 0
    # up to commit b606d97 (the strength of the row's frame, l c^(2-p), underflowed).
    from topk_core._pav_path import pav_mag

    x = np.array([[a, a]])
    y, _ = pav_mag(x, 1, 2.0, conjugate_exponent(p), with_residuals=False)
    np.testing.assert_allclose(y, x / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", [3.5, 4.0])
@pytest.mark.parametrize("a", [1e-200, 1e-250, 1e-300, 1e-307])
@pytest.mark.parametrize("batch", [1, 64])
def test_magnitude_of_tiny_ties_sharing_places(p, a, batch):
    # Found by a fuzz: four ties of 2a sharing three places (k = 3), in rows of tiny keys.  With the frame's
    # strength l c^(2-p) below 1e-300 the exact outputs are the hard operator's, ties split evenly, to the last
    # digit; PAV returned 0 for every entry (1e-200 to 1e-300), or ties 1e-3 off (keys near 1e-307, scaled by
    # 2^1000 at most, short of 1).  Both row counts: the kernels' routes differ.
    import topk_numpy as tk

    x = np.tile(np.array([2.0, -2.0, 1.5, 2.0, 0.0, -2.0, -1.5, 0.5, 1.0]) * a, (batch, 1))
    want = np.where(np.abs(x) == 2 * a, 0.75 * x, 0.0)
    for lam in (1e-3, 1.0, 1e3):
        y = tk.soft_topk_mag(x, 3, regularization_strength=lam, p=p, method="pav")
        np.testing.assert_allclose(y, want, rtol=1e-13, atol=0)


# Found by a fuzz (the 14 largest entries of a normal row of 64, k = 8, p = 4, l = 1): the last free entry,
# 0.8418, lies u = 1.5e-17 above the threshold, below the rounding of its key in the frame of the block's
# smallest key at the first solve (0.9171): left out of the block there, it came back 2.40e-6 instead
# of 2.49e-6 (sum(y) missed k by 8.8e-8) up to commit b606d97.
_SUB_ULP_ROW = np.array([
    2.4496101173835734, 2.2153157922791573, 1.2884494025471271, 1.203149109868868, 1.1927854056370009,
    1.1399695378080401, 1.089085938792044, 1.0302384097445416, 1.0241103348921585, 0.9816892807129348,
    0.9271147346528198, 0.9171387266435495, 0.8417834491957104, 0.7850579315877457,
])


@pytest.mark.parametrize("batch", [1, 64])
def test_mask_keeps_a_free_entry_below_its_keys_rounding(batch):
    import topk_numpy as tk

    from ._oracles import mp_threshold_mask_row

    x = np.random.default_rng(0).permuted(np.tile(_SUB_ULP_ROW, (batch, 1)), axis=-1)
    y = tk.soft_topk_mask(x, 8, regularization_strength=1.0, p=4.0, method="pav")
    for row, out in zip(x[:3], y[:3], strict=False):
        want = np.array(mp_threshold_mask_row(row, 8, 1.0, 4.0, digits=100), dtype=float)
        np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-15)
    assert np.abs(y.sum(-1) - 8.0).max() <= 1e-14


# Rows of 9 scaled by e^u (`tests/_rows.rows_of_kind`, "spread", seed 6, rows 81 and 152) whose threshold at
# p = 10, l = 1 lies within the rounding of a key: the mask's entry 0.01636 needs y = 0.0045, u = l y^9 =
# 8e-22 below its key, whose ulp is 3.5e-18.  In every other key's frame the value could not be placed
# between the key and the next float below it: PAV's kernel left the entry at 0 (sum(y) missed k by
# 4.5e-3; the magnitude was 1.9e-2 off) until it solved such blocks again just below the key
# (`kernels._solve_below_key`).  p = 10 is above what method="pav" serves: the kernel itself.
_BELOW_A_KEY_ROWS = {
    "mask": np.array([0.15648084892399633, -0.06469999884163206, 0.01636295246646848, 0.033639500837156,
                      0.18559057071330892, -0.1590128784321001, 0.07799882140578239, 0.00106102230941329,
                      -0.1468477675915235]),
    "mag": np.array([-11.083085824271489, 6.794914855835894, -2.837909007032147, 7.07265736958799,
                     8.590270452390827, 7.801196701657025, -2.17037760538858, 10.844758182942183,
                     8.919976607879654]),
}


@pytest.mark.parametrize("op", ["mask", "mag"])
def test_block_solved_just_below_a_key_at_large_p(op):
    from topk_core import _pav_path

    from ._oracles import mp_threshold_mag_row, mp_threshold_mask_row

    x = _BELOW_A_KEY_ROWS[op]
    oracle = mp_threshold_mask_row if op == "mask" else mp_threshold_mag_row
    want = np.array(oracle(x, 3, 1.0, 10.0, digits=200), dtype=float)
    got = getattr(_pav_path, f"pav_{op}")(x[None], 3, 1.0, conjugate_exponent(10.0), with_residuals=False)[0][0]
    scale = 1.0 if op == "mask" else np.abs(x).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * scale)


def test_block_solved_just_below_a_key_it_was_placed_above_in_another_frame():
    # A "dominant" row of the fuzz (`benchmarks/pav_vs_threshold.py --seed 11`) at p = 8, l = 100: the value
    # lies 5.5e-22 below the key 0.048 (its entry's y = 4.8e-4).  Solved relative to the k-th key 0.89 it
    # came out 22 of the small key's ulps above it, relative to 0.46 one ulp below it: neither within the
    # eight ulps above it that `_solve_below_key` asked for, and the entry came back 0.
    from topk_core import _pav_path

    from ._oracles import mp_threshold_mask_row

    x = np.array([1.0000000000000000e04, -3.4415527004108942e-01, -5.2009668153064814e-01, 1.6160007302789465e00,
                  4.6369521786494833e-01, 6.7660271098386915e-01, 4.8246760323819762e-02, 8.9361528163568194e-01,
                  -1.8541219971621392e-01])
    want = np.array(mp_threshold_mask_row(x, 3, 100.0, 8.0, digits=200), dtype=float)
    assert 4e-4 < want[6] < 5e-4
    got = _pav_path.pav_mask(x[None], 3, 100.0, conjugate_exponent(8.0), with_residuals=False)[0][0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize(("n", "row", "k", "lam"), [(9, 120, 3, 1.0), (64, 197, 8, 100.0)])
def test_block_value_far_below_its_smallest_key_at_large_p(n, row, k, lam):
    # Normal rows (`normal(size=(200, n))`, seed 5) at p = 50.  Row 120 of 9: the fourth entry's y = 0.0015
    # lies u = y^49 = 1e-139 below its key.  Solved relative to that key, the bracket ran from the k-th
    # key's side, and halving reached 1e-92 (y = 0.013, sum(y) 1.2e-2 above k) when the 300 iterations ran
    # out.  Splits in a key's frame now go to the key, then geometrically below it.  Row 197 of 64: y =
    # 3.2e-4 lies 1e-170 below its key, where the splits' floor, 1e-300 of a bracket of 1e-165, underflowed
    # to 0 and a split landed on the key and ended the search there (y = 0.41).
    from topk_core import _pav_path

    from ._oracles import mp_threshold_mask_row

    x = np.random.default_rng(5).normal(size=(200, n))[row]
    want = np.array(mp_threshold_mask_row(x, k, lam, 50.0, digits=300), dtype=float)
    got = _pav_path.pav_mask(x[None], k, lam, conjugate_exponent(50.0), with_residuals=False)[0][0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


# Spanning rows whose k-th key is huge (k = 3 of 9 at l = 0.01; 32 of 1024 at l = 1): the magnitude is
# solved in a frame scaled by 2^-333 (2^-158) with the strength scaled to 2^992 (2^948), where u / l of the
# entries far below the k-th key underflowed: g' came back inf (p = 5: entries 1e74 and 1e72), and the block
# equation lost their terms (p = 8: its value 2e-7 and g' 2e-9 off).
_SCALED_FRAME_ROW = np.array([-6.455e77, 1.114e98, 3.783e74, -7.945e95, -5.106e109, 2.317e100, -4.107e86,
                              -2.054e72, 1.130e109])


@pytest.mark.parametrize(("p", "n", "k", "lam"), [(5.0, 9, 3, 0.01), (8.0, 9, 3, 0.01), (8.0, 1024, 32, 1.0)])
def test_magnitude_derivatives_where_u_over_l_underflows_in_the_frame(p, n, k, lam):
    from topk_core import _pav_path

    from ._oracles import mp_threshold_mag_parts

    if n == len(_SCALED_FRAME_ROW):
        x = _SCALED_FRAME_ROW
    else:
        rng = np.random.default_rng(3)
        x = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(9.0, 49.0, n)
    want, gprime, _, free = mp_threshold_mag_parts(x, k, lam, p, digits=80)
    assert free.sum() >= 6
    got, residuals = _pav_path.pav_mag(x[None], k, lam, conjugate_exponent(p), with_residuals=True)
    np.testing.assert_allclose(got[0], want, rtol=1e-13, atol=0)
    # Entrywise: these entries lie far from the threshold, where g' is well conditioned.
    np.testing.assert_allclose(np.asarray(residuals.gprime)[0], gprime, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("row", "k"), [([-5.0, 5.0, 5.0, -4.0, -2.0, 2.0, -5.0], 3),
                                      ([-2.0, 2.0, 4.0, -2.0, -2.0, -2.0], 4)])
@pytest.mark.parametrize("p", [6.0, 8.0])
def test_pav_magnitude_of_ties_whose_threshold_no_float_resolves(row, k, p):
    # The rows of `test_threshold.py::test_mag_ties_whose_threshold_no_float_resolves` (keys near 1e-110,
    # l = 0.5) through method="pav", which serves p <= 8: a free tie at the threshold lies r ~ 1e-660 of its
    # key below it at p = 8, and the ties share the places left (3/4 of 5; 3/5 of 2).  The oracle needs the
    # digits: in 450 it put the ties 0.3 of the largest output off at p = 8.
    import topk_numpy as tk

    from ._oracles import mp_threshold_mag_row

    x = np.array(row) * 1e-110
    want = np.array(mp_threshold_mag_row(x, k, 0.5, p, digits=1100), dtype=float)
    got = tk.soft_topk_mag(x, k, regularization_strength=0.5, p=p, method="pav")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15 * np.abs(x).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [5.0, 6.5, 8.0])
@pytest.mark.parametrize("op", ["mask", "mag"])
def test_pav_between_p_4_and_8_matches_the_oracle(op, p, dtype):
    # method="pav" serves p <= 8 (up to commit 62fd162, p <= 4): normal rows of 16 (k = 4) at three strengths,
    # against 60-digit oracles of the rows as given (float32 rows are solved in float64 and rounded once:
    # within an ulp).
    import topk_numpy as tk

    from ._oracles import mp_threshold_mag_row, mp_threshold_mask_row

    oracle = mp_threshold_mask_row if op == "mask" else mp_threshold_mag_row
    x = np.random.default_rng(int(p * 10)).normal(size=(6, 16)).astype(dtype)
    for lam in (0.05, 1.0, 20.0):
        got = getattr(tk, f"soft_topk_{op}")(x, 4, regularization_strength=lam, p=p, method="pav")
        want = np.stack([oracle(row.astype(np.float64), 4, lam, p, digits=60) for row in x])
        scale = 1.0 if op == "mask" else np.abs(x).max(axis=-1, keepdims=True)
        tol = (1.0 if dtype == np.float32 else 8.0) * np.finfo(dtype).eps
        assert got.dtype == dtype
        np.testing.assert_array_less(np.abs(got - want) / scale, tol)


def test_mask_for_p_above_2_resolves_an_entry_just_above_the_threshold():
    # Found by hypothesis: x = (3, 6e-8), k = 1, l = 3, p = 3. The second entry's u = s - value
    # is ~3e-16, below the spacing of floats near 3, and g(u) = (u / l)^(1/2) is infinitely
    # steep at 0: solved relative to the k-th key it came out as 0 (sum(y) = 1 - 1e-8).
    # Reference: with y2 = sqrt(u2 / l) and y1 = 1 - y2 = sqrt((u2 + 3 - 6e-8) / l), eliminating
    # u2 gives (1 - y2)^2 - y2^2 = (3 - 6e-8) / 3, so y2 = (1 - (3 - 6e-8) / 3) / 2 exactly
    # (its float evaluation keeps about eight digits).
    import topk_numpy as tk

    x = np.array([3.0, 5.96046448e-08])
    y = tk.soft_topk_mask(x, 1, regularization_strength=3.0, p=3.0)
    y2 = (1.0 - (3.0 - 5.96046448e-08) / 3.0) / 2.0
    np.testing.assert_allclose(y, [1.0 - y2, y2], rtol=1e-6, atol=0)
    assert abs(y.sum() - 1.0) <= 1e-15


def test_unit_range_is_the_exponent_rule():
    # The compare-only test the lanes vectorize (`_in_unit_range`) against the binary-exponent rule
    # of `_unit_scale`, at and around the edges of the range, denormals and zero.
    import math

    from topk_core._pav import kernels

    edges = [2.0**e for e in (-1074, -1022, -102, -101, -100, 0, 99, 100, 101, 1023)]
    below, above = np.nextafter(1.0, 0.0), np.nextafter(1.0, 2.0)
    values = [0.0, 1.0, 3.0] + [float(f * v) for v in edges for f in (1.0, below, above)]
    for v in values + [-v for v in values]:
        expected = abs(math.frexp(v)[1]) <= kernels._EXPONENT_RANGE
        assert kernels._in_unit_range(v) == expected, v
        assert (kernels._unit_scale(v) == 1.0) == expected, v


@pytest.mark.parametrize("lam", [1e-8, 0.1, 3.0, 1e8])
def test_quadratic_fixed_point_solves_its_equation(lam):
    # p = 2: u = g(s - u) = (s - u) / l, and 0 for keys that are not positive.
    from topk_core._pav import _scalar

    for s in (1e-200, 1e-3, 1.0, 7.5, 1e300):
        u = _scalar.quadratic_fixed_point(s, lam)
        assert 0.0 <= u <= s
        assert abs(u * (1.0 + lam) - s) <= 4 * np.finfo(float).eps * s  # (s - u) / l = u, without s - u
    assert _scalar.quadratic_fixed_point(0.0, lam) == 0.0
    assert _scalar.quadratic_fixed_point(-2.0, lam) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 16), (2, 1000)])
def test_magnitude_residuals_are_aligned_views_of_one_block(shape, dtype):
    # `kernels._residual_block`: g', codes and offset share one allocation (how glibc's malloc then
    # hands memory back between calls, see there), each array on its own cache line, none overlapping.
    from topk_core._pav.kernels import fused_outputs

    x = np.ones(shape, dtype=dtype)
    out, gprime, codes, offset = fused_outputs(x, True, True)
    assert (gprime.shape, gprime.dtype) == (shape, np.dtype(dtype))
    assert (codes.shape, codes.dtype) == (shape, np.dtype(np.int8))
    assert (offset.shape, offset.dtype) == ((shape[0],), np.dtype(dtype))
    assert not offset.any()
    base = gprime.base
    assert base is not None and codes.base is base and offset.base is base
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in (gprime, codes, offset))
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert all(a.flags.c_contiguous and a.flags.writeable and a.flags.aligned for a in (gprime, codes, offset))
    assert not np.shares_memory(out, base)
    # The mask's g' and the forward-only arrays stay arrays of their own.
    _, mask_gprime, mask_codes, mask_offset = fused_outputs(x, False, True)
    assert mask_gprime.shape == shape and mask_codes.size == 0 and mask_offset.size == 0
    _, no_gprime, no_codes, no_offset = fused_outputs(x, True, False)
    assert no_gprime.size == 0 and no_codes.size == 0 and no_offset.size == 0


def test_kernel_pairs_compile_one_signature_for_writable_and_read_only_inputs(rng):
    # The serial/parallel dispatchers pass the arrays a kernel only reads as read-only views: a writable
    # array (NumPy's) and a read-only one (JAX's) share one compiled signature, not two.
    from topk_core._pav import products
    from topk_core._pav.kernels import read_only

    gprime = np.abs(rng.normal(size=(3, 5)))
    t = rng.normal(size=(3, 5))
    for g_in, t_in in ((gprime, t), (read_only(gprime), read_only(t))):
        out = np.empty((3, 5))
        products._mask_rows(g_in, t_in, out)
        np.testing.assert_allclose(out, gprime * (t - np.sum(gprime * t, axis=1, keepdims=True) / np.sum(gprime, axis=1, keepdims=True)))
    assert gprime.flags.writeable and t.flags.writeable  # the caller's arrays are left as they were
    inputs = [sig[:2] for sig in products._mask_rows.serial.signatures]
    assert inputs and all(not a.mutable for sig in inputs for a in sig)
