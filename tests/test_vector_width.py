"""The CPU kernels ask LLVM for 512-bit vectors (`topk_core._pav.vector_width`).

The attribute is checked in each kernel's LLVM IR (any host), and on a host
with AVX-512 in its machine code too: a kernel that lost its
`prefer_wide_vectors()` call would compile to 256-bit vectors again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numba as nb
import numpy as np
import pytest

import topk_core as tc
from topk_core._pav import kernels, lanes, products, select, sortfree
from topk_core._pav.vector_width import (
    PREFERRED_VECTOR_BITS,
    host_features,
    host_has,
    target_features,
    unfolded_one,
)

ATTRIBUTE = f'"prefer-vector-width"="{PREFERRED_VECTOR_BITS}"'

# (name, dispatcher): every kernel whose loops the attribute widens.  Parallel variants compile their
# prange bodies into functions of their own, which carry the attribute too; those of `lanes.lane_rows`
# and `select._select_rows` call one function per chunk (`_lane_chunk`, `_select_chunk`) in both variants.
KERNELS = [
    ("lanes._lane_chunk", lanes._lane_chunk),
    ("lanes._pass", lanes._pass),
    ("lanes._lane_outputs", lanes._lane_outputs),
    ("lanes._update", lanes._update),
    ("lanes._confirm", lanes._confirm),
    ("lanes._start", lanes._start),
    ("lanes._cubic_start", lanes._cubic_start),
    ("lanes._absolute_frame", lanes._absolute_frame),
    ("lanes.sweep_order_statistics", lanes.sweep_order_statistics),
    ("lanes._row_outputs", lanes._row_outputs),
    ("lanes._mag_row_values", lanes._mag_row_values),
    ("lanes._mag_rows", lanes._mag_rows),
    ("sortfree.row_sums", sortfree.row_sums),
    ("sortfree._mask_values", sortfree._mask_values),
    ("sortfree._mag_values", sortfree._mag_values),
    ("sortfree._free_derivatives", sortfree._free_derivatives),
    ("sortfree._mag_residuals", sortfree._mag_residuals),
    ("products._mask_rows (parallel)", products._mask_rows.parallel),
    ("products._mag_rows (parallel)", products._mag_rows.parallel),
    ("products._mask_rows (serial)", products._mask_rows.serial),
    ("products._mag_rows (serial)", products._mag_rows.serial),
    ("products._short_mag_vjp_rows (parallel)", products._short_mag_vjp_rows.parallel),
    ("products._short_mag_vjp_rows (serial)", products._short_mag_vjp_rows.serial),
    ("products._short_mag_jvp_rows (parallel)", products._short_mag_jvp_rows.parallel),
    ("products._short_mag_jvp_rows (serial)", products._short_mag_jvp_rows.serial),
    ("select._select_chunk", select._select_chunk),
    ("select.lane_order_statistics (parallel)", select.lane_order_statistics.parallel),
    ("kernels._flat_keys (parallel)", kernels._flat_keys.parallel),
]


# The kernels called from Python; the others are called from these (compiled with them).
TOP_LEVEL = [lanes.lane_rows.serial, lanes.lane_rows.parallel, products._mask_rows.serial,
             products._mask_rows.parallel, products._mag_rows.serial, products._mag_rows.parallel,
             products._short_mag_vjp_rows.serial, products._short_mag_vjp_rows.parallel,
             products._short_mag_jvp_rows.serial, products._short_mag_jvp_rows.parallel,
             select._select_rows.serial, select._select_rows.parallel, select.lane_order_statistics.parallel,
             kernels._flat_keys.parallel]


@dataclass(frozen=True)
class _CompiledHere:
    """One signature of a kernel that this process compiled (rather than loaded from the cache): its
    IR and machine code are at hand, as for a kernel compiled afresh."""

    dispatcher: nb.core.registry.CPUDispatcher
    signature: tuple

    def inspect_llvm(self) -> dict:
        return {self.signature: self.dispatcher.inspect_llvm(self.signature)}

    def inspect_asm(self) -> dict:
        return {self.signature: self.dispatcher.inspect_asm(self.signature)}


def _loaded_from_cache(dispatcher, signature) -> bool:
    # Numba keeps no IR of code that it loads from its cache (and warns when asked for it).
    return dispatcher.overloads[signature].library._disable_inspection


def _fresh(dispatcher):
    """`dispatcher` for one signature of the fixture's calls, with its IR and machine code: as compiled
    by this process if it was (a cold cache, as on CI), else compiled again without the cache.
    Compiling a kernel compiles, or loads, the kernels it calls: their signatures are known afterwards.

    One signature is enough: the attribute and the machine-code patterns checked here do not depend on
    what the float64 signatures differ in (an omitted default, the layout of an argument).  Compiling
    every one, the fixture's setup took 328 s in the suite (`--durations`), `lane_rows`' parallel
    variant alone 76 s for its two signatures standalone.  The one taken, whatever tests ran before on
    the worker: one with C-contiguous arrays, among those one compiled here, then the first by name."""
    candidates = sorted(
        filter(_of_the_fixture, dispatcher.signatures),
        key=lambda sig: (not _contiguous(sig), _loaded_from_cache(dispatcher, sig), str(sig)),
    )
    if candidates and not _loaded_from_cache(dispatcher, candidates[0]):
        return _CompiledHere(dispatcher, candidates[0])
    options = {key: value for key, value in dispatcher.targetoptions.items() if key not in ("cache", "nopython")}
    fresh = nb.njit(**options)(dispatcher.py_func)
    if candidates:
        fresh.compile(candidates[0])
    return fresh


def _contiguous(signature):
    return all(a.layout == "C" for a in signature if isinstance(a, nb.types.Array))


def _of_the_fixture(signature):
    """Whether a signature can come from the fixture's calls: float64 arrays.  Tests run before it in
    the same process add float32 ones."""
    return not any(isinstance(a, nb.types.Array) and a.dtype == nb.types.float32 for a in signature)


@pytest.fixture(scope="module")
def fresh_kernels():
    """Run the public operators on inputs that reach every kernel above, in both compilations; then
    return each kernel with its IR and machine code (`_fresh`: as compiled by these calls, or compiled
    afresh), by `id` of its dispatcher (top-level kernels first, which gives the others their
    signatures)."""
    rng = np.random.default_rng(0)
    cases = [
        ((16, 16), 3, 2.0),  # lanes, serial
        ((8192, 16), 3, 2.0),  # lanes, parallel
        ((8192, 16), 3, 4.0 / 3.0),  # lanes with the cubic start
        ((1024, 64), 8, 2.0),  # lanes writing the outputs row by row
        ((4, 3000), 40, 2.0),  # sort-free rows
        ((8192, 16), 10, 2.0),  # k + 1 beyond the lanes' own sweeps: lane_order_statistics
        ((8192, 16), 3, 1.5),  # neither lanes nor sort-free: the selection kernel
        ((4, 16), 3, 1.5),
    ]
    for shape, k, p in cases:
        x = rng.normal(size=shape)
        for op in ("mask", "mag"):
            getattr(tc, f"soft_topk_{op}")(x, k, p=p, regularization_strength=0.1)  # no residuals
            _, res = getattr(tc, f"soft_topk_{op}_forward")(x, k, p=p, regularization_strength=0.1)
            getattr(tc, f"{op}_vjp_from_residuals")(res, x)
            getattr(tc, f"{op}_jvp_from_residuals")(res, x)
    fresh = {}
    # Callers before callees: a caller loaded from the cache leaves its callees uncompiled, a fresh
    # compilation of it gives them their signatures.
    chain = [*TOP_LEVEL, lanes._lane_chunk, select._select_chunk, select._sortfree_row, select.sortfree_iterate,
             sortfree.emit_row]
    for dispatcher in chain + [d for _, d in KERNELS if d not in chain]:
        fresh[id(dispatcher)] = _fresh(dispatcher)
    return fresh


@pytest.mark.parametrize(("name", "dispatcher"), KERNELS, ids=[name for name, _ in KERNELS])
def test_kernels_prefer_512_bit_vectors(fresh_kernels, name, dispatcher):
    irs = list(fresh_kernels[id(dispatcher)].inspect_llvm().values())
    assert irs, f"{name} was not compiled by the calls of the fixture"
    for ir in irs:
        assert ATTRIBUTE in ir, f"{name} lacks {ATTRIBUTE}"


def test_a_kernel_without_the_call_lacks_the_attribute():
    # The check above can fail: a loop compiled without `prefer_wide_vectors()` has no attribute.
    def plain_sum(a):
        s = 0.0
        for i in range(a.shape[0]):
            s += a[i]
        return s

    kernel = nb.njit(plain_sum)
    kernel(np.ones(4))
    assert ATTRIBUTE not in next(iter(kernel.inspect_llvm().values()))


# What the kernels were compiled for (`target_features`: the host's, or NUMBA_CPU_FEATURES, `.ci/avx2_codegen.sh`).
TARGET = target_features()


@pytest.mark.skipif(not host_has("avx512f", TARGET), reason="needs a CPU with AVX-512")
def test_a_product_kernel_uses_512_bit_registers_on_an_avx512_host(fresh_kernels):
    assert all("zmm" in asm for asm in fresh_kernels[id(products._mask_rows.serial)].inspect_asm().values())


def test_the_host_check_reads_the_sign_of_a_feature():
    # "-avx512f" (a host without it) must not count: the skip above once tested the bare name.
    features = ["+sse2", "-avx512f", "+avx2"]
    assert host_has("sse2", features) and host_has("avx2", features)
    assert not host_has("avx512f", features)
    assert not host_has("no-such-feature")
    assert all(f[:1] in "+-" for f in host_features() if f)


# A vector store under a mask: AVX's `vmaskmovps`/`vmaskmovpd` (memory last, in AT&T syntax).
MASKED_STORE = re.compile(r"vmaskmovp[sd]\s+%[xy]mm\d+, %[xy]mm\d+, [^%\s]")
# The masked stores that cost are AVX's (`vmaskmovps`); AVX-512 hosts, whose opmask stores were not
# measured slow, are not checked.
needs_masked_stores = pytest.mark.skipif(not host_has("avx", TARGET) or host_has("avx512f", TARGET),
                                         reason="needs an x86 CPU with AVX but not AVX-512")


def _machine_code(fresh_kernels, name, dispatcher):
    """The assembly of the kernel `dispatcher` as the fixture holds it (at least one signature)."""
    asms = list(fresh_kernels[id(dispatcher)].inspect_asm().values())
    assert asms, f"{name} was not compiled by the calls of the fixture"
    return asms


# Every kernel above stores plainly.  Masked stores come from stores the compiler makes conditional:
# a select that may store back what it read from the same place (the sweeps' running maxima, the
# magnitude's x on A, the lanes' state where a lane keeps its values: `vector_width.unfolded_one`),
# and a store under a flag read at run time (`with_residuals`, `is_mag`, the sweeps' `last`: each
# kernel's loops take such flags as constants).  On this AVX2 host (AMD EPYC) the masked stores of
# the outputs' pass alone took the mask's forward to 1.5x its time.
@needs_masked_stores
@pytest.mark.parametrize(("name", "dispatcher"), KERNELS, ids=[name for name, _ in KERNELS])
def test_kernels_store_without_masked_stores(fresh_kernels, name, dispatcher):
    for asm in _machine_code(fresh_kernels, name, dispatcher):
        assert not MASKED_STORE.search(asm), name


@needs_masked_stores
def test_a_folded_one_lets_the_store_become_masked():
    # Why `unfolded_one` hides its 1 from the compiler: a 1 it can fold (here from the size of an array
    # allocated in the function) is multiplied away, and the store is masked again.
    def running_max(column):
        tops = np.full(64, -np.inf)
        unit = tops.dtype.type(tops.size > 0)
        for i in range(64):
            a = tops[i]
            tops[i] = a * unit if a > column[i] else column[i]
        return tops

    def opaque_running_max(column):
        tops = np.full(64, -np.inf)
        unit = unfolded_one(tops)
        for i in range(64):
            a = tops[i]
            tops[i] = a * unit if a > column[i] else column[i]
        return tops

    asms = []
    for fn in (running_max, opaque_running_max):
        kernel = nb.njit(fn)
        np.testing.assert_array_equal(kernel(np.arange(64.0)), np.arange(64.0))
        asms.append(next(iter(kernel.inspect_asm().values())))
    assert MASKED_STORE.search(asms[0]) and not MASKED_STORE.search(asms[1])


@needs_masked_stores
def test_an_in_place_select_compiles_to_a_masked_store():
    # The check above can fail: the same loop storing back the value it read gets a masked store.
    def running_max(tops, column):
        for i in range(tops.shape[0]):
            a = tops[i]
            tops[i] = a if a > column[i] else column[i]

    kernel = nb.njit(running_max)
    kernel(np.zeros(64, dtype=np.float32), np.ones(64, dtype=np.float32))
    assert MASKED_STORE.search(next(iter(kernel.inspect_asm().values())))


# A division of 4 (ymm) or 8 (zmm) float64 lanes at once.
PACKED_DIVISION = re.compile(r"vdivpd\s+[^\n]*%[yz]mm")
# The lane solver's per-group steps, one Newton or closed-form division per lane: each loop has the
# exponent as a constant (`lanes._update`); with q read at run time they compiled to scalar divisions
# on an AVX2 host.
LANE_STEPS = [("lanes._update", lanes._update), ("lanes._start", lanes._start)]


@pytest.mark.skipif(not host_has("avx", TARGET), reason="needs an x86 CPU with AVX")
@pytest.mark.parametrize(("name", "dispatcher"), LANE_STEPS, ids=[name for name, _ in LANE_STEPS])
def test_the_lane_steps_divide_whole_vectors(fresh_kernels, name, dispatcher):
    for asm in _machine_code(fresh_kernels, name, dispatcher):
        assert PACKED_DIVISION.search(asm), f"{name} divides one lane at a time"
