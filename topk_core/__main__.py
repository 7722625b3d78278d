"""Demo: `python -m topk_core` prints the operators on a small example and checks them."""

from __future__ import annotations

import numpy as np

import topk_core as tc


def main() -> None:
    np.set_printoptions(precision=4, suppress=True)
    x = np.array([2.0, -1.5, 0.3, 1.6, -0.2, 1.2])
    k = 2
    print(f"x = {x}, k = {k}\n")
    print("hard_topk_mask        ", tc.hard_topk_mask(x, k))
    for p in (4.0 / 3.0, 2.0):
        for lam in (0.3, 1.5):
            y = tc.soft_topk_mask(x, k, regularization_strength=lam, p=p)
            print(f"soft_topk_mask p={p:.3g} l={lam:<4}", y, f" sum={y.sum():.6f}  zeros={int((y == 0).sum())}")
    print("hard_topk_mag         ", tc.hard_topk_mag(x, k))
    for lam in (0.3, 1.5):
        print(f"soft_topk_mag  p=1.33 l={lam:<4}", tc.soft_topk_mag(x, k, regularization_strength=lam))

    # The hard limit: l -> 0 recovers the hard operators for distinct values.
    tiny = tc.soft_topk_mask(x, k, regularization_strength=1e-6)
    assert np.array_equal(tiny, tc.hard_topk_mask(x, k)), tiny
    assert np.array_equal(tc.soft_topk_mag(x, k, regularization_strength=1e-6), tc.hard_topk_mag(x, k))
    print("\nhard limit (l = 1e-6) equals the hard operators: ok")

    # A gradient: the closed-form VJP against central finite differences.
    lam, u = 1.5, np.linspace(-1.0, 1.0, x.size)
    for name, fwd, vjp in (
        ("mask", tc.soft_topk_mask_forward, tc.mask_vjp_from_residuals),
        ("mag", tc.soft_topk_mag_forward, tc.mag_vjp_from_residuals),
    ):
        _, res = fwd(x, k, regularization_strength=lam)
        grad = vjp(res, u)
        eps = 1e-6
        fd = np.empty_like(x)
        for j in range(x.size):
            step = np.zeros_like(x)
            step[j] = eps
            up = fwd(x + step, k, regularization_strength=lam)[0]
            down = fwd(x - step, k, regularization_strength=lam)[0]
            fd[j] = u @ (up - down) / (2 * eps)
        err = np.abs(grad - fd).max()
        assert err < 1e-6, (name, grad, fd)
        print(f"VJP of soft_topk_{name:<4} = {grad}  (finite differences agree to {err:.1e}): ok")


if __name__ == "__main__":
    main()
