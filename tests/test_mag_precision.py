"""The magnitude operator where float64 cancels: ties at tiny strengths, and magnitudes spanning hundreds of orders.

Free entries sit just above the threshold, so ``r = |x| - t`` is far below
``|x|``: computed from the absolute threshold it keeps few or no digits
(ties at a strength of 1e-13 kept 3; at 1e-50, none, and the output was 0
instead of ``x`` times the tie's share).  Rows whose magnitudes span 1e20 and
more (p = 3) or 1e200 (p = 4/3, where l^3 overflowed in the rescaled frame)
lost their small entries the same way.  Every CPU route of the PAV method
is checked against the threshold form computed in arbitrary precision
(`_oracles.mp_threshold_mag_parts`): the lane solver (p = 2 and 4/3, short rows), the
selection kernel, the sort-free route (p = 2 and 4/3, long rows) and the
full-sort route (taken when the array holds a non-finite entry anywhere).
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import topk_core as tc
import topk_numpy as tk
from topk_core._pav import lanes, sortfree
from topk_core._pav.kernels import fused_outputs, read_only

from ._method_backends import backend_context
from ._oracles import assert_within_input_rounding, mag_vjp_from_parts, mp_q_minus_one, mp_threshold_mag_parts
from ._rows import rows_lowered_from_one_scale, spanning_row

TIE_ROW = np.array([3.0, -3.0, 2.0, 2.0, -2.0, 2.0, 1.0, 0.5, 0.25])
P_VALUES = [1.25, 4.0 / 3.0, 1.5, 2.0, 3.0]
P_IDS = ["p=5/4", "p=4/3", "p=3/2", "p=2", "p=3"]


@functools.cache
def _oracle(row: tuple, k: int, lam: float, p: float, digits: int):
    return mp_threshold_mag_parts(np.array(row), k, lam, p, digits)


def _routes(x: np.ndarray, k: int, lam: float, p: float, lane_groups: bool = False,
            threshold: bool = False) -> dict[str, np.ndarray]:
    """Outputs of the row `x` on the fused route its shape selects, and on the full-sort route;
    with `lane_groups`, also as the last of 70 copies (a full lane group and a partial one); with
    `threshold`, also the threshold method's."""
    routes = {"fused": tk.soft_topk_mag(x[None], k, p=p, regularization_strength=lam)[0]}
    with_nan = np.stack([x, np.full_like(x, np.nan)])
    routes["full sort"] = tk.soft_topk_mag(with_nan, k, p=p, regularization_strength=lam)[0]
    if lane_groups:
        routes["lane groups"] = tk.soft_topk_mag(np.tile(x, (70, 1)), k, p=p, regularization_strength=lam)[69]
    if threshold:
        routes["threshold"] = tk.soft_topk_mag(x[None], k, p=p, regularization_strength=lam, method="threshold")[0]
    return routes


def _assert_entrywise(y: np.ndarray, expected: np.ndarray, rtol: float, label: str) -> None:
    # Relative to each entry: the small entries are the ones that cancel.
    scale = np.where(expected != 0.0, np.abs(expected), 1.0)
    error = np.abs(y - expected) / scale
    assert error.max() <= rtol, f"{label}: relative error {error.max():.2e} at entry {error.argmax()}"


TIE_CASES = [(p, lam, 2) for p in P_VALUES for lam in (1e-2, 1e-9, 1e-13, 1e-50)]
# Rows of 9: the lane solver serves p = 4/3 too (rows up to LANE_MAX_N).
TIE_CASES += [(p, lam, 1) for p in (4.0 / 3.0, 2.0) for lam in (1e-9, 1e-13)]
# Long rows (the oracle's cost grows with n): the sort-free route serves p = 2 and 4/3 only.
TIE_CASES += [(p, lam, 100) for p in (4.0 / 3.0, 2.0) for lam in (1e-9, 1e-50)]


@pytest.mark.parametrize(("p", "lam", "repeats"), TIE_CASES)
def test_ties_at_tiny_strengths(p, lam, repeats):
    # Short rows: the lane solver (p = 2, 4/3) or the selection kernel; long rows: the sort-free route.
    # The tied 2's are free.
    x = np.tile(TIE_ROW, repeats)
    k = 5 * repeats // 2 if repeats > 2 else 5
    expected = _oracle(tuple(x), k, lam, p, 120)[0]
    for label, y in _routes(x, k, lam, p).items():
        _assert_entrywise(y, expected, 1e-13, label)


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0], ids=["p=4/3", "p=2"])
@pytest.mark.parametrize("lam", [1e-2, 1e-9, 1e-13])
def test_lane_solver_converges_on_ties_at_tiny_strengths(p, lam):
    # Allowed every pass, the lanes solve the tie row themselves (p = 4/3 hands rows back after
    # one pass by default).  A p = 4/3 step tolerance scaled by the keys instead of l once
    # accepted a threshold 4% of l off: outputs 1.5016 for 1.5 at l = 1e-13.
    x = TIE_ROW[None]
    k = 5
    outputs = fused_outputs(x, True, True)
    unresolved = np.ones(1, np.bool_)
    lanes.lane_rows(read_only(x), k, lam, p / (p - 1.0), True, np.empty((0, 2)), *outputs, unresolved, 1,
                    lanes.MAX_PASSES, lanes.EVERY_ROW, lanes.LANES)
    assert not unresolved[0]
    _assert_entrywise(outputs[0][0], _oracle(tuple(TIE_ROW), k, lam, p, 120)[0], 1e-13, "lanes")


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
@pytest.mark.parametrize("lam", [1e-9, 1e-50])
def test_vjp_of_ties_at_tiny_strengths(rng, p, lam):
    # g' of the free entries comes from r: with r cancelled, J^T u was as wrong as the outputs.
    x = np.tile(TIE_ROW, 2)
    k = 5
    _, gprime, saturated, free = _oracle(tuple(x), k, lam, p, 120)
    u = rng.normal(size=x.shape)
    expected = mag_vjp_from_parts(x, k, gprime, saturated, free, u)
    for rows in (x[None], np.stack([x, np.full_like(x, np.nan)])):
        _, vjp_fn = tk.soft_topk_mag_vjp(rows, k, p=p, regularization_strength=lam)
        cotangent = np.zeros_like(rows)
        cotangent[0] = u
        np.testing.assert_allclose(vjp_fn(cotangent)[0], expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("p", "small", "digits"),
    [
        (4.0 / 3.0, 1e-20, 60), (4.0 / 3.0, 8e-254, 60), (4.0 / 3.0, 1e-300, 60),
        (2.0, 1e-100, 60), (2.0, 1e-300, 60),
        (1.5, 1e-100, 60), (2.5, 1e-50, 140), (3.0, 1e-20, 80), (3.0, 1e-120, 280),
    ],
)
def test_rows_spanning_hundreds_of_orders(p, small, digits):
    # One entry of 1 (saturated) and twenty tiny ones: for p < 2 the threshold is far below them
    # (outputs ~ x); for p > 2 they are tied within a strength that is tiny next to them.
    x = np.full(21, small)
    x[0] = 1.0
    expected = _oracle(tuple(x), 6, 1.0, p, digits)[0]
    for label, y in _routes(x, 6, 1.0, p).items():
        assert y[0] == 1.0, label
        _assert_entrywise(y, expected, 1e-12, label)


@pytest.mark.parametrize(
    ("p", "span", "centre"),
    [(p, span, 0) for p in (4.0 / 3.0, 2.0) for span in (20, 50, 100)]
    + [(p, 300, 0) for p in (1.25, 1.5, 3.0, 6.0, 20.0)] + [(3.0, 100, 0), (6.0, 200, 0)]
    # Rows of huge or tiny keys: the frames of large p (strength l c^(2-p)) overflowed, PAV returned zeros.
    + [(20.0, 20, 250), (6.0, 80, 200), (2.0, 20, -250), (3.0, 20, -250), (6.0, 80, -200),
       (4.0 / 3.0, 20, -250), (1.25, 20, -250)],
)
def test_random_rows_spanning_many_orders(p, span, centre):
    # Rows of 16: the lane solver's (p = 2, 4/3) or the selection kernel's.  With s_(k+1) far below
    # s_(k), the threshold held relative to s_(k) rounded to about 0: the lanes returned every entry
    # of the row (a lane without a violator; mag, p = 2, span 50), and for p = 3 PAV found no
    # violator where there was one, or a block value far above the threshold (the fixed point of
    # a key, u << s, came out as s - d = 0 +- eps s): free entries whose output is ~x came back 0.
    # For large p the row's frame, scaled to s_(k), took the strength l c^(2-p) out of the float
    # range (p = 6, span 200: every output 0); such rows are now solved unscaled.
    for seed in range(3):
        x = spanning_row(seed, span, 16, centre)
        expected = _oracle(tuple(x), 5, 0.1, p, 60)[0]
        for label, y in _routes(x, 5, 0.1, p).items():
            assert_within_input_rounding(y, expected, x, f"{label}, seed {seed}")


# Found by a randomized search against the oracle: five keys ~1e-31 and the rest far below, k = 1,
# l = 0.4, p = 4/3.  The threshold lies near 1e-89.  The lane solver's start rounded it to 0, where
# every non-zero key counts as saturated; f = 0 on the empty free set passed for the non-unique
# case and every entry came back x (entries ~1e-100 instead of 0).  With 16 passes the lanes
# settled on a threshold of -1e-45 within a tolerance that scales with l.  The selection kernel's
# closed-form block, re-solved in absolute terms, cancelled in mean - d and returned x for the
# free entry at 3e-79.  Now the lanes hand the row back and that block is found by root finding.
UNDERFLOWING_START_ROW = (
    -6.091785945711816e-156, -1.2765319533309024e-108, -3.0744679496698384e-31, 7.477365993666829e-31,
    -5.521605055048139e-31, -1.5368814175035882e-104, -3.210749826466042e-79, 1.0716291037983793e-96,
    7.64336798234531e-31, 4.82667132474957e-31, 3.198362362689387e-124, 1.6126507934516472e-93,
)


def test_a_threshold_far_below_the_keys_that_the_lane_start_rounds_to_zero():
    x = np.array(UNDERFLOWING_START_ROW)
    lam, p = 0.4038694106227086, 4.0 / 3.0
    expected = _oracle(UNDERFLOWING_START_ROW, 1, lam, p, 200)[0]
    assert np.count_nonzero(expected) == 6  # five keys ~1e-31 and one free entry at 3e-79
    for label, y in _routes(x, 1, lam, p, lane_groups=True).items():
        assert_within_input_rounding(y, expected, x, label)
    # The lane solver alone: solved exactly, or handed back (then the selection kernel's).
    out, gprime, codes, offset = fused_outputs(x[None], True, False)
    unresolved = np.empty(1, dtype=bool)
    lanes.lane_rows(read_only(x[None]), 1, lam, 4.0, True, np.empty((0, 2)), out, gprime, codes, offset,
                    unresolved, 1, lanes.MAX_PASSES, lanes.EVERY_ROW, lanes.LANES)
    if not unresolved[0]:
        assert_within_input_rounding(out[0], expected, x, "lanes")


# Found by the property test of the routes (on the floor releases of .ci/core_floor.sh) and then by a fuzz of
# 300,000 rows spanning many orders against the full-sort route: magnitude lanes whose start's threshold
# lies far below s_(k) go on in absolute terms (`lanes._absolute_frame`), but carried the start's rounding
# relative to s_(k), which the p = 4/3 step's tolerance (8 ulps of l) then confirmed.  (5e-3, 5e-8, 0.5),
# k = 2, l = 2: the threshold 1.6e-8 known to 3e-19, the free output 3.4e-8 1e-11 of itself off; the row
# of 6 (k = 1, l = 89): its free output -1.1e-13 5e-6 of itself off (4.9e6 times the bound); the row of 35
# (k = 14, l = 20): 2.1e-13 5e-7 off.
FAR_BELOW_START_ROWS = [
    ((5e-3, 5e-8, 0.5), 2, 2.0),
    ((-6.125962083859257e-52, 0.005383869254611306, -9.803417885683724e-54, -3.347555068565538e-13,
      -6.075267477779472e-34, -1.0159227908248228e-42), 1, 89.10484026514649),
    ((6.36029769009078e+39, 2.5658350231511223e+31, 2.9407779486988645e-24, 3.994623963257323e+41,
      -1.4941958647437001e-66, 3.7759187588884603e+18, -1.4755567030104454e-56, -6.916221921535011e-66,
      -2.980728994245372e+48, 8.967083966391179e-38, 2.2703514964632786e-61, 1.109338095493374e-31,
      6.163398117659785e-52, -0.0013652476340177116, 4.4188639818764e-66, -1.7662677911081022e+45,
      -7.564234239186576e-28, 2.777272665728284e-44, 2.9403154021082885e+18, 5.274283370021579e-13,
      4.416508983379684e-45, 9.141262683157662e-56, 3168762.2367904168, 47706452829858.734,
      -7.037127785201475e-46, 4.89533180076849e+24, -7.694357358027337e-45, 1.3781650667431034e-18,
      1.385095940574378, -3.216688864401445e+31, 7.821043803565766e-25, 7.222679465911006e-36,
      -2.7504170233717695e-47, -1.1686236626327656e-21, -2.6222129243788233e+35), 14, 19.991877963564257),
]


@pytest.mark.parametrize(("row", "k", "lam"), FAR_BELOW_START_ROWS, ids=["n=3", "n=6", "n=35"])
def test_a_lane_moved_to_the_absolute_frame_steps_to_its_root_there(row, k, lam):
    x = np.array(row)
    expected = _oracle(row, k, lam, 4.0 / 3.0, 200)[0]
    for label, y in _routes(x, k, lam, 4.0 / 3.0, lane_groups=True).items():
        assert_within_input_rounding(y, expected, x, label)
    out, gprime, codes, offset = fused_outputs(x[None], True, False)
    unresolved = np.empty(1, dtype=bool)
    lanes.lane_rows(read_only(x[None]), k, lam, 4.0, True, np.empty((0, 2)), out, gprime, codes, offset,
                    unresolved, 1, lanes.MAX_PASSES, lanes.EVERY_ROW, lanes.LANES)
    if not unresolved[0]:  # (solved by the lanes themselves, else handed back to the selection kernel)
        assert_within_input_rounding(out[0], expected, x, "lanes")


# Found by a fuzz of the threshold method against PAV (rows spanning many orders, p = 1.25): the free
# entries 2e-147 and 3.6e-146 lie 108 orders below the one saturated key (k = 1, l = 58), so their
# z = (r / l)^4 underflows float64 and sum(y) = k holds exactly for every t below the saturation level of
# 2.6e-38, 4.3e-158.  The exact root is at that level (below it the true sum exceeds k by some 1e-430), so
# the free outputs are |x| - 4.3e-158, 2e-11 of themselves below |x| (the threshold method returned x until
# `threshold._mag_underflow_top`).  An oracle of 300 digits could not see the excess either and agreed with
# the threshold method; from 500 digits on it agrees with PAV.
FLAT_BY_UNDERFLOW_ROWS = [
    pytest.param((-2.0210919944526376e-147, -3.5738050983821736e-146, -2.623190294477143e-38), 1,
                 57.63545418545632, 1.25, id="k=1"),
    # The same kind of row, found once the threshold method took the top: k = 2, l = 80, the free entry
    # 3.1e-121 comes out |x| - 3.6e-128, 1.2e-7 of itself below |x|.  PAV returned x there: in absolute
    # terms its bracket was [0, 3.5e-46], whose geometric split (with a floor of 1e-300 of its upper end,
    # which underflowed to 0) was 0, the bottom of the stretch, where it stopped.
    pytest.param((-3.0938114821966134e-121, 1.109832261531056e-30, -1.2342420097807626e-12), 2,
                 80.37306537785335, 1.25, id="k=2"),
    # Found by the next fuzz (rows spanning many orders, entry by entry): the threshold method stayed at the
    # bottom where the fixed point of the smallest saturated key read as unsaturated by rounding (its
    # saturation width's power of 1e-88 was 17 ulps off), and the entry 4.7e-151, which lies below the
    # root 1.4e-132, came back as x instead of 0.
    pytest.param((-4.681631898593159e-151, -1.224388767335358e-44, -9.83046555641963e-125), 1,
                 1.0928455598706373, 4.0 / 3.0, id="k=1,p=4/3"),
    # Both methods missed here (PAV's geometric split too): 1.3e-100 lies below the root and came back as x.
    pytest.param((-6.380041691590401e-25, 1.4764963998332395e-17, 5.601935784912989e-90, 1.3306112981662809e-100),
                 2, 0.01829100924268733, 1.25, id="k=2,n=4"),
]


@pytest.mark.parametrize(("row", "k", "lam", "p"), FLAT_BY_UNDERFLOW_ROWS)
def test_pav_takes_the_top_of_a_flat_stretch_made_by_underflow(row, k, lam, p):
    x = np.array(row)
    expected = _oracle(row, k, lam, p, 600)[0]
    assert np.any(np.abs(expected) < np.abs(x) * (1 - 1e-12))  # the threshold is subtracted
    for label, y in _routes(x, k, lam, p, lane_groups=True).items():
        assert_within_input_rounding(y, expected, x, label)


@pytest.mark.parametrize(("row", "k", "lam", "p"), FLAT_BY_UNDERFLOW_ROWS)
@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch", "jax"])
def test_threshold_method_takes_the_top_of_a_flat_stretch_made_by_underflow(backend, row, k, lam, p):
    # The root finder settled anywhere on the stretch (`threshold._mag_underflow_top` moves it to its top).
    x = np.array(row)
    expected = _oracle(row, k, lam, p, 600)[0]
    with backend_context(backend) as b:
        y, _ = tc.soft_topk_mag_forward(b.to(x), k, regularization_strength=lam, p=p, method="threshold")
        assert_within_input_rounding(b.back(y), expected, x, backend)


@pytest.mark.parametrize(("row", "k", "lam", "p"), FLAT_BY_UNDERFLOW_ROWS)
def test_the_top_of_a_flat_stretch_has_pavs_jacobian(row, k, lam, p):
    # At the top the smallest saturated key meets its saturation edge, where rounding reads it either way:
    # the threshold method's sets must still give PAV's VJP (the free entries' g' underflow to 0 there).
    x = np.array([row])
    u = np.random.default_rng(0).normal(size=x.shape)
    vjps = []
    for method in ("pav", "threshold"):
        _, res = tc.soft_topk_mag_forward(x, k, regularization_strength=lam, p=p, method=method)
        vjps.append(tc.mag_vjp_from_residuals(res, u))
    np.testing.assert_allclose(vjps[1], vjps[0], rtol=1e-12, atol=0.0)


# Found by `benchmarks/mag_entrywise.py`: the threshold method scales |x| by c = 2^-216 (to the largest key,
# 1e65) and the strength by c^(2 - p); with the float of 2 - 4/3 that factor was 1.1e-14 of itself off,
# the threshold (its cube here) 90 ulps, and the last entry, 1e-43 above it, came out 1.4 times the bound
# off (`regularizer.strength_scale` now takes the exponent 2/3 exactly).
SCALED_STRENGTH_ROW = ((-2.1698828422594024e-13, -1.2879571981171968e-27, 1.0008655421159823e+65,
                        9.780043381633743e+46, -1.9000418292243116e+38, -2.187104493373741e-40), 4, 3.6020560805647484)


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch", "jax"])
def test_threshold_method_scales_the_default_strength_exactly(backend):
    row, k, lam = SCALED_STRENGTH_ROW
    x = np.array(row)
    expected = _oracle(row, k, lam, 4.0 / 3.0, 200)[0]
    with backend_context(backend) as b:
        y, _ = tc.soft_topk_mag_forward(b.to(x), k, regularization_strength=lam, method="threshold")
        assert_within_input_rounding(b.back(y), expected, x, backend)


def _rows_of_a_tiny_kth_key(count: int) -> list[tuple[np.ndarray, float]]:
    """Rows (x, l) of 4 with k = 2: the k-th key `a` at 1e-120..1e-250 (a frame scaled by 2^400..2^830), the
    threshold ``t = (a / l)^3`` (p = 4/3) 3-80 orders below it, a free entry 1e-6..1e-2 above t (its
    output |x| - t cancels), one below t and one far above a."""
    rng = np.random.default_rng(0)
    rows = []
    while len(rows) < count:
        a = 10.0 ** rng.uniform(-250.0, -120.0) * rng.uniform(1.0, 2.0)
        t = a * 10.0 ** -rng.uniform(3.0, 80.0)
        if t >= 1e-300:
            free = t * (1.0 + 10.0 ** rng.uniform(-6.0, -2.0))
            rows.append((np.array([a * 10.0 ** rng.uniform(1.0, 50.0), a, free, 0.5 * t]), a / t ** (1.0 / 3.0)))
    return rows


def test_frames_scaled_to_a_tiny_kth_key_take_the_default_strength_exactly():
    # PAV scales a row whose k-th key lies beyond 2^+-100 by a power of two, and the strength by its power
    # 2 - p: with the float of 2/3 that factor was up to 5e-14 of itself off, and free outputs near the
    # threshold 4.3 times the bound (`kernels._strength_scale` now takes 2/3 exactly).
    for x, lam in _rows_of_a_tiny_kth_key(20):
        expected = _oracle(tuple(x), 2, lam, 4.0 / 3.0, 300)[0]
        for label, y in _routes(x, 2, lam, 4.0 / 3.0, lane_groups=True, threshold=True).items():
            assert_within_input_rounding(y, expected, x, label)


# Found by `benchmarks/mag_entrywise.py` with strengths 1e-10..1e10: at l = 1.05e-8, 200 times the k-th key
# 4.7e-11, the lane solver's p = 4/3 step took an iterate whose Newton step was within 8 ulps of l + |t| as
# converged, where the threshold's rounding is about eps s_(k): the threshold came back 2e-14 of itself
# (90 ulps) off, and the free output 1.5e-12, 30 times below its input, 3.5 times the bound (the full-sort
# route was within it).  `lanes._step_scale` now takes the absolute threshold as the magnitude's scale.
STRENGTH_FAR_ABOVE_THE_KEYS_ROW = (
    (4.4413737644317007e-11, 1.5708741489923162e-58, -1.2199536863133524e-55, -7.092864086850281e+36,
     -4.720102061097413e-11, -4.680588417928079e+25, 1.2316345696058477e-63), 3, 1.0520481760981621e-08)


def test_lane_solver_at_a_strength_far_above_the_keys():
    row, k, lam = STRENGTH_FAR_ABOVE_THE_KEYS_ROW
    x = np.array(row)
    expected = _oracle(row, k, lam, 4.0 / 3.0, 300)[0]
    for label, y in _routes(x, k, lam, 4.0 / 3.0, lane_groups=True, threshold=True).items():
        assert_within_input_rounding(y, expected, x, label)


def test_sortfree_route_on_a_long_row_spanning_many_orders():
    # Found on 2026-12-07 by a fuzz on long rows (n = 300-1024, p = 2, l = 1e-4..1e4): 8 of 400 such rows
    # (k = 97, l = 3255) left the sort-free route's answer beyond the bound, this one 97 times (a free
    # output 2e-11 below an input of 1.3e-9): its step test took the saturation width, l t, as the scale
    # of the threshold's rounding, and stopped 3e-12 of t off.  ("fused": the sort-free route, which a row
    # of 512 with k = 97 takes; the full-sort route and the threshold method were within the bound.)
    x = rows_lowered_from_one_scale(np.random.default_rng(175), 1, 512)[0]
    k, lam = 97, 3255.517382490791
    expected = _oracle(tuple(x), k, lam, 2.0, 300)[0]
    for label, y in _routes(x, k, lam, 2.0, threshold=True).items():
        assert_within_input_rounding(y, expected, x, label)


# Found by `benchmarks/mag_entrywise.py` on long rows (n = 300-1024, p = 2): the threshold method's p = 2
# evaluation took the free entries' total as sum(z) - |S| t, which keeps only the digits of k t; with 379
# saturated entries and 2 units of free weight its sign test was some 1e-13 of t off, the bracket lost the
# root, the closed-form polish fell outside it and was dropped, and a free output near its threshold came
# out 2.8 times the entry-by-entry bound off (5 of 8,000 rows, up to 3.1 times; PAV within it).
def _long_row_of_many_saturated_entries() -> tuple[np.ndarray, int, float]:
    rng = np.random.default_rng(2657)
    x = rows_lowered_from_one_scale(rng, 1, 512)[0]
    return x, 381, 24.633525558136228


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch", "jax"])
def test_threshold_method_on_a_long_row_of_many_saturated_entries(backend):
    x, k, lam = _long_row_of_many_saturated_entries()
    expected = _oracle(tuple(x), k, lam, 2.0, 300)[0]
    with backend_context(backend) as b:
        y, _ = tc.soft_topk_mag_forward(b.to(x[None]), k, regularization_strength=lam, p=2.0, method="threshold")
        assert_within_input_rounding(b.back(y)[0], expected, x, backend)


def test_a_left_neighbour_far_above_a_block_of_ties_far_below_stays_saturated():
    # Found by the property test of the routes: ties at 7.5e-35 hold the last unit weight
    # (k = 4, l = 1, p = 4/3), so their value is ~1e-102 (their outputs ~x).  Solved relative to
    # the ties, it rounded to 1e-16 times them, above g of the entry 7.5e-18, which the closed-form
    # block then took in as free, and then the whole row: the ties came back 0 (sum(y) = 3) and
    # 7.5e-18 lost 11 digits.
    row = (7.5e-13, 7.499999999999999e-18, 7.5e-11, 7.5e-35, 7.5e-35, 7.5e-35)
    x = np.array(row)
    expected = _oracle(row, 4, 1.0, 4.0 / 3.0, 300)[0]
    np.testing.assert_array_equal(expected, x)
    for label, y in _routes(x, 4, 1.0, 4.0 / 3.0, lane_groups=True).items():
        assert_within_input_rounding(y, expected, x, label)


def test_a_pair_at_its_saturation_level_to_rounding_is_not_solved_at_a_bisection_midpoint():
    # Found by the property test of the routes: the tied 0.2266 are free with y = 1 - 2e-16, so
    # their sets flip within the rounding of the threshold t = 5.4e-8 (k = 15, l = 60, p = 4/3).
    # The lanes' root moved out of the bracket and back, and their tolerance (8 ulps of l for
    # p = 4/3) took a bisection midpoint 4e-11 off t: the free entries near 1e-6 lost 5 digits.
    row = (5e-07,) + (1e-06,) * 5 + (2.26579182e-01,) * 2 + (4.53158364e-01,) * 13
    x = np.array(row)
    expected = _oracle(row, 15, 60.0, 4.0 / 3.0, 120)[0]
    for label, y in _routes(x, 15, 60.0, 4.0 / 3.0, lane_groups=True).items():
        assert_within_input_rounding(y, expected, x, label)


@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
def test_float32_ties_at_a_tiny_strength(p):
    x = np.tile(TIE_ROW, 2).astype(np.float32)
    expected = _oracle(tuple(x.astype(np.float64)), 5, 1e-9, p, 120)[0]
    for label, y in _routes(x, 5, 1e-9, p).items():
        assert y.dtype == np.float32
        _assert_entrywise(y.astype(np.float64), expected, 4 * np.finfo(np.float32).eps, label)


def _boundary_threshold(upper: float, lam: float, p: float) -> float:
    """The threshold t of a row whose k-th magnitude `upper` sits exactly at its saturation level (y = 1)
    and whose next one contributes nothing at t, to 60 digits: t solves ``upper - t = l t^(1/(q-1))``
    (spec section 5: z = g(|x| - t) = t)."""
    import mpmath

    with mpmath.workdps(60):
        exponent = 1 / mp_q_minus_one(p)  # p - 1
        lo, hi = mpmath.mpf(0), mpmath.mpf(upper)
        for _ in range(240):  # bisection: upper - t - l t^(p-1) decreases in t
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if upper - mid - mpmath.mpf(lam) * mid**exponent > 0 else (lo, mid)
        return lo


@pytest.mark.parametrize("method", ["pav", "threshold"])
@pytest.mark.parametrize("p", [1.001, 1.002, 1.005, 1.01, 1.02])
def test_p_close_to_one_where_the_free_entries_underflow(method, p):
    """q - 1 = 1/(p - 1) is 100 to 1000: the next entry's z = g(|x| - t) ~ (1e-4)^200 underflows, and the
    k-th entry sits at its saturation level.  The block equation was then 0 on a whole stretch of values:
    PAV stopped inside it, and the k-th entry came back above |x| (3.3e8 for x = 1.15 at p = 1.005; the
    saturated entries' fixed point, Newton without the halving rule, stopped short too)."""
    import mpmath

    lam = 0.1
    for scale, signs in ((1.0, (1, 1, 1)), (1.0, (-1, 1, -1)), (3.0, (1, -1, 1))):
        x = scale * np.array([2.0, 1.15, 1.05]) * np.array(signs)
        t = _boundary_threshold(abs(x[1]), lam * scale ** (2 - p), p)  # mag(c x; l) = c mag(x; l c^(p-2))
        expected = np.array([x[0], x[1], signs[2] * float(mpmath.mpf(abs(x[2])) - t)])
        y = tk.soft_topk_mag(x, 2, regularization_strength=lam * scale ** (2 - p), p=p, method=method)
        assert y[0] == x[0]  # a clear winner: x itself
        # The entry at its level comes back as x, the next as |x| - t: to the rounding of g(r) = (r / l)^(q - 1),
        # which multiplies r's relative rounding by q - 1 (before the fix: off by 1e8 and 5%).
        bound = 1e-12 * np.abs(expected) + 4 * (p / (p - 1) - 1) * np.finfo(float).eps * np.abs(x)
        assert np.all(np.abs(y - expected) <= bound), (y - expected) / bound


# Free entries never come back above |x|.  On F, |y| = g(r) + r lies below |x| (F lies below saturation),
# but rounded it passed |x| next to the saturation level, where the rounding of the threshold decides
# between F and A: by up to 124 ulps for p = 1.01 (g = (r / l)^100 multiplies the rounding of r by 100),
# 1 ulp for p = 4/3, on every PAV route; and by up to 7% where Dykstra stopped at max_iter.  The free
# outputs are now capped at |x|.


def _arithmetic_row(n: int, seed: int) -> np.ndarray:
    """n distinct values in [-2, 2], the same on every platform (integer arithmetic and one division)."""
    j = np.arange(n)
    return ((j * 7919 + seed * 104729) % 2003 - 1001) / 500.0


def _around_saturation(x: np.ndarray, k: int, lam: float, p: float, width: int) -> np.ndarray | None:
    """`width` copies of the row `x` in which its largest entry that is not saturated takes the `width` values
    of x's dtype around the smallest one at which PAV saturates it on this host (bisection over the float
    grid): free entries as close to their saturation level as they come.  None: every entry saturated."""
    kw = dict(regularization_strength=lam, p=p, method="pav")
    y = tk.soft_topk_mag(x, k, **kw)
    unsaturated = y != x
    if not unsaturated.any():
        return None
    i = int(np.argmax(np.where(unsaturated, np.abs(x), -1)))
    bits = np.int64 if x.dtype == np.float64 else np.int32
    trial = x.copy()

    def saturated(magnitude):
        trial[i] = np.copysign(bits(magnitude).view(x.dtype), x[i])
        return tk.soft_topk_mag(trial, k, **kw)[i] == trial[i]

    # Far enough above the others (p <= 2): s - t >= l max(t, 1) >= l t^(p - 1).
    lo, hi = int(np.abs(x[i]).view(bits)), int(np.asarray(4 * (1 + lam) * (np.abs(x).max() + 1), x.dtype).view(bits))
    if not saturated(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if saturated(mid) else (mid, hi)
    rows = np.tile(x, (width, 1))
    window = np.maximum(lo + np.arange(width, dtype=bits) - width // 2, 0)  # (no negative bit patterns)
    rows[:, i] = np.copysign(window.astype(bits).view(x.dtype), x[i])
    return rows


@functools.cache
def _pav_window(n: int, p: float, lam: float, seed: int, dtype: str) -> np.ndarray:
    rows = _around_saturation(_arithmetic_row(n, seed).astype(dtype), n // 4, lam, p, 32)
    assert rows is not None
    return rows


def _assert_at_most_abs_x(y: np.ndarray, x: np.ndarray, label: str) -> None:
    assert y.dtype == x.dtype, label
    over = np.abs(y) > np.abs(x)
    ulps = (np.abs(y[over]) - np.abs(x[over])) / np.spacing(np.abs(x[over]))
    assert not over.any(), f"{label}: {over.sum()} entries above |x|, by up to {ulps.max():.0f} ulps"


# (n, p, l, seed): windows where, before the cap, free outputs came back 1-124 ulps above |x| (float64,
# on an AVX-512 host): the selection kernel (p = 1.01, 1.1), the lane solver in the lane layout (n = 12)
# and row by row (n = 64), each with and without residuals, and the full-sort route (a NaN row beside).
PAV_WINDOWS = [(12, 1.01, 1.0, 0), (12, 1.1, 0.01, 0), (12, 4.0 / 3.0, 0.01, 0), (64, 4.0 / 3.0, 0.01, 1)]


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["pav", "threshold", "dykstra"])
def test_free_outputs_never_exceed_abs_x(method, float_dtype, backend_name):
    # PAV reads float32 keys in float64, so its float32 outputs are float64 values rounded: at most |x|
    # already.  Dykstra and the threshold method compute in float32 themselves (the threshold method
    # on PAV's windows: its saturation level lies within rounding of PAV's).
    if method in ("pav", "threshold"):
        cases = [(_pav_window(n, p, lam, seed, np.dtype(float_dtype).name), n // 4, lam, p, {})
                 for n, p, lam, seed in PAV_WINDOWS]
    else:
        # Stopped at max_iter (p = 2): 19 entries of 320 were 0.8% above |x|, in float32 and float64.
        rows = np.stack([_arithmetic_row(40, 10 * r) for r in range(8)]).astype(float_dtype)
        cases = [(rows, 10, 10.0, 2.0, {"max_iter": 200})]
    with backend_context(backend_name) as b, warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.DykstraNotConverged)
        for rows, k, lam, p, extra in cases:
            kw = dict(regularization_strength=lam, p=p, method=method, **extra)
            with_nan = np.concatenate([rows, np.full_like(rows[:1], np.nan)])
            outputs = {
                "forward": tc.soft_topk_mag(b.to(rows), k, **kw),
                "with residuals": tc.soft_topk_mag_forward(b.to(rows), k, **kw)[0],
                "beside a NaN row": tc.soft_topk_mag(b.to(with_nan), k, **kw)[:-1],
            }
            for label, y in outputs.items():
                _assert_at_most_abs_x(b.back(y), rows, f"{method}, {label}, p = {p:.3g}, l = {lam}")


# (q, l, t): thresholds at which the sort-free route's values of keys just below saturation (p = 4/3)
# came back 1 ulp above |x| (one key of 48 each).  Its own kernel, the threshold given: the route
# itself came within 1 ulp of |x| in a randomized search only once in thousands of rows.
SORTFREE_THRESHOLDS = [(4.0, 3.8253425458770436, 1.4048502604342952), (4.0, 10.755633911129971, 2.1004843015423167),
                       (4.0, 4.422571408481472, 2.036423559935766)]


@pytest.mark.parametrize(("q", "lam", "t"), SORTFREE_THRESHOLDS)
def test_sortfree_values_just_below_saturation_stay_at_most_abs_x(q, lam, t):
    width = sortfree._width(t, lam, q, True)
    level = t + width
    keys = level + np.spacing(level) * np.arange(-40, 8)
    x = keys * np.where(np.arange(keys.size) % 2 == 0, 1.0, -1.0)
    y = np.empty_like(x)
    sortfree._mag_values(keys, x, y, 0.0, t, width, lam, q)
    assert np.count_nonzero((y != 0) & (np.abs(y) < keys)) > 30  # most of them free
    _assert_at_most_abs_x(y, x, "sortfree._mag_values")


@settings(max_examples=int(os.environ.get("TOPK_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(
    x=st.integers(4, 24).flatmap(lambda n: arrays(np.float64, n, elements=st.floats(-10, 10, width=64))),
    data=st.data(), lam=st.floats(1e-3, 10.0), p=st.sampled_from([1.01, 1.05, 1.1, 4.0 / 3.0, 2.0]),
)
def test_entries_at_their_saturation_level_stay_at_most_abs_x(x, data, lam, p):
    # The largest unsaturated entry of a row moved through the values around its saturation level, where
    # the rounding of the threshold decides whether it is free: before the cap, each of six runs of 60
    # examples found a free output above |x| (the first: x = [3, 3, 3, 3], k = 1, l = 3, p = 1.01, 71 ulps).
    k = data.draw(st.integers(1, x.size - 1))
    rows = _around_saturation(x, k, lam, p, 16)
    if rows is None:
        return
    kw = dict(regularization_strength=lam, p=p, method="pav")
    _assert_at_most_abs_x(tk.soft_topk_mag(rows, k, **kw), rows, "forward")
    _assert_at_most_abs_x(tk.soft_topk_mag_vjp(rows, k, **kw)[0], rows, "with residuals")
