"""The width of the SIMD vectors the compiler may use in the CPU kernels: `prefer_wide_vectors`.

On most x86 CPUs with AVX-512, LLVM's tuning prefers 256-bit vectors (older
such CPUs lower their clock on 512-bit instructions), so loops that could
take 16 float32 or 8 float64 lanes per instruction take half as many.  Numba
lifts that preference only for the whole process (`NUMBA_CPU_FEATURES`,
which changes every function it compiles); LLVM also reads it per function,
from the function attribute ``"prefer-vector-width"``.  A kernel that calls
`prefer_wide_vectors()` gets that attribute, and with it 512-bit vectors
where the CPU has them: measured on an Intel Xeon with AVX-512, the short-row
forwards took 0.8-0.9x their time and the forward+VJP of the magnitudes
0.8-0.85x (docs/faq.md).  On CPUs without 512-bit registers it changes
nothing: the compiler never uses a vector wider than the target's.

The attribute belongs to the LLVM function being compiled, so the call must
be in the function whose loops it widens: in a kernel's body, and inside the
body of a `prange` loop, which the parallel compilation moves into a function
of its own.  A kernel that Numba inlines (``inline="always"``) inherits its
caller's.  `tests/test_vector_width.py` checks the attribute on the kernels.

`unfolded_one` keeps a select that may store back what it read from becoming a
masked store (slow on CPUs with AVX2 only); `host_features` and `host_has` tell
what the host's vectors are (benchmarks and tests).
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba as nb
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

PREFERRED_VECTOR_BITS = 512
_ATTRIBUTE = f'"prefer-vector-width"="{PREFERRED_VECTOR_BITS}"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Mark the function being compiled with LLVM's ``"prefer-vector-width"="512"`` (no code is emitted)."""

    def codegen(context, builder, signature, args):
        # llvmlite's attribute set admits keyword attributes only; a key="value" attribute is
        # written into the function's definition as it stands, which LLVM's parser accepts.
        set.add(builder.function.attributes, _ATTRIBUTE)
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _opaque_one(typingctx):
    """The integer 1 passed through an empty inline assembly statement, which the optimizer cannot see
    through (no instruction is emitted; the constraint names a general register, as on every target)."""

    def codegen(context, builder, signature, args):
        int64 = llvm_ir.IntType(64)
        return builder.asm(llvm_ir.FunctionType(int64, [int64]), "", "=r,0", [llvm_ir.Constant(int64, 1)],
                           side_effect=False)

    return types.int64(), codegen


@nb.njit(cache=True, inline="always")
def unfolded_one(a):
    """1 in the dtype of array `a`: a 1 the compiler cannot fold.

    A select that may store back the value just read from the same place,
    ``buf[i] = new if cond else buf[i]``, is compiled as a store of `new` where `cond`
    holds only: in a vectorized loop, a masked store.  On CPUs with AVX2 but not
    AVX-512 that is `vmaskmovps`/`vmaskmovpd`, microcoded, and in some processes
    (by where the buffers lie) it took many times the time of a plain store: on an
    AMD EPYC (Zen 3), the sweeps of `lanes.sweep_order_statistics` took 3-7x their
    time in such processes (timed alone and in `perf` profiles; docs/faq.md).
    ``buf[i] * unfolded_one(buf)`` in that branch is exact (infinities and NaN
    included) and no longer the value read, so the store is plain (a blend).

    The 1 comes out of an empty inline assembly statement (`_opaque_one`): one
    derived from the array's size (``size > 0``) was folded where the array was
    allocated in the same function with a known size (the sweeps' running
    maxima, inlined into `lanes.lane_rows`), which made their stores masked again.
    """
    return a.dtype.type(_opaque_one())


def host_features() -> list[str]:
    """The host CPU's features as LLVM (Numba's compiler) lists them: every feature it knows,
    ``"+name"`` where the host has it and ``"-name"`` where not."""
    return llvm.get_host_cpu_features().flatten().split(",")


def target_features() -> list[str]:
    """The CPU features Numba compiles for, listed as `host_features` lists them: ``NUMBA_CPU_FEATURES``
    where it is set (with ``NUMBA_CPU_NAME``, code for another CPU: `.ci/avx2_codegen.sh` checks the AVX2
    code of the kernels on an AVX-512 host), else the host's."""
    configured = nb.config.CPU_FEATURES
    return configured.split(",") if configured else host_features()


def host_has(feature: str, features: list[str] | None = None) -> bool:
    """Whether the host (or the list `features`, as `host_features` gives it) has `feature`, e.g. "avx512f".

    The sign decides: the bare name is in the list of a host without it too ("-avx512f").
    """
    return f"+{feature}" in (host_features() if features is None else features)
