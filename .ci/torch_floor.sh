#!/usr/bin/env bash
# The PyTorch tests on an older torch release, to check the floor that pyproject.toml declares for the `torch` extra.
#
#     bash .ci/torch_floor.sh 2.4.1         # 530 passed, 112 skipped (compile, Triton, CUDA and JAX cases) on 2026-12-07
#     bash .ci/torch_floor.sh 2.12.1 -n 2   # 711 passed, 46 skipped (CUDA and JAX cases); so 2.8.0, 2.9.1, 2.10.0, 2.11.0
#
# A virtual environment per version under ${TORCH_FLOOR_DIR:-/tmp/torch-floor}: that torch release from the
# package registry (a CUDA build of several GB on Linux x86_64: the tests run on the CPU) with the Triton it
# pins, the core's dependencies, no JAX; the checkout on PYTHONPATH; the torch test modules.
# Not part of CI: it downloads a torch release per version.
set -euo pipefail
version=${1:?usage: bash .ci/torch_floor.sh TORCH_VERSION [pytest arguments]}
shift
source "$(dirname "$0")/floor_env.sh"
dir=${TORCH_FLOOR_DIR:-/tmp/torch-floor}
python=$(floor_venv "$dir" "$version" "torch==$version" numpy numba array-api-compat \
    pytest pytest-xdist hypothesis scipy entmax mpmath)
PYTHONPATH="$root:$root/adapters" floor_pytest "$python" "$dir" \
    "$root/tests/test_torch_adapter.py" "$root/tests/test_torch_compile.py" "$root/tests/test_torch_func.py" \
    "$root/tests/test_torch_fused.py" "$root/tests/test_torch_host_products.py" "$root/tests/test_triton_rows.py" \
    "$root/tests/test_applications_torch.py" "$root/tests/test_second_order.py" "$root/tests/test_torch_support.py" -W "ignore:Please use \`torch.vmap\`:FutureWarning" "$@"
