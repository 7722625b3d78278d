"""Regenerate the paper's illustrations into docs/figures/ (run from the repository root).

* operator_curve.png: x(s) = (3, 1, -1 + s, s), k = 2; the mass that the mask
  puts on the two moving entries, mask_2 + mask_3 (0-based), as s varies, for
  the hard operator and the soft operators with p = 2 and p = 4/3.
* sparsity.png: the number of non-zeros of both soft operators as the
  regularization strength grows, for several p (n = 100, k = 10).

    python benchmarks/paper_figures.py [--out docs/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import topk_numpy as tk


def operator_curve(out: Path, strength: float = 1.0) -> Path:
    s = np.linspace(-2.0, 5.0, 701)
    x = np.stack([np.full_like(s, 3.0), np.ones_like(s), s - 1.0, s], axis=-1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    curves = [("hard", tk.hard_topk_mask(x, 2))]
    for p, name in [(2.0, "p = 2"), (4.0 / 3.0, "p = 4/3")]:
        curves.append((f"soft, {name}", tk.soft_topk_mask(x, 2, regularization_strength=strength, p=p)))
    for label, y in curves:
        ax.plot(s, y[:, 2] + y[:, 3], label=label)
    ax.set_xlabel("s")
    ax.set_ylabel("mask$_2$ + mask$_3$")
    ax.set_title(f"x(s) = (3, 1, s - 1, s), k = 2, strength = {strength:g}")
    ax.legend()
    fig.tight_layout()
    path = out / "operator_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sparsity(out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=100)
    strengths = np.logspace(-3, 2, 60)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, (name, fn) in zip(axes, [("soft_topk_mask", tk.soft_topk_mask), ("soft_topk_mag", tk.soft_topk_mag)],
                              strict=True):
        for p in (1.25, 4.0 / 3.0, 1.5, 2.0, 3.0):
            nnz = [np.count_nonzero(fn(x, 10, regularization_strength=lam, p=p)) for lam in strengths]
            ax.semilogx(strengths, nnz, label=f"p = {p:.3g}")
        ax.set_title(f"{name}, n = 100, k = 10")
        ax.set_xlabel("regularization_strength")
    axes[0].set_ylabel("number of non-zeros")
    axes[1].legend()
    fig.tight_layout()
    path = out / "sparsity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (operator_curve(args.out), sparsity(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
