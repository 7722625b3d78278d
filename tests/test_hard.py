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


def _documented_derivative(x: np.ndarray, t: np.ndarray, k: int, operator: str) -> np.ndarray:
    """``J t`` (= ``J^T t``: the Jacobian is diagonal) by docs/policy.md: 0 for the mask; for the magnitude,
    `t` on the kept entries (a stable argsort of ``|x|``) and 0 elsewhere; 0 on every row containing NaN,
    whose output is the constant NaN row."""
    nan_rows = np.isnan(x).any(axis=-1, keepdims=True)
    if operator == "mask":
        return np.zeros_like(x)
    keep = _stable_reference(np.abs(np.where(nan_rows, 0.0, x)), k)
    return np.where(nan_rows, 0.0, t * keep)


def _jax_products(operator: str, x: np.ndarray, t: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    jax = pytest.importorskip("jax")
    tj = pytest.importorskip("topk_jax")
    fn = getattr(tj, f"hard_topk_{operator}")
    x_j, t_j = jax.numpy.asarray(x), jax.numpy.asarray(t)
    grad = jax.grad(lambda a: jax.numpy.sum(fn(a, k) * t_j))(x_j)
    _, y_dot = jax.jvp(lambda a: fn(a, k), (x_j,), (t_j,))
    return np.asarray(grad), np.asarray(y_dot)


def _torch_products(operator: str, x: np.ndarray, t: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    torch = pytest.importorskip("torch")
    tt = pytest.importorskip("topk_torch")
    from ._torch_helpers import quiet_lazy_torch_imports

    quiet_lazy_torch_imports()  # forward mode's first use imports modules that warn
    fn = getattr(tt, f"hard_topk_{operator}")
    x_t = torch.tensor(x, requires_grad=True)
    fn(x_t, k).backward(torch.tensor(t))
    _, y_dot = torch.func.jvp(lambda a: fn(a, k), (torch.tensor(x),), (torch.tensor(t),))
    return x_t.grad.numpy(), y_dot.numpy()


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_hard_derivatives_follow_the_policy_in_nan_rows(rng, operator, framework):
    """A NaN row's output is the constant NaN row: its derivative is 0 in both directions (the soft
    operators' products are NaN there instead), and the other rows keep their usual derivative."""
    k = 2
    x = rng.normal(size=(4, 6)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 0], x[2, 5] = np.nan, np.inf
    x[3, 4] = -np.inf  # kept by the magnitude, with the identity derivative
    t = rng.normal(size=x.shape).astype(np.float32)
    grad, y_dot = (_jax_products if framework == "jax" else _torch_products)(operator, x, t, k)
    expected = _documented_derivative(x, t, k, operator)
    for got in (grad, y_dot):
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got, expected)
