"""method="threshold": exact sort-free root finding, pure Array API, on every backend.

The oracle is the Numba PAV (method="pav" on NumPy float64), which shares no
solver code with the threshold method; Jacobians are compared through the
public `*_from_residuals` functions.
"""

from __future__ import annotations

import functools
import os

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from hypothesis import assume as hypothesis_assume
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import topk_core as tc
import topk_numpy as tk
from topk_core._agnostic import threshold
from topk_core._agnostic.regularizer import conjugate_exponent, strength_scale
from topk_core._agnostic.residuals import KEPT_CODE

from ._method_backends import FORWARD, JVP, VJP, backend_context, cuda_torch
from ._oracles import (
    assert_within_input_rounding,
    mp_threshold_mag_parts,
    mp_threshold_mag_row,
    mp_threshold_mask_row,
    rounding_reach,
)
from ._rows import rows_far_below_their_largest_key, rows_spanning_many_orders, spanning_row


def _pav(operator, x, k, **kw):
    return FORWARD[operator](x, k, method="pav", **kw)


def _check(backend, operator, x, k, *, atol=1e-10, want=None, **kw):
    """Threshold on the backend against PAV on NumPy; returns both residuals."""
    xb = backend.to(x)
    y, res = FORWARD[operator](xb, k, method="threshold", **kw)
    backend.assert_like(y, xb)
    want_res = None
    if want is None:
        want, want_res = _pav(operator, x, k, **kw)
    got = backend.back(y)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    both_inf = np.isinf(want) & (got == want)
    np.testing.assert_allclose(np.where(both_inf, 0.0, got), np.where(both_inf, 0.0, want), rtol=0, atol=atol)
    return res, want_res


@pytest.mark.parametrize("lam", [0.05, 0.7])
def test_matches_pav_on_random_rows(backend, rng, p, operator, lam):
    x = rng.normal(size=(24, 11))
    for k in (1, 4, 10):
        _check(backend, operator, x, k, p=p, regularization_strength=lam)


def test_matches_pav_on_ties_and_zeros(backend, rng, p, operator):
    rows = np.array([
        [3.0, 3.0, 3.0, 0.0, 0.0, -1.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -5.0, 5.0, 0.0, 0.0],
        [3.0, 1.0, 1.0, -2.0, 1.0, 3.0],
        [2.0, -2.0, 2.0, -2.0, 0.5, 0.5],
        [0.0, 0.0, 0.0, 0.0, 0.0, 7.0],
    ])
    ints = rng.integers(-2, 3, size=(30, 6)).astype(np.float64)
    x = np.concatenate([rows, ints])
    for k in range(1, 6):
        for lam in (0.1, 1.0):
            _check(backend, operator, x, k, p=p, regularization_strength=lam)


@pytest.mark.parametrize("scale", [1e50, 1e-50], ids=["huge", "tiny"])
@pytest.mark.parametrize("scaled_strength", [False, True], ids=["l=0.1", "l~scale"])
def test_matches_pav_on_huge_and_tiny_inputs(backend, rng, p, operator, scale, scaled_strength):
    x = rng.normal(size=(12, 9)) * scale
    lam = 0.1 * scale if scaled_strength else 0.1
    # The magnitude operator returns values on the scale of x.
    atol = 1e-10 * scale if operator == "mag" else 1e-10
    _check(backend, operator, x, 3, p=p, regularization_strength=lam, atol=atol)


@pytest.mark.parametrize("scale", [1e150, 1e-150, 1e300, 1e-300])
def test_extreme_scales_follow_the_scaling_laws(rng, p, scale):
    # mask(c z; c l) = mask(z; l) and mag(c z; l c^(2-p)) = c mag(z; l), checked against PAV on z
    # (PAV's moment updates overflow at these scales; the threshold method rescales internally).
    z = rng.normal(size=(10, 7))
    y = tc.soft_topk_mask(z * scale, 2, p=p, regularization_strength=0.3 * scale, method="threshold")
    np.testing.assert_allclose(y, tc.soft_topk_mask(z, 2, p=p, regularization_strength=0.3), rtol=0, atol=1e-12)
    out = tc.soft_topk_mag(z * scale, 2, p=p, regularization_strength=0.3 * scale ** (2.0 - p), method="threshold")
    want = tc.soft_topk_mag(z, 2, p=p, regularization_strength=0.3)
    np.testing.assert_allclose(out / scale, want, rtol=1e-12, atol=1e-12)


def test_float32_is_close_to_pav(backend, rng, operator):
    x = rng.normal(size=(16, 10)).astype(np.float32)
    xb = backend.to(x)
    y, _ = FORWARD[operator](xb, 3, method="threshold")
    backend.assert_like(y, xb)
    want, _ = _pav(operator, x.astype(np.float64), 3)
    assert np.all(np.abs(backend.back(y) - want) <= 2e-5 * (1 + np.abs(want)))


@pytest.mark.parametrize("dominant", [1e2, 1e4, 1e8])
def test_mask_with_a_dominant_entry_keeps_the_precision_of_the_small_keys(backend, rng, p, dominant):
    # The threshold lies among keys ~0.01 while the row maximum is huge. Relative to the
    # maximum those keys round to a few values (in float32 at 1e8, all to one), and sum(y)
    # missed k by up to k - 1; the method now solves again relative to the key nearest
    # to the threshold.
    x = rng.normal(size=(16, 40)) * 0.01
    x[:, 0] = dominant
    for lam in (1e-4, 1e-6):
        _check(backend, "mask", x, 8, p=p, regularization_strength=lam, atol=1e-8)
    x32 = backend.to(x.astype(np.float32))
    y32, _ = FORWARD["mask"](x32, 8, method="threshold", p=p, regularization_strength=1e-3)
    want, _ = _pav("mask", x.astype(np.float32), 8, p=p, regularization_strength=1e-3)
    np.testing.assert_allclose(backend.back(y32), want, rtol=0, atol=1e-3)
    np.testing.assert_allclose(backend.back(y32).sum(-1), 8.0, rtol=1e-4)


def test_float32_mask_of_tied_keys_that_the_strength_cannot_resolve_in_the_absolute_frame(backend):
    # Found by a randomized search: float32 keys j * 1.2497e7 (j = -3..3, tied in groups) with
    # l = 1.4e-4, k = 114.  Near the threshold adjacent float32 numbers are 1 apart, so sum(y)
    # jumps from 109 to 130 between them; the solve in the absolute frame returned its point of
    # smallest miss, at -42, outside its bracket, and the reference key taken nearest to it was
    # the wrong group: sum(y) came back 109.  The reference now comes from the bracket.
    counts = [25, 27, 21, 28, 34, 21, 26]
    x = np.repeat(np.arange(-3.0, 4.0) * 12497099.37481811, counts).astype(np.float32)
    x = np.random.default_rng(0).permutation(x)[None]
    lam = 1.3970412145102766e-4
    y, _ = FORWARD["mask"](backend.to(x), 114, method="threshold", p=3.0, regularization_strength=lam)
    y = backend.back(y)
    want, _ = _pav("mask", x.astype(np.float64), 114, p=3.0, regularization_strength=lam)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6)
    assert abs(float(y.sum()) - 114.0) <= 1e-4


def test_a_newton_landing_by_rounding_inside_the_bracket_is_no_root(backend):
    # Found by a randomized search against PAV: |x| = 1e114 and seven ties of 1e77, k = 7, p = 2.
    # Scaled to the largest key, the threshold is 8.8e-38.  On the piece where only the largest key
    # is above the iterate, sum(y) = 1 and the Newton step aims at 0, outside the bracket; the
    # rounding of s + step (3.6e-19 - 3.6e-19 (1 + eps)) landed it at 4.8e-35, inside, and the rule
    # for exact piecewise-linear steps (a step that stays in its piece lands on the root) took it:
    # the ties came back 0.
    x = np.array([[1e114] + [1e77] * 7])
    y, _ = FORWARD["mag"](backend.to(x), 7, method="threshold", p=2.0, regularization_strength=1.0)
    want = mp_threshold_mag_row(x[0], 7, 1.0, 2.0, digits=300)
    np.testing.assert_allclose(backend.back(y)[0], want, rtol=1e-12)


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
@pytest.mark.parametrize(("dtype", "spans"), [(np.float64, (20, 50, 300)), (np.float32, (8, 15))])
def test_mask_rows_spanning_many_orders(backend, p, dtype, spans):
    # Rows of 20 keys +-10^u, u uniform in [-span, span]: relative to the maximum, the keys far
    # below it collapsed into one value, the first threshold was off by up to eps * max, and the
    # key "nearest" to it was arbitrary: sum(y) missed k by up to k - 1 (float32 from a span of
    # 1e+-8, float64 from 1e+-30).  The key nearest the threshold now comes from a solve on the
    # keys as they are.
    rng = np.random.default_rng(7)
    for span in spans:
        x = (10.0 ** rng.uniform(-span, span, size=(6, 20)) * rng.choice([-1.0, 1.0], size=(6, 20))).astype(dtype)
        y, _ = FORWARD["mask"](backend.to(x), 5, method="threshold", p=p)
        want, _ = _pav("mask", x.astype(np.float64), 5, p=p)
        atol = 1e-12 if dtype == np.float64 else 4e-6
        np.testing.assert_allclose(backend.back(y), want, rtol=0, atol=atol, err_msg=f"span 1e+-{span}")


@pytest.mark.parametrize(
    ("p", "span", "centre"),
    [(p, 300, 0) for p in (1.25, 4.0 / 3.0, 1.5, 3.0, 6.0, 20.0)] + [(4.0 / 3.0, 100, 0), (2.0, 200, 0), (3.0, 100, 0)]
    # Rows of huge or tiny keys: the frames of large p (strength l c^(2-p)) left the float range.
    + [(20.0, 20, 250), (6.0, 80, 200), (2.0, 20, -250), (3.0, 20, -250), (6.0, 80, -200),
       (1.25, 20, -250), (4.0 / 3.0, 20, -250), (1.5, 20, -250), (4.0 / 3.0, 20, -200)],
)
def test_mag_random_rows_spanning_many_orders(p, span, centre):
    # Magnitudes spanning 1e+-100 and more: the threshold lies hundreds of orders below the largest
    # key, and the first root finder, which halved its bracket toward 0, ran out of iterations: the
    # two smallest of the k saturated entries came back 0.  It now splits geometrically.  For p > 2
    # at 1e+-300 the free entries whose output is ~x came back 0: in the scaled frame l is ~1e279
    # and r ~1e-220, and r / l underflowed inside g (`regularizer.g` now forms it as a quotient of powers).
    # For large p the strength of the frame scaled to the largest key, l c^(2-p), was clipped to
    # the float range, which changed the problem; the scale is now bounded instead.
    for seed in range(3):
        x = spanning_row(seed, span, 20, centre)
        expected = mp_threshold_mag_parts(x, 5, 0.1, p, 60)[0]
        y, _ = FORWARD["mag"](x[None], 5, method="threshold", p=p)
        assert_within_input_rounding(y[0], expected, x, f"seed {seed}")


@pytest.mark.parametrize("p", [3.0, 6.0, 20.0])
@pytest.mark.parametrize("a", [1e-20, 1e-100, 1e-300])
def test_mag_ties_of_tiny_keys_at_large_p(p, a):
    # Two tied keys, k = 1: each output is t y = t / 2 plus r, and r / t = l (y t)^(p-1) / t is far
    # below the float range here (1e-366 for p = 20 at 1e-20), so each output is a / 2.  Bounding
    # the frame's scale on this side (instead of clipping its strength) returned a.
    x = np.array([[a, a]])
    y, _ = FORWARD["mag"](x, 1, method="threshold", p=p, regularization_strength=2.0)
    np.testing.assert_allclose(y, x / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("e", [-200, -270, -290])
@pytest.mark.parametrize("lam", [0.01, 1.0])
def test_mag_tiny_ties_sharing_places_warn_nothing(backend, e, lam):
    # 21 ties of -1.3 share 3 places below five larger keys (k = 8, p = 4), all scaled by 10^e: the
    # slope (the sum of g' over the free ties next to the threshold) overflows and bisection takes over.
    # NumPy-backed arrays warned "overflow encountered in reduce" (an error under this suite's
    # filterwarnings) up to commit b606d97.  The frame's strength is below 2^-1000: the outputs are the
    # hard operator's, ties split evenly.  (Found by benchmarks/pav_vs_threshold.py.)
    unit = 10.0**e
    x = np.array([[8.0, 5.0, 4.0, 2.0, 1.5] + [-1.3] * 21 + [1e-3, -2e-4, 5e-6]]) * unit
    want = np.where(np.abs(x) > 1.4 * unit, x, np.where(x == -1.3 * unit, x * 3 / 21, 0.0))
    y, _ = FORWARD["mag"](backend.to(x), 8, method="threshold", p=4.0, regularization_strength=lam)
    np.testing.assert_allclose(backend.back(y), want, rtol=1e-13, atol=0)


# Keys spanning 1e-16..1e-55, k = 3, p = 5/4, l = 0.01: two saturated entries, and the third place
# shared by the rest, almost all of it by 6e-22 (y = 1 - 1e-29: z / t rounds to 1).  Every output is x
# to float64's precision and the Jacobian the identity to about 1e-55 (g' <= 1e-55 on the free set,
# D = sum g' + 1).  (Found by a fuzz of the VJPs of PAV against the threshold method.)
SPANNING_MAG_ROW = [-3e-34, 6e-22, -2.5e-55, 1.2e-48, -2e-41, 1.8e-16, 3.4e-29, 4.8e-47, 8.8e-19]
SPANNING_MAG_CODES = [-1, 1, -1, 1, -1, 2, 1, 1, 2]


def test_mag_free_entry_rounded_to_saturation_keeps_the_jacobian(backend):
    # The threshold method read 6e-22 as saturated (3 = k entries in A next to free ones): the offset
    # k - |A| was 0 instead of 1, the denominator D = sum g' + offset collapsed to the free set's
    # g', and the VJP came back 0.79 off.
    x = np.array([SPANNING_MAG_ROW])
    u = np.cos(np.arange(9.0))[None]
    y, res = FORWARD["mag"](backend.to(x), 3, method="threshold", p=1.25, regularization_strength=0.01)
    np.testing.assert_allclose(backend.back(y), x, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(backend.back(res.codes), [SPANNING_MAG_CODES])
    np.testing.assert_array_equal(backend.back(res.offset).ravel(), [1.0])
    np.testing.assert_allclose(backend.back(VJP["mag"](res, backend.to(u))), u, rtol=0, atol=1e-12)


def test_mask_free_entry_rounded_to_saturation_keeps_the_jacobian(backend):
    # k = 1, p = 5/4, l = 1: the first entry takes 1 - 1e-18 of the place, the next three 1e-20..8e-19 (their
    # u = 1e-5..3e-5, y = u^4).  Read as saturated (y rounds to 1), the first entry's g' = 4 left the free
    # set, and the products (of the order of the free g', 1e-13) came back O(1) off.  Reference: PAV, which
    # holds that entry in its block.
    x = np.array([[1.0, 1e-5, 2e-5, 3e-5, -1.0]])
    u = np.cos(np.arange(5.0))[None]
    _, res_pav = FORWARD["mask"](x, 1, method="pav", p=1.25, regularization_strength=1.0)
    want = VJP["mask"](res_pav, u)
    _, res = FORWARD["mask"](backend.to(x), 1, method="threshold", p=1.25, regularization_strength=1.0)
    np.testing.assert_allclose(backend.back(res.gprime)[0, 0], 4.0, rtol=1e-12)
    # (The first product, g' (u - dgamma) with dgamma ~ u, cancels: known to a few ulps of g' u only.)
    np.testing.assert_allclose(backend.back(VJP["mask"](res, backend.to(u))), want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("method", ["pav", "threshold"])
@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0], ids=["p=2", "p=4/3"])
def test_mag_second_place_500_orders_below_the_first(method, p):
    # k = 2: the first place goes to 1e250, the second is decided among keys near 1e-250.  Scaled to the
    # largest key (into [1, 2)), those are 1e-500: 0 in float64, and the threshold method returned 1e250
    # alone (weights summing to 1, not k; a strict xfail until `threshold._mag_deep_frames`).  Found by
    # a sanity run on rows spanning the float range.  Oracle: the threshold in 80 digits.
    x = np.array([[1e250, 1e-250, 3e-251, -2e-251]])
    y, _ = FORWARD["mag"](x, 2, method=method, p=p, regularization_strength=1.0)
    np.testing.assert_allclose(y[0], mp_threshold_mag_row(x[0], 2, 1.0, p, digits=80), rtol=1e-12, atol=0)


# Magnitude rows whose k-th place is decided among keys far below the largest: beyond the frame's range
# (scaled to the largest key) their keys were subnormal numbers or zeros, and the threshold method
# returned the large keys alone (float32 from about 35 orders, float64 from about 300); they are set
# aside and the rest framed again (`threshold._mag_deep_frames`).  (row, k): the second float32 row
# needs three frames (its 1e10, 1e-20 and 1e-30 scales lie 28-30 orders apart); the third sat at 170
# in a frame not scaled to its largest key (p = 3).  Normal float32 keys only: XLA on the CPU flushes
# subnormal numbers to zero.
_DEEP_ROWS = {
    np.float64: [
        ([1e250, 1e-250, 3e-251, -2e-251, 0.0], 2),
        ([1e300, -1e100, 5e-10, 1e-300, 2e-301, -3e-301], 4),
        ([-1e307, 3e306, 1e-5, 2e-290, -1e-290, 4e-291, 1e-300], 4),
    ],
    np.float32: [
        ([1e20, 1e-20, 3e-21, -2e-21, 0.0], 2),
        ([3e38, 1e10, 1e-20, 3e-21, -2e-30, 1e-30, 4e-31], 5),
        ([-2.79e37, -0.894, -0.245, -0.795, -1.74, -0.863, 0.117, 1.55], 4),
    ],
}


def _assert_entrywise(got: np.ndarray, want: np.ndarray, x: np.ndarray, rtol: float) -> None:
    """|got - want| within `rtol` of each |x| (the outputs lie between 0 and x)."""
    bad = np.abs(got - want) > rtol * np.abs(x)
    assert not bad.any(), (got[bad], want[bad], x[bad])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e3])
def test_mag_places_far_below_the_largest_key(backend, dtype, lam, p):
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for row, k in _DEEP_ROWS[dtype]:
        x = np.array([row], dtype=dtype)
        y, _ = FORWARD["mag"](backend.to(x), k, method="threshold", p=p, regularization_strength=lam)
        backend.assert_like(y, backend.to(x))
        want = mp_threshold_mag_row(x[0].astype(np.float64), k, lam, p, digits=80)
        _assert_entrywise(backend.back(y)[0].astype(np.float64), want, x[0].astype(np.float64), rtol)


@pytest.mark.parametrize("seed", [0, 1])
def test_mag_vjp_far_below_the_largest_key_matches_pav(backend, p, seed):
    # The residuals of re-framed rows (the keys set aside saturated) against PAV's, through one VJP.
    for row, k in _DEEP_ROWS[np.float64]:
        x = np.array([row])
        u = np.random.default_rng(seed).normal(size=x.shape)
        _, want = _pav("mag", x, k, p=p, regularization_strength=1.0)
        _, res = FORWARD["mag"](backend.to(x), k, method="threshold", p=p, regularization_strength=1.0)
        got = backend.back(VJP["mag"](res, backend.to(u)))
        np.testing.assert_allclose(got, VJP["mag"](want, u), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e3])
def test_mag_rows_spanning_the_float_range_match_pav(backend, dtype, lam, p):
    # Before `_mag_deep_frames`: outputs off by their full value (1.0 relative to |x|) for every p and
    # strength, in both dtypes (`python benchmarks/deep_rows.py --no-deep-frames`); PAV solves in float64
    # relative to its k-th key.
    rng = np.random.default_rng([int(dtype == np.float32), round(np.log10(lam)) + 3, round(100 * p)])
    x, k = rows_far_below_their_largest_key(rng, dtype, 12, 40)
    want, _ = _pav("mag", x, k, p=p, regularization_strength=lam)
    y, _ = FORWARD["mag"](backend.to(x), k, method="threshold", p=p, regularization_strength=lam)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    _assert_entrywise(backend.back(y).astype(np.float64), want.astype(np.float64), x.astype(np.float64), rtol)


def test_mag_rows_without_deep_thresholds_keep_their_frame(rng):
    # The test that picks rows for re-framing reads the keys once and sets none aside on ordinary rows:
    # outputs bit for bit those of the frame alone (the rounds switched off).
    x = rng.normal(size=(64, 16)) * 10.0 ** rng.uniform(-3, 3, size=(64, 1))
    y, _ = FORWARD["mag"](x, 4, method="threshold", p=4.0 / 3.0, regularization_strength=0.1)
    saved = threshold._DEEP_ROUNDS
    try:
        threshold._DEEP_ROUNDS = 0
        y0, _ = FORWARD["mag"](x, 4, method="threshold", p=4.0 / 3.0, regularization_strength=0.1)
    finally:
        threshold._DEEP_ROUNDS = saved
    np.testing.assert_array_equal(y, y0)


def test_mask_threshold_far_closer_to_a_key_than_to_the_maximum(backend):
    # Keys 1 and ~1e-277 in one row, l = 1e-276: relative to the maximum the small keys are
    # all -1, and bisecting from the first bracket (~1e-15 wide) to the root's scale took
    # ~900 halvings. The second frame splits geometrically down to the scale l. p = 2
    # has the closed form y = (x - tau) / l on the free entries: tau = -2e-277 here.
    x = np.array([[1.0, 3e-277, 1e-277, 2e-300], [1e-3, 3e-277, 1e-277, 2e-300]])
    y, _ = FORWARD["mask"](backend.to(x), 2, method="threshold", p=2.0, regularization_strength=1e-276)
    want = np.array([[1.0, 0.5, 0.3, 0.2], [1.0, 0.5, 0.3, 0.2]])
    np.testing.assert_allclose(backend.back(y), want, rtol=1e-12, atol=0)


# Magnitude rows whose free entries sit just above the threshold, where r = |x| - t cancels:
# the eight tied 2's share the one unit left by the four 3's (k = 5, y = 1/8 each, output -> 0.25
# as the strength -> 0), and rows whose magnitudes span many orders (the 1.0 saturated, the
# twelve entries s share the 3 units left, y = 1/4: about 2.5e-21 for s = 1e-20 at p = 3).
# Computed from the absolute threshold, r kept 3 digits at a strength of 1e-13, none at 1e-50
# (output 0), and the small entries of the spanning rows came back 0.
_TIED_ROW = np.tile([3.0, -3.0, 2.0, 2.0, -2.0, 2.0, 1.0, 0.5, 0.25], 2)
_CANCEL_P = [1.25, 4.0 / 3.0, 1.5, 2.0, 3.0]
_CANCEL_P_IDS = ["p=5/4", "p=4/3", "p=3/2", "p=2", "p=3"]


def _spanning_row(s: float) -> np.ndarray:
    return np.array([1.0] + [s] * 12)


@functools.cache
def _mp_mag(row: tuple, k: int, lam: float, p: float):
    """(out, g', saturated, free) of one row in 120-digit arithmetic, computed once per module."""
    return mp_threshold_mag_parts(np.array(row), k, lam, p)


def _assert_mag_close(got, want, rtol, entrywise=False):
    got = np.asarray(got, dtype=np.float64)
    scale = np.abs(want) if entrywise else np.max(np.abs(want))
    np.testing.assert_array_equal(got == 0, want == 0)
    assert np.all(np.abs(got - want) <= rtol * scale), np.max(np.abs(got - want) / np.maximum(scale, 1e-300))


@pytest.mark.parametrize("p", _CANCEL_P, ids=_CANCEL_P_IDS)
@pytest.mark.parametrize("lam", [1e-2, 1e-6, 1e-9, 1e-13, 1e-50])
def test_mag_ties_at_tiny_strengths_keep_their_digits(p, lam):
    want = _mp_mag(tuple(_TIED_ROW), 5, lam, p)[0]
    got = tk.soft_topk_mag(_TIED_ROW, 5, p=p, regularization_strength=lam, method="threshold")
    _assert_mag_close(got, want, 1e-12)


@pytest.mark.parametrize("p", _CANCEL_P, ids=_CANCEL_P_IDS)
@pytest.mark.parametrize("s", [1e-8, 1e-20, 1e-50, 1e-100])
def test_mag_rows_spanning_many_orders_keep_their_small_entries(p, s):
    x = _spanning_row(s)
    want = _mp_mag(tuple(x), 4, 1.0, p)[0]
    got = tk.soft_topk_mag(x, 4, p=p, regularization_strength=1.0, method="threshold")
    _assert_mag_close(got, want, 1e-12, entrywise=True)


@pytest.mark.parametrize(("row", "k", "lam"), [([-5.0, 5.0, 5.0, -4.0, -2.0, 2.0, -5.0], 3, 0.5),
                                              ([-2.0, 2.0, 4.0, -2.0, -2.0, -2.0], 4, 0.5)])
def test_mag_ties_whose_threshold_no_float_resolves(backend, row, k, lam):
    # p = 5, keys near 1e-110: a free tie at the threshold has r = l (y t)^4 ~ 1e-440, 1e-330 of its key, in
    # every frame (scaled to 1, the strength l c^3 ~ 1e-330 is clipped): the tie came back kept or dropped
    # whole (5, 5, 5, 5 for k = 3: 33% of the largest output off).  Interpolated between the bracket's
    # ends, each tied entry gets its share of the places left, its exact value (3/4 of 5; 3/5 of 2).
    # Oracle: the threshold in 450 digits.  (PAV meets these too: `test_pav_kernel.py`.)
    x = np.array([row]) * 1e-110
    y, _ = FORWARD["mag"](backend.to(x), k, method="threshold", p=5.0, regularization_strength=lam)
    want = mp_threshold_mag_row(x[0], k, lam, 5.0, digits=450)
    np.testing.assert_allclose(backend.back(y)[0], want, rtol=1e-12, atol=0)


def test_mag_threshold_below_the_float_range():
    # The threshold (~4e-400) is below the float64 range; the free entries' outputs are ~x there.
    # The first root finder, halving toward 0, never reached the scale (a strict xfail until the
    # geometric splits down to the smallest normal number).
    x = _spanning_row(1e-100)
    got = tk.soft_topk_mag(x, 4, p=1.25, regularization_strength=1.0, method="threshold")
    _assert_mag_close(got, _mp_mag(tuple(x), 4, 1.0, 1.25)[0], 1e-12, entrywise=True)


@pytest.mark.parametrize(("seed", "k", "lam"), [(0, 12, 1.0), (0, 20, 1e3), (1, 20, 1e-3)])
def test_mag_threshold_far_below_its_free_keys_converges(seed, k, lam):
    # Magnitudes 1e0..1e300, p = 3: the threshold lies tens of orders below the free keys, where their
    # part of the sum barely moves with it, and the transformed Newton step only halved t (129 loop
    # iterations: ThresholdNotConverged at the default max_iter, an error here).  Newton in log t
    # takes it there in a few.  Oracle: the threshold in 120 digits.
    x = spanning_row(seed, 150.0, 24, 150.0)
    got = tk.soft_topk_mag(x, k, p=3.0, regularization_strength=lam, method="threshold")
    _assert_mag_close(got, _mp_mag(tuple(x), k, lam, 3.0)[0], 1e-12, entrywise=True)


@pytest.mark.parametrize(("seed", "p"), [(9, 20.0), (74, 20.0), (4, 50.0), (28, 50.0)])
def test_mask_at_large_p_with_its_threshold_far_below_l_converges(seed, p):
    # Keys spanning 1e-50..1e-10 at l = 0.1: for p > 2 the outputs (u / l)^(1/(p-1)) are large far below
    # u = l (here 0.1-0.6 within 1e-10 of the keys), and the first solve's splits, floored at l, and the
    # absolute frame's approached the root by halving from -l and from 1e-5: ThresholdNotConverged at the
    # default max_iter (an error here).  Splits for p > 2 now go geometrically down to the data bracket's
    # end l (k/n)^(p-1) below the maximum, and toward 0 down to the key frames' floor.  Oracle: 200 digits.
    x = spanning_row(seed, 20.0, 64, centre=-30.0)
    got = tk.soft_topk_mask(x, 8, p=p, regularization_strength=0.1, method="threshold")
    np.testing.assert_allclose(got, mp_threshold_mask_row(x, 8, 0.1, p, digits=200), rtol=0, atol=1e-13)


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
def test_mag_cancelling_rows_on_every_backend_with_residuals(backend, p):
    # Outputs and g' (from the same accurate r) against the arbitrary-precision parts.
    for x, k, lam, entrywise in ((_TIED_ROW, 5, 1e-9, False), (_TIED_ROW, 5, 1e-50, False),
                                 (_spanning_row(1e-20), 4, 1.0, True)):
        want, gprime, saturated, free = _mp_mag(tuple(x), k, lam, p)
        xb = backend.to(x[None])
        out, res = FORWARD["mag"](xb, k, method="threshold", p=p, regularization_strength=lam)
        backend.assert_like(out, xb)
        _assert_mag_close(backend.back(out)[0], want, 1e-12, entrywise)
        got_gprime = backend.back(res.gprime)[0]
        np.testing.assert_array_equal(got_gprime != 0, free)
        np.testing.assert_allclose(got_gprime, gprime, rtol=1e-10, atol=0)
        want_codes = np.where(free, np.sign(x), np.where(saturated, KEPT_CODE, 0))
        np.testing.assert_array_equal(backend.back(res.codes)[0], want_codes)


@pytest.mark.parametrize("p", _CANCEL_P, ids=_CANCEL_P_IDS)
def test_mag_cancelling_rows_in_float32(p):
    # Float32 has its own cancellation (eps 1.2e-7): ties at a strength of 1e-6 lost every digit.
    rows = [(_TIED_ROW, 5, lam) for lam in (1e-2, 1e-6, 1e-13)] + [(_spanning_row(1e-8), 4, 1.0)]
    for x, k, lam in rows:
        x32 = x.astype(np.float32)
        got = tk.soft_topk_mag(x32, k, p=p, regularization_strength=lam, method="threshold")
        assert got.dtype == np.float32
        want = _mp_mag(tuple(x32.astype(np.float64)), k, lam, p)[0]
        _assert_mag_close(got, want, 1e-5, entrywise=k == 4)


def test_mag_cancelling_rows_under_jit():
    # The second solve (relative to a key near the threshold) also runs in the adapters' structured loop.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        for x, k, lam, p, q in ((_TIED_ROW, 5, 1e-50, 4.0 / 3.0, 4.0), (_spanning_row(1e-20), 4, 1.0, 3.0, 1.5)):
            solve = jax.jit(
                lambda a, k=k, lam=lam, q=q: threshold.threshold_mag(a, k, lam, q, jnp, loop=jax.lax.while_loop)[0]
            )
            got = np.asarray(solve(jnp.asarray(x[None])))[0]
            _assert_mag_close(got, _mp_mag(tuple(x), k, lam, p)[0], 1e-12, entrywise=k == 4)


def test_nonfinite_rows_follow_the_pav_rule(backend, operator):
    inf, nan = np.inf, np.nan
    x = np.array([
        [inf, 1.0, 2.0, -inf, 0.5],
        [inf, inf, inf, 0.0, 1.0],
        [-inf, -inf, 1.0, 2.0, 3.0],
        [inf, -inf, 0.0, 0.0, -1.0],
        [nan, 1.0, 2.0, 3.0, 4.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
    ])
    for k in (1, 2, 3, 4):
        res, _ = _check(backend, operator, x, k, p=2.0)
        gprime = backend.back(res.gprime)
        assert np.all(np.isnan(gprime[4])) and np.all(np.isfinite(np.delete(gprime, 4, axis=0)))


@pytest.mark.parametrize("p", [1.25, 4.0 / 3.0, 2.0, 3.0], ids=["p=5/4", "p=4/3", "p=2", "p=3"])
def test_non_unique_threshold_has_no_spurious_free_entry(backend, p):
    # Mask: no fractional entry, tau is anywhere in [x_(k+1), x_(k) - l]; the exact VJP is 0.
    xb = backend.to(np.array([[3.0, 1.0, 1.0, -2.0], [1.1, 1.0, 0.9, 0.0]]))
    y, res = tc.soft_topk_mask_forward(xb, 1, regularization_strength=0.1, p=p, method="threshold")
    np.testing.assert_array_equal(backend.back(y), [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(backend.back(res.gprime), 0.0)
    u = backend.to(np.array([[0.3, -1.0, 0.7, 0.2], [1.0, 2.0, 3.0, 4.0]]))
    np.testing.assert_array_equal(backend.back(tc.mask_vjp_from_residuals(res, u)), 0.0)
    # Magnitude: k entries saturated and the rest exactly 0: identity on them, 0 elsewhere.
    xm = backend.to(np.array([[5.0, -4.0, 0.1, 0.05], [2.0, 0.3, -3.0, 0.2]]))
    out, mres = tc.soft_topk_mag_forward(xm, 2, regularization_strength=0.1, p=p, method="threshold")
    np.testing.assert_array_equal(backend.back(out), [[5.0, -4.0, 0.0, 0.0], [2.0, 0.0, -3.0, 0.0]])
    # The saturated entries (identity) are coded as A, the others 0; no entry is free.
    np.testing.assert_array_equal(backend.back(mres.codes), [[2, 2, 0, 0], [2, 0, 2, 0]])


def test_exactly_on_a_kink_of_the_flat_interval(p):
    # x_(k) - l == x_(k+1): the interval of thresholds is a single point.
    x = np.array([[1.0, 0.75, 0.5, 0.25, 0.0]])
    for k in (1, 2, 3):
        y, res = tc.soft_topk_mask_forward(x, k, regularization_strength=0.25, p=p, method="threshold")
        want, want_res = _pav("mask", x, k, regularization_strength=0.25, p=p)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(res.gprime == 0, want_res.gprime == 0)


def test_residuals_are_input_order_with_one_segment_per_row(backend, operator, rng):
    xb = backend.to(rng.normal(size=(5, 6)))
    _, res = FORWARD[operator](xb, 2, method="threshold")
    assert res.perm is None and res.inv_perm is None
    assert res.block_start is None and res.block_end is None
    assert tuple(res.gprime.shape) == (5, 6)
    if operator == "mag":
        assert tuple(res.offset.shape) == (5, 1)
        assert tuple(res.codes.shape) == (5, 6)


def test_jacobians_agree_with_pav(backend, rng, p, operator):
    x = rng.normal(size=(20, 9))
    res, want_res = _check(backend, operator, x, 3, p=p, regularization_strength=0.4)
    for _ in range(2):
        t = rng.normal(size=x.shape)
        for products in (JVP, VJP):
            got = backend.back(products[operator](res, backend.to(t)))
            want = products[operator](want_res, t)
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


def test_many_rows_with_early_stopping_and_compaction(rng, operator):
    # Batches of >= 32 rows gather their unconverged rows as they go.
    x = rng.normal(size=(400, 16)) * rng.uniform(0.1, 10.0, size=(400, 1))
    for p in (4.0 / 3.0, 2.0):
        y, _ = FORWARD[operator](x, 2, p=p, method="threshold")
        want, _ = _pav(operator, x, 2, p=p)
        assert np.all(np.abs(y - want) <= 1e-9 * (1 + np.abs(want)))


def test_jit_with_a_structured_loop_and_unrolled(operator):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    solver = {"mask": threshold.threshold_mask, "mag": threshold.threshold_mag}[operator]
    x = np.random.default_rng(3).normal(size=(6, 8))
    with jax.enable_x64(True):
        # The adapters' route: the root finder as one lax.while_loop (fixed shapes, early exit).
        looped = jax.jit(lambda a: solver(a, 3, 0.1, 4.0, jnp, loop=jax.lax.while_loop)[0])
        got = np.asarray(looped(jnp.asarray(x)))
        # Through the public function a tracer unrolls the Python loop max_iter times.
        unrolled = jax.jit(lambda a: FORWARD[operator](a, 3, p=2.0, method="threshold", max_iter=12)[0])
        got_p2 = np.asarray(unrolled(jnp.asarray(x)))
    np.testing.assert_allclose(got, _pav(operator, x, 3)[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_p2, _pav(operator, x, 3, p=2.0)[0], rtol=0, atol=1e-10)


def test_iteration_controls(rng, operator):
    x = rng.normal(size=(30, 12))
    want, _ = _pav(operator, x, 4)
    with pytest.warns(tc.ThresholdNotConverged, match="max_iter=1 "):
        rough, _ = FORWARD[operator](x, 4, method="threshold", max_iter=1)
    assert np.all(np.isfinite(rough))
    loose, _ = FORWARD[operator](x, 4, method="threshold", tol=1e-4)
    assert np.all(np.abs(loose - want) <= 1e-3 * (1 + np.abs(want)))
    exact, _ = FORWARD[operator](x, 4, method="threshold", max_iter=threshold.DEFAULT_MAX_ITER)
    np.testing.assert_allclose(exact, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["numpy", "torch", "array_api_strict"])
def test_stopped_by_max_iter_it_warns(operator, name):
    # Readable arrays: rows stopped by the cap say so (as Dykstra's do), not only with a tiny cap.
    x = np.random.default_rng(3).normal(size=(40, 64))
    with backend_context(name) as backend:
        with pytest.warns(tc.ThresholdNotConverged, match="max_iter=2 "):
            y, _ = FORWARD[operator](backend.to(x), 8, method="threshold", max_iter=2)
        assert np.abs(backend.back(y) - _pav(operator, x, 8)[0]).max() > 1e-9  # not converged indeed
        y, _ = FORWARD[operator](backend.to(x), 8, method="threshold")  # default cap: no warning (an error here)
        np.testing.assert_allclose(backend.back(y), _pav(operator, x, 8)[0], rtol=0, atol=1e-12)


def _loop_runs(solver, x, k, lam, q, **hooks):
    """(outputs, and for each root finder's loop of the solve in turn: its iterations and the iteration at
    which each row converged); `hooks`: the solver's other adapter keywords."""
    runs = []
    y, _ = solver(x, k, lam, q, np_xp, loop=threshold.counting_loop(runs), **hooks)
    return y, runs


def test_structured_loop_ends_early_on_float32_router_rows(operator):
    """Under jit the loop runs until the slowest row of the batch converges.

    4096 float32 rows of 64 normal logits, k = 6, l = 0.1 (a router's shape), p = 4/3: rows whose
    search crossed a piece with k saturated entries and a free one jumped past the root and back
    and then halved their brackets (24 and 26 iterations for the whole batch, against a median of
    8), and the magnitude's bracket started at half the smallest key (16 with the first fix
    alone).  The outputs agree with PAV in float64 about as closely as before (5.4e-6 and 7.1e-6,
    before 5.4e-6 and 5.9e-6; 2.6e-5 when the magnitude's answer could come from such a piece).
    """
    x = np.random.default_rng(0).normal(size=(4096, 64)).astype(np.float32)
    solver = threshold.threshold_mask if operator == "mask" else threshold.threshold_mag
    y, runs = _loop_runs(solver, x, 6, 0.1, 4.0)
    iterations = [count for count, _ in runs]
    assert max(iterations) <= 15, iterations
    want, _ = _pav(operator, x.astype(np.float64), 6, regularization_strength=0.1)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)


def test_rows_do_not_crawl_from_the_top_of_their_brackets(operator):
    """The same router rows as above: the loop ends after 11 iterations, not 14 (mask) or 12, and a typical
    row converges in 7 (mask; was 8) or 5 (was 7).

    The search started at the bracket's upper end, where nothing (the magnitude) or only the largest
    keys (the mask) are above the threshold; Newton crawled down from there, and pieces without free
    entries (flat: sum(y) does not move) were bisected toward the data's far end and back.  It now
    starts at the bracket's midpoint (the mask's lower end raised by the row's mean), leaves a flat
    piece one or two keys short of k for the point where the next key saturates, and takes Newton
    steps onward in the same direction without the halving rule (at most three in a row).
    """
    x = np.random.default_rng(0).normal(size=(4096, 64)).astype(np.float32)
    solver = threshold.threshold_mask if operator == "mask" else threshold.threshold_mag
    loop_count, done_at = _loop_runs(solver, x, 6, 0.1, 4.0)[1][0]  # the first root finder's loop
    assert np.median(done_at) <= 7, np.median(done_at)
    assert loop_count <= 11, loop_count


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0])
def test_mask_splits_its_bracket_below_the_maximum_at_the_midpoint(p):
    """The same router rows: relative to the row maximum, the mask's bracket runs from the row's mean
    to near the maximum, and its geometric mean (the split of brackets whose ends differ by more
    than a factor 4) lay close to the maximum, far above the root, from which Newton crawled back
    down.  Split at the midpoint unless the far end exceeds 64 times the near end and l, a typical
    row converges in 5 or 4 iterations (p = 4/3 was 7, p = 2 was 6) and the loop ends after 10 or 9
    (11, 10).
    """
    x = np.random.default_rng(0).normal(size=(4096, 64)).astype(np.float32)
    loop_count, done_at = _loop_runs(threshold.threshold_mask, x, 6, 0.1, conjugate_exponent(p))[1][0]
    assert np.median(done_at) <= (5 if p < 2 else 4), np.median(done_at)
    assert loop_count <= (10 if p < 2 else 9), loop_count


def _router_row_next_to_a_key():
    # Row 4812 of 65536 float32 rows of 64 normal logits: at p = 3, l = 0.1, k = 6 its threshold lies
    # 3.6e-11 below its seventh key (whose output is 1.9e-5), far closer than l.
    return np.random.default_rng(0).normal(size=(65536, 64)).astype(np.float32)[4812:4813]


def test_mask_splits_down_to_a_root_next_to_its_key():
    """p = 3 solves every mask row again relative to the key nearest to its threshold, in a bracket
    around that key.  Bisection toward the key halved down from the bracket's width to the root's
    distance, 15 halvings (19 iterations); splits go geometrically down to the floor
    ``l ftol^(1/(q - 1))`` now, below which the key's output is within the tolerance."""
    x = _router_row_next_to_a_key()
    y, runs = _loop_runs(threshold.threshold_mask, x, 6, 0.1, conjugate_exponent(3.0))
    assert runs[-1][0] <= 8, [count for count, _ in runs]
    want, _ = _pav("mask", x.astype(np.float64), 6, regularization_strength=0.1, p=3.0)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6)


def test_mag_splits_down_to_a_root_next_to_its_key():
    """The magnitude's solve again next to a key (p > 2), alike: splits toward the key go geometrically down
    to ``width ftol^(1/(q - 1))`` (the saturation width ``width = l t^(1/(q - 1))``), not to the width:
    on 4096 router rows that loop ran 10 iterations, 6 now (at 65,536 rows, 16 and 7)."""
    x = np.random.default_rng(0).normal(size=(65536, 64)).astype(np.float32)[:4096]
    y, runs = _loop_runs(threshold.threshold_mag, x, 6, 0.1, conjugate_exponent(3.0))
    assert runs[-1][0] <= 7, [count for count, _ in runs]
    want, _ = _pav("mag", x.astype(np.float64), 6, regularization_strength=0.1, p=3.0)
    np.testing.assert_allclose(y, want, rtol=0, atol=3e-5)


def test_p_above_2_rows_near_their_maximum_skip_the_absolute_solve():
    """p > 2 solves every mask row again next to the key nearest to its threshold; rows within 64 l of their
    maximum find that key from the first solve (their keys kept their digits there): on router rows no
    loop runs in the absolute frame (its loop ran 11 iterations; with readable arrays and no row far
    below its maximum it is not entered), and the outputs still match PAV."""
    x = np.random.default_rng(0).normal(size=(65536, 64)).astype(np.float32)[4096:8192]
    y, runs = _loop_runs(threshold.threshold_mask, x, 6, 0.1, conjugate_exponent(3.0))
    assert len(runs) == 2, [count for count, _ in runs]  # the first solve and the key frame's
    want, _ = _pav("mask", x.astype(np.float64), 6, regularization_strength=0.1, p=3.0)
    np.testing.assert_allclose(y, want, rtol=0, atol=3e-5)


def test_mask_solved_again_next_to_keys_with_eager_arrays():
    """The same solve with eager arrays, whose loop gathers the unconverged rows as it goes (their floors
    of splits with them), on many p > 2 rows, against PAV."""
    x = np.random.default_rng(0).normal(size=(65536, 64)).astype(np.float32)[4096:8192]
    y = tc.soft_topk_mask(x, 6, regularization_strength=0.1, p=3.0, method="threshold")
    want = tc.soft_topk_mask(x.astype(np.float64), 6, regularization_strength=0.1, p=3.0, method="pav")
    np.testing.assert_allclose(y, want, rtol=0, atol=3e-5)


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0])
def test_heavy_tailed_long_rows_stay_near_bisection(operator, p):
    """k = 100 of 4096 lognormal keys (sigma 3): the threshold lies among keys far apart next to l, where
    sum(y) is a staircase of flat pieces.  Entering them one key at a time took the loop to its
    budget of 100 iterations (a trial of this change); only flat pieces one or two keys short are
    entered so, and steps that skip the halving rule are capped: mask 19, 19, 22 iterations for
    p = 4/3, 2, 3 (28, 26, 33 before these changes), magnitude 18, 13, 11 (20, 14, 12).
    """
    x = np.random.default_rng(3).lognormal(0.0, 3.0, size=(64, 4096))
    solver = threshold.threshold_mask if operator == "mask" else threshold.threshold_mag
    loop_count, _ = _loop_runs(solver, x, 100, 0.1, conjugate_exponent(p))[1][0]
    assert loop_count <= 30, loop_count


def test_float32_mask_keeps_its_point_of_smallest_miss_next_to_tied_keys():
    """Two tied zeros at the k-th place, p = 5/4, l = 0.009, float32: one ulp of the threshold moves
    sum(y) by 7e-5 there, and the bracket closed between a point of the piece with k saturated
    entries (miss 1.9e-5) and one where both zeros had left saturation (8.3e-5).  The mask's y is
    within its miss of the root's: it must keep the first (a rule meant for the magnitude, whose
    outputs are not y, took the second: 4.1e-5 off PAV instead of 9.3e-6)."""
    x = np.array([0.49667618, 0.29908502, 0.2833985, 0.03422637, 0.0, 0.0, -0.0083493, -0.06831633, -0.24335952,
                  -0.248864, -0.57968044], np.float32)[None]
    kw = dict(p=1.25, regularization_strength=0.00893589262777245)
    y, _ = FORWARD["mask"](x, 6, method="threshold", **kw)
    want, _ = _pav("mask", x.astype(np.float64), 6, **kw)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("p", [3.0, 2.5])
def test_float32_rows_at_large_p_are_solved_next_to_a_key(operator, p):
    """p > 2: g is steep at 0, so an entry one float32 ulp of the threshold above it has y ~ sqrt(eps / l);
    relative to the row's maximum the threshold carries that ulp (outputs 1.2e-3 off PAV at p = 3).
    Such rows are always solved again in the frame of the key nearest to the threshold."""
    x = np.random.default_rng(0).normal(size=(2048, 64)).astype(np.float32)
    y, _ = FORWARD[operator](x, 6, method="threshold", p=p, regularization_strength=0.1)
    want, _ = _pav(operator, x.astype(np.float64), 6, p=p, regularization_strength=0.1)
    np.testing.assert_allclose(y, want, rtol=0, atol=5e-6)


def test_float32_mask_whose_threshold_settles_on_a_key(backend):
    """The root finder may stop on a key (`tol k` of sum(y) short of k) whose entry is then 0, and the
    Newton polish that would enter it is not taken: at p = 3 an entry 9e-10 above the threshold came back 0
    instead of 3e-5, 250 float32 ulps (row 220 of 500 normal float32 rows of 1024, k = 32, l = 1).  The
    entries at the threshold now supply the deficit (`_mask_enter_at_tau`); PAV in float64 is the
    reference."""
    x = np.random.default_rng(0).normal(size=(500, 1024)).astype(np.float32)[220:221]
    want = tc.soft_topk_mask(x.astype(np.float64), 32, p=3.0, regularization_strength=1.0, method="pav")
    y = backend.back(tc.soft_topk_mask(backend.to(x), 32, p=3.0, regularization_strength=1.0, method="threshold"))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=0, atol=16 * np.finfo(np.float32).eps)


def test_axis_and_half_precision(rng, operator):
    x = rng.normal(size=(5, 7, 3)).astype(np.float16)
    y = getattr(tc, f"soft_topk_{operator}")(x, 2, axis=1, method="threshold")
    want = getattr(tc, f"soft_topk_{operator}")(x, 2, axis=1, method="pav")
    assert y.dtype == np.float16 and y.shape == x.shape
    np.testing.assert_allclose(y.astype(np.float64), want.astype(np.float64), rtol=0, atol=2e-3)


@pytest.mark.gpu
def test_cuda_tensors_stay_on_the_device(operator):
    torch = cuda_torch()
    x = torch.randn(64, 33, dtype=torch.float64, device="cuda")
    y, res = FORWARD[operator](x, 5, method="threshold")
    assert y.device == x.device and res.gprime.device == x.device
    want, _ = FORWARD[operator](x.cpu(), 5, method="pav")
    np.testing.assert_allclose(y.cpu().numpy(), want.numpy(), rtol=0, atol=1e-10)
    t = torch.randn_like(x)
    assert JVP[operator](res, t).device == x.device


_keys = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


@settings(deadline=None)
@given(
    x=st.integers(2, 24).flatmap(lambda n: arrays(np.float64, n, elements=_keys)),
    dominant=st.one_of(st.none(), st.floats(1e3, 1e12)),
    data=st.data(),
    lam=st.floats(1e-3, 1e2),
    p=st.sampled_from([1.25, 4.0 / 3.0, 1.5, 2.0, 3.0]),
)
def test_threshold_agrees_with_pav_on_rows_with_and_without_a_dominant_entry(x, dominant, data, lam, p):
    # Property: float64, the sort-free method against the sorted one. The tolerance is that of
    # the keys' local scale (|x| <= 1e3 near the threshold): eps |x| / l for p <= 2, and its
    # square root for p = 3 (steep g at 0, see docs/methods.md).
    if dominant is not None:
        x = x.copy()
        x[data.draw(st.integers(0, x.size - 1))] = dominant
    k = data.draw(st.integers(1, x.size))
    tol = 1e-6 if p <= 2 else 1e-4
    for operator in ("mask", "mag"):
        want, _ = _pav(operator, x[None], k, p=p, regularization_strength=lam)
        got, _ = FORWARD[operator](x[None], k, method="threshold", p=p, regularization_strength=lam)
        scale = 1.0 if operator == "mask" else max(1.0, float(np.sort(np.abs(x))[-k]))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
        if operator == "mask":
            np.testing.assert_allclose(got.sum(), k, rtol=0, atol=tol * k)


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_threshold_of_subnormal_keys_agrees_with_pav_without_overflow(operator, p):
    # Found by the property above: keys of 2e-313 with p = 3, whose frame cannot scale them to 1 and
    # clips the strength, put g' of the free entries beyond the float range there; it is inf, with
    # no overflow in its division (warnings are errors in the tests).
    for x in (np.full((1, 2), 2.22507386e-313), np.array([[2.22507386e-313, 6.7e-313, -1e-320]])):
        for k in (1, 2):
            want, _ = _pav(operator, x, k, p=p, regularization_strength=1.0)
            got, _ = FORWARD[operator](x, k, method="threshold", p=p, regularization_strength=1.0)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@settings(max_examples=int(os.environ.get("TOPK_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(x=rows_spanning_many_orders(3, 40), data=st.data(), lam=st.floats(1e-3, 1e2),
       p=st.sampled_from([1.25, 4.0 / 3.0, 1.5, 2.0]), magnitude=st.booleans())
def test_threshold_agrees_entrywise_with_pav_on_rows_spanning_many_orders(x, data, lam, p, magnitude):
    # Float64, p <= 2: each output within 64 ulps of its rounding reach of PAV's (full-sort route).
    # 20000 examples of this search found a Newton landing that rounding had put inside the bracket
    # (test_a_newton_landing_by_rounding_inside_the_bracket_is_no_root).
    q = p / (p - 1.0)
    lam = lam if magnitude else lam * float(np.max(np.abs(x)))
    # The known limit (docs/methods.md): a threshold about (|x| / l)^(q - 1) below the float range.
    hypothesis_assume((q - 1.0) * np.log10(np.min(np.abs(x)) / lam) > -280.0)
    k = data.draw(st.integers(1, x.size))
    forward = tc.soft_topk_mag_forward if magnitude else tc.soft_topk_mask_forward
    y_ref, res = forward(np.stack([x, np.full_like(x, np.nan)]), k, p=p, regularization_strength=lam, method="pav")
    y, _ = forward(x[None], k, p=p, regularization_strength=lam, method="threshold")
    tol = 64 * np.finfo(np.float64).eps * rounding_reach(x, res, magnitude) + 1e-300
    assert np.all(np.abs(y[0] - y_ref[0]) <= tol)


@pytest.mark.parametrize("operator", ["mask", "mag"])
@pytest.mark.parametrize("p", [1.25, 4.0 / 3.0, 1.5, 2.0, 3.0], ids=["p=5/4", "p=4/3", "p=3/2", "p=2", "p=3"])
def test_order_statistics_start_the_root_finder_at_the_first_block(rng, operator, p):
    """With the k-th and (k+1)-th keys (the adapters' `order_statistics` hook: np.partition, torch.topk,
    jax.lax.top_k on accelerators) the root finder starts at PAV's first block: on rows of 64 logits its
    structured loop runs about half the iterations (11 -> 4-5 at p = 4/3 on 65,536 rows), with the same
    answer as PAV."""
    from topk_core._api import _numpy_order_statistics

    x = rng.normal(size=(512, 64))
    solver = {"mask": threshold.threshold_mask, "mag": threshold.threshold_mag}[operator]
    counts = {}
    for hooks in ({}, {"order_statistics": _numpy_order_statistics}):
        y, runs = _loop_runs(solver, x, 6, 0.1, conjugate_exponent(p), **hooks)
        want, _ = _pav(operator, x, 6, p=p, regularization_strength=0.1)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-10)
        counts[bool(hooks)] = runs[0][0]
    assert counts[True] < counts[False]
    if p != 3.0:  # (p = 3: 20 -> 16, its tail is elsewhere)
        assert counts[True] <= 0.6 * counts[False]


def test_order_statistics_are_asked_for_small_k_only(rng):
    """Top-k primitives sort for large k: beyond `_FIRST_BLOCK_MAX_K` (and for k = n) no order statistics
    are asked for, and the answer is PAV's either way."""
    from topk_core._api import _numpy_order_statistics

    calls = []

    def order_statistics(keys, k):
        calls.append(k)
        return _numpy_order_statistics(keys, k)

    x = rng.normal(size=(8, 200))
    for k in (5, threshold._FIRST_BLOCK_MAX_K, threshold._FIRST_BLOCK_MAX_K + 1, 200):
        y, _ = threshold.threshold_mag(x, k, 0.1, 4.0, np_xp, order_statistics=order_statistics)
        np.testing.assert_allclose(y, _pav("mag", x, k, regularization_strength=0.1)[0], rtol=0, atol=1e-10)
    assert calls == [5, threshold._FIRST_BLOCK_MAX_K]


def test_strength_scale_of_the_default_exponent_is_exact_to_an_ulp():
    # 2^(2m/3) for every scale of a float64 frame: split into whole and thirds, within an ulp; the float
    # of 2 - 4/3 in the exponent was up to 5e-14 of the result off at |m| ~ 1000 (90 ulps of a threshold
    # at m = 216, `tests/test_mag_precision.py::test_threshold_method_scales_the_default_strength_exactly`).
    import mpmath

    m = np.arange(-1000.0, 1001.0)
    got = strength_scale(m, 4.0, np_xp)
    with mpmath.workdps(40):
        exact = np.array([float(mpmath.mpf(2) ** (2 * mpmath.mpf(int(v)) / 3)) for v in m])
    np.testing.assert_array_less(np.abs(got - exact), np.spacing(exact) * 1.01)
    np.testing.assert_array_equal(strength_scale(m, 2.0, np_xp), np.ones_like(m))
