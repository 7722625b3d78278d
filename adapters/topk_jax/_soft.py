"""Soft operators for JAX: one module-level `jax.custom_jvp` per operator.

Layout.  The public functions (in `topk_jax`) validate the Python scalars
eagerly, resolve ``method="auto"`` for the input's device (`resolve_method`),
move the axis last and flatten to ``(batch, n)`` rows with `jax.numpy`, and
call `soft_topk_mask_rows` / `soft_topk_mag_rows` defined here.  These are
`jax.custom_jvp` functions of the rows with one static (hashable) argument,
`Static`, whose `method` is the resolved solver ("pav", "threshold" or
"dykstra").

Primal path, two kinds of solvers:

* ``"threshold"`` and ``"dykstra"`` (`NATIVE_METHODS`): the core's pure
  Array-API solvers run in `jax.numpy` (``xp=jnp``), on the rows' own device,
  with their root-finding / projection loop as one ``jax.lax.while_loop`` (the
  solvers' ``loop=`` hook), so that `jax.jit` compiles one loop body instead
  of unrolling ``max_iter`` iterations.  They run inside the custom_jvp
  primal: autodiff never goes through the iterations.  No callback, no host
  round trip; `jax.vmap` batches the loop like any JAX code.
* ``"pav"``: the core's forward (the Numba PAV) runs on the host through
  a callback (`topk_jax._host_call`: `jax.experimental.buffer_callback` on
  the CPU where JAX has it, which writes into XLA's output buffers;
  `jax.pure_callback` otherwise).  Without differentiation the callback
  returns only the output; under differentiation one call also returns the residuals (the
  arrays of `topk_core.MaskResiduals` / `MagResiduals` that the method uses;
  which ones is found once per configuration while tracing).  The call is
  wrapped in a `jax.custom_batching.custom_vmap` whose rule treats a vmapped
  axis as one more leading axis of the rows: the whole batch goes to one host
  call, never one round trip per row (the callback itself also declares
  ``vmap_method="broadcast_all"``).  `topk_jax._sharding.per_shard` runs it
  once per device on local rows when the input is sharded.

``method="auto"`` (`auto_method`): PAV through the callback when the rows live
on the CPU (the fastest exact method there, see docs/methods.md), the
threshold method on the device otherwise (GPU, TPU, ...).  Under tracing the
platform is read from the input's mesh when it has one, else from
`jax.default_backend()`.

Tangent rule.  `topk_core.mask_jvp_from_residuals` /
`topk_core.mag_jvp_from_residuals`, evaluated with ``xp=jax.numpy`` on the
residuals: gathers, elementwise operations and segment sums, linear in the
tangent, so JAX transposes it for `jax.grad`, `jax.vjp` and `jax.jacrev`.
On the CPU, for calls of at least `_host_products.HOST_PRODUCT_MIN_ENTRIES`
entries with residuals in input order, the same products run on the host
instead (the core's Numba kernels), through a primitive with its own JVP,
transpose and batching rules (`topk_jax._host_products`).  Tangents never go
through a solver loop.

Second order.  The residuals come from a second `jax.custom_jvp`
(`_solve_*`) whose own rule says what differentiating the residuals means:
the orders, blocks, set codes and counts are locally constant (almost
everywhere), and g' moves with x by ``dg' = rate * dy``
(`topk_core._agnostic.jacobians.gprime_jvp_rows`; rate = 0 for p = 2, where
both operators are piecewise linear).  The tangent rule differentiated again
is then exact to any order: its own ingredients (y, the residuals) are outputs
of the same rules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import topk_core
from topk_core import _validate
from topk_core._agnostic.dykstra import dykstra_mag, dykstra_mask
from topk_core._agnostic.jacobians import gprime_jvp_rows
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._agnostic.residuals import with_gprime
from topk_core._agnostic.threshold import threshold_mag, threshold_mask
from topk_core._api import soft_forward_into
from topk_jax import _host_call, _host_products
from topk_jax._sharding import per_shard

__all__ = [
    "NATIVE_METHODS", "Static", "auto_method", "device_platforms", "resolve_method", "soft_topk_mag_rows",
    "soft_topk_mask_rows",
]

NATIVE_METHODS = ("threshold", "dykstra")
"""Methods that run in `jax.numpy` on the array's device (no callback)."""


def device_platforms(x: jax.Array) -> frozenset[str]:
    """The platforms ("cpu", "gpu", "tpu", ...) of the devices that hold `x`.

    Concrete arrays: their devices.  Tracers (under `jax.jit`, `jax.vmap`,
    ...): the platform of the input's mesh when it has one, else the default
    backend, where an un-placed jitted computation runs.
    """
    if not isinstance(x, jax.core.Tracer):
        try:
            return frozenset(d.platform for d in x.devices())
        except Exception:  # deleted or exotic arrays: fall back to the tracer rule
            pass
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
    return frozenset({platform if platform is not None else jax.default_backend()})


def _host_platform(rows: jax.Array) -> bool:
    """Whether `rows` live on the CPU (`device_platforms`): host memory, which callbacks can see in place."""
    return device_platforms(rows) == {"cpu"}


def auto_method(x: jax.Array) -> str:
    """What ``method="auto"`` runs for `x`: "pav" (host callback) on the CPU, "threshold" on any other device.

    The rule of `topk_core._api.auto_method` for JAX arrays, extended to
    tracers (see `device_platforms`).
    """
    return "pav" if _host_platform(x) else "threshold"


def resolve_method(x: jax.Array, p: float, method: Any, max_iter: Any, tol: Any) -> str:
    """Validate `method` and its controls (errors of `topk_numpy`) and return the solver that will run."""
    return _validate.check_method(method, p, max_iter, tol, auto=auto_method(x))


@dataclasses.dataclass(frozen=True)
class Static:
    """The validated Python scalars of one soft call: static under `jax.jit`, hashable."""

    k: int
    regularization_strength: float
    p: float
    method: str
    max_iter: int | None
    tol: float | None

    @property
    def piecewise_linear(self) -> bool:
        """True for p = 2, where both operators are piecewise linear in x."""
        return conjugate_exponent(self.p) == 2.0

    def keywords(self) -> dict[str, Any]:
        """Keyword arguments of the core's forward functions (the axis is always the last)."""
        return {
            "regularization_strength": self.regularization_strength,
            "p": self.p,
            "axis": -1,
            "method": self.method,
            "max_iter": self.max_iter,
            "tol": self.tol,
        }


class _Operator(NamedTuple):
    name: str
    kind: str
    forward: Callable[..., tuple[Any, Any]]
    residuals: type
    jvp: Callable[..., Any]
    threshold: Callable[..., tuple[Any, Any]]
    dykstra: Callable[..., tuple[Any, Any]]


_MASK = _Operator(
    "soft_topk_mask", "mask", topk_core.soft_topk_mask_forward, topk_core.MaskResiduals,
    topk_core.mask_jvp_from_residuals, threshold_mask, dykstra_mask,
)
_MAG = _Operator(
    "soft_topk_mag", "mag", topk_core.soft_topk_mag_forward, topk_core.MagResiduals,
    topk_core.mag_jvp_from_residuals, threshold_mag, dykstra_mag,
)


@functools.lru_cache(maxsize=512)
def _residual_layout(op: _Operator, static: Static, dtype: np.dtype, n: int) -> tuple[Any, ...]:
    """What the core's forward returns as residuals for this configuration.

    One entry per residual field: None when the method does not use the field
    (e.g. no permutation for methods that work in input order), else
    ``(dtype on the JAX side, size of the last axis)`` (``n``, or 1 for per-row
    scalars).  Found once, while tracing, by running the forward on no rows
    (the core runs no kernel for them, and compiles none: one row of zeros
    compiled the serial kernels in the rows' dtype, 24 s or more on an empty
    Numba cache): `jax.pure_callback` needs the structure before the data.
    Indices become int32 (valid for n < 2**31 and usable with x64 disabled).
    Narrower integers and bools keep their dtype.
    """
    _, res = op.forward(np.zeros((0, n), dtype=dtype), static.k, **static.keywords())
    layout = []
    for value in res:
        if value is None:
            layout.append(None)
            continue
        core_dtype = np.asarray(value).dtype
        if core_dtype.kind in "iu" and core_dtype.itemsize >= 4:
            field_dtype = np.int32  # indices
        elif core_dtype.kind in "iub":
            field_dtype = core_dtype  # int8 signs, bools
        else:
            field_dtype = dtype
        layout.append((np.dtype(field_dtype), np.shape(value)[-1]))
    return tuple(layout)


def _host_residuals(op: _Operator, res: Any, layout: tuple[Any, ...], lead: tuple[int, ...]) -> Any:
    """The core's residuals as contiguous arrays of the declared dtypes, shaped ``(*lead, last)``."""
    batch = int(np.prod(lead))
    fields = []
    for value, entry in zip(res, layout, strict=True):
        if entry is None:
            fields.append(None)
            continue
        field_dtype, last = entry
        array = np.broadcast_to(np.asarray(value, dtype=field_dtype), (batch, last))
        fields.append(np.ascontiguousarray(array).reshape((*lead, last)))
    return op.residuals(*fields)


@functools.lru_cache(maxsize=512)
def _host_callback(op: _Operator, static: Static, with_residuals: bool) -> Callable[[Any], Any]:
    """The host function for `jax.pure_callback`, one object per configuration.

    Cached so that eager (un-jitted) calls with the same configuration reuse
    the compiled callback instead of compiling a new one each time.
    """

    def callback(rows: Any, into: Any = None) -> Any:
        # JAX hands over jax.Arrays (or NumPy arrays, depending on the version);
        # Numba wants NumPy, so convert explicitly (no copy on the CPU backend).
        rows = np.asarray(rows)
        shape, dtype = rows.shape, rows.dtype
        # Extra leading axes (a vmapped batch) are flattened into rows, so the
        # whole batch goes through one call of the core.
        flat = rows.reshape(-1, shape[-1])
        # `into`: XLA's output buffers (`_host_call`), which the core's kernels write where they can.
        targets = None if into is None else (into if with_residuals else (into, None))
        y, res = soft_forward_into(
            op.kind, flat, static.k, targets, with_residuals=with_residuals, **static.keywords()
        )
        if not with_residuals:
            return np.asarray(y, dtype=dtype).reshape(shape)
        layout = _residual_layout(op, static, dtype, shape[-1])
        return np.asarray(y, dtype=dtype).reshape(shape), _host_residuals(op, res, layout, shape[:-1])

    return callback


def _result_spec(op: _Operator, static: Static, rows: jax.Array, with_residuals: bool) -> Any:
    y_spec = jax.ShapeDtypeStruct(rows.shape, rows.dtype)
    if not with_residuals:
        return y_spec
    layout = _residual_layout(op, static, np.dtype(rows.dtype), rows.shape[-1])
    fields = (
        None if entry is None else jax.ShapeDtypeStruct((*rows.shape[:-1], entry[1]), entry[0]) for entry in layout
    )
    return y_spec, op.residuals(*fields)


@functools.lru_cache(maxsize=512)
def _host_solver(op: _Operator, static: Static, with_residuals: bool) -> Callable[[jax.Array], Any]:
    """The host solve as a JAX function of rows with any number of leading axes.

    A `jax.custom_batching.custom_vmap`: under `jax.vmap` its rule calls it
    again on the batched rows (the batch axis is just one more leading axis),
    so the sharding of a vmapped axis is visible to `per_shard`, and the whole
    batch still goes to one host call (per device).
    """
    callback = _host_callback(op, static, with_residuals)

    def host(rows: jax.Array) -> Any:
        spec = _result_spec(op, static, rows, with_residuals)
        return _host_call.host_call(
            callback, spec, rows, on_cpu=_host_platform(rows), vmap_method="broadcast_all", writes_into=True
        )

    @jax.custom_batching.custom_vmap
    def solver(rows: jax.Array) -> Any:
        return per_shard(host, rows, rows.ndim - 1, leading=True)

    @solver.def_vmap
    def _solver_vmap(axis_size: int, in_batched: list[bool], rows: jax.Array) -> Any:
        del axis_size, in_batched  # one argument, batched on its leading axis
        out = solver(rows)
        return out, jax.tree.map(lambda _: True, out)

    return solver


def _native_solve(
    op: _Operator, rows: jax.Array, lam: jax.Array, *, k: int, p: float, method: str, max_iter: int | None,
    tol: float | None,
) -> tuple[jax.Array, Any]:
    """The core's Array-API solver in `jax.numpy`, on the rows' device: `(y, residuals)`.

    `lam`: the strength, a 0-d array of the rows' dtype (traced: see `_native_solver`).  Its loop is one
    `jax.lax.while_loop` (fixed shapes, early exit per batch), never `max_iter` unrolled iterations.
    """
    solver = getattr(op, method)
    # The threshold method's start from the order statistics (`_order_statistics`) on accelerators only:
    # XLA's top_k on the CPU took 48 ms for (65536, 64) float32 rows (7 keys each), as long as two
    # iterations of the loop, and the jitted magnitude then took 1.6x its time without it although its
    # loop ran 4 iterations instead of 11 (`benchmarks/ab_versions.py --jax`).  (JAX on the CPU runs
    # `"pav"` unless asked otherwise.)
    hooks = {}
    if method == "threshold" and jax.default_backend() != "cpu":
        hooks["order_statistics"] = _order_statistics
    return solver(
        rows, k, lam, conjugate_exponent(p), jnp, max_iter=max_iter, tol=tol, loop=jax.lax.while_loop, **hooks,
    )


@functools.lru_cache(maxsize=32)
def _native_solver(
    op: _Operator, k: int, p: float, method: str, max_iter: int | None, tol: float | None,
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]:
    """`_native_solve` for one configuration as one `jax.jit` function of ``(rows, lam)``.

    Under an outer `jax.jit` it is inlined like any nested jit.  Called eagerly, the solve compiles
    once per shape and dtype and then runs as one program.  Dispatched operation by operation (about
    1,500 for the threshold method), an eager p = 4/3 call on (9, 3) float64 rows on the CPU took 5 s
    for each new shape (a small XLA program per operation) and 0.5 s for each call afterwards; jitted,
    2 s the first time and under a millisecond afterwards.

    The strength is an argument, not part of the configuration: with it in the configuration, every
    new strength of an eager call (a strength annealed during training, docs/choosing.md) compiled and
    kept a new program, about 3 s and 277 memory maps each, until the process ran out of memory maps
    (vm.max_map_count) and aborted ("LLVM ERROR: Unable to allocate section memory!").  p, k and the
    controls stay static: the solvers branch on q in Python, k sizes arrays, the controls pick their
    defaults by dtype.  The cache's bound bounds the programs kept alive (one per configuration and
    shape; an evicted configuration's programs are freed): 512 configurations could hold more memory
    maps than Linux allows a process by default (65,530).
    """
    return jax.jit(
        functools.partial(_native_solve, op, k=k, p=p, method=method, max_iter=max_iter, tol=tol)
    )


def _order_statistics(keys: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The threshold method's start (`topk_core._agnostic.threshold.OrderStatistics`): the k-th and
    (k+1)-th largest keys of each row, (batch, 1) each, by `jax.lax.top_k`."""
    top = jax.lax.top_k(keys, k + 1)[0]
    return top[..., k - 1:k], top[..., k:k + 1]


def _solve(op: _Operator, rows: jax.Array, static: Static, with_residuals: bool) -> Any:
    """Run the solver: `y`, or `(y, residuals)` in (batch, n) layout.

    Threshold and Dykstra run natively in `jax.numpy`; PAV on the host.
    """
    if static.method in NATIVE_METHODS:
        # The strength's check in the rows' dtype, on the Python number (the solver sees an array).
        _validate.check_strength_in_dtype(static.regularization_strength, rows.dtype, jnp, static.method)
        lam = jnp.asarray(static.regularization_strength, dtype=rows.dtype)
        solver = _native_solver(op, static.k, static.p, static.method, static.max_iter, static.tol)
        y, residuals = solver(rows, lam)
        return (y, residuals) if with_residuals else y
    return _host_solver(op, static, with_residuals)(rows)


def _zero_tangent(value: jax.Array | None) -> Any:
    if value is None:
        return None
    if jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.zeros_like(value)
    return np.zeros(value.shape, dtype=jax.dtypes.float0)


def _tangent(op: _Operator, residuals: Any, rows_dot: jax.Array) -> jax.Array:
    if _host_products.serves(residuals, rows_dot):
        # The host route's residuals on the CPU: the core's Numba product, as a primitive JAX can transpose.
        return _host_products.host_product(op.kind, residuals, rows_dot)
    return op.jvp(residuals, rows_dot, axis=-1, xp=jnp)


def _make_operator(op: _Operator) -> tuple[Any, Any]:
    def solve(rows: jax.Array, static: Static) -> Any:
        return _solve(op, rows, static, with_residuals=True)

    solve = jax.custom_jvp(solve, nondiff_argnums=(1,))

    def solve_jvp(static: Static, primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
        # Reached only when the residuals themselves are differentiated, i.e. for second and higher
        # order derivatives of the operator.
        (rows,), (rows_dot,) = primals, tangents
        y, residuals = solve(rows, static)
        y_dot = _tangent(op, residuals, rows_dot)
        residuals_dot = type(residuals)(*(_zero_tangent(value) for value in residuals))
        if not static.piecewise_linear:
            # g' moves with x; the rest (orders, blocks, set codes, counts) is locally constant.
            q, lam = conjugate_exponent(static.p), static.regularization_strength
            gprime_dot = gprime_jvp_rows(op.kind, residuals, y_dot, lam, q, jnp)
            residuals_dot = with_gprime(residuals_dot, gprime_dot)
        return (y, residuals), (y_dot, residuals_dot)

    solve.defjvp(solve_jvp)

    def operator(rows: jax.Array, static: Static) -> jax.Array:
        return _solve(op, rows, static, with_residuals=False)

    operator = jax.custom_jvp(operator, nondiff_argnums=(1,))

    def operator_jvp(static: Static, primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
        (rows,), (rows_dot,) = primals, tangents
        y, residuals = solve(rows, static)
        return y, _tangent(op, residuals, rows_dot)

    operator.defjvp(operator_jvp)
    return operator, solve


soft_topk_mask_rows, _solve_mask = _make_operator(_MASK)
soft_topk_mask_rows.__doc__ = """`jax.custom_jvp`: soft top-k mask of (batch, n) rows (native or host solver)."""
soft_topk_mag_rows, _solve_mag = _make_operator(_MAG)
soft_topk_mag_rows.__doc__ = """`jax.custom_jvp`: soft top-k in magnitude of (batch, n) rows (native or host solver)."""
