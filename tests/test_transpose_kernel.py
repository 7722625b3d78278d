"""The 8 x 8 block transposes between input rows and the lane layout, against NumPy's transposition.

`lanes.load_group` and `lanes.store_group` take them for the blocks of 8
entries and fall back to a loop for the rest; both must move every entry of
every named row, in any order of rows, converting dtypes exactly as a scalar
store does (float32 to float64 exactly, float64 to float32 rounded).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from topk_core._pav import lanes
from topk_core._pav.transpose import lanes_to_rows, rows_to_lanes

DTYPES = [np.float32, np.float64]


@nb.njit
def _blocks_to_lanes(src, rows, dst):
    for first in range(0, rows.shape[0], 8):
        for j0 in range(0, src.shape[1], 8):
            rows_to_lanes(src, rows, first, j0, dst)


@nb.njit
def _blocks_to_rows(src, rows, dst):
    for first in range(0, rows.shape[0], 8):
        for j0 in range(0, src.shape[0], 8):
            lanes_to_rows(src, j0, first, dst, rows)


@pytest.mark.parametrize("source", DTYPES)
@pytest.mark.parametrize("target", DTYPES)
def test_blocks_move_every_entry_of_the_named_rows(rng, source, target):
    # Rows in any order (a permutation of a larger array, one row named twice), values that
    # float32 must round, and the transposition back to the rows.
    x = (rng.normal(size=(40, 24)) * 1e3).astype(source)
    rows = rng.permutation(40)[:16].astype(np.int64)
    rows[5] = rows[11]
    lanes_layout = np.full((24, 16), np.nan, dtype=target)
    _blocks_to_lanes(x, rows, lanes_layout)
    np.testing.assert_array_equal(lanes_layout, x[rows].T.astype(target))
    back = np.full((40, 24), -7.0, dtype=source)
    _blocks_to_rows(lanes_layout, rows, back)
    expected = np.full((40, 24), -7.0, dtype=source)
    expected[rows] = x[rows].astype(target).astype(source)  # the row named twice gets the same values twice
    np.testing.assert_array_equal(back, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float64_lanes_round_to_float32_rows_as_a_store_does(rng, dtype):
    z = rng.normal(size=(8, 8)) * 10.0 ** rng.integers(-40, 40, size=(8, 8))
    rows = np.arange(8, dtype=np.int64)
    out = np.empty((8, 8), dtype=dtype)
    _blocks_to_rows(z, rows, out)
    np.testing.assert_array_equal(out, z.T.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 8, 13, 16, 64, 77])
def test_load_and_store_groups(rng, dtype, n):
    # Full and partial groups, n with and without a remainder of 8, every row or a subset.
    batch = lanes.LANES + 21
    x = rng.normal(size=(batch, n)).astype(dtype)
    subset = rng.permutation(batch)[: lanes.LANES + 5].astype(np.int64)
    for names in (lanes.EVERY_ROW, subset):
        count = batch if names.shape[0] == 0 else names.shape[0]
        for r0 in (0, lanes.LANES):
            used = min(lanes.LANES, count - r0)
            rows = np.empty(lanes.LANES, dtype=np.int64)
            z = np.empty((n, lanes.LANES))
            lanes.load_group(x, r0, rows, z, names)
            expected_rows = (np.arange(batch) if names.shape[0] == 0 else names)[r0:r0 + used]
            np.testing.assert_array_equal(rows[:used], expected_rows)
            np.testing.assert_array_equal(rows[used:], expected_rows[0])  # lanes past the last row repeat the first
            np.testing.assert_array_equal(z.T, x[rows].astype(np.float64))
            out = np.zeros_like(x)
            lanes.store_group(z * 3.0, used, rows, out)
            expected = np.zeros_like(x)
            expected[expected_rows] = (x[expected_rows].astype(np.float64) * 3.0).astype(dtype)
            np.testing.assert_array_equal(out, expected)
