"""The JAX adapter's host calls on the CPU: the core's Numba product (a primitive) against XLA's, and the
host calls writing XLA's buffers in place against copying results into them and against `jax.pure_callback`.

With the PAV route on the CPU, the tangent rule of the soft operators runs the
core's Numba product through a primitive with a transpose rule
(`topk_jax._host_products`) for calls of at least `HOST_PRODUCT_MIN_ENTRIES`
entries, and the product written against the Array API, compiled by XLA, for
smaller ones.  This script times the jitted forward + VJP (``jax.vjp`` of the
operator and its pullback of a cotangent of ones, in one `jax.jit`) both ways,
side by side in one process (best of interleaved runs after a warm-up), and
prints the largest difference between the two gradients.  A second table times
the jitted forward (no residuals) and forward + VJP with the host calls through
`jax.experimental.buffer_callback` (where JAX has it) handing the core XLA's
output buffers to write in place (as shipped), copying the core's results into
them, and, for the forward, through `jax.pure_callback`.

    python benchmarks/bench_jax_products.py                         # full table
    python benchmarks/bench_jax_products.py --quick                 # small shapes, a smoke run
    python benchmarks/bench_jax_products.py --write docs/jax.md     # and update the docs page
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from _report import interleaved_times, machine, table_parser, table_size, write_section

import topk_jax as tk
from topk_jax import _host_call, _host_products

CALLBACK_SHAPES = [(64, 16), (4096, 64), (16384, 64), (262144, 16)]
SHAPES = [(64, 16), (1024, 16), (256, 256), (4096, 64), (16384, 64), (64, 4096), (1, 10**6), (262144, 16)]
QUICK_SHAPES = [(64, 16), (1024, 16)]
STRENGTH = 0.1


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of every callable; rounds interleave them, so load drift hits all alike."""
    return interleaved_times(fns, repeats, min)


def _cases(shapes: list[tuple[int, int]], seed: int) -> Iterator[tuple[tuple[int, int], jax.Array, int, str]]:
    """(shape, float32 normal rows, k = n/10, operator) for every shape and both operators."""
    rng = np.random.default_rng(seed)
    for shape in shapes:
        x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        for op in ("mask", "mag"):
            yield shape, x, max(1, shape[1] // 10), op


def forward_and_pullback(op: str, k: int, host: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The jitted forward + VJP, its product through the primitive (`host`) or compiled by XLA; the choice is
    made while tracing, on the first call."""
    fn = getattr(tk, f"soft_topk_{op}")

    def run(x: jax.Array, u: jax.Array) -> jax.Array:
        rule, least = _host_products.serves, _host_products.HOST_PRODUCT_MIN_ENTRIES
        if host:
            _host_products.HOST_PRODUCT_MIN_ENTRIES = 0  # whatever the size
        else:
            _host_products.serves = lambda *args: False
        try:
            return jax.vjp(lambda t: fn(t, k, regularization_strength=STRENGTH), x)[1](u)[0]
        finally:
            _host_products.serves, _host_products.HOST_PRODUCT_MIN_ENTRIES = rule, least

    return jax.jit(run)


def forward(op: str, k: int, route: str, pullback: bool = False) -> Callable[..., jax.Array]:
    """The jitted forward (with `pullback`: forward + VJP of a cotangent), its host calls through
    `buffer_callback` writing XLA's buffers in place (`route` "in place", as shipped), copying results into
    them ("copied"), or through `jax.pure_callback` ("pure"); the route is fixed while tracing, on the
    first call."""
    fn = getattr(tk, f"soft_topk_{op}")

    def run(x: jax.Array, u: jax.Array) -> jax.Array:
        shipped = _host_call._buffer_callback, _host_call.WRITE_IN_PLACE
        _host_call.WRITE_IN_PLACE = route == "in place"
        if route == "pure":
            _host_call._buffer_callback = None
        try:
            if not pullback:
                return fn(x, k, regularization_strength=STRENGTH)
            return jax.vjp(lambda t: fn(t, k, regularization_strength=STRENGTH), x)[1](u)[0]
        finally:
            _host_call._buffer_callback, _host_call.WRITE_IN_PLACE = shipped

    return jax.jit(run)


CALLBACK_ROUTES = ("in place", "copied", "pure")


def callback_table(out: Callable[[str], None], shapes: list[tuple[int, int]], repeats: int) -> None:
    out("")
    out(f"The jitted forward and forward + VJP (float32, k = n/10, p = 4/3, l = {STRENGTH}), best of {repeats} "
        "interleaved runs, with the host calls through `buffer_callback` writing XLA's output buffers in place "
        "(as shipped), through `buffer_callback` copying the results into them, and through `jax.pure_callback`.")
    out("")
    out("| shape | operator | forward in place (ms) | copied (ms) | pure_callback (ms) | in place / copied "
        "| in place / pure | fwd+VJP in place (ms) | copied (ms) | in place / copied |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for shape, x, k, op in _cases(shapes, 1):
        u = jnp.ones_like(x)
        calls = {(route, pullback): forward(op, k, route, pullback)
                 for route in CALLBACK_ROUTES for pullback in (False, True) if not (pullback and route == "pure")}
        t = best_times({key: lambda f=f, x=x, u=u: f(x, u).block_until_ready() for key, f in calls.items()},
                       repeats)
        fwd = [t[route, False] * 1e3 for route in CALLBACK_ROUTES]
        both = [t[route, True] * 1e3 for route in CALLBACK_ROUTES[:2]]
        out(f"| {shape} | {op} | {fwd[0]:.3f} | {fwd[1]:.3f} | {fwd[2]:.3f} | {fwd[0] / fwd[1]:.2f} "
            f"| {fwd[0] / fwd[2]:.2f} | {both[0]:.3f} | {both[1]:.3f} | {both[0] / both[1]:.2f} |")


def main() -> None:
    parser = table_parser(__doc__, 15)
    args = parser.parse_args()
    shapes, repeats = table_size(args, SHAPES, QUICK_SHAPES)
    lines: list[str] = []
    out = lines.append
    out(f"Machine: {machine()}, jax {jax.__version__} on {jax.default_backend()}.")
    out(f"float32, k = n/10, p = 4/3, l = {STRENGTH}: `jax.vjp` and the pullback of a cotangent of ones in one "
        f"`jax.jit`, best of {repeats} interleaved runs after a warm-up. As shipped, calls of "
        f"{_host_products.HOST_PRODUCT_MIN_ENTRIES} entries or more take the Numba product.")
    out("")
    out("| shape | operator | Numba product (ms) | XLA product (ms) | Numba / XLA | max abs diff |")
    out("|---|---|---|---|---|---|")
    for shape, x, k, op in _cases(shapes, 0):
        u = jnp.ones_like(x)
        host, xla = forward_and_pullback(op, k, True), forward_and_pullback(op, k, False)
        diff = float(jnp.max(jnp.abs(host(x, u) - xla(x, u))))
        t = best_times({"host": lambda host=host, x=x, u=u: host(x, u).block_until_ready(),
                        "xla": lambda xla=xla, x=x, u=u: xla(x, u).block_until_ready()}, repeats)
        out(f"| {shape} | {op} | {t['host'] * 1e3:.3f} | {t['xla'] * 1e3:.3f} | {t['host'] / t['xla']:.2f} "
            f"| {diff:.1e} |")
    if _host_call._buffer_callback is not None:
        callback_table(out, CALLBACK_SHAPES[:1] if args.quick else CALLBACK_SHAPES, repeats)
    print("\n".join(lines))
    if args.write:
        write_section(args.write, "bench_jax_products", "\n".join(lines))


if __name__ == "__main__":
    main()
