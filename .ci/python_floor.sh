#!/usr/bin/env bash
# The tests on the oldest Python that pyproject.toml declares (requires-python), with the newest releases of the
# dependencies that install there.
#
#     bash .ci/python_floor.sh       # 3762 passed, 348 skipped (JAX, CUDA, AVX2-only cases), 3 xfailed on 2026-12-07
#                                    # (Python 3.10.13; numpy 2.2.6, numba 0.68.1, torch 2.13.0, triton 3.7.1)
#     PYTHON310=/path/to/python3.10 bash .ci/python_floor.sh -x
#
# JAX is not installed: jaxlib's last release for Python 3.10 is 0.6.2, below the `jax` extra's floor (0.10.1),
# so `pip install "sparse-topk[jax]"` needs Python 3.11 or newer; its tests skip here.  torch==2.13.0 comes from
# the package registry (a CUDA build of several GB on Linux x86_64; the tests run on the CPU).
# A virtual environment under ${PYTHON_FLOOR_DIR:-/tmp/python-floor}; the checkout installed into it, editable.
# Not part of CI: it downloads a second torch.
set -euo pipefail
source "$(dirname "$0")/floor_env.sh"
dir=${PYTHON_FLOOR_DIR:-/tmp/python-floor}
FLOOR_PYTHON=
for candidate in ${PYTHON310:-} python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
        FLOOR_PYTHON=$candidate
        break
    fi
done
[ -n "$FLOOR_PYTHON" ] || { echo "python_floor.sh: no Python 3.10 found (set PYTHON310)" >&2; exit 2; }
export FLOOR_PYTHON
python=$(floor_venv "$dir" py310 torch==2.13.0 numpy numba array-api-compat array-api-strict \
    pytest pytest-xdist hypothesis scipy mpmath entmax matplotlib triton editables)
floor_core_tests "$python" "$dir" "$@"
