"""The Jacobian products on the CPU as a JAX primitive that runs the core's Numba product on the host.

The tangent rule of the soft operators is the core's closed-form product
written against the Array API; evaluated with `jax.numpy`, XLA compiles it
into loops over the rows; with them the magnitude's jitted forward+VJP took
2.2x its time with the core's Numba product at (262144, 16) and (1, 10^6), and
1.15-1.5x from (4096, 64) on (float32; `benchmarks/bench_jax_products.py`,
table in docs/jax.md).  A host callback alone
would not do: `jax.grad` transposes the tangent rule, and a callback has no
transpose.  So the product is a primitive, ``sparse_topk_host_product``, of
the residual fields and the rows, linear in the rows, with

* a lowering to a host callback that runs the core's product on the buffers
  (`topk_jax._host_call`);
* a JVP rule: the product of the rows' tangent, plus, where the residuals
  have tangents (second order for p != 2, where g' moves with x), the
  derivative of the core's `jax.numpy` product in them;
* a transpose rule: the mask's Jacobian is symmetric, the magnitude's
  transpose is the core's VJP, both the same primitive;
* a batching rule: a vmapped axis is one more leading axis of the rows (the
  residuals broadcast to it), so a vmap (`jax.jacrev`, ...) is one host call.

Used for residuals in input order (the PAV and threshold methods' layout) on
the CPU, for calls of at least HOST_PRODUCT_MIN_ENTRIES entries, when no mesh
shards the rows (`_soft._tangent`); elsewhere the `jax.numpy` product.
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
from topk_core._agnostic import jacobians
from topk_core._api import jacobian_product_into

from ._host_call import host_call

__all__ = ["HOST_PRODUCT_MIN_ENTRIES", "host_product", "serves"]

# Calls of at least this many entries take the host product: below it the callback's fixed cost exceeded what
# it saved.  Jitted forward+VJP, float32, p = 4/3, with the Numba product against XLA's: 1.24-1.27x the time at
# (64, 16), 1.04-1.11x at (1024, 16), 0.89-1.09x at (256, 256), 0.65-0.95x from (4096, 64) on, but 1.08x for the
# mask's single row of 10^6 (`benchmarks/bench_jax_products.py`, table in docs/jax.md).
HOST_PRODUCT_MIN_ENTRIES = 1 << 16

host_product_p = Primitive("sparse_topk_host_product")

# The residual fields the products read, per operator, in the primitive's operand order.
_FIELDS = {"mask": ("gprime",), "mag": ("gprime", "codes", "offset")}
_TYPES = {"mask": topk_core.MaskResiduals, "mag": topk_core.MagResiduals}


def serves(residuals: Any, rows: jax.Array) -> bool:
    """Whether the primitive takes the product of `residuals` with `rows`: input order (no permutation, one
    block per row) on the CPU, at least HOST_PRODUCT_MIN_ENTRIES entries, with no mesh sharding the rows (a
    callback would gather them)."""
    if residuals.perm is not None or residuals.block_start is not None or rows.size < HOST_PRODUCT_MIN_ENTRIES:
        return False
    sharding = getattr(jax.typeof(rows), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty:
        return False
    from ._soft import _host_platform  # the adapter's rule, for tracers too (imported here: _soft imports us)

    return _host_platform(rows)


def host_product(kind: str, residuals: Any, rows: jax.Array, transpose: bool = False) -> jax.Array:
    """``J rows`` of operator `kind` ("mask" or "mag") from its residuals, or ``J^T rows`` with `transpose`."""
    fields = [getattr(residuals, name) for name in _FIELDS[kind]]
    return host_product_p.bind(*fields, rows, kind=kind, transpose=transpose)


def _product_on_host(kind: str, transpose: bool, *arrays: Any, into: Any = None) -> np.ndarray:
    """The core's product on NumPy arrays with any leading axes (flattened into rows), written into XLA's
    output buffer `into` where the kernel can (`topk_jax._host_call`)."""
    *fields, rows = (np.asarray(a) for a in arrays)
    shape = rows.shape
    flat = [f.reshape(-1, f.shape[-1]) for f in fields]
    res = _TYPES[kind](None, None, None, None, *flat)  # input order: no permutation, no blocks
    out = jacobian_product_into(kind, transpose, res, rows.reshape(-1, shape[-1]), into)
    return np.asarray(out, dtype=rows.dtype).reshape(shape)


def _abstract_eval(*args: Any, kind: str, transpose: bool) -> Any:
    rows = args[-1]
    return jax.core.ShapedArray(rows.shape, rows.dtype)


def _callback_product(*args: Any, kind: str, transpose: bool) -> jax.Array:
    rows = args[-1]
    spec = jax.ShapeDtypeStruct(rows.shape, rows.dtype)
    # Lowered only where `serves` held: on the CPU.
    return host_call(functools.partial(_product_on_host, kind, transpose), spec, *args, on_cpu=True,
                     writes_into=True)


def _jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...], *, kind: str, transpose: bool) -> tuple[Any, Any]:
    out = host_product_p.bind(*primals, kind=kind, transpose=transpose)
    *fields, rows = primals
    *field_dots, rows_dot = tangents
    terms = []
    if type(rows_dot) is not ad.Zero:
        terms.append(host_product_p.bind(*fields, rows_dot, kind=kind, transpose=transpose))
    if any(type(t) is not ad.Zero and t.dtype != jax.dtypes.float0 for t in field_dots):
        terms.append(_residual_term(kind, transpose, fields, field_dots, rows))
    if not terms:
        return out, ad.Zero(rows.aval)  # the output is shaped like the rows
    return out, functools.reduce(jnp.add, terms)


def _residual_term(kind: str, transpose: bool, fields: list[Any], field_dots: list[Any], rows: Any) -> Any:
    """The product's derivative in its residuals (second order for p != 2: g' moves with x), by the core's
    `jax.numpy` product, which is linear in the tangents it is given here."""
    floating = [i for i, f in enumerate(fields) if jnp.issubdtype(f.dtype, jnp.floating)]

    def product(*values: Any) -> Any:
        current = list(fields)
        for i, value in zip(floating, values, strict=True):
            current[i] = value
        res = _TYPES[kind](None, None, None, None, *current)
        if kind == "mask":
            return jacobians.mask_jvp_rows(res, rows, jnp)
        return (jacobians.mag_vjp_rows if transpose else jacobians.mag_jvp_rows)(res, rows, jnp)

    dots = [ad.instantiate_zeros(field_dots[i]) for i in floating]
    return jax.jvp(product, [fields[i] for i in floating], dots)[1]


def _transpose(cotangent: Any, *args: Any, kind: str, transpose: bool) -> list[Any]:
    *fields, rows = args
    if any(ad.is_undefined_primal(f) for f in fields):
        raise NotImplementedError("sparse_topk_host_product is linear in its rows only; the residuals are constants")
    if type(cotangent) is ad.Zero:
        return [None] * len(fields) + [ad.Zero(rows.aval)]
    return [None] * len(fields) + [host_product_p.bind(*fields, cotangent, kind=kind, transpose=not transpose)]


def _batch(args: tuple[Any, ...], dims: tuple[Any, ...], *, kind: str, transpose: bool) -> tuple[Any, int]:
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    moved = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims, strict=True)
    ]
    return host_product_p.bind(*moved, kind=kind, transpose=transpose), 0


# Eager application compiles the primitive like any other (JAX's own rule for primitives with a lowering).
host_product_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, host_product_p))
host_product_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(host_product_p, mlir.lower_fun(_callback_product, multiple_results=False))
ad.primitive_jvps[host_product_p] = _jvp
ad.primitive_transposes[host_product_p] = _transpose
batching.primitive_batchers[host_product_p] = _batch
