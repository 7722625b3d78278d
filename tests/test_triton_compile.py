"""The Triton kernels compile for NVIDIA GPUs, checked on any Linux machine (`_triton_rows.compile_ahead`).

Triton's interpreter (tests/test_triton_rows.py) runs the kernels' Python on
NumPy: it cannot show that Triton's compiler accepts them (float64
arithmetic, ``tl.sort`` of float64 rows, the loops, conversions from and to
the input's dtype) or what ``ptxas`` makes of them.  The compiler and the
``ptxas`` of Triton's wheel compile for a GPU architecture without a GPU; the
compilation runs in a subprocess, since this process imported the kernels
under the interpreter where there is no CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton", minversion="3.2")

from ._torch_helpers import triton_compiler_environment

# (operator, n, p's conjugate exponent q, Triton dtype, residuals): every exponent mode of both
# kernels, both dtypes they receive (the adapter computes float16 and bfloat16 in float32), the
# shortest and longest rows, with and without residuals.
VARIANTS = [
    *[(op, 64, q, "fp32", True) for op in ("mask", "mag") for q in (2.0, 4.0, 3.0)],
    *[(op, 16, 3.0, "fp64", False) for op in ("mask", "mag")],
    *[(op, 4096, 4.0, "fp64", True) for op in ("mask", "mag")],
]
# sm_90: H100, H200; sm_80: A100 (the general exponent mode, both dtypes).
ARCHITECTURES = {90: VARIANTS, 80: [v for v in VARIANTS if v[2] == 3.0]}

_COMPILE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from topk_core import _triton_rows
arch, variants = json.loads(sys.argv[1])
for op, n, q, dtype, residuals in variants:
    kernel = _triton_rows.compile_ahead(op, n, q, dtype, arch, residuals)
    print(json.dumps([op, n, q, dtype, residuals, len(kernel.asm["cubin"])]), flush=True)
"""


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_kernels_compile_for_the_gpu(arch):
    variants = ARCHITECTURES[arch]
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([arch, variants])],
                          env=triton_compiler_environment(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = [json.loads(line) for line in done.stdout.splitlines()]
    assert [tuple(c[:5]) for c in compiled] == [tuple(v) for v in variants]
    assert all(size > 10_000 for *_, size in compiled)  # a cubin with the kernel's code in it
