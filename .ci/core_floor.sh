#!/usr/bin/env bash
# The core, NumPy and PyTorch tests on the oldest releases of the core's dependencies that pyproject.toml
# declares (numpy, numba, array-api-compat; array-api-strict of the test extra), beside torch 2.13.0.
#
#     bash .ci/core_floor.sh          # 3646 passed, 348 skipped, 3 xfailed on 2026-12-07 (no JAX: its tests skip)
#     bash .ci/core_floor.sh -x -q    # pytest arguments
#
# Found by this check on 2026-12-07, and raised: numpy 1.26 ran the threshold method's float32 rows in float64
# (value-based casting of float32's largest value) and returned float64 residuals; numba 0.60 divides the
# lane kernels' rows one lane at a time; array-api-compat 1.11 to 1.15 wrap torch without count_nonzero's
# keepdims (1.11) or Python scalars in maximum/minimum (to 1.15); array-api-strict 2.2 lacks the 2024.12
# functions the core uses (count_nonzero, take_along_axis).
# A virtual environment under ${CORE_FLOOR_DIR:-/tmp/core-floor}; the checkout installed into it, editable.
# Not part of CI: it installs a second environment.
set -euo pipefail
source "$(dirname "$0")/floor_env.sh"
dir=${CORE_FLOOR_DIR:-/tmp/core-floor}
# torch==2.13.0 named: the local CPU wheel, not a CUDA build.
python=$(floor_venv "$dir" floor torch==2.13.0 "numpy==2.0.2" "numba==0.61.0" "array-api-compat==1.16" \
    "array-api-strict==2.3.1" pytest pytest-xdist hypothesis scipy mpmath entmax matplotlib editables)
# (No Triton here: its kernels' module is left out.)
floor_core_tests "$python" "$dir" --ignore="$root/topk_core/_triton_rows.py" "$@"
