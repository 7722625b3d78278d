"""The Jacobian products of the soft operators as a JAX primitive, ``sparse_topk_product``.

The tangent rule of the soft operators is the core's closed-form product
(`topk_core.mask_jvp_from_residuals`, ...), written against the Array API.
For residuals in input order (the PAV and threshold methods' layout: one
segment per row) it is bound as a primitive of the residual fields and the
rows, linear in the rows, rather than traced as `jax.numpy` operations,
because JAX's own transpose of those operations is not the core's VJP:

* the products take a row's dominant entry (one g' above half the row's
  total) apart so that its two terms of order g' cancel exactly; JAX's
  transpose of that select put the cancellation back, and `jax.grad`,
  `jax.vjp` and `jax.jacrev` came out wrong where `jax.jvp` was right
  (p = 12, ``x = [0.5, 0.3]``, k = 1: the gradient of ``y[1]`` had 0 where
  0.39 was right; p = 8, float32 normal rows of 4, k = 2: 7.7% of the
  mask's rows off by more than 1e-3);
* on the CPU, a host callback (the core's Numba product, several times
  faster than XLA's loops over short rows) has no transpose at all.

The primitive has

* two lowerings, picked by its parameter ``on_host``: a host callback that
  runs the core's Numba product on the buffers (`topk_jax._host_call`), on
  the CPU for calls of at least HOST_PRODUCT_MIN_ENTRIES entries whose rows
  no mesh shards (`serves`); else the core's product in `jax.numpy`, on the
  rows' own device;
* a JVP rule (the product of the tangent: the residuals are constants, as
  everywhere in the adapter; second order for p != 2 is refused before here,
  by the residuals' own rule);
* a transpose rule: the mask's Jacobian is symmetric, the magnitude's
  transpose is the core's VJP, both the same primitive;
* a batching rule: a vmapped axis is one more leading axis of the rows (the
  residuals broadcast to it), so a vmap (`jax.jacrev`, ...) is one product.

Residuals with blocks (Dykstra's, p = 2) take the `jax.numpy` product as it
is (`_soft._tangent`): it has no dominant-entry form to lose.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

import topk_core
from topk_core._api import jacobian_product_into

from ._host_call import host_call

__all__ = ["HOST_PRODUCT_MIN_ENTRIES", "product", "row_form", "serves"]

# Calls of at least this many entries take the host product: below it the callback's fixed cost exceeded what
# it saved.  Jitted forward+VJP, float32, p = 4/3, with the Numba product against XLA's: 1.24-1.27x the time at
# (64, 16), 1.04-1.11x at (1024, 16), 0.89-1.09x at (256, 256), 0.65-0.95x from (4096, 64) on, but 1.08x for the
# mask's single row of 10^6 (`benchmarks/bench_jax_products.py`, table in docs/jax.md).
HOST_PRODUCT_MIN_ENTRIES = 1 << 16

product_p = Primitive("sparse_topk_product")

# The residual fields the products read, per operator, in the primitive's operand order.
_FIELDS = {"mask": ("gprime",), "mag": ("gprime", "codes", "offset")}
_TYPES = {"mask": topk_core.MaskResiduals, "mag": topk_core.MagResiduals}
_PRODUCTS = {
    ("mask", False): topk_core.mask_jvp_from_residuals, ("mask", True): topk_core.mask_vjp_from_residuals,
    ("mag", False): topk_core.mag_jvp_from_residuals, ("mag", True): topk_core.mag_vjp_from_residuals,
}


def row_form(residuals: Any) -> bool:
    """Whether the primitive takes the products of `residuals`: input order, one segment per row."""
    return residuals.perm is None and residuals.block_start is None


def serves(residuals: Any, rows: jax.Array) -> bool:
    """Whether the primitive takes the product of `residuals` with `rows`: input order (no permutation, one
    block per row) on the CPU, at least HOST_PRODUCT_MIN_ENTRIES entries, with no mesh sharding the rows (a
    callback would gather them)."""
    if not row_form(residuals) or rows.size < HOST_PRODUCT_MIN_ENTRIES:
        return False
    sharding = getattr(jax.typeof(rows), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty:
        return False
    from ._soft import _host_platform  # the adapter's rule, for tracers too (imported here: _soft imports us)

    return _host_platform(rows)


def product(kind: str, residuals: Any, rows: jax.Array, transpose: bool = False) -> jax.Array:
    """``J rows`` of operator `kind` ("mask" or "mag") from its residuals in row form (`row_form`), or
    ``J^T rows`` with `transpose`: on the host where `serves` holds, else in `jax.numpy`."""
    fields = [getattr(residuals, name) for name in _FIELDS[kind]]
    return product_p.bind(*fields, rows, kind=kind, transpose=transpose, on_host=serves(residuals, rows))


def _product_on_host(kind: str, transpose: bool, *arrays: Any, into: Any = None) -> np.ndarray:
    """The core's product on NumPy arrays with any leading axes (flattened into rows), written into XLA's
    output buffer `into` where the kernel can (`topk_jax._host_call`)."""
    *fields, rows = (np.asarray(a) for a in arrays)
    shape = rows.shape
    flat = [f.reshape(-1, f.shape[-1]) for f in fields]
    res = _TYPES[kind](None, None, None, None, *flat)  # input order: no permutation, no blocks
    out = jacobian_product_into(kind, transpose, res, rows.reshape(-1, shape[-1]), into)
    return np.asarray(out, dtype=rows.dtype).reshape(shape)


def _abstract_eval(*args: Any, kind: str, transpose: bool, on_host: bool) -> Any:
    return args[-1]  # shaped, typed and sharded as the rows


def _lowered(*args: Any, kind: str, transpose: bool, on_host: bool) -> jax.Array:
    *fields, rows = args
    if on_host:  # only where `serves` held: on the CPU
        spec = jax.ShapeDtypeStruct(rows.shape, rows.dtype)
        return host_call(functools.partial(_product_on_host, kind, transpose), spec, *args, on_cpu=True,
                         writes_into=True)
    # The core's product in jax.numpy, on (batch, n) rows (a vmap adds leading axes).
    flat = [f.reshape(-1, f.shape[-1]) for f in fields]
    res = _TYPES[kind](None, None, None, None, *flat)
    out = _PRODUCTS[kind, transpose](res, rows.reshape(-1, rows.shape[-1]), axis=-1, xp=jnp)
    return out.reshape(rows.shape)


def _jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...], **params: Any) -> tuple[Any, Any]:
    out = product_p.bind(*primals, **params)
    rows_dot = tangents[-1]
    if type(rows_dot) is ad.Zero:
        return out, ad.Zero(rows_dot.aval)  # the output is shaped like the rows
    return out, product_p.bind(*primals[:-1], rows_dot, **params)


def _transpose(cotangent: Any, *args: Any, kind: str, transpose: bool, on_host: bool) -> list[Any]:
    *fields, rows = args
    if any(ad.is_undefined_primal(f) for f in fields):
        raise NotImplementedError("sparse_topk_product is linear in its rows only; the residuals are constants")
    if type(cotangent) is ad.Zero:
        return [None] * len(fields) + [ad.Zero(rows.aval)]
    return [None] * len(fields) + [product_p.bind(*fields, cotangent, kind=kind, transpose=not transpose,
                                                  on_host=on_host)]


def _batch(axis_data: Any, args: tuple[Any, ...], dims: tuple[Any, ...], **params: Any) -> tuple[Any, Any]:
    if all(d is None for d in dims):
        return product_p.bind(*args, **params), None
    # JAX's own broadcast of the unbatched operands: under an explicit mesh it shards the new axis as the
    # vmapped one is (a plain broadcast left it replicated, and the products' selects refused the mix).
    moved = [batching.bdim_at_front(a, d, axis_data.size, axis_data.explicit_mesh_axis)
             for a, d in zip(args, dims, strict=True)]
    return product_p.bind(*moved, **params), 0


# Eager application compiles the primitive like any other (JAX's own rule for primitives with a lowering).
product_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, product_p))
product_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(product_p, mlir.lower_fun(_lowered, multiple_results=False))
ad.primitive_jvps[product_p] = _jvp
ad.primitive_transposes[product_p] = _transpose
batching.fancy_primitive_batchers[product_p] = _batch
