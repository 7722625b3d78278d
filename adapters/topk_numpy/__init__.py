"""sparse-topk for NumPy: the four operators plus Jacobian products mirroring `jax.vjp` / `jax.jvp`.

The mathematics lives in `topk_core`; see `topk_core.soft_topk_mask` and
`topk_core.soft_topk_mag`.  Array-likes are accepted and converted with
`numpy.asarray`; outputs are NumPy arrays of the input's floating dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import topk_core
from topk_core._api import DEFAULT_P, DEFAULT_STRENGTH

__version__ = topk_core.__version__

__all__ = [
    "__version__",
    "hard_topk_mag",
    "hard_topk_mask",
    "soft_topk_mag",
    "soft_topk_mag_jvp",
    "soft_topk_mag_vjp",
    "soft_topk_mask",
    "soft_topk_mask_jvp",
    "soft_topk_mask_vjp",
]


def _as_array(name: str, x: Any) -> np.ndarray:
    # Dtype checks (floating only) happen in topk_core, with one message style.
    return np.asarray(x)


def soft_topk_mask(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> np.ndarray:
    """Sparse soft top-k mask along `axis` (see `topk_core.soft_topk_mask`).

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.soft_topk_mask(np.array([3.0, 1.0, 0.9, -2.0]), k=2, p=2.0, regularization_strength=1.0)
    array([1.  , 0.55, 0.45, 0.  ])
    """
    return topk_core.soft_topk_mask(
        _as_array("x", x), k, regularization_strength=regularization_strength, p=p, axis=axis,
        method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mag(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> np.ndarray:
    """Sparse soft top-k in magnitude along `axis` (see `topk_core.soft_topk_mag`).

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.soft_topk_mag(np.array([0.1, -4.0, 3.0, 0.2]), k=2)
    array([ 0., -4.,  3.,  0.])
    """
    return topk_core.soft_topk_mag(
        _as_array("x", x), k, regularization_strength=regularization_strength, p=p, axis=axis,
        method=method, max_iter=max_iter, tol=tol,
    )


def hard_topk_mask(x: Any, k: int, *, axis: int = -1) -> np.ndarray:
    """Hard top-k mask, ties toward the lower index (see `topk_core.hard_topk_mask`).

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.hard_topk_mask(np.array([1.0, 3.0, 3.0, 2.0]), k=2)
    array([0., 1., 1., 0.])
    """
    return topk_core.hard_topk_mask(_as_array("x", x), k, axis=axis)


def hard_topk_mag(x: Any, k: int, *, axis: int = -1) -> np.ndarray:
    """Hard top-k in magnitude (see `topk_core.hard_topk_mag`).

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> tk.hard_topk_mag(np.array([0.5, -3.0, 2.0, 1.0]), k=2)
    array([ 0., -3.,  2.,  0.])
    """
    return topk_core.hard_topk_mag(_as_array("x", x), k, axis=axis)


def _vjp(forward: Callable, product: Callable, x: Any, k: int, axis: int, **kw: Any) -> tuple[np.ndarray, Callable]:
    arr = _as_array("x", x)
    y, residuals = forward(arr, k, axis=axis, **kw)

    def vjp_fn(cotangent: Any) -> np.ndarray:
        ct = _as_array("cotangent", cotangent)
        topk_core._validate.check_same_shape("cotangent", ct, arr.shape)
        return product(residuals, ct, axis=axis)

    return y, vjp_fn


def _jvp(forward: Callable, product: Callable, x: Any, tangent: Any, k: int, axis: int, **kw: Any):
    arr = _as_array("x", x)
    t = _as_array("tangent", tangent)
    topk_core._validate.check_same_shape("tangent", t, arr.shape)
    y, residuals = forward(arr, k, axis=axis, **kw)
    return y, product(residuals, t, axis=axis)


def soft_topk_mask_vjp(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, Callable[[Any], np.ndarray]]:
    """Return ``(soft_topk_mask(x, k, ...), vjp_fn)``; ``vjp_fn(u)`` is ``J^T u``, shaped like `x`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, vjp_fn = tk.soft_topk_mask_vjp(np.array([3.0, 1.0, 0.9, -2.0]), k=2, p=2.0, regularization_strength=1.0)
    >>> vjp_fn(np.array([0.0, 1.0, 0.0, 0.0]))
    array([ 0. ,  0.5, -0.5,  0. ])
    """
    return _vjp(
        topk_core.soft_topk_mask_forward, topk_core.mask_vjp_from_residuals, x, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mask_jvp(
    x: Any, tangent: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(soft_topk_mask(x, k, ...), J @ tangent)``.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, y_dot = tk.soft_topk_mask_jvp(np.array([3.0, 1.0, 0.9, -2.0]), np.ones(4), k=2, p=2.0, regularization_strength=1.0)
    >>> y_dot
    array([0., 0., 0., 0.])
    """
    return _jvp(
        topk_core.soft_topk_mask_forward, topk_core.mask_jvp_from_residuals, x, tangent, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mag_vjp(
    x: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, Callable[[Any], np.ndarray]]:
    """Return ``(soft_topk_mag(x, k, ...), vjp_fn)``; ``vjp_fn(u)`` is ``J^T u``, shaped like `x`.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, vjp_fn = tk.soft_topk_mag_vjp(np.array([0.1, -4.0, 3.0, 0.2]), k=2)
    >>> vjp_fn(np.ones(4))
    array([0., 1., 1., 0.])
    """
    return _vjp(
        topk_core.soft_topk_mag_forward, topk_core.mag_vjp_from_residuals, x, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )


def soft_topk_mag_jvp(
    x: Any, tangent: Any, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(soft_topk_mag(x, k, ...), J @ tangent)``.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_numpy as tk
    >>> y, y_dot = tk.soft_topk_mag_jvp(np.array([0.1, -4.0, 3.0, 0.2]), np.ones(4), k=2)
    >>> y_dot
    array([0., 1., 1., 0.])
    """
    return _jvp(
        topk_core.soft_topk_mag_forward, topk_core.mag_jvp_from_residuals, x, tangent, k, axis,
        regularization_strength=regularization_strength, p=p, method=method, max_iter=max_iter, tol=tol,
    )
