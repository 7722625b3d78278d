"""Hard operators against a stable argsort reference."""

from __future__ import annotations

import numpy as np
import pytest

import topk_numpy as tk


def _stable_reference(keys: np.ndarray, k: int) -> np.ndarray:
    idx = np.argsort(-keys, axis=-1, kind="stable")[..., :k]
    mask = np.zeros_like(keys)
    np.put_along_axis(mask, idx, 1.0, axis=-1)
    return mask


@pytest.mark.parametrize("k", [1, 3, 7])
def test_hard_mask_matches_stable_argsort_with_ties(rng, k):
    x = rng.integers(-2, 3, size=(40, 7)).astype(np.float64)
    np.testing.assert_array_equal(tk.hard_topk_mask(x, k), _stable_reference(x, k))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_hard_mag_matches_stable_argsort_with_ties(rng, k):
    x = rng.integers(-2, 3, size=(40, 7)).astype(np.float32)
    expected = x * _stable_reference(np.abs(x), k)
    np.testing.assert_array_equal(tk.hard_topk_mag(x, k), expected)


def test_exactly_k_selected(rng):
    x = np.zeros((3, 10))
    assert np.all(tk.hard_topk_mask(x, 4).sum(axis=-1) == 4)
    np.testing.assert_array_equal(tk.hard_topk_mask(x, 4)[0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
