"""Helpers of the JAX adapter tests: closed-form Jacobians (spec section 6) read off the outputs.

They share no code with the library: the free and saturated sets and `g'`
are recovered from the operator's output with NumPy in float64.  Also the
inputs and the operator lookup shared by the JAX test modules.
"""

from __future__ import annotations

import numpy as np

import topk_jax as tk


def soft(op: str, lib=tk):
    return getattr(lib, f"soft_topk_{op}")


def rows(seed: int, shape: tuple[int, ...], scale: float = 1.5) -> np.ndarray:
    """Distinct random values, with a tie planted in the first row."""
    x = np.random.default_rng(seed).normal(size=shape) * scale
    flat = x.reshape(-1, shape[-1])
    if shape[-1] > 2:
        flat[0, 2] = flat[0, 1]
    return x


def _q(p: float) -> float:
    return p / (p - 1.0)


def mask_jacobian(y: np.ndarray, lam: float, p: float) -> np.ndarray:
    """Jacobian of the soft mask of one row, from its output `y`.

    On the free set `F = {0 < y < 1}`, `y = ((x - tau) / l)^(q-1)`, so
    `g' = (q-1)/l * y^((q-2)/(q-1))` and `J = diag(g') - g' g'^T / sum(g')` on `F`.
    """
    q = _q(p)
    free = (y > 0) & (y < 1)
    gp = np.where(free, (q - 1.0) / lam * np.where(free, y, 1.0) ** ((q - 2.0) / (q - 1.0)), 0.0)
    total = gp.sum()
    jac = np.diag(gp)
    if total > 0:
        jac -= np.outer(gp, gp) / total
    return jac


def _solve_r(a: np.ndarray, lam: float, q: float) -> np.ndarray:
    """`r >= 0` with `(r / l)^(q-1) + r = a`, by bisection (the left side increases in r)."""
    lo, hi = np.zeros_like(a), a.copy()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = (mid / lam) ** (q - 1.0) + mid > a
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return 0.5 * (lo + hi)


def mag_jacobian(x: np.ndarray, out: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    """Jacobian of the soft top-k in magnitude of one row, from its input and output.

    `A`: entries returned unchanged (non-zero); `F`: the other non-zero entries,
    with `|out| = g(r) + r`; `D = sum_F g' + (k - |A|)` and
    `J_ij = (1 + g'_i)(delta_ij - s_i s_j g'_j / D)` on `F`, the identity on `A`.
    """
    q = _q(p)
    kept = (out == x) & (x != 0)
    free = (out != 0) & ~kept
    r = _solve_r(np.abs(out), lam, q)
    gp = np.where(free, (q - 1.0) / lam * (np.where(free, r, 1.0) / lam) ** (q - 2.0), 0.0)
    s = np.sign(x)
    denom = gp.sum() + (k - kept.sum())
    jac = np.diag(kept.astype(float) + (1.0 + gp) * free)
    if denom > 0:
        jac -= ((1.0 + gp) * s)[:, None] * (s * gp)[None, :] / denom * free[:, None] * free[None, :]
    return jac
