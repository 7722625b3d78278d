#!/usr/bin/env bash
# The machine-code checks of tests/test_vector_width.py for a CPU with AVX2 but not AVX-512 (most AMD EPYC
# and Ryzen before Zen 4), run on any x86 host: Numba compiles for Haswell's features
# (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES; `vector_width.target_features` reads them), so the checks that an
# AVX-512 host skips (no masked stores, whole-vector divisions) read AVX2 code.  They read the code only: the
# kernels' speed on such a CPU is measured there (docs/methods.md, "The same on a CPU without AVX-512").
#
#     bash .ci/avx2_codegen.sh        # 62 passed, 1 skipped (the AVX-512 check) on 2026-12-07
#
# Numba's cache goes to a folder of its own (${AVX2_CACHE_DIR:-/tmp/avx2-codegen-cache}): code for another
# CPU must not reach the checkout's cache.  Not part of CI (`make test` runs the checks for the host's CPU).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-$root/.venv/bin/python}
export NUMBA_CPU_NAME=haswell
export NUMBA_CPU_FEATURES="+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,\
+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512vl,-avx512bw,-avx512dq,-avx512cd"
export NUMBA_CACHE_DIR=${AVX2_CACHE_DIR:-/tmp/avx2-codegen-cache}
cd "$root"
"$python" -m pytest -q -p no:cacheprovider tests/test_vector_width.py "$@"
