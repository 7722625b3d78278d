"""Argument checks shared by every backend, with one message style.

Every message names the argument, the value received and the allowed range,
and every check runs before any computation.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

from numba import config as numba_config

from ._compat import array_namespace, library_name

METHODS = ("auto", "pav", "dykstra", "threshold")
PAV_EXACT_MAX_P = 8.0
"""The largest p that PAV serves: above it ``method="auto"`` runs the threshold method where it would
run PAV (host arrays), and an explicit ``method="pav"`` raises ValueError.  PAV decides its blocks on
the float keys, and for large p a free entry's distance to the threshold, ``l y^(p-1)``, falls below a
key's rounding: its kernel, which solves again in the frame of the key next to the value, matched the
threshold method to 7e-12 on a fuzz up to p = 8 (four seeds of `benchmarks/pav_vs_threshold.py`, and
their residual sets on every row), but from p = 10 on it misses on ties of tiny keys (2e-9 at p = 10)
and spanning rows, 0.29 (mask, spanning rows) and 0.6 (magnitude, ties of tiny keys) at p = 50 (`--p 50
--seed 12`).  The threshold method is exact there (docs/methods.md, known limits).  Up to commit
62fd162 the line was at 4; on the CPU the threshold method takes 11-53 times PAV's time at p = 5 to 8
(NumPy, float32 rows of 64: `benchmarks/ab_versions.py 62fd162 --p 6`)."""
# The floating dtypes the operators take (names as `str(dtype)` ends): float16 and bfloat16 are computed
# in float32 (`_api.compute_dtype`), the others natively.
SUPPORTED_FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
# Methods with an iteration loop, the only ones that take `max_iter` and `tol`.
ITERATIVE_METHODS = ("dykstra", "threshold")


def check_float_dtype(x: Any, xp: Any, name: str = "x") -> None:
    """Raise TypeError unless `x` (the argument called `name`) has a real floating dtype."""
    dtype = x.dtype
    try:
        ok = xp.isdtype(dtype, "real floating")
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok and str(dtype) == "bfloat16" and type(x).__module__ == "numpy":
        # ml_dtypes' bfloat16 (what np.asarray gives for a JAX bfloat16 array) is no Array-API dtype.
        raise TypeError(
            f"`{name}` is a NumPy array of ml_dtypes.bfloat16, which is not an Array-API dtype: use "
            f"topk_numpy (it computes bfloat16 in float32 and returns bfloat16), or cast, e.g. "
            f"{name}.astype(numpy.float32)."
        )
    if not ok:
        _check_same_library(x, xp, name)
        raise TypeError(
            f"`{name}` must have a real floating dtype (float16, bfloat16, float32 or float64); "
            f"got dtype {dtype}. Cast integer or boolean inputs explicitly, e.g. {_float32_cast(xp, name)}."
        )
    if str(dtype).rsplit(".", 1)[-1] not in SUPPORTED_FLOATS:
        # Other floating dtypes pass `isdtype`: NumPy's longdouble (float128) was computed in float32, less
        # precision than float64, and returned as float128 without a word; torch's float8 reached the
        # soft operators' float32 path and torch's sort in the hard ones (NotImplementedError).
        raise TypeError(
            f"`{name}` must have one of the floating dtypes float16, bfloat16, float32 or float64; got dtype "
            f"{dtype}. Cast it explicitly, e.g. to float64 (or to float32 from float8)."
        )


# How each library's users write a cast to float32 (a tensor has no `astype`), by `library_name`.
_FLOAT32_CASTS = {"torch": "{}.to(torch.float32)", "numpy": "{}.astype(numpy.float32)",
                  "jax": "{}.astype(jax.numpy.float32)"}


def _float32_cast(xp: Any, name: str) -> str:
    """The cast of the argument `name` to float32 as users of `xp`'s library write it (`xp` is the argument's
    library: `_check_same_library` has run)."""
    return _FLOAT32_CASTS.get(library_name(xp), "xp.astype({}, xp.float32)").format(name)


def _check_same_library(x: Any, xp: Any, name: str) -> None:
    """Name a namespace `xp` passed explicitly that is not `x`'s library (its dtype check fails then, and
    a dtype message would mislead)."""
    try:
        own = array_namespace(x)
    except TypeError:
        return
    if library_name(own) != library_name(xp):
        raise TypeError(
            f"`xp` ({library_name(xp)}) is not the library of `{name}` ({library_name(own)}): pass the "
            f"namespace of `{name}`'s library, or xp=None to take it from `{name}`"
        )


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Return `axis` (the argument called `name`) normalized to [0, ndim)."""
    if ndim == 0:
        raise ValueError("`x` must have at least one dimension; got a 0-d array (a scalar)")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`{name}` must be an int in [{-ndim}, {ndim - 1}]; got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"`{name}` must be an int in [{-ndim}, {ndim - 1}] for an array of ndim {ndim}; got {axis}")
    return axis % ndim


def check_k(k: Any, n: int, axis: int) -> int:
    """Return `k` as an int after checking 1 <= k <= n."""
    if n == 0:
        raise ValueError(f"`x` has an empty axis {axis} (n = 0): top-k needs at least one entry along `axis`")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        k = _zero_d_number(k, integral=True, message=(
            f"`k` must be a Python int with 1 <= k <= n = {n}; got {k!r} of type {type(k).__name__}{_traced_hint(k)}"
        ))
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"`k` must satisfy 1 <= k <= n = {n} (the length of axis {axis}); got k = {k}")
    return k


def _traced(value: Any) -> bool:
    return "Tracer" in type(value).__name__


def _zero_d_number(value: Any, integral: bool, message: str) -> int | float:
    """The Python number of a concrete 0-d array (NumPy, JAX, torch: `jnp.float32(0.5)`, `torch.tensor(2)`),
    an integer one where `integral`; else TypeError(`message`)."""
    dtype = str(getattr(value, "dtype", ""))
    if not _traced(value) and getattr(value, "ndim", None) == 0 and "bool" not in dtype and "complex" not in dtype:
        try:
            if integral:
                if "int" in dtype:
                    return operator.index(value)
            elif "int" in dtype or "float" in dtype:
                return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(message)


def _traced_hint(value: Any) -> str:
    """A hint for a value traced by JAX (which the operators cannot take: k, p and the strength set the
    computation), else ''."""
    if not _traced(value):
        return ""
    name = type(value).__name__
    if any(kind in name for kind in ("JVP", "Linearize", "Grad")):
        return (": a value traced by differentiation. The operators take k, p and the strength as constants "
                "(derivatives are with respect to x only): close over a Python number")
    return (": a traced value. Under jax.jit, pass it as a static argument "
            "(jax.jit(f, static_argnames=...) or static_argnums=...), or close over a Python number")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        value = _zero_d_number(value, integral=False, message=(
            f"`{name}` must be a real number; got {value!r} of type {type(value).__name__}{_traced_hint(value)}"
        ))
    value = float(value)
    # (Not math.isfinite: under torch.compile a strength that changed between calls is a symbolic float,
    # which math.isfinite cannot take; a comparison it can.  Finite <=> x - x == 0.)
    if not value - value == 0.0:
        raise ValueError(f"`{name}` must be finite; got {value}")
    return value


def check_strength(regularization_strength: Any) -> float:
    """Return the strength as a float after checking it is finite and > 0."""
    value = _check_real("regularization_strength", regularization_strength)
    if not value > 0.0:
        raise ValueError(f"`regularization_strength` must be a finite float > 0; got {value}")
    return value


def check_strength_in_dtype(lam: float, dtype: Any, xp: Any, method: str) -> None:
    """The threshold and Dykstra methods compute in the input's floating dtype: `lam` must be a normal
    number of it (a float32 strength of 1e-50 is 0 there, and the result was NaN)."""
    smallest = float(xp.finfo(dtype).smallest_normal)
    if lam < smallest:
        raise ValueError(
            f"`regularization_strength` = {lam:.3g} is below the smallest normal number ({smallest:.3g}) of "
            f"{dtype}, the dtype method={method!r} computes in: pass float64 inputs, or use method='pav' "
            "(CPU, computes in float64)"
        )


def check_p(p: Any) -> float:
    """Return `p` as a float after checking it is finite and > 1."""
    value = _check_real("p", p)
    if not value > 1.0:
        raise ValueError(f"`p` must be a finite float > 1 (p = 4/3 and p = 2 are the usual choices); got {value}")
    return value


def numba_jit_enabled() -> bool:
    """Whether Numba compiles: not with ``NUMBA_DISABLE_JIT=1`` (set to debug other Numba code), under which the PAV
    kernels cannot run (their intrinsics have no Python form)."""
    return not numba_config.DISABLE_JIT


def check_method(method: Any, p: float, max_iter: Any, tol: Any, auto: str = "pav") -> str:
    """Return the method that will run after checking that it can serve `p` and its controls.

    `auto` is the method that ``method="auto"`` resolves to for the array at
    hand (the delegation layer picks it by backend and device); where it is
    ``"pav"`` and Numba's JIT is disabled (`numba_jit_enabled`), "auto" runs
    ``"threshold"`` instead, and an explicit ``"pav"`` is refused; so it is
    for ``p > PAV_EXACT_MAX_P``, where PAV is not exact.  ``"dykstra"``
    solves p = 2 only.  `max_iter` (int >= 1) and `tol` (finite float > 0)
    are accepted by the iterative methods named explicitly and must be None
    for ``"pav"`` and ``"auto"``.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
    resolved = auto if method == "auto" else method
    if resolved == "pav" and p > PAV_EXACT_MAX_P:
        if method == "pav":
            raise ValueError(
                f"method='pav' is exact for p <= {PAV_EXACT_MAX_P:g} only; got p = {p}. Above it PAV's blocks, decided "
                "on the float keys, miss entries whose distance to the threshold falls below a key's rounding "
                "(outputs up to 0.6 off at p = 50). Use method='threshold' (exact, any p > 1) or 'auto', "
                "which picks it there"
            )
        resolved = "threshold"
    if resolved == "pav" and not numba_jit_enabled():
        if method == "pav":
            raise ValueError(
                "method='pav' runs Numba kernels, and Numba's JIT is disabled here (NUMBA_DISABLE_JIT is set); "
                "use method='threshold' (exact, in the array's own library) or 'auto', which picks it then"
            )
        resolved = "threshold"
    if resolved == "dykstra" and abs(p - 2.0) > 1e-12:
        raise ValueError(
            f"method='dykstra' solves the p = 2 operators only (a Euclidean projection); got p = {p}. "
            f"Use method='threshold' (exact, any p > 1) or 'pav' (exact, p <= {PAV_EXACT_MAX_P:g})"
        )
    if resolved not in ITERATIVE_METHODS or method == "auto":
        if max_iter is not None or tol is not None:
            picked = f"picks {resolved!r} here" if method == "auto" else f"is the exact {resolved!r} solver"
            raise ValueError(
                f"`max_iter` and `tol` control the iterative methods only ({', '.join(map(repr, ITERATIVE_METHODS))},"
                f" named explicitly); method={method!r} {picked} and takes neither (got max_iter={max_iter!r}, "
                f"tol={tol!r}); leave them as None"
            )
        return resolved
    if max_iter is not None:
        if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral):
            raise TypeError(
                f"`max_iter` must be a Python int >= 1 or None; got {max_iter!r} of type {type(max_iter).__name__}"
            )
        if max_iter < 1:
            raise ValueError(f"`max_iter` must be an int >= 1 or None (the method's default); got {max_iter}")
    if tol is not None:
        value = _check_real("tol", tol)
        if not value > 0.0:
            raise ValueError(f"`tol` must be a finite float > 0 or None (the method's default); got {value}")
    return resolved


def check_same_shape(name: str, value: Any, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless `value` has exactly `shape`."""
    got = tuple(getattr(value, "shape", ()))
    if got != tuple(shape):
        raise ValueError(f"`{name}` must have the shape of `x`, {tuple(shape)}; got shape {got}")
