"""sparse-topk core: fast, differentiable and sparse top-k operators for any Array-API array.

Implements Sander et al., "Fast, Differentiable and Sparse Top-k: a Convex
Analysis Perspective" (ICML 2023).  Framework adapters with autodiff live in
`topk_numpy`, `topk_jax` and `topk_torch`.
"""

from ._agnostic.dykstra import DykstraNotConverged
from ._agnostic.residuals import MagResiduals, MaskResiduals
from ._agnostic.threshold import ThresholdNotConverged
from ._api import (
    hard_topk_mag,
    hard_topk_mask,
    mag_jvp_from_residuals,
    mag_vjp_from_residuals,
    mask_jvp_from_residuals,
    mask_vjp_from_residuals,
    soft_topk_mag,
    soft_topk_mag_forward,
    soft_topk_mask,
    soft_topk_mask_forward,
)

__version__ = "0.1.0"

__all__ = [
    "DykstraNotConverged",
    "MagResiduals",
    "MaskResiduals",
    "ThresholdNotConverged",
    "__version__",
    "hard_topk_mag",
    "hard_topk_mask",
    "mag_jvp_from_residuals",
    "mag_vjp_from_residuals",
    "mask_jvp_from_residuals",
    "mask_vjp_from_residuals",
    "soft_topk_mag",
    "soft_topk_mag_forward",
    "soft_topk_mask",
    "soft_topk_mask_forward",
]
