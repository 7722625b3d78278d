"""Run an operator shard by shard, so that the host callback sees local rows.

The operators act on each slice along `axis` independently, so a sharding of
the *other* axes (the batch) can be kept: every device processes its local
rows.  `jax.pure_callback` alone cannot do that under automatic sharding: XLA
gives the callback a maximal sharding, gathers the whole array onto one
device, runs the host function once there, and leaves the result on that
device (or replicates it).  So the adapter wraps the computation in
`jax.shard_map` whenever a mesh is known while tracing:

* explicit axes (`jax.sharding.AxisType.Explicit`, the default of
  `jax.make_mesh`): the sharding is part of the array's type; the operator
  runs under `jax.shard_map` with exactly that sharding, and the output keeps
  it.  If `axis` itself is sharded, the array is first resharded so that
  `axis` is whole on every device (the output is then sharded like that).
* automatic axes: the input's sharding is unknown while tracing, but the mesh
  is; the host solve (`leading=True`) shards the leading (batch) axis of its
  rows over all automatic mesh axes when their number of devices divides it,
  and XLA moves the data to match.  Otherwise (or without a mesh) the
  callback runs once on the whole array.
* inside a `jax.shard_map` (manual axes) the data is already local: run as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = ["per_shard"]


def per_shard(fn: Callable[[jax.Array], Any], x: jax.Array, axis: int, *, leading: bool = False) -> Any:
    """`fn(x)`, run once per device on local data when `x` lives on a known mesh.

    `fn` must act on every slice along `axis` independently and return arrays
    (or a pytree of arrays) shaped like `x`.  With ``leading=True`` the leading
    axis is also sharded over the automatic axes of the mesh (see the module
    docstring).
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return fn(x)
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    free = tuple(name for name, kind in kinds.items() if kind != AxisType.Manual)
    if not free:  # inside a shard_map over every axis: the data is already local
        return fn(x)
    explicit = all(kinds[name] == AxisType.Explicit for name in free)
    spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
    if spec[axis] is not None:
        spec[axis] = None
        x = jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*spec)))
    keep = NamedSharding(mesh, PartitionSpec(*spec))
    if leading and axis != 0 and spec[0] is None:
        used = {name for entry in spec if entry is not None for name in _names(entry)}
        spare = tuple(
            name for name in free if name not in used and (explicit or kinds[name] == AxisType.Auto)
        )
        if spare and x.shape[0] % math.prod(mesh.shape[name] for name in spare) == 0:
            spec[0] = spare
    pspec = PartitionSpec(*spec)
    if all(entry is None for entry in spec):
        if not leading:
            return fn(x)
        if len(free) == len(kinds):
            # Nothing to split: one host call on the whole array.  Pin the
            # result to the input's (replicated) sharding rather than leaving
            # it on the single device where XLA ran the callback.
            return _constrain(fn(x), keep)
        # Partly inside a shard_map: callbacks need every axis manual, so each
        # device solves its (replicated) copy.
    if explicit and pspec != keep.spec:
        x = jax.sharding.reshard(x, NamedSharding(mesh, pspec))
    # check_vma=False: the outputs of `jax.pure_callback` carry no varying-axes
    # annotation, which the custom JVP's primal/tangent type check would reject.
    out = jax.shard_map(
        fn, mesh=mesh, in_specs=pspec, out_specs=pspec, axis_names=frozenset(free), check_vma=False
    )(x)
    return _constrain(out, keep) if explicit and pspec != keep.spec else out


def _names(entry: Any) -> tuple[str, ...]:
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _constrain(out: Any, sharding: NamedSharding) -> Any:
    if all(kind == AxisType.Explicit for kind in sharding.mesh.axis_types):
        return jax.tree.map(lambda a: jax.sharding.reshard(a, sharding), out)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), out)
