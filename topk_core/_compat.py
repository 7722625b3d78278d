"""The only importer of `array_api_compat`: namespace and device helpers."""

from __future__ import annotations

from typing import Any

from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_numpy_array,
    is_numpy_namespace,
    size,
    to_device,
)

__all__ = [
    "array_namespace",
    "default_int",
    "device",
    "is_array_api_obj",
    "is_numpy_array",
    "is_numpy_namespace",
    "is_plain_numpy",
    "library_name",
    "namespace_of",
    "size",
    "to_device",
]


def namespace_of(x: Any, xp: Any = None) -> Any:
    """Return `xp` if given, else the Array-API namespace of `x` (TypeError if none)."""
    if xp is not None:
        if not hasattr(x, "dtype"):
            raise TypeError(
                f"`x` must be an array of the library of `xp` ({library_name(xp)}); got {type(x).__name__}"
            )
        return xp
    try:
        return array_namespace(x)
    except TypeError as err:
        raise TypeError(
            f"`x` must be an array of a library that implements the Array API "
            f"(numpy, torch, jax, array_api_strict, ...); got {type(x).__name__}"
        ) from err


def library_name(xp: Any) -> str:
    """The library behind a namespace, for messages: 'numpy' for numpy and array-api-compat's wrapper of
    it, 'jax' for jax.numpy, 'torch', 'array_api_strict'."""
    name = getattr(xp, "__name__", None)
    if not isinstance(name, str):
        return repr(xp)
    return name.removeprefix("array_api_compat.").split(".")[0]


def is_plain_numpy(xp: Any) -> bool:
    """Whether `xp` is NumPy (or array-api-compat's wrapper of it), by name: `is_numpy_namespace`
    caches its answers, and torch.compile refuses to trace a cached function."""
    return getattr(xp, "__name__", None) in ("numpy", "array_api_compat.numpy")


def default_int(xp: Any) -> Any:
    """The namespace's default integer dtype (int32 in JAX without x64, int64 elsewhere)."""
    return xp.__array_namespace_info__().default_dtypes()["integral"]
