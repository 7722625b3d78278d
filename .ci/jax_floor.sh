#!/usr/bin/env bash
# The JAX tests on an older JAX release, to check the floor that pyproject.toml declares for the `jax` extra.
#
#     bash .ci/jax_floor.sh 0.10.1          # 434 passed, 36 skipped (torch-only cases) on 2026-12-08
#     bash .ci/jax_floor.sh 0.9.1           # 1 failure: test_auto_rule_for_tracers (no AbstractDevice.platform)
#
# A virtual environment per version under ${JAX_FLOOR_DIR:-/tmp/jax-floor} (jax, jaxlib and the core's
# dependencies from the package registry, no torch), the checkout on PYTHONPATH, the JAX test modules.
# Not part of CI: it downloads a JAX release per version.
set -euo pipefail
version=${1:?usage: bash .ci/jax_floor.sh JAX_VERSION [pytest arguments]}
shift
source "$(dirname "$0")/floor_env.sh"
dir=${JAX_FLOOR_DIR:-/tmp/jax-floor}
python=$(floor_venv "$dir" "$version" "jax==$version" "jaxlib==$version" numpy numba array-api-compat \
    pytest hypothesis ml_dtypes scipy mpmath)
PYTHONPATH="$root:$root/adapters" floor_pytest "$python" "$dir" \
    "$root/tests/test_jax_adapter.py" "$root/tests/test_jax_methods.py" "$root/tests/test_jax_host_products.py" \
    "$root/tests/test_jax_sharding.py" "$root/tests/test_applications_jax.py" "$root/tests/test_second_order.py" \
    "$root/tests/test_fp_mode.py" "$@"
