"""Helpers of the PyTorch adapter tests.

* `quiet_lazy_torch_imports`: torch imports a few modules lazily on first use
  (the forward-mode decompositions on the first dual tensor, Inductor on the
  first `torch.compile`), and those imports emit DeprecationWarnings from
  torch's own code (`torch.jit.script`), which the suite turns into errors.
  Importing them up front, with those warnings silenced, keeps the tests'
  own warnings strict.
* Closed-form Jacobians (spec section 6) read off the operators' outputs with
  NumPy in float64; they share no code with the library.
"""

from __future__ import annotations

import warnings

import numpy as np


def quiet_lazy_torch_imports() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._decomp.decompositions_for_jvp
        import torch._inductor.compile_fx  # noqa: F401


def _q(p: float) -> float:
    return p / (p - 1.0)


def mask_jacobian(y: np.ndarray, lam: float, p: float) -> np.ndarray:
    """Jacobian of the soft mask of one row, from its output `y`.

    On the free set `F = {0 < y < 1}`, `y = ((x - tau) / l)^(q - 1)`, hence
    `g' = (q - 1)/l * y^((q - 2)/(q - 1))` and `J = diag(g') - g' g'^T / sum(g')` on `F`.
    """
    q = _q(p)
    free = (y > 0) & (y < 1)
    safe = np.where(free, y, 1.0)
    gp = np.where(free, (q - 1.0) / lam * safe ** ((q - 2.0) / (q - 1.0)), 0.0)
    jac = np.diag(gp)
    if gp.sum() > 0:
        jac -= np.outer(gp, gp) / gp.sum()
    return jac


def _solve_r(a: np.ndarray, lam: float, q: float) -> np.ndarray:
    """`r >= 0` with `(r / l)^(q - 1) + r = a` (the left side increases in r), by bisection."""
    lo, hi = np.zeros_like(a), a.copy()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = (mid / lam) ** (q - 1.0) + mid > a
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    return 0.5 * (lo + hi)


def mag_jacobian(x: np.ndarray, out: np.ndarray, k: int, lam: float, p: float) -> np.ndarray:
    """Jacobian of the soft top-k in magnitude of one row, from `x` and its output.

    `A` = entries returned unchanged, `F` = the other non-zero entries; on `F`,
    `|out| = g(r) + r` gives `r`, then `g' = (q - 1) l^(1 - q) r^(q - 2)`,
    `D = sum_F g' + k - |A|` and `J_ij = (1 + g'_i)(delta_ij - s_i s_j g'_j / D)` on `F x F`.
    """
    q = _q(p)
    saturated = (out == x) & (x != 0)
    free = (out != 0) & ~saturated
    r = _solve_r(np.abs(out), lam, q)
    safe = np.where(free, r, 1.0)
    gp = np.where(free, (q - 1.0) * lam ** (1.0 - q) * safe ** (q - 2.0), 0.0)
    s = np.sign(x)
    jac = np.diag(saturated.astype(float))
    denominator = gp.sum() + k - saturated.sum()
    if free.any():
        block = np.diag(1.0 + gp) - np.outer((1.0 + gp) * s, s * gp) / denominator
        jac[np.ix_(free, free)] = block[np.ix_(free, free)]
    return jac


def separated_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of well-separated values (away from kinks, as finite differences need), float64."""
    n = shape[-1]
    base = np.linspace(-2.0, 2.0, n)
    rows = [rng.permutation(base) + rng.uniform(-0.02, 0.02, n) for _ in range(int(np.prod(shape[:-1])))]
    return np.stack(rows).reshape(shape)
